"""The arq job functions: plan a drain, migrate one VMI (one attempt), finish a node, advance, reconcile.

Every job is at-least-once and idempotent (DESIGN.md rules 2 and 3): job ids are deterministic
(`orchestrator.keys`), a re-run re-reads the drain records and the cluster, adopts the VMIM it finds instead
of creating another, and changes nothing twice. Level-based: `advance_drain` looks at the whole drain and
does what is missing (start the next nodes, enqueue a lost job, finish a node, close the drain), so any job's
end, a crash or the reconcile cron moves a drain forward the same way.

A migration slot is held from VMIM creation until that VMIM is final or gone (rule 1): the job holds its lease
while it follows the VMIM, aborts it on a stall or a cancel and waits for KubeVirt to report it final before
releasing; a worker that dies keeps the slot (its lease expires) and the reconciler adopts or frees it after
looking at the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypedDict

import structlog
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Retry
from redis.exceptions import RedisError

from orchestrator import keys, queue
from orchestrator import kube as k
from orchestrator.clock import ScaledClock
from orchestrator.model import (
    DrainPhase,
    DrainRequest,
    FailureClass,
    NodePhase,
    VmPhase,
    VmVerdict,
    split_vmi_key,
)
from orchestrator.placement import choose_target, launcher_overhead
from orchestrator.planner import PlanError, plan_drain
from orchestrator.records import AttemptRecord, DrainLimits, DrainRecord, NodeRecord, VmRecord
from orchestrator.settings import Settings
from orchestrator.snapshot import parse_vmi
from orchestrator.store import DrainStore
from orchestrator.view import ATTEMPT_LABEL, DRAIN_LABEL, VMI_LABEL, ClusterView
from workers.semaphore import HeldSlot, RedisSemaphore, Scope, SemaphoreLost, hold

log = structlog.get_logger("workers.jobs")

FINAL_VMIM = ("Succeeded", "Failed")
NODE_ANNOTATION = "drainctl.io/drain-id"
DRAINED_ANNOTATION = "drainctl.io/drained-at"
RETRYABLE = {FailureClass.UNSCHEDULABLE, FailureClass.TARGET_FAILED, FailureClass.NOT_CONVERGING,
             FailureClass.TIMEOUT, FailureClass.UNKNOWN, FailureClass.ABORTED}


QUARANTINE_CLASSES = {FailureClass.TARGET_FAILED, FailureClass.UNSCHEDULABLE}
"""Failures that say something about the target node (not about the VM), counted per node per drain."""
QUARANTINE_AFTER = 2
"""Distinct VMs a node must fail before the drain stops sending any VM there."""


class Ctx(TypedDict, total=False):
    """What arq passes to every job (`ctx`), filled by the worker's on_startup."""

    redis: ArqRedis
    settings: Settings
    kube: k.Kube
    view: ClusterView
    store: DrainStore
    semaphore: RedisSemaphore
    clock: ScaledClock
    job_id: str
    job_try: int


Obj = dict[str, Any]
"""A Kubernetes object as the API returns it."""


def _set(**fields: Any) -> Callable[[NodeRecord | VmRecord | DrainRecord], None]:
    """A record update that sets `fields` (binds the values now, unlike a lambda in a loop)."""
    def apply(record: NodeRecord | VmRecord | DrainRecord) -> None:
        for name, value in fields.items():
            setattr(record, name, value)
    return apply


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def vmim_name(drain_id: str, vmi_name: str, attempt: int) -> str:
    """Deterministic VMIM name of one attempt (a re-run finds it instead of creating another)."""
    base = f"drain-{drain_id[:10]}-{vmi_name}"
    suffix = f"-{attempt}"
    return base[: 253 - len(suffix)].rstrip("-.") + suffix


def classify(reason: str) -> FailureClass:
    """Map KubeVirt's failure texts (reference kubevirt.md 3.5-3.7) onto our classes."""
    text = reason.lower()
    if "stuck for" in text or "not completed after" in text:
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


def _limits(ctx: Ctx, drain: DrainRecord) -> DrainLimits:
    """The drain's effective limits; before the plan stored them, the settings' own."""
    if drain.limits is not None:
        return drain.limits
    s = ctx["settings"]
    return DrainLimits(cluster=s.limits.max_in_flight_cluster, per_node=s.limits.max_in_flight_per_node,
                       inbound=s.limits.max_inbound_per_node, max_attempts=s.retry.max_attempts,
                       pending_timeout_s=s.timeouts.pending_timeout_s,
                       completion_timeout_per_gib=s.timeouts.completion_timeout_per_gib,
                       progress_timeout_s=s.timeouts.progress_timeout_s)


# ================================================================================================ enqueue
async def enqueue_control(ctx: Ctx, function: str, *args: Any, job_id: str) -> bool:
    return await queue.enqueue_control(ctx["redis"], ctx["settings"].connection.queue_name, function, *args,
                                       job_id=job_id)


async def enqueue_migrate(ctx: Ctx, drain_id: str, vmi: str, attempt: int, *, delay_s: float = 0.0) -> bool:
    ns, name = split_vmi_key(vmi)
    return await queue.enqueue_after(ctx["redis"], ctx["settings"].connection.queue_name, "migrate", drain_id, vmi,
                                     attempt, job_id=keys.migrate_job_id(drain_id, ns, name, attempt=attempt),
                                     delay_wall_s=ctx["settings"].to_wall(delay_s))


async def retrying(ctx: Ctx, work: Awaitable[str], *, what: str) -> str:
    """Run a job's work; a retryable failure (API 5xx/429/410/409, connection errors, Redis errors) runs the
    same job again after a doubling delay (arq Retry keeps its id: no second job, nothing done twice)."""
    try:
        return await work
    except (k.KubeError, RedisError, OSError) as exc:
        if isinstance(exc, k.KubeError) and not exc.retryable:
            raise
        job_try = int(ctx.get("job_try") or 1)
        delay = min(30.0, 0.5 * 2 ** min(job_try, 6))
        log.warning("job.retry", what=what, error=str(exc), try_=job_try, defer_s=delay)
        raise Retry(defer=delay) from exc


# =================================================================================================== plan
async def plan_job(ctx: Ctx, drain_id: str) -> str:
    return await retrying(ctx, _plan(ctx, drain_id), what=f"plan {drain_id}")


async def _plan(ctx: Ctx, drain_id: str) -> str:
    store = ctx["store"]
    drain = await store.get(drain_id)
    bound = log.bind(drain_id=drain_id)
    if drain.phase not in (DrainPhase.PENDING, DrainPhase.PLANNING):
        await advance_drain(ctx, drain_id)
        return drain.phase.value
    if drain.phase is DrainPhase.PENDING:
        await store.update(drain_id, _set(phase=DrainPhase.PLANNING, message="planning"))
    request = DrainRequest.from_json(drain.request)
    snapshot = await ctx["kube"].snapshot()
    try:
        plan = plan_drain(snapshot, request, ctx["settings"], now=time.time(), drain_id=drain_id)  # type: ignore[arg-type]
    except PlanError as exc:
        await _close_drain(ctx, drain_id, DrainPhase.FAILED, f"refused by the planner: {exc}")
        bound.warning("drain.refused", error=str(exc))
        return DrainPhase.FAILED.value
    nodes: dict[str, NodeRecord] = {}
    vms: dict[str, VmRecord] = {}
    for index, node_plan in enumerate(plan.nodes):
        nodes[node_plan.node] = NodeRecord(
            node=node_plan.node, phase=NodePhase.PENDING, index=index, wave=node_plan.wave,
            vms=len(node_plan.jobs) + len(node_plan.skipped) + len(node_plan.blocked))
        for job in node_plan.jobs:
            vms[job.vmi] = _vm_record(job.vmi, node_plan.node, VmPhase.QUEUED, VmVerdict.MIGRATE,
                                      job.reason, memory=job.memory_bytes, proposed=job.proposed_target)
        for decision in node_plan.skipped:
            vms[decision.vmi] = _vm_record(decision.vmi, node_plan.node, VmPhase.SKIPPED, decision.verdict,
                                           decision.reason)
        for decision in node_plan.blocked:
            vms[decision.vmi] = _vm_record(decision.vmi, node_plan.node, VmPhase.BLOCKED, decision.verdict,
                                           decision.reason)
    limits = plan.limits
    await store.create_children(drain_id, nodes=nodes, vms=vms)

    def running(d: DrainRecord) -> None:
        d.phase = DrainPhase.RUNNING
        d.message = f"draining {', '.join(plan.drain_nodes)}"
        d.plan = plan.to_json()
        d.started_at = time.time()
        d.limits = DrainLimits(cluster=int(limits.in_flight_cluster.effective),
                               per_node=int(limits.outbound_per_node.effective),
                               inbound=int(limits.inbound_per_node.effective),
                               max_attempts=limits.max_attempts,
                               pending_timeout_s=limits.pending_timeout_s,
                               completion_timeout_per_gib=limits.completion_timeout_per_gib.effective,
                               progress_timeout_s=limits.progress_timeout_s.effective)
        d.estimate_s = plan.estimate.total_s
        d.warnings = list(plan.warnings)

    for node in plan.drain_nodes:
        await ctx["kube"].cordon(node, annotations={NODE_ANNOTATION: drain_id})
        await store.update_node(drain_id, node, _set(phase=NodePhase.CORDONED))
        node_obj = await ctx["kube"].find(k.NODES, node)
        if node_obj is not None:
            await ctx["kube"].event(involved=node_obj, reason="DrainStarted",
                                    message=f"drainctl drain {drain_id}: node cordoned")
    await store.update(drain_id, running)
    await store.emit(drain_id, "drain.planned", nodes=list(plan.drain_nodes), vms=len(vms),
                     migrate=sum(1 for v in vms.values() if v.phase is VmPhase.QUEUED),
                     estimate_s=plan.estimate.total_s, warnings=list(plan.warnings))
    bound.info("drain.planned", nodes=list(plan.drain_nodes), vms=len(vms), estimate_s=plan.estimate.total_s)
    await advance_drain(ctx, drain_id)
    return DrainPhase.RUNNING.value


def _vm_record(vmi: str, node: str, phase: VmPhase, verdict: VmVerdict, reason: str, *, memory: int = 0,
               proposed: str | None = None) -> VmRecord:
    return VmRecord(vmi=vmi, node=node, phase=phase, verdict=verdict, reason=reason, memory_bytes=memory,
                    proposed_target=proposed, attempt=1 if phase is VmPhase.QUEUED else 0, message=reason)


# ================================================================================================ advance
async def advance_job(ctx: Ctx, drain_id: str) -> str:
    async def work() -> str:
        await advance_drain(ctx, drain_id)
        return "ok"

    return await retrying(ctx, work(), what=f"advance {drain_id}")


async def advance_drain(ctx: Ctx, drain_id: str, *, ensure: bool = False) -> None:
    """Do whatever the drain needs next; safe to call any time, from any worker, any number of times.
    `ensure` (the reconciler) also re-enqueues the jobs of VMs that should have one, in case one was lost."""
    lock = ctx["redis"].lock(keys.drain_lock_key(drain_id), timeout=60, blocking_timeout=30)
    async with lock:
        await _advance(ctx, drain_id, ensure=ensure)


async def _advance(ctx: Ctx, drain_id: str, *, ensure: bool) -> None:
    store = ctx["store"]
    view = await store.view(drain_id)
    drain = view.drain
    phase = drain.phase
    if phase.is_final:
        return
    if phase in (DrainPhase.PENDING, DrainPhase.PLANNING):
        await enqueue_control(ctx, "plan", drain_id, job_id=keys.plan_job_id(drain_id))
        return
    cancelling = phase is DrainPhase.CANCELLING
    by_node: dict[str, list[VmRecord]] = {}
    for vm in view.vms.values():
        by_node.setdefault(vm.node, []).append(vm)
    nodes = view.nodes_in_order()
    active = 0
    for node in nodes:
        name, nphase = node.node, node.phase
        vms = by_node.get(name, [])
        if nphase.is_final:
            continue
        if cancelling and nphase in (NodePhase.PENDING, NodePhase.CORDONED):
            for vm in vms:
                await _cancel_vm_if_idle(ctx, drain_id, vm.vmi, "the drain was cancelled before the node started")
            await store.update_node(drain_id, name, _set(
                phase=NodePhase.CANCELLED, message="cancelled before it started", finished_at=time.time()))
            await store.emit(drain_id, "node.cancelled", node=name)
            continue
        if nphase is NodePhase.MIGRATING:
            active += 1
            open_vms = [vm for vm in vms if not vm.phase.is_final]
            if cancelling:
                # Queued and waiting VMs have not started: they never will. In-flight ones are aborted by
                # their jobs (mode "abort") or left to finish (mode "finish").
                for vm in open_vms:
                    if vm.phase in (VmPhase.QUEUED, VmPhase.WAITING):
                        await _cancel_vm_if_idle(ctx, drain_id, vm.vmi, "the drain was cancelled")
                open_vms = [vm for vm in (await store.vms(drain_id)).values()
                            if vm.node == name and not vm.phase.is_final]
            if not open_vms:
                await enqueue_control(ctx, "finish", drain_id, name, job_id=keys.finish_job_id(drain_id, name))
            elif not cancelling:
                await _feed_node(ctx, drain_id, drain, open_vms, ensure=ensure)
        elif nphase is NodePhase.EVICTING:
            active += 1
            await enqueue_control(ctx, "finish", drain_id, name, job_id=keys.finish_job_id(drain_id, name))
    if not cancelling:
        await _start_nodes(ctx, drain_id, drain, nodes, by_node, active)
    nodes_now = await store.nodes(drain_id)
    if nodes_now and all(n.phase.is_final for n in nodes_now.values()):
        if cancelling:
            await _close_drain(ctx, drain_id, DrainPhase.CANCELLED, _summary(nodes_now, await store.vms(drain_id)))
        elif all(n.phase is NodePhase.DRAINED for n in nodes_now.values()):
            await _close_drain(ctx, drain_id, DrainPhase.SUCCEEDED, _summary(nodes_now, await store.vms(drain_id)))
        else:
            await _close_drain(ctx, drain_id, DrainPhase.FAILED, _summary(nodes_now, await store.vms(drain_id)))


async def _start_nodes(ctx: Ctx, drain_id: str, drain: DrainRecord, nodes: list[NodeRecord],
                       by_node: dict[str, list[VmRecord]], active: int) -> None:
    """Start the next nodes in order while fewer than max_parallel_nodes run and capacity allows."""
    store = ctx["store"]
    max_parallel = drain.max_parallel_nodes
    drain_nodes = {n.node for n in nodes}
    for node in nodes:
        if active >= max_parallel:
            return
        if node.phase not in (NodePhase.PENDING, NodePhase.CORDONED):
            continue
        name = node.node
        ok, message = _capacity_gate(ctx, drain_nodes, nodes, by_node, name)
        if not ok:
            if node.message != message:
                await store.update_node(drain_id, name, _set(message=message))
                await store.emit(drain_id, "node.waiting", node=name, message=message)
            return

        def start(n: NodeRecord) -> bool | None:
            if n.phase not in (NodePhase.PENDING, NodePhase.CORDONED):
                return False
            n.phase, n.started_at, n.message = NodePhase.MIGRATING, time.time(), "migrating VMs"
            return None

        rec = await store.update_node(drain_id, name, start)
        if rec.phase is not NodePhase.MIGRATING:
            continue
        active += 1
        queued = [vm for vm in by_node.get(name, []) if vm.phase is VmPhase.QUEUED]
        await _feed_node(ctx, drain_id, drain, queued, ensure=False)
        if not queued:
            await enqueue_control(ctx, "finish", drain_id, name, job_id=keys.finish_job_id(drain_id, name))
        await store.emit(drain_id, "node.started", node=name, vms=len(queued))
        log.info("node.started", drain_id=drain_id, node=name, vms=len(queued))


async def _feed_node(ctx: Ctx, drain_id: str, drain: DrainRecord, open_vms: list[VmRecord], *,
                     ensure: bool) -> None:
    """Keep a node's migrate jobs in the arq queue up to a window of its outbound limit + 1.

    The rest of the node's VMs wait in the drain records (phase Queued, in order). A window rather than every
    job at once: arq re-examines every queued job on every poll, so a full queue of 30 000 migrations would
    cost Redis round trips for nothing; the extra one keeps the next migration already waiting on the
    semaphore, so no pickup latency sits between two migrations."""
    window = (drain.limits.per_node if drain.limits else ctx["settings"].limits.max_in_flight_per_node) + 1
    live = [vm for vm in open_vms if vm.phase in (VmPhase.WAITING, VmPhase.MIGRATING)
            or (vm.phase is VmPhase.QUEUED and vm.enqueued == vm.attempt)]
    if ensure:
        for vm in live:
            await enqueue_migrate(ctx, drain_id, vm.vmi, vm.attempt,
                                  delay_s=max(0.0, (vm.not_before_s or 0.0) - time.time())
                                  * ctx["settings"].time_scale)
    fresh = [vm for vm in open_vms if vm.phase is VmPhase.QUEUED and vm.enqueued != vm.attempt]
    # Largest first (the planner's order): long jobs early shorten the node's makespan.
    fresh.sort(key=lambda vm: (-vm.memory_bytes, vm.vmi))
    for vm in fresh[: max(0, window - len(live))]:
        await ctx["store"].update_vm(drain_id, vm.vmi, _set(enqueued=vm.attempt))
        await enqueue_migrate(ctx, drain_id, vm.vmi, vm.attempt)


def _capacity_gate(ctx: Ctx, drain_nodes: set[str], nodes: list[NodeRecord],
                   by_node: dict[str, list[VmRecord]], name: str) -> tuple[bool, str]:
    """The spare-memory rule, live: free memory outside the drain must hold what is still to move from the
    running nodes plus everything of the node about to start."""
    view = ctx.get("view")
    if view is None or not view.nodes:
        return True, ""
    spare = sum(max(0, view.free_memory(node)) for node in view.parsed_nodes()
                if node.name not in drain_nodes and not node.unschedulable)
    running = {n.node for n in nodes if n.phase is NodePhase.MIGRATING}
    need = 0
    for node_name in running | {name}:
        for vm in by_node.get(node_name, []):
            if not vm.phase.is_final:
                mem = vm.memory_bytes
                need += mem + launcher_overhead(mem)
    if spare >= need:
        return True, ""
    gib = 1024**3
    return False, (f"waiting for capacity: spare memory {spare / gib:.1f} GiB < {need / gib:.1f} GiB still to "
                   f"move from running nodes plus {name}")


async def _cancel_vm_if_idle(ctx: Ctx, drain_id: str, vmi: str, reason: str) -> None:
    changed: list[bool] = []

    def cancel(vm: VmRecord) -> bool | None:
        changed.clear()
        if vm.phase.is_final or vm.phase is VmPhase.MIGRATING:
            return False
        vm.phase, vm.message, vm.finished_at = VmPhase.CANCELLED, reason, time.time()
        changed.append(True)
        return None

    await ctx["store"].update_vm(drain_id, vmi, cancel)
    if changed:
        await ctx["store"].emit(drain_id, "vm.cancelled", vmi=vmi, reason=reason)


def _summary(nodes: dict[str, NodeRecord], vms: dict[str, VmRecord]) -> str:
    counts: dict[str, int] = {}
    for vm in vms.values():
        counts[vm.phase.value] = counts.get(vm.phase.value, 0) + 1
    node_counts: dict[str, int] = {}
    for n in nodes.values():
        node_counts[n.phase.value] = node_counts.get(n.phase.value, 0) + 1
    parts = ", ".join(f"{v} {p}" for p, v in sorted(node_counts.items()))
    vm_parts = ", ".join(f"{v} {p}" for p, v in sorted(counts.items()))
    return f"nodes: {parts}; VMs: {vm_parts or 'none'}"


async def _close_drain(ctx: Ctx, drain_id: str, phase: DrainPhase, message: str) -> None:
    store = ctx["store"]

    def close(d: DrainRecord) -> None:
        if not d.phase.is_final:
            d.phase, d.message, d.finished_at = phase, message, time.time()

    drain = await store.update(drain_id, close)
    nodes = drain.nodes
    if phase is DrainPhase.CANCELLED and drain.cancel is not None and drain.cancel.uncordon:
        for node in nodes:
            with contextlib.suppress(k.NotFound):
                await ctx["kube"].cordon(node, unschedulable=False, annotations={NODE_ANNOTATION: None})
        await store.emit(drain_id, "nodes.uncordoned", nodes=nodes)
    await store.unlock_nodes(drain_id, nodes)
    await store.emit(drain_id, "drain.finished", phase=phase.value, message=message)
    log.info("drain.finished", drain_id=drain_id, phase=phase.value, message=message)


# ================================================================================================ migrate
async def _heartbeat(ctx: Ctx) -> None:
    """Keep arq's in-progress key short-lived but alive while this job runs, so that after a kill -9 another
    worker re-runs the job within seconds instead of after the longest job timeout (arq #402/#407)."""
    job_id = ctx.get("job_id")
    if not job_id:
        return
    key = in_progress_key_prefix + job_id
    while True:
        with contextlib.suppress(Exception):
            await ctx["redis"].pexpire(key, 6000)
        await asyncio.sleep(2.0)


async def migrate_job(ctx: Ctx, drain_id: str, vmi: str, attempt: int) -> str:
    beat = asyncio.create_task(_heartbeat(ctx), name=f"heartbeat:{drain_id}:{vmi}:{attempt}")
    try:
        return await retrying(ctx, _migrate(ctx, drain_id, vmi, attempt), what=f"migrate {vmi} attempt {attempt}")
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat


class _Outcome:
    def __init__(self, phase: VmPhase, *, target: str | None, reason: str,
                 failure: FailureClass | None = None, vmim: str | None = None) -> None:
        self.phase = phase
        self.target = target
        self.reason = reason
        self.failure = failure
        self.vmim = vmim


async def _migrate(ctx: Ctx, drain_id: str, vmi: str, attempt: int) -> str:
    store = ctx["store"]
    bound = log.bind(drain_id=drain_id, vmi=vmi, attempt=attempt)
    rec = await store.vm(drain_id, vmi)
    if rec is None:
        return "unknown vm"
    if rec.phase.is_final:
        return rec.phase.value
    if rec.attempt != attempt:
        return "stale attempt"
    drain = await store.get(drain_id)
    ns, name = split_vmi_key(vmi)
    limits = _limits(ctx, drain)
    holder = keys.migration_holder_id(drain_id, ns, name, attempt=attempt)
    mig_name = vmim_name(drain_id, name, attempt)
    if drain.phase is DrainPhase.CANCELLING and rec.phase is not VmPhase.MIGRATING:
        await _cancel_vm_if_idle(ctx, drain_id, vmi, "the drain was cancelled")
        await ctx["semaphore"].release(holder)
        await advance_drain(ctx, drain_id)
        return VmPhase.CANCELLED.value
    source = rec.node
    scopes = [Scope(keys.CLUSTER_SCOPE, limits.cluster), Scope(keys.node_scope(source), limits.per_node)]
    if rec.phase is VmPhase.QUEUED:
        await store.update_vm(drain_id, vmi, _set(phase=VmPhase.WAITING, message="waiting for a migration slot"))
    meta = {"drain_id": drain_id, "vmi": vmi, "attempt": str(attempt), "vmim": f"{ns}/{mig_name}",
            "source": source}

    async def on_wait() -> None:
        bound.info("semaphore.waiting")

    outcome: _Outcome | None = None
    try:
        async with hold(ctx["semaphore"], holder, scopes, meta=meta, on_wait=on_wait) as slot:
            bound.info("semaphore.acquired", token=slot.lease.token)
            outcome = await _drive(ctx, slot, drain_id=drain_id, vmi=vmi, rec=rec, attempt=attempt,
                                   mig_name=mig_name, limits=limits, bound=bound)
    except SemaphoreLost as exc:
        # Someone adopted our lease (we stalled past it): run again and re-adopt it as its holder.
        bound.warning("semaphore.lost", error=str(exc))
        raise Retry(defer=1) from exc
    assert outcome is not None
    await _record_outcome(ctx, drain_id, vmi, attempt, outcome, bound)
    await advance_drain(ctx, drain_id)
    return outcome.phase.value


async def _drive(ctx: Ctx, slot: HeldSlot, *, drain_id: str, vmi: str, rec: VmRecord, attempt: int,
                 mig_name: str, limits: DrainLimits, bound: Any) -> _Outcome:
    """Create (or adopt) this attempt's VMIM and follow it to an end.

    If anything interrupts us once the VMIM may exist (the worker stops, the API or Redis fails), the slot is
    kept (rule 1): the job runs again and adopts the VMIM, or the reconciler frees the slot once it is final."""
    touched: list[bool] = []
    try:
        return await _drive_inner(ctx, slot, drain_id=drain_id, vmi=vmi, rec=rec, attempt=attempt,
                                  mig_name=mig_name, limits=limits, bound=bound, touched=touched)
    except BaseException:
        ns, _ = split_vmi_key(vmi)
        current = ctx["view"].vmims.get(f"{ns}/{mig_name}")
        if touched and (current is None or (current.get("status") or {}).get("phase") not in FINAL_VMIM):
            slot.keep()
        raise


async def _drive_inner(ctx: Ctx, slot: HeldSlot, *, drain_id: str, vmi: str, rec: VmRecord, attempt: int,
                       mig_name: str, limits: DrainLimits, bound: Any, touched: list[bool]) -> _Outcome:
    kube, view, clock = ctx["kube"], ctx["view"], ctx["clock"]
    ns, name = split_vmi_key(vmi)
    key = f"{ns}/{mig_name}"
    source = rec.node
    obj = view.vmims.get(key) or await kube.find(k.VMIMS, mig_name, ns)
    if obj is not None:
        touched.append(True)
    target: str | None = None
    if obj is None:
        # Re-read what may have changed while we waited for the slot: a cancel, or a newer attempt.
        fresh = await ctx["store"].vm(drain_id, vmi)
        drain = await ctx["store"].get(drain_id)
        if fresh is None or fresh.phase.is_final or fresh.attempt != attempt or \
                drain.phase.is_final or drain.phase is DrainPhase.CANCELLING:
            return _Outcome(VmPhase.CANCELLED, target=None, reason="the drain was cancelled",
                            failure=FailureClass.ABORTED)
        vmi_obj = await kube.find(k.VMIS, name, ns)
        if vmi_obj is None:
            return _Outcome(VmPhase.FAILED, target=None, reason="the VMI no longer exists",
                            failure=FailureClass.VM_GONE)
        now_node = (vmi_obj.get("status") or {}).get("nodeName")
        if now_node and now_node != source:
            return _Outcome(VmPhase.SUCCEEDED, target=now_node, reason=f"already running on {now_node}")
        choice = _choose(ctx, vmi_obj, source, rec, limits, quarantined=set(drain.quarantined))
        if choice.target is None:
            return _Outcome(VmPhase.FAILED, target=None, reason=choice.reason, failure=FailureClass.UNSCHEDULABLE)
        target = choice.target
        await slot.confirm()  # fencing: never create while our lease is not ours any more
        body = {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": mig_name, "namespace": ns,
                         "labels": {DRAIN_LABEL: drain_id, ATTEMPT_LABEL: str(attempt), VMI_LABEL: name},
                         "annotations": {"drainctl.io/fencing-token": str(slot.lease.token),
                                         "drainctl.io/source-node": source,
                                         "kubevirt.io/migrationUnschedulablePodTimeoutSeconds":
                                             str(int(limits.pending_timeout_s))}},
            "spec": {"vmiName": name, "addedNodeSelector": {"kubernetes.io/hostname": target}},
        }
        touched.append(True)  # from here on the VMIM may exist even if the call below fails
        while obj is None:
            try:
                obj = await kube.create(k.VMIMS, body, ns)
            except k.AlreadyExists:
                obj = await kube.get(k.VMIMS, mig_name, ns)
            except k.Rejected as exc:
                if "in-flight migration detected" in exc.message:
                    # Another migration of this VMI (KubeVirt's evacuation, a user) runs: wait for its end.
                    await _update_vm(ctx, drain_id, vmi, message=f"waiting: {exc.message}")
                    await clock.sleep(5.0)
                    continue
                return _Outcome(VmPhase.FAILED, target=target, reason=exc.message, failure=FailureClass.REJECTED)
            except k.NotFound:
                return _Outcome(VmPhase.FAILED, target=None, reason="the VMI no longer exists",
                                failure=FailureClass.VM_GONE)
        view.observe(obj)
        await _update_vm(ctx, drain_id, vmi, phase=VmPhase.MIGRATING, target=target, vmim=mig_name,
                         message=f"migrating to {target} ({choice.reason})", started_at=time.time(),
                         attempt_entry=AttemptRecord(attempt=attempt, vmim=mig_name, target=target,
                                                     started_at=time.time()))
        await ctx["store"].emit(drain_id, "migration.created", vmi=vmi, attempt=attempt, vmim=mig_name,
                                source=source, target=target)
        bound.info("migration.created", vmim=mig_name, target=target)
    else:
        target = ((obj.get("spec") or {}).get("addedNodeSelector") or {}).get("kubernetes.io/hostname")
        view.observe(obj)
        bound.info("migration.adopted", vmim=mig_name, target=target, phase=(obj.get("status") or {}).get("phase"))
        if rec.phase is not VmPhase.MIGRATING:
            await _update_vm(ctx, drain_id, vmi, phase=VmPhase.MIGRATING, target=target, vmim=mig_name,
                             message=f"migrating to {target} (adopted)")
    return await _follow(ctx, slot, drain_id=drain_id, vmi=vmi, key=key, target=target, rec=rec,
                         limits=limits, bound=bound)


def _choose(ctx: Ctx, vmi_obj: Obj, source: str, rec: VmRecord, limits: DrainLimits, *,
            quarantined: set[str]) -> Any:
    view = ctx["view"]
    vmi = parse_vmi(vmi_obj)
    nodes = view.parsed_nodes()
    by_name: dict[str, Any] = {n.name: n for n in nodes}
    free: dict[str, int] = {n.name: view.free_memory(n) for n in nodes}
    inbound = view.inbound_counts()
    need = vmi.memory_request_bytes + launcher_overhead(vmi.memory_request_bytes)
    return choose_target(vmi, source=by_name.get(source), nodes=nodes, free=free, inbound=inbound,
                         exclude=set(rec.failed_targets) | quarantined, need_bytes=need,
                         max_inbound=limits.inbound)


async def _follow(ctx: Ctx, slot: HeldSlot, *, drain_id: str, vmi: str, key: str, target: str | None,
                  rec: VmRecord, limits: DrainLimits, bound: Any) -> _Outcome:
    """Follow the VMIM through the shared watch; enforce our pending and completion timeouts; abort on a
    cancel; return when it is final (or gone)."""
    kube, view, clock, store = ctx["kube"], ctx["view"], ctx["clock"], ctx["store"]
    ns, mig_name = key.split("/", 1)
    started = clock.now()
    running_since: float | None = None
    pending_timeout = limits.pending_timeout_s
    progress_timeout = limits.progress_timeout_s
    last_change = started
    memory = rec.memory_bytes
    per_gib = limits.completion_timeout_per_gib
    # KubeVirt's own budget (per GB of migration data, decimal, rounded up) plus a margin: KubeVirt
    # normally aborts first; ours is the backstop for a migration that stalls where KubeVirt does not look.
    completion_budget = per_gib * max(1, math.ceil(memory / 1e9)) + 60.0
    last_phase: str | None = None
    last_cancel_check = 0.0
    abort_reason: tuple[str, FailureClass] | None = None
    cancel_seen = False
    while True:
        watch_cancel = abort_reason is None and not cancel_seen
        obj = await view.wait_vmim(key, _phase_changed(last_phase, view, drain_id if watch_cancel else None),
                                   timeout_s=1.0)
        if obj is None:
            obj = await kube.find(k.VMIMS, mig_name, ns)
            if obj is None:
                reason = abort_reason[0] if abort_reason else "the VMIM disappeared before it finished"
                return _Outcome(VmPhase.FAILED, target=target, reason=reason,
                                failure=abort_reason[1] if abort_reason else FailureClass.UNKNOWN, vmim=mig_name)
            view.observe(obj)
        status = obj.get("status") or {}
        phase = status.get("phase") or ""
        if phase != last_phase:
            bound.info("migration.phase", vmim=mig_name, phase=phase)
            last_change = clock.now()
            if phase == "Running" and running_since is None:
                running_since = clock.now()
                await _update_vm(ctx, drain_id, vmi, message=f"transferring to {target}")
                await store.emit(drain_id, "migration.running", vmi=vmi, vmim=mig_name, target=target)
            last_phase = phase
        if phase == "Succeeded":
            return _Outcome(VmPhase.SUCCEEDED, target=target, reason=f"migrated to {target}", vmim=mig_name)
        if phase == "Failed":
            reason = (status.get("migrationState") or {}).get("failureReason") or _failed_condition(obj)
            if abort_reason is not None:
                return _Outcome(VmPhase.FAILED, target=target, reason=f"{abort_reason[0]} ({reason})",
                                failure=abort_reason[1], vmim=mig_name)
            return _Outcome(VmPhase.FAILED, target=target, reason=reason, failure=classify(reason), vmim=mig_name)
        if slot.lost.is_set():
            raise SemaphoreLost(f"lease of {slot.lease.holder} lost while following {mig_name}")
        if abort_reason is not None:
            continue
        now = clock.now()
        if running_since is None and now - started > pending_timeout:
            abort_reason = (f"aborted by drainctl: not running after {pending_timeout:.0f} s (phase {phase or 'new'})",
                            FailureClass.UNSCHEDULABLE)
        elif running_since is None and now - last_change > progress_timeout and phase != "Pending":
            # Pending is KubeVirt's queue (its own limits); any other phase that stands still is stuck.
            abort_reason = (f"aborted by drainctl: no progress for {progress_timeout:.0f} s in phase {phase}",
                            FailureClass.TIMEOUT)
        elif running_since is not None and now - running_since > completion_budget:
            abort_reason = (f"aborted by drainctl: not completed within {completion_budget:.0f} s",
                            FailureClass.NOT_CONVERGING)
        elif (view.cancel_requested(drain_id) and not cancel_seen) or time.monotonic() - last_cancel_check > 5.0:
            # A cancel wakes us through the shared pub/sub listener; the slow poll covers a lost message.
            last_cancel_check = time.monotonic()
            cancel_seen = cancel_seen or view.cancel_requested(drain_id)
            drain = await store.get(drain_id)
            if drain.phase is DrainPhase.CANCELLING and (drain.cancel is None or drain.cancel.mode == "abort"):
                abort_reason = ("the drain was cancelled", FailureClass.ABORTED)
        if abort_reason is not None:
            bound.warning("migration.abort", vmim=mig_name, reason=abort_reason[0])
            await store.emit(drain_id, "migration.abort", vmi=vmi, vmim=mig_name, reason=abort_reason[0])
            await kube.delete(k.VMIMS, mig_name, ns, uid=obj["metadata"].get("uid"))


def _phase_changed(last: str | None, view: ClusterView, drain_id: str | None) -> Callable[[Obj | None], bool]:
    """Wake on a phase change, the VMIM vanishing, or (until we acted on it) a cancel of `drain_id`."""
    def changed(obj: Obj | None) -> bool:
        if obj is None or (obj.get("status") or {}).get("phase") != last:
            return True
        return drain_id is not None and view.cancel_requested(drain_id)
    return changed


def _failed_condition(obj: Obj) -> str:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "migrationAbortRequested":
            return "Migration failed due to being canceled"
    return "the migration failed without a reason"


async def _update_vm(ctx: Ctx, drain_id: str, vmi: str, *, phase: VmPhase | None = None,
                     target: str | None = None, vmim: str | None = None, message: str | None = None,
                     started_at: float | None = None, attempt_entry: AttemptRecord | None = None) -> VmRecord:
    def apply(vm: VmRecord) -> None:
        if phase is not None:
            vm.phase = phase
        if target is not None:
            vm.target = target
        if vmim is not None:
            vm.vmim = vmim
        if message is not None:
            vm.message = message
        if started_at is not None and vm.started_at is None:
            vm.started_at = started_at
        if attempt_entry is not None:
            vm.put_attempt(attempt_entry.model_copy())

    return await ctx["store"].update_vm(drain_id, vmi, apply)


async def _record_outcome(ctx: Ctx, drain_id: str, vmi: str, attempt: int, outcome: _Outcome, bound: Any) -> None:
    store = ctx["store"]
    drain = await store.get(drain_id)
    max_attempts = _limits(ctx, drain).max_attempts
    cancelled = outcome.phase is VmPhase.CANCELLED or (
        outcome.failure is FailureClass.ABORTED and drain.phase in (DrainPhase.CANCELLING, DrainPhase.CANCELLED))
    retry = (outcome.phase is VmPhase.FAILED and not cancelled and outcome.failure in RETRYABLE
             and attempt < max_attempts)
    now = time.time()
    backoff = ctx["settings"].timeouts.backoff(attempt + 1)

    def apply(vm: VmRecord) -> bool | None:
        if vm.phase.is_final or vm.attempt != attempt:
            return False
        entry = (vm.attempt_entry(attempt) or AttemptRecord(attempt=attempt)).model_copy()
        entry.finished_at, entry.outcome, entry.reason = now, outcome.phase, outcome.reason
        entry.failure_class, entry.target = outcome.failure, outcome.target
        entry.vmim = outcome.vmim or entry.vmim
        vm.put_attempt(entry)
        # Never retry onto the node that just failed this VM (a cancel is not the node's fault).
        if outcome.target and outcome.phase is VmPhase.FAILED and outcome.failure is not FailureClass.ABORTED:
            vm.failed_targets = sorted(set(vm.failed_targets) | {outcome.target})
        if outcome.phase is VmPhase.SUCCEEDED:
            vm.phase, vm.target, vm.message = VmPhase.SUCCEEDED, outcome.target, outcome.reason
            vm.finished_at, vm.failure_class = now, None
        elif cancelled:
            vm.phase, vm.message, vm.finished_at = VmPhase.CANCELLED, f"aborted in flight: {outcome.reason}", now
        elif retry:
            vm.phase, vm.attempt, vm.enqueued = VmPhase.QUEUED, attempt + 1, attempt + 1
            vm.failure_class = outcome.failure
            vm.not_before_s = now + ctx["settings"].to_wall(backoff)
            vm.message = f"attempt {attempt} failed ({outcome.reason}); retrying on another node in {backoff:.0f} s"
        else:
            vm.phase, vm.finished_at, vm.failure_class = VmPhase.FAILED, now, outcome.failure
            vm.message = f"failed after {attempt} attempt(s): {outcome.reason}"
        return None

    rec = await store.update_vm(drain_id, vmi, apply)
    if outcome.phase is VmPhase.FAILED and outcome.target and outcome.failure in QUARANTINE_CLASSES:
        await _note_target_failure(ctx, drain_id, outcome.target, vmi, outcome.reason)
    await store.emit(drain_id, f"vm.{rec.phase.value.lower()}", vmi=vmi, attempt=attempt, target=outcome.target,
                     reason=outcome.reason, failure_class=outcome.failure.value if outcome.failure else None)
    bound.info("migration.finished", phase=outcome.phase.value, reason=outcome.reason,
               failure_class=outcome.failure.value if outcome.failure else None)
    vmi_obj = await ctx["kube"].find(k.VMIS, *reversed(split_vmi_key(vmi)))
    if vmi_obj is not None:
        await ctx["kube"].event(involved=vmi_obj, reason="DrainMigration" + outcome.phase.value,
                                message=f"drainctl drain {drain_id} attempt {attempt}: {outcome.reason}",
                                warning=outcome.phase is not VmPhase.SUCCEEDED)
    if rec.phase is VmPhase.QUEUED and rec.attempt == attempt + 1:
        await enqueue_migrate(ctx, drain_id, vmi, attempt + 1, delay_s=backoff)


async def _note_target_failure(ctx: Ctx, drain_id: str, node: str, vmi: str, reason: str) -> None:
    """Count a node's failures across the drain's VMs; at QUARANTINE_AFTER distinct VMs, no VM of this drain
    goes there any more. KubeVirt has no such memory: its scheduler picks the same broken node again."""
    newly: list[str] = []

    def note(d: DrainRecord) -> None:
        newly.clear()
        seen = set(d.target_failures.get(node) or [])
        seen.add(vmi)
        d.target_failures[node] = sorted(seen)
        if len(seen) >= QUARANTINE_AFTER and node not in d.quarantined:
            d.quarantined[node] = f"{len(seen)} VMs failed there; last: {reason}"
            newly.append(node)

    await ctx["store"].update(drain_id, note)
    if newly:
        await ctx["store"].emit(drain_id, "target.quarantined", node=node, reason=reason)
        log.warning("target.quarantined", drain_id=drain_id, node=node, reason=reason)


# ================================================================================================= finish
async def finish_job(ctx: Ctx, drain_id: str, node: str) -> str:
    return await retrying(ctx, _finish_node(ctx, drain_id, node), what=f"finish {node}")


async def _finish_node(ctx: Ctx, drain_id: str, node: str) -> str:
    store, kube, clock = ctx["store"], ctx["kube"], ctx["clock"]
    rec = await store.node(drain_id, node)
    if rec.phase.is_final:
        return rec.phase.value
    drain = await store.get(drain_id)
    vms = [v for v in (await store.vms(drain_id)).values() if v.node == node]
    if any(not v.phase.is_final for v in vms):
        await advance_drain(ctx, drain_id)
        return "not ready"
    if drain.phase is DrainPhase.CANCELLING:
        await store.update_node(drain_id, node, _set(phase=NodePhase.CANCELLED, message="drain cancelled",
                                                     finished_at=time.time()))
        await advance_drain(ctx, drain_id)
        return NodePhase.CANCELLED.value
    left = [v for v in vms if v.phase is not VmPhase.SUCCEEDED]
    failed = any(v.phase is VmPhase.FAILED for v in left)
    staying = {v.name for v in left}
    await store.update_node(drain_id, node, _set(phase=NodePhase.EVICTING, message="evicting the remaining pods"))
    deadline = clock.now() + 600.0
    evicted = 0
    while True:
        pods, _ = await kube.list(k.PODS, field_selector=f"spec.nodeName={node}")
        pending = []
        for pod in pods:
            meta = pod["metadata"]
            owners = meta.get("ownerReferences") or []
            if any(o.get("kind") == "DaemonSet" for o in owners):
                continue
            if "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
                continue
            labels = meta.get("labels") or {}
            phase = (pod.get("status") or {}).get("phase")
            domain = (meta.get("annotations") or {}).get("kubevirt.io/domain")
            if labels.get("kubevirt.io") == "virt-launcher" and phase not in ("Succeeded", "Failed") and \
                    domain in staying:
                continue  # a VM we could not move: evicting would stop it or start KubeVirt's own evacuation
            pending.append(pod)
        if not pending:
            break
        if clock.now() > deadline:
            names = ", ".join(f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in pending[:5])
            stuck = f"pods still on the node after 600 s of evictions: {names}"
            await store.update_node(drain_id, node, _set(phase=NodePhase.FAILED, finished_at=time.time(),
                                                         message=stuck))
            await advance_drain(ctx, drain_id)
            return NodePhase.FAILED.value
        for pod in pending:
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            try:
                await kube.evict(meta["namespace"], meta["name"])
                evicted += 1
            except k.NotFound:
                continue
            except k.TooManyRequests as exc:
                refused = f"eviction of {meta['namespace']}/{meta['name']} refused, retrying: {exc.message}"
                await store.update_node(drain_id, node, _set(message=refused))
        await clock.sleep(5.0)
    node_obj = await kube.find(k.NODES, node)
    if left:
        names = ", ".join(f"{v.vmi} ({v.phase.value}: {v.message})" for v in left[:5])
        message = f"{len(left)} VM(s) could not be moved and stay on the node: {names}"
        final = NodePhase.FAILED if failed else NodePhase.INCOMPLETE
        await store.update_node(drain_id, node, _set(phase=final, message=message, finished_at=time.time(),
                                                     evicted=evicted))
        if node_obj is not None:
            await kube.event(involved=node_obj, reason="DrainFailed", message=message, warning=True)
        await store.emit(drain_id, "node.failed", node=node, message=message)
    else:
        await kube.annotate(k.NODES, node, {DRAINED_ANNOTATION: _now_iso(), NODE_ANNOTATION: drain_id})
        await store.update_node(drain_id, node, _set(phase=NodePhase.DRAINED, message="drained",
                                                     finished_at=time.time(), evicted=evicted))
        if node_obj is not None:
            await kube.event(involved=node_obj, reason="NodeDrained",
                             message=f"drainctl drain {drain_id}: every VM migrated, {evicted} pod(s) evicted")
        await store.emit(drain_id, "node.drained", node=node, evicted=evicted)
    log.info("node.finished", drain_id=drain_id, node=node, left=len(left), evicted=evicted)
    await advance_drain(ctx, drain_id)
    return (NodePhase.FAILED if failed else NodePhase.INCOMPLETE).value if left else NodePhase.DRAINED.value


# ============================================================================================== reconcile
async def reconcile_job(ctx: Ctx) -> str:
    """Periodic: advance every open drain, and settle expired semaphore leases against the cluster."""
    store, sem, kube = ctx["store"], ctx["semaphore"], ctx["kube"]
    opened = 0
    for drain_id in await store.ids():
        drain = await store.find(drain_id)
        if drain is None or drain.phase.is_final:
            continue
        opened += 1
        await advance_drain(ctx, drain_id, ensure=True)
    adopted = released = 0
    for info in await sem.expired():
        meta = dict(info.meta)
        vmim = meta.get("vmim", "")
        ns, _, name = vmim.partition("/")
        obj = await kube.find(k.VMIMS, name, ns) if name else None
        phase = ((obj or {}).get("status") or {}).get("phase")
        if obj is not None and phase not in FINAL_VMIM:
            await sem.adopt(info.holder, expected_token=info.token)
            adopted += 1
        else:
            await sem.release(info.holder, token=info.token)
            released += 1
        m_drain, m_vmi, m_attempt = meta.get("drain_id"), meta.get("vmi"), meta.get("attempt")
        if m_drain and m_vmi and m_attempt:
            rec = await store.vm(m_drain, m_vmi)
            if rec is not None and not rec.phase.is_final and rec.attempt == int(m_attempt):
                await enqueue_migrate(ctx, m_drain, m_vmi, int(m_attempt))
    if adopted or released:
        log.info("reconcile.leases", adopted=adopted, released=released)
    return f"drains={opened} adopted={adopted} released={released}"
