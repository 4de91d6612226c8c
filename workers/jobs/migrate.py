"""The migrate job: one attempt of one VM, from semaphore slot to a final VMIM and a recorded outcome.

A migration slot is held from VMIM creation until that VMIM is final or gone (rule 1): the job holds its lease
while it follows the VMIM, aborts it on a stall or a cancel and waits for KubeVirt to report it final before
releasing; a worker that dies keeps the slot (its lease expires) and the reconciler adopts or frees it after
looking at the cluster. Timers run on the injected clock and count from the stamps in the attempt record, so
a re-run of the job (a crash, an API error) continues the budgets instead of restarting them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from arq.worker import Retry

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.model import (
    ATTEMPT_LABEL,
    DRAIN_ID_LABEL,
    FENCING_TOKEN_ANNOTATION,
    FINAL_MIGRATION_PHASES,
    SOURCE_NODE_ANNOTATION,
    UNSCHEDULABLE_TIMEOUT_ANNOTATION,
    VMI_LABEL,
    DrainPhase,
    FailureClass,
    VmPhase,
    split_vmi_key,
)
from orchestrator.placement import choose_target
from orchestrator.records import AttemptRecord, DrainLimits, DrainRecord, TransferRecord, VmRecord
from orchestrator.rules import vm_memory_on_target
from orchestrator.snapshot import migration_transfer_s, parse_vmi
from orchestrator.tuning import transfer_sample
from orchestrator.view import ClusterView
from workers.jobs.advance import advance_drain
from workers.jobs.common import (
    QUARANTINE_AFTER,
    Ctx,
    Obj,
    assign,
    cancel_vm_if_idle,
    enqueue_migrate,
    guarded,
    limits_of,
    log,
    vmim_name,
)
from workers.jobs.decisions import (
    Abort,
    Settle,
    classify,
    completion_budget_s,
    migration_timeout,
    settle_attempt,
    wait_expired,
)
from workers.jobs.ladder import (
    Rung,
    apply_rung,
    escalates,
    hopeless,
    needs_policy,
    next_rung,
    release_rung,
    vm_rungs,
)
from workers.jobs.verdict import VerdictWatch
from workers.semaphore import Chooser, HeldSlot, Scope, SemaphoreLost, hold

CANNOT_CONVERGE = "CannotConverge"
IN_FLIGHT_ELSEWHERE = "in-flight migration detected"
"""KubeVirt's admission refusal while another migration of the VMI runs (an evacuation, a user's)."""
CANCEL_POLL_S = 5.0
"""Wall seconds between reads of the drain record while following (a cancel normally arrives by pub/sub)."""


# ================================================================================================ migrate
async def migrate_job(ctx: Ctx, drain_id: str, vmi: str, attempt: int) -> str:
    # No per-job heartbeat: a started job leaves arq's queue and its worker's alive key stands for it; when that
    # key expires (kill -9) the job goes back into the queue within seconds (workers.loop.requeue_orphans).
    async def failed(reason: str) -> None:
        await _record_outcome(ctx, drain_id, vmi, attempt,
                              Outcome(VmPhase.FAILED, target=None, reason=reason, failure=FailureClass.UNKNOWN),
                              log.bind(drain_id=drain_id, vmi=vmi, attempt=attempt))
        await advance_drain(ctx, drain_id)

    return await guarded(ctx, _migrate(ctx, drain_id, vmi, attempt), what=f"migrate {vmi} attempt {attempt}",
                         on_failure=failed)


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as this job saw it."""

    phase: VmPhase
    target: str | None
    reason: str
    failure: FailureClass | None = None
    vmim: str | None = None


class _Settled(Exception):
    """Raised by the target chooser when the attempt has an outcome without migrating (no target fits, the VMI
    is gone or already elsewhere)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


@dataclass(frozen=True)
class _Busy:
    """KubeVirt refused the VMIM: another migration of the VMI runs. The job waits for it without a slot."""

    message: str


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
    limits = limits_of(ctx, drain)
    holder = keys.migration_holder_id(drain_id, ns, name, attempt=attempt)
    mig_name = vmim_name(drain_id, name, attempt)
    if drain.phase is DrainPhase.CANCELLING and rec.phase is not VmPhase.MIGRATING:
        await cancel_vm_if_idle(ctx, drain_id, vmi, "the drain was cancelled")
        await ctx["semaphore"].release(holder)
        await advance_drain(ctx, drain_id)
        return VmPhase.CANCELLED.value
    source = rec.node
    rung = await _rung(ctx, drain, rec, attempt)
    solo = rung is Rung.SOLO
    per_node = limits.node_parallel.get(source, limits.per_node)
    # Solo: the whole of the source node's scope (and, in the chooser, of the target's inbound scope).
    scopes = [Scope(keys.CLUSTER_SCOPE, limits.cluster),
              Scope(keys.node_scope(source), per_node, weight=per_node if solo else 1)]
    if rec.phase is VmPhase.QUEUED:
        await store.update_vm(drain_id, vmi, assign(phase=VmPhase.WAITING, message="waiting for a migration slot"))
    meta = {"drain_id": drain_id, "vmi": vmi, "attempt": str(attempt), "vmim": f"{ns}/{mig_name}",
            "source": source}

    async def on_wait() -> None:
        bound.info("semaphore.waiting")

    priority = await _priority(ctx, drain_id, rec)
    result: Outcome | _Busy | None = None
    try:
        async with hold(ctx["semaphore"], holder, scopes, meta=meta, on_wait=on_wait, priority=priority,
                        choose=_target_chooser(ctx, drain_id, vmi, rec, limits, mig_name, solo=solo)) as slot:
            bound.info("semaphore.acquired", token=slot.lease.token, target=keys.inbound_node(slot.lease.chosen),
                       rung=_rung_value(rung))
            result = await _drive(ctx, slot, drain_id=drain_id, vmi=vmi, rec=rec, attempt=attempt,
                                  mig_name=mig_name, limits=limits, bound=bound, rung=rung)
    except _Settled as settled:
        result = settled.outcome
    except SemaphoreLost as exc:
        # Someone adopted our lease (we stalled past it): run again and re-adopt it as its holder.
        bound.warning("semaphore.lost", error=str(exc))
        raise Retry(defer=1) from exc
    assert result is not None
    if needs_policy(rung):
        await release_rung(ctx, namespace=ns, name=name, policy_name=mig_name)
    if isinstance(result, _Busy):
        result = await _wait_elsewhere(ctx, drain_id, vmi, rec, limits, result.message)
    await _record_outcome(ctx, drain_id, vmi, attempt, result, bound)
    await advance_drain(ctx, drain_id)
    return result.phase.value


async def _rung(ctx: Ctx, drain: DrainRecord, rec: VmRecord, attempt: int) -> Rung | None:
    """The ladder's rung of this attempt; the VM's annotations are read only when the last attempt escalated or
    was judged unable to converge (other VMs cost no request)."""
    previous = rec.attempt_entry(attempt - 1)
    if previous is None and rec.expected_rung is None:
        return None
    if previous is not None and previous.rung is None and previous.convergence is None:
        return None
    allowed, _ = await vm_rungs(ctx, drain, rec.namespace, rec.name)
    return next_rung(rec, attempt, allowed)


async def _priority(ctx: Ctx, drain_id: str, rec: VmRecord) -> float | None:
    """This VM's place in the semaphore's queue: its node's priority (written by the advance step), larger
    VMs of the node first. None (no order) before the first advance wrote one."""
    raw = await ctx["redis"].hget(keys.drain_priorities_key(drain_id), rec.node)  # type: ignore[misc]
    if raw is None:
        return None
    return float(raw) - rec.memory_bytes / 1e15


async def _wait_elsewhere(ctx: Ctx, drain_id: str, vmi: str, rec: VmRecord, limits: DrainLimits,
                          message: str) -> Outcome:
    """Another migration of the VMI runs (KubeVirt refused ours). Wait for its end with our slot released
    (it already counts against KubeVirt's limits): run the job again later, until a cancel or a deadline."""
    store, clock = ctx["store"], ctx["clock"]
    drain = await store.get(drain_id)
    if drain.phase is DrainPhase.CANCELLING or drain.phase.is_final:
        return Outcome(VmPhase.CANCELLED, target=None, reason="the drain was cancelled", failure=FailureClass.ABORTED)
    now = clock.time()
    limit = limits.pending_timeout_s + completion_budget_s(rec.memory_bytes, limits.completion_timeout_per_gib)

    def note(vm: VmRecord) -> None:
        if vm.busy_since is None:
            vm.busy_since = now
        vm.message = f"waiting for another migration of the VM: {message}"

    fresh = await store.update_vm(drain_id, vmi, note)
    waited = clock.since(fresh.busy_since or now)
    if wait_expired(waited_s=waited, limit_s=limit):
        return Outcome(VmPhase.FAILED, target=None, failure=FailureClass.CONFLICT,
                       reason=f"another migration of the VM was still running after {waited:.0f} s: {message}")
    raise Retry(defer=ctx["settings"].to_wall(max(5.0, limit / 40)))


async def _drive(ctx: Ctx, slot: HeldSlot, *, drain_id: str, vmi: str, rec: VmRecord, attempt: int,
                 mig_name: str, limits: DrainLimits, bound: Any, rung: Rung | None) -> Outcome | _Busy:
    """Create (or adopt) this attempt's VMIM and follow it to an end.

    If anything interrupts us once the VMIM may exist (the worker stops, the API or Redis fails), the slot is
    kept (rule 1): the job runs again and adopts the VMIM, or the reconciler frees the slot once it is final."""
    touched: list[bool] = []
    try:
        return await _drive_inner(ctx, slot, drain_id=drain_id, vmi=vmi, rec=rec, attempt=attempt,
                                  mig_name=mig_name, limits=limits, bound=bound, touched=touched, rung=rung)
    except BaseException:
        ns, _ = split_vmi_key(vmi)
        current = ctx["view"].vmims.get(f"{ns}/{mig_name}")
        if touched and (current is None or (current.get("status") or {}).get("phase") not in FINAL_MIGRATION_PHASES):
            slot.keep()
        raise


async def _drive_inner(ctx: Ctx, slot: HeldSlot, *, drain_id: str, vmi: str, rec: VmRecord, attempt: int,
                       mig_name: str, limits: DrainLimits, bound: Any, touched: list[bool],
                       rung: Rung | None) -> Outcome | _Busy:
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
            return Outcome(VmPhase.CANCELLED, target=None, reason="the drain was cancelled",
                           failure=FailureClass.ABORTED)
        vmi_obj = await kube.find(k.VMIS, name, ns)
        if vmi_obj is None:
            return Outcome(VmPhase.FAILED, target=None, reason="the VMI no longer exists",
                           failure=FailureClass.VM_GONE)
        now_node = (vmi_obj.get("status") or {}).get("nodeName")
        if now_node and now_node != source:
            return Outcome(VmPhase.SUCCEEDED, target=now_node, reason=f"already running on {now_node}")
        target = keys.inbound_node(slot.lease.chosen)
        # Judge the target again on the VMI as it is now (the chooser read it before waiting); this also
        # parses it, so a VMI that became unreadable fails here.
        choice = _choose(ctx, vmi_obj, source, rec, limits, quarantined=set(drain.quarantined),
                         max_inbound=None if target else limits.inbound,
                         last_resort=set(drain.request.get("last_resort_targets") or ()))
        if target is None:  # a lease granted before inbound scopes existed: choose as it was chosen then
            if choice.target is None:
                return Outcome(VmPhase.FAILED, target=None, reason=choice.reason, failure=FailureClass.UNSCHEDULABLE)
            target = choice.target
        elif target not in choice.ranked:
            # The VMI or the node changed while we waited: give the slot back and choose again.
            bound.info("migration.target_changed", target=target, reason=choice.reason)
            raise Retry(defer=1)
        why = choice.reason if choice.target == target else f"{target}: inbound slot taken"
        await slot.confirm()  # fencing: never create while our lease is not ours any more
        if needs_policy(rung):
            assert rung is not None
            touched.append(True)  # the rung's policy and labels are released with the attempt
            await apply_rung(ctx, drain_id=drain_id, namespace=ns, name=name, policy_name=mig_name, rung=rung)
        if rung is not None:
            why += f", escalated: {rung.value}"
        body = {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": mig_name, "namespace": ns,
                         "labels": {DRAIN_ID_LABEL: drain_id, ATTEMPT_LABEL: str(attempt), VMI_LABEL: name},
                         "annotations": {FENCING_TOKEN_ANNOTATION: str(slot.lease.token),
                                         SOURCE_NODE_ANNOTATION: source,
                                         UNSCHEDULABLE_TIMEOUT_ANNOTATION:
                                             str(int(limits.pending_timeout_s))}},
            "spec": {"vmiName": name, "addedNodeSelector": {"kubernetes.io/hostname": target}},
        }
        touched.append(True)  # from here on the VMIM may exist even if the call below fails
        try:
            obj = await kube.create(k.VMIMS, body, ns)
        except k.AlreadyExists:
            obj = await kube.get(k.VMIMS, mig_name, ns)
        except k.Rejected as exc:
            if IN_FLIGHT_ELSEWHERE in exc.message:
                return _Busy(exc.message)
            return Outcome(VmPhase.FAILED, target=target, reason=exc.message, failure=FailureClass.REJECTED)
        except k.NotFound:
            return Outcome(VmPhase.FAILED, target=None, reason="the VMI no longer exists",
                           failure=FailureClass.VM_GONE)
        view.observe(obj)
        now = clock.time()

        def created(vm: VmRecord) -> None:
            vm.phase, vm.target, vm.vmim, vm.busy_since = VmPhase.MIGRATING, target, mig_name, None
            vm.message = f"migrating to {target} ({why})"
            if vm.started_at is None:
                vm.started_at = now
            entry = vm.attempt_entry(attempt)
            if entry is None or entry.vmim != mig_name:
                vm.put_attempt(AttemptRecord(attempt=attempt, vmim=mig_name, target=target, started_at=now,
                                             rung=_rung_value(rung)))

        rec = await ctx["store"].update_vm(drain_id, vmi, created)
        await ctx["store"].emit(drain_id, "migration.created", vmi=vmi, attempt=attempt, vmim=mig_name,
                                source=source, target=target)
        bound.info("migration.created", vmim=mig_name, target=target)
    else:
        target = ((obj.get("spec") or {}).get("addedNodeSelector") or {}).get("kubernetes.io/hostname")
        view.observe(obj)
        bound.info("migration.adopted", vmim=mig_name, target=target, phase=(obj.get("status") or {}).get("phase"))
        created_ts = clock.time()

        def adopted(vm: VmRecord) -> None:
            if vm.phase is not VmPhase.MIGRATING:
                vm.message = f"migrating to {target} (adopted)"
            vm.phase, vm.target, vm.vmim = VmPhase.MIGRATING, target, mig_name
            if vm.attempt_entry(attempt) is None:
                vm.put_attempt(AttemptRecord(attempt=attempt, vmim=mig_name, target=target, started_at=created_ts))

        rec = await ctx["store"].update_vm(drain_id, vmi, adopted)
    return await _follow(ctx, slot, drain_id=drain_id, vmi=vmi, key=key, target=target, rec=rec,
                         limits=limits, bound=bound)


def _rung_value(rung: Rung | None) -> str | None:
    return None if rung is None else rung.value


def _target_chooser(ctx: Ctx, drain_id: str, vmi: str, rec: VmRecord, limits: DrainLimits,
                    mig_name: str, *, solo: bool = False) -> Chooser:
    """The targets this attempt may take an inbound slot on, best first, for the semaphore to pick one
    atomically with the cluster and source-node slots (our inbound limit; the view's counts may be stale).

    Called before every try while the job waits for room, so the choice follows the cluster. The VMIM of this
    attempt, if it exists already (a re-run), fixes the target. Raises _Settled when the attempt needs no
    slot: no target fits, the VMI is gone or already runs elsewhere. A solo attempt takes a target's whole
    inbound scope: only a target that receives no other migration of ours."""
    ns, name = split_vmi_key(vmi)
    fetched: list[Obj] = []
    weight = limits.inbound if solo else 1

    async def choose() -> list[Scope]:
        # The shared watch sees our VMIMs; ask the API too on the first try only (a job re-run at once).
        existing = ctx["view"].vmims.get(f"{ns}/{mig_name}")
        if existing is None and not fetched:
            existing = await ctx["kube"].find(k.VMIMS, mig_name, ns)
        target = (((existing or {}).get("spec") or {}).get("addedNodeSelector") or {}).get("kubernetes.io/hostname")
        if target:
            return [Scope(keys.inbound_scope(target), limits.inbound, weight=weight)]
        if not fetched:
            vmi_obj = await ctx["kube"].find(k.VMIS, name, ns)
            if vmi_obj is None:
                raise _Settled(Outcome(VmPhase.FAILED, target=None, reason="the VMI no longer exists",
                                       failure=FailureClass.VM_GONE))
            now_node = (vmi_obj.get("status") or {}).get("nodeName")
            if now_node and now_node != rec.node:
                raise _Settled(Outcome(VmPhase.SUCCEEDED, target=now_node, reason=f"already running on {now_node}"))
            fetched.append(vmi_obj)
        drain = await ctx["store"].get(drain_id)
        if drain.phase is DrainPhase.CANCELLING or drain.phase.is_final:
            # Cancelled while this job waited for room: it never started, and stops waiting now.
            raise _Settled(Outcome(VmPhase.CANCELLED, target=None, reason="the drain was cancelled",
                                   failure=FailureClass.ABORTED))
        choice = _choose(ctx, fetched[0], rec.node, rec, limits, quarantined=set(drain.quarantined),
                         max_inbound=None, last_resort=set(drain.request.get("last_resort_targets") or ()))
        if not choice.ranked:
            raise _Settled(Outcome(VmPhase.FAILED, target=None, reason=choice.reason,
                                   failure=FailureClass.UNSCHEDULABLE))
        # Enough options that some have room whenever the cluster scope has (each full one holds >= 1 slot).
        return [Scope(keys.inbound_scope(n), limits.inbound, weight=weight)
                for n in choice.ranked[: max(8, limits.cluster + 1)]]

    return choose


def _choose(ctx: Ctx, vmi_obj: Obj, source: str, rec: VmRecord, limits: DrainLimits, *,
            quarantined: set[str], max_inbound: int | None, last_resort: set[str] | None = None) -> Any:
    view = ctx["view"]
    vmi = parse_vmi(vmi_obj)
    nodes = view.parsed_nodes()
    by_name: dict[str, Any] = {n.name: n for n in nodes}
    free: dict[str, int] = {n.name: view.free_memory(n) for n in nodes}
    inbound = view.inbound_counts()
    need = vm_memory_on_target(vmi, launcher_pod_bytes=view.launcher_memory(vmi.namespace, vmi.name))
    return choose_target(vmi, source=by_name.get(source), nodes=nodes, free=free, inbound=inbound,
                         exclude=set(rec.failed_targets) | quarantined, need_bytes=need,
                         max_inbound=max_inbound, last_resort=last_resort or ())


async def _follow(ctx: Ctx, slot: HeldSlot, *, drain_id: str, vmi: str, key: str, target: str | None,
                  rec: VmRecord, limits: DrainLimits, bound: Any) -> Outcome:
    """Follow the VMIM through the shared watch; enforce our pending, progress and completion timeouts
    (counted from the attempt record's stamps, so a re-run continues them); abort on a cancel; return when
    it is final (or gone)."""
    kube, view, clock, store = ctx["kube"], ctx["view"], ctx["clock"], ctx["store"]
    ns, mig_name = key.split("/", 1)
    entry = rec.attempt_entry(rec.attempt)
    created_at = entry.started_at if entry is not None and entry.started_at is not None else clock.time()
    running_at = entry.running_at if entry is not None else None
    last_change = clock.time()
    completion_budget = completion_budget_s(rec.memory_bytes, limits.completion_timeout_per_gib)
    last_phase: str | None = None
    last_cancel_check = 0.0
    abort: Abort | None = None
    cancel_seen = False
    verdict = VerdictWatch(ctx, drain_id, vmi, ns, rec.name, rec.attempt)
    while True:
        watch_cancel = abort is None and not cancel_seen
        obj = await view.wait_vmim(key, _phase_changed(last_phase, view, drain_id if watch_cancel else None),
                                   timeout_s=verdict.wake_s(last_phase or ""))
        if obj is None:
            obj = await kube.find(k.VMIMS, mig_name, ns)
            if obj is None:
                return await _vanished(ctx, rec, target=target, vmim=mig_name, abort=abort)
            view.observe(obj)
        status = obj.get("status") or {}
        phase = status.get("phase") or ""
        if phase != last_phase:
            bound.info("migration.phase", vmim=mig_name, phase=phase)
            last_change = clock.time()
            if phase == "Running" and running_at is None:
                running_at = clock.time()
                await store.update_vm(drain_id, vmi, _mark_running(rec.attempt, running_at, target))
                await store.emit(drain_id, "migration.running", vmi=vmi, vmim=mig_name, target=target)
            last_phase = phase
        if phase == "Succeeded":
            return Outcome(VmPhase.SUCCEEDED, target=target, reason=f"migrated to {target}", vmim=mig_name)
        if phase == "Failed":
            reason = (status.get("migrationState") or {}).get("failureReason") or _failed_condition(obj)
            if abort is not None:
                return Outcome(VmPhase.FAILED, target=target, reason=f"{abort.reason} ({reason})",
                               failure=abort.failure, vmim=mig_name)
            return Outcome(VmPhase.FAILED, target=target, reason=reason, failure=classify(reason), vmim=mig_name)
        if slot.lost.is_set():
            raise SemaphoreLost(f"lease of {slot.lease.holder} lost while following {mig_name}")
        if abort is not None:
            continue
        abort = migration_timeout(
            phase=phase, since_created=clock.since(created_at),
            since_running=None if running_at is None else clock.since(running_at),
            since_change=clock.since(last_change), pending_timeout_s=limits.pending_timeout_s,
            progress_timeout_s=limits.progress_timeout_s, completion_budget=completion_budget)
        if abort is None and phase == "Running":
            abort = await verdict.check()
        if abort is None and ((view.cancel_requested(drain_id) and not cancel_seen)
                              or clock.time() - last_cancel_check > CANCEL_POLL_S):
            # A cancel wakes us through the shared pub/sub listener; the slow poll covers a lost message.
            last_cancel_check = clock.time()
            cancel_seen = cancel_seen or view.cancel_requested(drain_id)
            drain = await store.get(drain_id)
            if drain.phase is DrainPhase.CANCELLING and (drain.cancel is None or drain.cancel.mode == "abort"):
                abort = Abort("the drain was cancelled", FailureClass.ABORTED)
        if abort is not None:
            bound.warning("migration.abort", vmim=mig_name, reason=abort.reason)
            await store.emit(drain_id, "migration.abort", vmi=vmi, vmim=mig_name, reason=abort.reason)
            await kube.delete(k.VMIMS, mig_name, ns, uid=obj["metadata"].get("uid"))


def _mark_running(attempt: int, stamp: float, target: str | None) -> Callable[[VmRecord], None]:
    """Record when the transfer began (the completion budget counts from there, across re-runs)."""
    def running(vm: VmRecord) -> None:
        vm.message = f"transferring to {target}"
        current = vm.attempt_entry(attempt)
        if current is not None and current.running_at is None:
            vm.put_attempt(current.model_copy(update={"running_at": stamp}))
    return running


async def _vanished(ctx: Ctx, rec: VmRecord, *, target: str | None, vmim: str, abort: Abort | None) -> Outcome:
    """The VMIM is gone before we saw it final (deleted: our abort, or someone else). Where the VMI runs now
    says how it ended: an abort that lost the race leaves the VM on the target, migrated."""
    vmi_obj = await ctx["kube"].find(k.VMIS, rec.name, rec.namespace)
    node = ((vmi_obj or {}).get("status") or {}).get("nodeName")
    if node and node != rec.node:
        why = f" (the abort came too late: {abort.reason})" if abort is not None else ""
        return Outcome(VmPhase.SUCCEEDED, target=node, reason=f"migrated to {node}{why}", vmim=vmim)
    if abort is not None:
        return Outcome(VmPhase.FAILED, target=target, reason=abort.reason, failure=abort.failure, vmim=vmim)
    return Outcome(VmPhase.FAILED, target=target, reason="the VMIM disappeared before it finished",
                   failure=FailureClass.UNKNOWN, vmim=vmim)


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


async def _record_outcome(ctx: Ctx, drain_id: str, vmi: str, attempt: int, outcome: Outcome, bound: Any) -> None:
    store = ctx["store"]
    drain = await store.get(drain_id)
    allowed: frozenset[Rung] = frozenset()
    problem: str | None = None
    judged: AttemptRecord | None = None
    if outcome.phase is VmPhase.FAILED and outcome.failure is FailureClass.NOT_CONVERGING:
        # Only a VM judged unable to converge needs its rungs (two reads of the cluster).
        current = await store.vm(drain_id, vmi)
        judged = current.attempt_entry(attempt) if current is not None else None
        if judged is not None and judged.convergence == CANNOT_CONVERGE:
            allowed, problem = await vm_rungs(ctx, drain, *split_vmi_key(vmi))
    climbs = judged is not None and escalates(judged, allowed)
    settle = settle_attempt(outcome.phase, outcome.failure, attempt=attempt,
                            max_attempts=limits_of(ctx, drain).max_attempts, escalates=climbs,
                            drain_cancelled=drain.phase in (DrainPhase.CANCELLING, DrainPhase.CANCELLED))
    now = ctx["clock"].time()
    backoff = ctx["settings"].timeouts.backoff(attempt + 1)

    def apply(vm: VmRecord) -> bool | None:
        if vm.phase.is_final or vm.attempt != attempt:
            return False
        entry = (vm.attempt_entry(attempt) or AttemptRecord(attempt=attempt)).model_copy()
        entry.finished_at, entry.outcome, entry.reason = now, outcome.phase, outcome.reason
        entry.failure_class, entry.target = outcome.failure, outcome.target
        entry.vmim = outcome.vmim or entry.vmim
        vm.put_attempt(entry)
        vm.busy_since = None
        report = hopeless(entry, allowed, problem=problem) if settle in (Settle.RETRY, Settle.FAILED) else None
        if outcome.target and outcome.phase is VmPhase.FAILED and outcome.failure is not None \
                and outcome.failure.avoid_target:
            vm.failed_targets = sorted(set(vm.failed_targets) | {outcome.target})
        if settle is Settle.SUCCEEDED:
            vm.phase, vm.target, vm.message = VmPhase.SUCCEEDED, outcome.target, outcome.reason
            vm.finished_at, vm.failure_class = now, None
        elif settle is Settle.CANCELLED:
            vm.phase, vm.message, vm.finished_at = VmPhase.CANCELLED, f"aborted in flight: {outcome.reason}", now
        elif report is not None:
            vm.phase, vm.finished_at, vm.failure_class = VmPhase.FAILED, now, outcome.failure
            vm.message = f"failed after {attempt} attempt(s): {report}"
        elif settle is Settle.RETRY:
            vm.phase, vm.attempt, vm.enqueued = VmPhase.QUEUED, attempt + 1, attempt + 1
            vm.failure_class = outcome.failure
            vm.not_before_s = now + ctx["settings"].to_wall(backoff)
            upcoming = next_rung(vm, attempt + 1, allowed) if climbs else None
            if upcoming is not None:
                vm.message = f"attempt {attempt} failed ({outcome.reason}); escalating to the {upcoming.option} " \
                             f"rung in {backoff:.0f} s"
            else:
                vm.message = f"attempt {attempt} failed ({outcome.reason}); retrying on another node in " \
                             f"{backoff:.0f} s"
        else:
            vm.phase, vm.finished_at, vm.failure_class = VmPhase.FAILED, now, outcome.failure
            vm.message = f"failed after {attempt} attempt(s): {outcome.reason}"
        return None

    rec = await store.update_vm(drain_id, vmi, apply)
    await _record_transfer(ctx, drain_id, rec, attempt)
    if outcome.phase is VmPhase.FAILED and outcome.target and outcome.failure is not None \
            and outcome.failure.blames_target:
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


async def _record_transfer(ctx: Ctx, drain_id: str, rec: VmRecord, attempt: int) -> None:
    """A successful attempt counts towards its source node's observed bandwidth (orchestrator.tuning); a re-run
    records the same record again, which changes nothing."""
    entry = rec.attempt_entry(attempt)
    if rec.phase is not VmPhase.SUCCEEDED or entry is None or entry.outcome is not VmPhase.SUCCEEDED \
            or entry.finished_at is None:
        return
    vmim = ctx["view"].vmims.get(f"{rec.namespace}/{entry.vmim}") if entry.vmim else None
    sample = transfer_sample(running_at=entry.running_at, finished_at=entry.finished_at,
                             time_scale=ctx["settings"].time_scale, memory_bytes=rec.memory_bytes,
                             cluster_span_s=migration_transfer_s(vmim) if vmim is not None else None)
    if sample is None:
        return
    await ctx["store"].record_transfer(TransferRecord(
        source=rec.node, target=entry.target, vmi=rec.vmi, drain_id=drain_id, attempt=attempt,
        start_s=sample.start_s, end_s=sample.end_s, memory_bytes=sample.memory_bytes))


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
