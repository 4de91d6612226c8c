"""Every Redis key, pub/sub channel and arq job id format used by drainctl.

This module promises that no other module spells a key or a job id by hand: anything that reads or
writes Redis asks here, so a format changes in one place and two parts can never disagree about a
name. It is pure string formatting: no I/O, no Redis client, no clock.

Layout (``{id}`` is substituted, ``{{...}}`` below is a literal Redis Cluster hash tag):

==============================================  =====================================================
``drainctl:drain:{id}``                         drain record (hash)
``drainctl:drain:{id}:events``                  drain event stream
``drainctl:drain:{id}:vms``                     per-VM records of one drain (hash)
``drainctl:drain:{id}:nodes``                   per-node records of one drain (hash)
``drainctl:drain:{id}:lock``                    lock of the advance step of one drain
``drainctl:drain:{id}:plan``                    the plan a drain was submitted with (JSON)
``drainctl:tune:kubevirt``                      KubeVirt migration settings saved by a tuned drain (JSON)
``drainctl:drain:{id}:priorities``              semaphore priority of each running node of one drain (hash)
``drainctl:drains``                             index of drains (zset)
``drainctl:node:{node}:drain``                  which drain owns a node (node lock)
``drainctl:node:{node}:transfers``              the last migrations seen leaving a node (zset, by end)
``drainctl:idem:{key}``                         idempotency key of a request
``drainctl:epoch``                              this Redis's epoch (a Redis that lost its data has none)
``drainctl:epoch:scanned``                      the epoch whose cluster scan for lost drains is done
``drainctl:lost:{id}``                          a drain found lost after Redis came back empty (report)
``{{drainctl:sem:{name}}}:...``                 one semaphore; see :class:`SemaphoreKeys`
``{queue}:health-check``                        arq's worker heartbeat (written by every live worker)
==============================================  =====================================================

arq job ids are deterministic so that a job enqueued twice runs once (arq dedupes on the id):
``plan:{drain_id}``, ``migrate:{drain_id}:{namespace}/{name}:{attempt}``, ``finish:{drain_id}:{node}``.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "drainctl"

DRAINS_INDEX = f"{PREFIX}:drains"
"""Sorted set of every drain id (the score is chosen by the drain store)."""

CANCEL_CHANNEL = f"{PREFIX}:cancel"
"""Pub/sub channel announcing a drain cancel (the message is the drain id): workers stop following at once."""

EPOCH_KEY = f"{PREFIX}:epoch"
"""The epoch of this Redis's data: written once by the first process that finds it missing. A process that
knew another epoch (or none at all in a Redis that holds nothing else) knows the data was lost."""

EPOCH_SCANNED_KEY = f"{EPOCH_KEY}:scanned"
"""The epoch for which the cluster was scanned for drains a data loss left behind (see orchestrator.epoch)."""

CLUSTER_SCOPE = "cluster"
TUNE_KEY = f"{PREFIX}:tune:kubevirt"
"""KubeVirt's migration settings as they were before a tuned drain changed them, with that drain's id (JSON);
one at a time, since the settings are cluster-wide (workers.jobs.tune)."""
"""Semaphore scope shared by every migration in the cluster."""


def _part(value: str, what: str) -> str:
    # An empty id silently collapses two formats into one key (``drainctl:drain:`` would be both
    # "drain with empty id" and a prefix of every drain), so refuse it at the edge.
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "\n" in value:
        raise ValueError(f"{what} must not contain a newline: {value!r}")
    return value


# Workers ------------------------------------------------------------------------------------------


def worker_health_key(queue_name: str) -> str:
    """arq's heartbeat of the workers on one queue (``{queue}:health-check``, arq's own format): every live
    worker rewrites it with a TTL just above its health-check interval, so its absence means no worker."""
    return f"{_part(queue_name, 'queue name')}:health-check"


def time_scale_key(queue_name: str) -> str:
    """The time scale last verified against the cluster's clock by a process on this queue (a worker at its
    start, or a command that sampled the API server's ``Date`` header): ``{queue}:time-scale``, JSON
    ``{"server", "time_scale"}``, expiring after `TIME_SCALE_VERIFIED_TTL_S`. A command compares its own time scale
    with it instead of sampling the clock for a second before it submits."""
    return f"{_part(queue_name, 'queue name')}:time-scale"


TIME_SCALE_VERIFIED_TTL_S = 900


# Drains -------------------------------------------------------------------------------------------


def drain_key(drain_id: str) -> str:
    """Drain record: ``drainctl:drain:{id}``."""
    return f"{PREFIX}:drain:{_part(drain_id, 'drain id')}"


def drain_events_key(drain_id: str) -> str:
    """Event stream of one drain: ``drainctl:drain:{id}:events``."""
    return f"{drain_key(drain_id)}:events"


def drain_vms_key(drain_id: str) -> str:
    """Per-VM record hash of one drain: ``drainctl:drain:{id}:vms``."""
    return f"{drain_key(drain_id)}:vms"


def drain_nodes_key(drain_id: str) -> str:
    """Per-node record hash of one drain: ``drainctl:drain:{id}:nodes``."""
    return f"{drain_key(drain_id)}:nodes"


def drain_plan_key(drain_id: str) -> str:
    """The plan the submitter's dry run made, written with the drain record in one transaction; the plan job
    carries it out while it still matches the cluster: ``drainctl:drain:{id}:plan``."""
    return f"{drain_key(drain_id)}:plan"


def drain_lock_key(drain_id: str) -> str:
    """Short lock serialising the "advance this drain" step across workers: ``drainctl:drain:{id}:lock``."""
    return f"{drain_key(drain_id)}:lock"


def drain_priorities_key(drain_id: str) -> str:
    """Semaphore priority of each running node of one drain, written by the advance step and read by the
    migrate jobs of that node (a hash ``node -> number``, smaller first): ``drainctl:drain:{id}:priorities``."""
    return f"{drain_key(drain_id)}:priorities"


def node_lock_key(node: str) -> str:
    """Which drain owns a node: ``drainctl:node:{node}:drain``."""
    return f"{PREFIX}:node:{_part(node, 'node name')}:drain"


def node_transfers_key(node: str) -> str:
    """The last migrations drainctl saw leave a node, for its observed bandwidth (a sorted set of transfer
    records scored by their end; re-recording one is a no-op): ``drainctl:node:{node}:transfers``."""
    return f"{PREFIX}:node:{_part(node, 'node name')}:transfers"


def idempotency_key(key: str) -> str:
    """Idempotency record of a request: ``drainctl:idem:{key}``."""
    return f"{PREFIX}:idem:{_part(key, 'idempotency key')}"


def lost_drain_key(drain_id: str) -> str:
    """Marker that drain ``{id}`` was found lost and reported once: ``drainctl:lost:{id}``."""
    return f"{PREFIX}:lost:{_part(drain_id, 'drain id')}"


# arq job ids --------------------------------------------------------------------------------------


def plan_job_id(drain_id: str) -> str:
    """Job id of the plan job of a drain: ``plan:{drain_id}``."""
    return f"plan:{_part(drain_id, 'drain id')}"


def migrate_job_id(drain_id: str, namespace: str, name: str, *, attempt: int) -> str:
    """Job id of one migration attempt: ``migrate:{drain_id}:{namespace}/{name}:{attempt}``."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    return (
        f"migrate:{_part(drain_id, 'drain id')}:{_part(namespace, 'namespace')}/"
        f"{_part(name, 'VMI name')}:{attempt}"
    )


def dry_plan_job_id(nonce: str) -> str:
    """A dry run planned by a worker for a caller that waits for the answer (`DrainService.plan`)."""
    return f"dry-plan:{_part(nonce, 'nonce')}"


def advance_job_id(drain_id: str, nonce: int) -> str:
    """Job id of one "advance this drain" request: ``advance:{drain_id}:{nonce}`` (a fresh nonce each time,
    since advancing twice is harmless and a finished job's id stays taken while its result is kept)."""
    return f"advance:{_part(drain_id, 'drain id')}:{nonce}"


def finish_job_id(drain_id: str, node: str) -> str:
    """Job id of the job that finishes one node of a drain: ``finish:{drain_id}:{node}``."""
    return f"finish:{_part(drain_id, 'drain id')}:{_part(node, 'node name')}"


# Semaphore ----------------------------------------------------------------------------------------


def node_scope(node: str) -> str:
    """Semaphore scope of the migrations leaving ``node``: ``node:{node}``."""
    return f"node:{_part(node, 'node name')}"


def inbound_scope(node: str) -> str:
    """Semaphore scope of the migrations arriving on ``node``: ``inbound:{node}``."""
    return f"{_INBOUND}{_part(node, 'node name')}"


def inbound_node(scope: str | None) -> str | None:
    """The node of an inbound scope (``inbound:{node}`` -> ``node``); None for any other scope."""
    if scope is None or not scope.startswith(_INBOUND) or scope == _INBOUND:
        return None
    return scope[len(_INBOUND):]


_INBOUND = "inbound:"


def migration_holder_id(drain_id: str, namespace: str, name: str, *, attempt: int) -> str:
    """Semaphore holder id of one migration attempt: ``{drain_id}/{namespace}/{name}/{attempt}``."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    drain, ns, vmi = _part(drain_id, "drain id"), _part(namespace, "namespace"), _part(name, "VMI name")
    return f"{drain}/{ns}/{vmi}/{attempt}"


@dataclass(frozen=True)
class SemaphoreKeys:
    """The keys of one named semaphore.

    All of them share the hash tag ``{drainctl:sem:<name>}`` so that they land in one Redis Cluster
    slot and a single Lua script may touch them all. Scripts receive these names in ``KEYS``; they
    never build a key themselves.
    """

    name: str

    def __post_init__(self) -> None:
        _part(self.name, "semaphore name")
        # A brace inside the name would end the hash tag early and scatter the keys over slots.
        if "{" in self.name or "}" in self.name:
            raise ValueError(f"semaphore name must not contain braces: {self.name!r}")

    @property
    def tag(self) -> str:
        """The shared hash tag, braces included."""
        return f"{{{PREFIX}:sem:{self.name}}}"

    @property
    def holders(self) -> str:
        """Sorted set of every holder (score: lease expiry, Redis ms)."""
        return f"{self.tag}:holders"

    @property
    def fence(self) -> str:
        """Counter that hands out fencing tokens."""
        return f"{self.tag}:fence"

    @property
    def waiters(self) -> str:
        """Sorted set of waiting acquirers (score: heartbeat deadline, Redis ms)."""
        return f"{self.tag}:waiters"

    @property
    def waiter_priorities(self) -> str:
        """Hash of the waiters that wait with a priority: waiter id -> priority, then their scope keys and
        limits (newline-joined), so a waiter of a larger number can see who goes first."""
        return f"{self.tag}:waiter-priorities"

    @property
    def reservations(self) -> str:
        """Hash of the waiters for a weighted (solo) grant: waiter id -> the Redis ms it began to reserve, then
        the scope keys it reserves (newline-joined); slots freed there go to it, not to newcomers."""
        return f"{self.tag}:reservations"

    @property
    def scopes(self) -> str:
        """Set of the scope names that currently have at least one holder."""
        return f"{self.tag}:scopes"

    @property
    def released_channel(self) -> str:
        """Pub/sub channel announcing that a slot was freed (the message is the holder id)."""
        return f"{self.tag}:released"

    def lease(self, holder: str) -> str:
        """Hash with one holder's lease: token, scopes, expiry, meta."""
        return f"{self.tag}:lease:{_part(holder, 'holder id')}"

    def scope(self, scope: str) -> str:
        """Sorted set of the holders of one scope (score: lease expiry, Redis ms)."""
        return f"{self.tag}:scope:{_part(scope, 'scope name')}"


def semaphore_keys(name: str) -> SemaphoreKeys:
    """Keys of the semaphore called ``name`` (for example ``migrations``)."""
    return SemaphoreKeys(name)
