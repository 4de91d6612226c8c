"""The engine's decisions as pure functions, each returning a verdict with a human reason.

Like the planner's filters: no I/O, no clock reads (times come in as arguments), tested with tables of cases
(tests/workers/test_decisions.py). The jobs gather the facts, call these, then act and record.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.model import FailureClass, NodePhase, VmPhase, format_bytes
from orchestrator.records import VmRecord

COMPLETION_MARGIN_S = 60.0
"""Added to KubeVirt's own completion budget: KubeVirt normally aborts first; ours is the backstop for a
migration that stalls where KubeVirt does not look."""


def classify(reason: str) -> FailureClass:
    """Map KubeVirt's failure texts (reference kubevirt.md 3.5-3.7) onto our classes."""
    text = reason.lower()
    # Since KubeVirt v1.9 the launcher's own timeouts read "Live migration has been aborted" (any successful
    # abort does); this is only asked when we did not abort, so it is the launcher giving up on convergence.
    if "stuck for" in text or "not completed after" in text or "has been aborted" in text:
        return FailureClass.NOT_CONVERGING
    if "target pod" in text and ("removed" in text or "unschedulable" in text):
        return FailureClass.UNSCHEDULABLE
    if "canceled" in text or "aborted" in text:
        return FailureClass.ABORTED
    if "vmi does not exist" in text or "vmi shutdown" in text:
        return FailureClass.VM_GONE
    if "live migration failed" in text or "target pod shutdown" in text or "connection" in text:
        return FailureClass.TARGET_FAILED
    return FailureClass.UNKNOWN


# ------------------------------------------------------------------------------------------- timeouts
@dataclass(frozen=True)
class Abort:
    """Why drainctl aborts a migration, and the class that decides the retry."""

    reason: str
    failure: FailureClass


def completion_budget_s(memory_bytes: int, per_gib: float) -> float:
    """KubeVirt's budget (per GB of migration data, decimal, rounded up) plus our margin."""
    return per_gib * max(1, math.ceil(memory_bytes / 1e9)) + COMPLETION_MARGIN_S


def migration_timeout(*, phase: str, since_created: float, since_running: float | None, since_change: float,
                      pending_timeout_s: float, progress_timeout_s: float, completion_budget: float) -> Abort | None:
    """Whether one of our timeouts has fired for a VMIM in `phase`, given the cluster seconds since it was
    created, since its transfer began (None: not yet) and since its phase last changed.

    - not Running `pending_timeout_s` after its creation: the target never came up;
    - standing still `progress_timeout_s` in a phase other than Pending (Pending is KubeVirt's own queue,
      bounded by its limits) before the transfer: stuck;
    - transferring longer than the completion budget: not converging."""
    if since_running is None and since_created > pending_timeout_s:
        return Abort(f"aborted by drainctl: not running after {pending_timeout_s:.0f} s (phase {phase or 'new'})",
                     FailureClass.UNSCHEDULABLE)
    if since_running is None and since_change > progress_timeout_s and phase != "Pending":
        return Abort(f"aborted by drainctl: no progress for {progress_timeout_s:.0f} s in phase {phase}",
                     FailureClass.TIMEOUT)
    if since_running is not None and since_running > completion_budget:
        return Abort(f"aborted by drainctl: not completed within {completion_budget:.0f} s",
                     FailureClass.NOT_CONVERGING)
    return None


def wait_expired(*, waited_s: float, limit_s: float) -> bool:
    """Whether a wait for someone else's migration of the VM (KubeVirt's "in-flight migration detected") has
    lasted too long: past it the attempt fails as a conflict instead of holding its slots forever."""
    return waited_s > limit_s


# ------------------------------------------------------------------------------------------- outcomes
class Settle(enum.StrEnum):
    """What becomes of a VM after one attempt ended."""

    SUCCEEDED = "Succeeded"
    CANCELLED = "Cancelled"
    RETRY = "Retry"
    FAILED = "Failed"


def settle_attempt(phase: VmPhase, failure: FailureClass | None, *, drain_cancelled: bool, attempt: int,
                   max_attempts: int, escalates: bool = False) -> Settle:
    """Succeeded stays succeeded (even if a cancel raced it: the VM moved); an abort during a drain cancel
    is a cancel; a retryable failure is retried while attempts remain, or when the escalation ladder has a rung
    left for it (`escalates`: its attempts do not count against max_attempts); anything else failed."""
    if phase is VmPhase.SUCCEEDED:
        return Settle.SUCCEEDED
    if phase is VmPhase.CANCELLED or (failure is FailureClass.ABORTED and drain_cancelled):
        return Settle.CANCELLED
    if failure is not None and failure.retryable and (attempt < max_attempts or escalates):
        return Settle.RETRY
    return Settle.FAILED


# ------------------------------------------------------------------------------------------- feeding
@dataclass(frozen=True)
class Feed:
    live: tuple[VmRecord, ...]
    """VMs whose migrate job should exist (waiting, migrating, or queued with their job enqueued)."""
    start: tuple[VmRecord, ...]
    """Queued VMs to enqueue now, largest first."""


def feed_window(open_vms: Sequence[VmRecord], *, window: int) -> Feed:
    """Which of a node's open VMs get a migrate job now: up to `window` jobs live at once, largest first
    (the planner's order: long jobs early shorten the node's makespan)."""
    live = [vm for vm in open_vms if vm.phase in (VmPhase.WAITING, VmPhase.MIGRATING)
            or (vm.phase is VmPhase.QUEUED and vm.enqueued == vm.attempt)]
    fresh = [vm for vm in open_vms if vm.phase is VmPhase.QUEUED and vm.enqueued != vm.attempt]
    fresh.sort(key=lambda vm: (-vm.memory_bytes, vm.vmi))
    return Feed(tuple(live), tuple(fresh[: max(0, window - len(live))]))


# ------------------------------------------------------------------------------------------- slots
def migration_work_s(memory_bytes: int, *, setup_s: float, bandwidth_bytes_per_s: float) -> float:
    """How long one migration holds a slot, estimated as the planner does: setup + memory / bandwidth."""
    return setup_s + memory_bytes / max(1.0, bandwidth_bytes_per_s)


def node_priorities(work_left_s: Mapping[str, float], order: Sequence[str]) -> dict[str, float]:
    """The semaphore priority of each running node's migrations (smaller number first): the node with the
    most slot-seconds of work left goes first, ties in the request's order.

    Nodes drained at once share the cluster's slots but each uses at most its outbound limit; a slot that
    goes to a nearly empty node leaves the fullest one alone at the end with its outbound limit, while the
    other cluster slots sit idle (longest-remaining-first keeps the nodes finishing together). Whole
    seconds, so that estimates a little apart keep the request's order."""
    index = {node: i for i, node in enumerate(order)}
    return {node: -float(math.floor(work)) + index.get(node, len(index)) / (len(index) + 1.0)
            for node, work in work_left_s.items()}


# ------------------------------------------------------------------------------------------- nodes
def capacity_verdict(*, spare_bytes: int, need_bytes: int, node: str) -> tuple[bool, str]:
    """Whether `node` may start: the spare memory of the nodes that count as room must hold what is still to
    move from the running nodes plus all of `node` (the planner's rule, applied live)."""
    if spare_bytes >= need_bytes:
        return True, ""
    return False, (f"waiting for capacity: spare memory {format_bytes(spare_bytes)} < {format_bytes(need_bytes)} "
                   f"still to move from running nodes plus {node}")


# ------------------------------------------------------------------------------------------- the drain
def drain_verdict(node_phases: Sequence[NodePhase], *, cancelling: bool) -> str | None:
    """The drain's final phase once every node is final ("Succeeded" only if every node drained), else None."""
    if not node_phases or not all(p.is_final for p in node_phases):
        return None
    if cancelling:
        return "Cancelled"
    return "Succeeded" if all(p is NodePhase.DRAINED for p in node_phases) else "Failed"
