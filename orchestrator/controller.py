"""The DrainRequest controller: `drainctl.io/v1alpha1` DrainRequest objects drive drains. Built on kopf.

Promises:
- A new DrainRequest starts exactly one drain through `DrainService.submit`, with the object's uid as the
  idempotency key: a controller restart, a second replica or a replayed watch event finds the same drain.
- Its status mirrors the drain (phase, drainId, message, per-node phases, VM counts) until the drain is
  final; a spec the drain request model refuses, or a drain the planner refuses, ends as phase Failed with
  the reason in `status.message`; nodes held by another drain leave it Pending, retried until they are free.
- Deleting a DrainRequest whose drain is still open cancels that drain. A finalizer
  (`drainctl.io/cancel-drain`) makes this hold even when the deletion happens while no controller runs.
- It survives Redis and API outages: a pass that fails is retried at the next tick (one resync period) and
  the failure is visible in `ControllerHealth` (so `/readyz` answers 503) until a pass succeeds again.
- With several replicas only one acts: leader election on a `coordination.k8s.io/v1` Lease (holderIdentity,
  leaseDurationSeconds, acquireTime, renewTime, leaseTransitions), with client-go's rules: a lease held by
  someone else is taken over only after it went unrenewed for leaseDurationSeconds as measured by our own
  monotonic clock (no trust in other machines' clocks), every write is guarded by the resourceVersion read,
  and a leader that cannot renew in time stops acting before its lease could be taken. The Lease lives in
  the cluster, so a Redis outage never costs the leadership.

What kopf does here and what it does not:
- kopf (https://kopf.dev) runs the watch of DrainRequests, one timer per object (`interval=resync_s`) that
  calls `DrainRequestHandlers.tick`, the deletion handler behind our finalizer, status patches on the
  status subresource, retries with backoff and the stop path. It talks to the API server with its own
  aiohttp client, logged in with the same credentials as our `Kube` (`Kube.credentials`).
- kopf's own peering cannot elect a leader among identical replicas: peers of equal priority "issue a
  warning and freeze, leaving the cluster unserved" (docs.kopf.dev/en/latest/peering), and a Deployment's
  replicas share one priority. So kopf runs `standalone` (no peering objects) and only on the replica that
  holds our Lease (`LeaderElector`, kept from before); losing the Lease stops kopf before anyone may take
  over. kopf's progress and diff-base annotations use our prefix (`drainctl.io/`), its finalizer is ours.
- kopf runs in a thread of its own, with its own event loop, Redis pool and cluster connection: when it stops
  it cancels every task of its loop that it did not find at its start ("there is no way to trace who spawned
  what", kopf/_core/reactor/running.py), which in the API's loop would be request handlers and event streams.
- Resource scanning is off (no CRD watch, no cluster-wide CRD permission): the controller checks that the
  DrainRequest CRD is served before starting kopf, and reports a missing CRD as a readiness problem.

Level-based: each tick re-reads the object and the drain store and writes only what differs, so a missed
event costs at most one resync period. Start it with ``run_controller(service, kube, identity=...,
stop=event)`` beside the HTTP API; it returns after `stop` is set, releasing the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.model import DrainPhase, DrainRequest, VmPhase, VmVerdict
from orchestrator.planner import PlanError
from orchestrator.service import DrainService, IdempotencyKeyReused, NodeConflict
from orchestrator.settings import Settings
from orchestrator.store import DrainNotFound, DrainView

log = structlog.get_logger("orchestrator.controller")

Obj = dict[str, Any]
FINALIZER = "drainctl.io/cancel-drain"
LEASE_NAME = "drainctl-controller"
SOURCE = "drainrequest"
SPEC_FIELDS = {"nodes": "nodes", "maxParallelNodes": "max_parallel_nodes", "order": "order",
               "nonMigratable": "non_migratable", "maxAttempts": "max_attempts", "tune": "tune",
               "allowPostCopy": "allow_post_copy", "escalation": "escalation"}
"""DrainRequest spec field -> DrainRequest (model) field."""
FINAL_PHASES = frozenset(p.value for p in DrainPhase if p.is_final)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


KOPF_GRANTS: tuple[tuple[str, str, str], ...] = (
    (k.DRAINREQUESTS.group, k.DRAINREQUESTS.plural, "list"),
    (k.DRAINREQUESTS.group, k.DRAINREQUESTS.plural, "watch"),
    (k.DRAINREQUESTS.group, k.DRAINREQUESTS.plural, "patch"),
    (k.DRAINREQUESTS.group, f"{k.DRAINREQUESTS.plural}/status", "patch"),
    ("", "events", "create"),
)
"""(api group, resource, verb) of the calls kopf makes for us: list+watch DrainRequests, patch their
finalizers and annotations, patch their status, post Events about handler failures."""
RETRYABLE = (k.KubeError, RedisError, OSError)
"""A pass that fails with one of these is retried at the next tick (a non-retryable KubeError included: the
object may change, and a stuck object must stay visible in the health)."""


def micro_time(at: float | None = None) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds), as Lease acquireTime and renewTime want."""
    return datetime.fromtimestamp(time.time() if at is None else at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rfc3339(at: Any) -> str | None:
    if not isinstance(at, int | float):
        return None
    return datetime.fromtimestamp(float(at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_namespace() -> str:
    """Where the lease lives: $POD_NAMESPACE, the pod's service-account namespace, else "default"."""
    env = os.environ.get("POD_NAMESPACE")
    if env:
        return env
    with contextlib.suppress(OSError):
        text = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        if text:
            return text
    return "default"


def default_identity() -> str:
    """Pod name (the hostname in a pod) plus the process id: unique per replica and per restart."""
    return f"{socket.gethostname()}_{os.getpid()}"


# ============================================================================================ leader election
class LeaderElector:
    """Acquire, renew and release one Lease. Not a task: the caller decides when to call `try_acquire_or_renew`."""

    def __init__(self, kube: k.Kube, *, identity: str, namespace: str, name: str = LEASE_NAME,
                 lease_duration_s: float = 15.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.identity = identity
        self.namespace = namespace
        self.name = name
        self.lease_duration_s = lease_duration_s
        self._monotonic = monotonic
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.last_renewed: float | None = None
        """Our monotonic time of the last successful acquire or renew."""

    @property
    def is_leader(self) -> bool:
        """Whether our last renew is recent enough that no one else may have taken the lease yet."""
        return self.last_renewed is not None and self._monotonic() - self.last_renewed < self.lease_duration_s

    async def try_acquire_or_renew(self) -> bool:
        """One round of client-go's tryAcquireOrRenew. Returns whether we hold the lease now."""
        now = self._monotonic()
        obj = await self.kube.find(k.LEASES, self.name, self.namespace)
        stamp = micro_time()
        duration = max(1, round(self.lease_duration_s))
        if obj is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": duration,
                             "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}}
            try:
                await self.kube.create(k.LEASES, body, self.namespace)
            except (k.AlreadyExists, k.Conflict):
                return False
            self._won(now, fresh=True)
            return True
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        observed = (holder, spec.get("renewTime"), meta.get("resourceVersion"))
        if observed != self._observed:
            self._observed, self._observed_at = observed, now
        theirs = holder and holder != self.identity
        their_duration = float(spec.get("leaseDurationSeconds") or duration)
        if theirs and now - self._observed_at < their_duration:
            self.last_renewed = None
            return False
        patch: Obj = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                      "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": duration,
                               "renewTime": stamp}}
        if holder != self.identity:
            patch["spec"]["acquireTime"] = stamp
            patch["spec"]["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        try:
            await self.kube.patch(k.LEASES, self.name, patch, self.namespace)
        except (k.Conflict, k.NotFound):
            return False
        self._won(now, fresh=holder != self.identity)
        return True

    def _won(self, now: float, *, fresh: bool) -> None:
        if fresh or self.last_renewed is None:
            log.info("leader.acquired", identity=self.identity, lease=f"{self.namespace}/{self.name}")
        self.last_renewed = now

    async def release(self) -> None:
        """Give the lease up (if still ours) so another replica takes over at once instead of after expiry."""
        if self.last_renewed is None:
            return
        self.last_renewed = None
        obj = await self.kube.find(k.LEASES, self.name, self.namespace)
        if obj is None or (obj.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        patch = {"metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")},
                 "spec": {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": micro_time()}}
        with contextlib.suppress(k.Conflict, k.NotFound):
            await self.kube.patch(k.LEASES, self.name, patch, self.namespace)
        log.info("leader.released", identity=self.identity)


# ============================================================================================== reconcile
def request_from_spec(spec: Obj) -> DrainRequest:
    """The drain request a DrainRequest spec asks for; ValueError names the spec field and the problem."""
    if not isinstance(spec, dict):
        raise ValueError("spec: expected an object")
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"spec: unknown field(s) {', '.join(unknown)}")
    body = {SPEC_FIELDS[name]: value for name, value in spec.items() if value is not None}
    try:
        return DrainRequest.from_json(body)
    except ValueError as exc:
        text = str(exc).removeprefix("drain request: ")
        for camel, snake in SPEC_FIELDS.items():
            if text.startswith(f"{snake}:"):
                text = f"{camel}:{text[len(snake) + 1:]}"
        raise ValueError(f"spec.{text}") from None


def status_from_view(view: DrainView, *, generation: int | None) -> Obj:
    """The DrainRequest status that mirrors one drain."""
    drain = view.drain
    nodes = []
    for node in view.nodes_in_order():
        mine = view.vms_on(node.node)
        nodes.append({"name": node.node, "phase": node.phase.value, "message": node.message or "",
                      "vms": len(mine), "migrated": sum(1 for vm in mine if vm.phase is VmPhase.SUCCEEDED),
                      "failed": sum(1 for vm in mine if vm.phase is VmPhase.FAILED)})
    to_move = [vm for vm in view.vms.values() if vm.verdict is VmVerdict.MIGRATE]
    done = sum(1 for vm in to_move if vm.phase is VmPhase.SUCCEEDED)
    status: Obj = {
        "phase": drain.phase.value, "drainId": drain.id, "message": drain.message or "",
        "nodes": nodes,
        "progress": f"{done}/{len(to_move)} VMs",
        "vms": {"total": len(view.vms), "migrated": done,
                "failed": sum(1 for vm in view.vms.values() if vm.phase is VmPhase.FAILED),
                "open": sum(1 for vm in view.vms.values() if not vm.phase.is_final)},
        "startedAt": _rfc3339(drain.started_at), "finishedAt": _rfc3339(drain.finished_at),
    }
    if drain.estimate_s is not None:
        status["estimateSeconds"] = round(drain.estimate_s)
    if generation is not None:
        status["observedGeneration"] = generation
    return status


@dataclass
class ControllerHealth:
    """What `/readyz` reads: the controller's role and what keeps it from doing its job right now. Written from
    kopf's thread and the API's loop, hence the lock."""

    role: str = "starting"
    """starting, standby (another replica leads), leading, stopped."""
    problems: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def report(self, key: str, problem: str | None) -> None:
        with self._lock:
            if problem is None:
                self.problems.pop(key, None)
            else:
                self.problems[key] = problem

    def clear(self) -> None:
        with self._lock:
            self.problems.clear()

    @property
    def ok(self) -> bool:
        with self._lock:
            return self.role in ("standby", "leading") and not self.problems

    def describe(self) -> str:
        if self.ok:
            return "ok" if self.role == "leading" else "ok (standby)"
        with self._lock:
            problems = sorted(self.problems.items())
        return "; ".join([f"{self.role}", *(f"{key}: {text}" for key, text in problems)])


class DrainRequestHandlers:
    """The kopf handlers: a timer per DrainRequest that submits and mirrors, and the deletion handler."""

    def __init__(self, service: DrainService, *, health: ControllerHealth) -> None:
        self.service = service
        self.health = health
        self.conflict_retry_s = 10.0
        self._not_before: dict[str, float] = {}
        """uid -> monotonic time before which a DrainRequest waiting for busy nodes is not submitted again."""

    # ------------------------------------------------------------------------------------------ kopf entry
    async def tick(self, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        obj: Obj = dict(body)
        meta = obj.get("metadata") or {}
        try:
            status = await self.reconcile(obj)
        except RETRYABLE as exc:
            self.health.report(f"drainrequest {meta.get('namespace')}/{meta.get('name')}", f"retrying: {exc}")
            log.warning("drainrequest.retry", name=meta.get("name"), namespace=meta.get("namespace"),
                        error=str(exc) or type(exc).__name__)
            return
        self.health.report(f"drainrequest {meta.get('namespace')}/{meta.get('name')}", None)
        if status is not None:
            patch["status"] = status

    async def deleted(self, body: kopf.Body, **_: Any) -> None:
        obj: Obj = dict(body)
        meta = obj.get("metadata") or {}
        self.health.report(f"drainrequest {meta.get('namespace')}/{meta.get('name')}", None)
        self._not_before.pop(str(meta.get("uid")), None)
        try:
            await self._cancel(obj)
        except RETRYABLE as exc:
            # kopf keeps the finalizer and calls us again: the cancel is not lost.
            raise kopf.TemporaryError(f"cancelling the drain: {exc}", delay=1.0) from exc

    # ------------------------------------------------------------------------------------------ reconcile
    async def reconcile(self, obj: Obj) -> Obj | None:
        """The status the object should have now, or None when it has it already."""
        meta = obj["metadata"]
        status = obj.get("status") or {}
        final = status.get("phase") in FINAL_PHASES
        if final and not status.get("drainId"):
            return None  # refused or invalid: nothing runs, nothing to mirror
        drain_id = status.get("drainId")
        if not drain_id:
            return _changed(status, await self._submit(obj))
        if final:
            return None
        try:
            view = await self.service.get(str(drain_id))
        except DrainNotFound:
            return _changed(status, {"phase": DrainPhase.FAILED.value, "drainId": drain_id,
                                     "message": f"drain {drain_id} is no longer recorded in Redis"})
        log.debug("drainrequest.synced", name=meta["name"], namespace=meta.get("namespace"), drain_id=drain_id,
                  phase=view.drain.phase.value)
        return _changed(status, status_from_view(view, generation=meta.get("generation")))

    async def _submit(self, obj: Obj) -> Obj | None:
        meta = obj["metadata"]
        generation = meta.get("generation")
        if time.monotonic() < self._not_before.get(meta["uid"], 0.0):
            return None
        try:
            request = request_from_spec(obj.get("spec") or {})
        except ValueError as exc:
            return {"phase": DrainPhase.FAILED.value, "message": f"invalid: {exc}", "observedGeneration": generation}
        try:
            record, created = await self.service.submit(request, idempotency_key=meta["uid"], source=SOURCE)
        except PlanError as exc:
            return {"phase": DrainPhase.FAILED.value, "observedGeneration": generation,
                    "message": "refused by the planner: " + "; ".join(exc.problems)}
        except NodeConflict as exc:
            # Submitting plans against a fresh snapshot first; retrying that every tick would hammer the API.
            self._not_before[meta["uid"]] = time.monotonic() + self.conflict_retry_s
            return {"phase": DrainPhase.PENDING.value, "observedGeneration": generation,
                    "message": f"waiting: {exc}"}
        except IdempotencyKeyReused as exc:
            # This resource started a drain before its spec changed (its status write was lost): that drain
            # is still its drain; a spec change does not start another.
            return status_from_view(await self.service.get(exc.drain_id), generation=generation)
        log.info("drainrequest.submitted", name=meta["name"], namespace=meta.get("namespace"),
                 drain_id=record.id, created=created)
        return status_from_view(await self.service.get(record.id), generation=generation)

    async def _drain_id(self, obj: Obj) -> str | None:
        found = (obj.get("status") or {}).get("drainId")
        if found:
            return str(found)
        raw = await self.service.store.redis.get(keys.idempotency_key(obj["metadata"]["uid"]))
        return None if raw is None else (raw.decode() if isinstance(raw, bytes) else str(raw))

    async def _cancel(self, obj: Obj) -> None:
        drain_id = await self._drain_id(obj)
        if drain_id is None:
            return
        try:
            record = await self.service.cancel(drain_id)
        except DrainNotFound:
            return
        meta = obj["metadata"]
        log.info("drainrequest.cancelled", name=meta.get("name"), namespace=meta.get("namespace"),
                 drain_id=drain_id, phase=record.phase.value)


def _changed(current: Obj, status: Obj | None) -> Obj | None:
    """`status` without its None values, or None when `current` already has every one of them."""
    if status is None:
        return None
    wanted = {key: value for key, value in status.items() if value is not None}
    if all(current.get(key) == value for key, value in wanted.items()):
        return None
    return wanted


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="drainctl.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="drainctl.io")
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING  # Events for handler failures only, not one per tick
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    return settings


def kopf_registry(handlers: DrainRequestHandlers, kube: k.Kube, *, resync_s: float) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    resource = (k.DRAINREQUESTS.group, k.DRAINREQUESTS.version, k.DRAINREQUESTS.plural)

    def login(**_: Any) -> kopf.ConnectionInfo:
        cred = kube.credentials()
        return kopf.ConnectionInfo(server=cred.server, token=cred.token, ca_path=cred.ca_file,
                                   certificate_path=cred.cert_file, private_key_path=cred.key_file,
                                   insecure=not cred.verify_ssl)

    kopf.on.login(registry=registry)(login)
    kopf.timer(*resource, interval=resync_s, registry=registry)(handlers.tick)
    kopf.on.delete(*resource, registry=registry)(handlers.deleted)
    return registry


# ================================================================================================== run
async def run_controller(service: DrainService, kube: k.Kube, *, identity: str, stop: asyncio.Event,
                         namespace: str | None = None, lease_name: str = LEASE_NAME, lease_duration_s: float = 15.0,
                         renew_every_s: float = 5.0, retry_every_s: float = 2.0, resync_s: float = 1.0,
                         health: ControllerHealth | None = None) -> None:
    """Campaign for the lease; while holding it, run kopf (in its own thread, with connections of its own made
    from `service.settings`). Returns once `stop` is set, lease released."""
    renew_deadline_s = lease_duration_s * 2 / 3
    if not 0 < renew_every_s < renew_deadline_s:
        raise ValueError(f"renew_every_s: {renew_every_s} must be positive and below 2/3 of lease_duration_s "
                         f"({renew_deadline_s:.1f})")
    health = health if health is not None else ControllerHealth()
    elector = LeaderElector(kube, identity=identity, namespace=namespace or default_namespace(), name=lease_name,
                            lease_duration_s=lease_duration_s)
    try:
        while not stop.is_set():
            if await _attempt(elector, health):
                health.role = "leading"
                await _lead(kube, elector, health, settings=service.settings, stop=stop,
                            renew_every_s=renew_every_s, renew_deadline_s=renew_deadline_s, resync_s=resync_s,
                            retry_every_s=retry_every_s)
            else:
                health.role = "standby"
                health.clear()
                await _wait(stop, retry_every_s)
    finally:
        health.role = "stopped"
        with contextlib.suppress(k.KubeError):
            await elector.release()


async def _attempt(elector: LeaderElector, health: ControllerHealth) -> bool:
    try:
        won = await elector.try_acquire_or_renew()
    except k.KubeError as exc:
        log.warning("leader.error", identity=elector.identity, error=str(exc))
        health.report("lease", f"cannot reach the Lease: {exc}")
        return elector.is_leader
    health.report("lease", None)
    return won


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


async def _crd_served(kube: k.Kube, health: ControllerHealth) -> bool:
    try:
        await kube.list(k.DRAINREQUESTS)
    except k.NotFound:
        health.report("crd", "the DrainRequest CRD is not installed (kubectl apply -f k8s/crd-drainrequest.yaml, "
                             "or run the API with --no-controller)")
        log.warning("drainrequests.crd_missing", hint="kubectl apply -f k8s/crd-drainrequest.yaml")
        return False
    except k.KubeError as exc:
        health.report("crd", f"cannot list DrainRequests: {exc}")
        return False
    health.report("crd", None)
    return True


class KopfThread:
    """kopf's operator in a thread of its own, with its own event loop and its own connections (see the module
    docstring for why). `start()`, `ready`, `alive`, `error`, `stop()`."""

    def __init__(self, settings: Settings, *, health: ControllerHealth, resync_s: float, name: str) -> None:
        self.settings = settings
        self.health = health
        self.resync_s = resync_s
        self.stop_flag = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported to the thread that supervises kopf
            self.error = exc

    async def _run(self) -> None:
        conn = self.settings.connection
        kube = await k.Kube.connect(kubeconfig=conn.kubeconfig, context=conn.context)
        redis = ArqRedis.from_url(conn.redis_url)  # connects on first use: Redis may be away right now
        try:
            handlers = DrainRequestHandlers(DrainService(redis=redis, settings=self.settings, kube=kube),
                                            health=self.health)
            await kopf.operator(registry=kopf_registry(handlers, kube, resync_s=self.resync_s),
                                settings=kopf_settings(), standalone=True, clusterwide=True,
                                stop_flag=self.stop_flag, ready_flag=self.ready)
        finally:
            await redis.aclose()
            await kube.close()

    async def stop(self, *, timeout_s: float = 20.0) -> bool:
        """Ask kopf to stop and wait for its thread; False if it did not end in time (it is a daemon thread)."""
        self.stop_flag.set()
        await asyncio.to_thread(self._thread.join, timeout_s)
        return not self._thread.is_alive()


async def _lead(kube: k.Kube, elector: LeaderElector, health: ControllerHealth, *,
                settings: Settings, stop: asyncio.Event, renew_every_s: float, renew_deadline_s: float,
                resync_s: float, retry_every_s: float) -> None:
    """Run kopf while the lease is ours; stop it as soon as renewing failed for too long. A kopf that ends on
    its own is started again (after `retry_every_s`) as long as we lead."""
    operator: KopfThread | None = None
    try:
        while not stop.is_set():
            if operator is None and await _crd_served(kube, health):
                operator = KopfThread(settings, health=health, resync_s=resync_s,
                                      name=f"drainrequest-controller:{elector.identity}")
                operator.start()
            health.report("kopf", None if operator is not None and operator.ready.is_set() else "starting")
            await _wait(stop, min(renew_every_s, retry_every_s) if operator is None or not operator.ready.is_set()
                        else renew_every_s)
            if stop.is_set():
                break
            if operator is not None and not operator.alive:
                log.error("controller.kopf_ended", identity=elector.identity, error=repr(operator.error))
                health.report("kopf", f"ended: {operator.error!r}; restarting")
                operator = None
                await _wait(stop, retry_every_s)
            renewed = await _attempt(elector, health)
            # Step down before anyone else may take the lease: they wait a full lease duration after the last
            # renew they saw, we stop after the (shorter) renew deadline since our last successful renew.
            last = elector.last_renewed
            if not renewed and (last is None or time.monotonic() - last > renew_deadline_s):
                log.warning("leader.lost", identity=elector.identity)
                break
    finally:
        health.report("kopf", None)
        if operator is not None and not await asyncio.shield(operator.stop()):
            log.error("controller.kopf_stop_timeout", identity=elector.identity)
