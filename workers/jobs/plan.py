"""The plan job: carry out the plan the drain was submitted with (made again when it no longer matches the
cluster: `orchestrator.replan`), write its node and VM records, cordon the nodes, start advancing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.model import (
    NODE_DRAIN_ANNOTATION,
    DrainPhase,
    DrainPlan,
    DrainRequest,
    NodePhase,
    VmPhase,
    VmVerdict,
)
from orchestrator.planner import PlanError, plan_drain
from orchestrator.prometheus import MigrationMetricsReader
from orchestrator.records import DrainLimits, DrainRecord, NodeRecord, VmRecord
from orchestrator.replan import replan_reason
from orchestrator.settings import Settings
from orchestrator.view import drain_snapshot
from workers.jobs.advance import advance_drain, close_drain
from workers.jobs.common import Ctx, assign, guarded, log
from workers.jobs.tune import TuneConflict, apply_tuning, tuned_values


async def dirty_rates(ctx: Ctx, settings: Settings, nodes: list[str]) -> dict[str, float]:
    """The guests' last known dirty rates on `nodes` (the planner's input for hard VMs): from the worker's
    Prometheus reader, or one made from `settings` (a caller's dry run); `{}` without Prometheus."""
    reader = ctx.get("prometheus")
    if reader is not None and reader.enabled:
        return await reader.node_dirty_rates(nodes)
    if settings.connection.prometheus_url is None:
        return {}
    async with MigrationMetricsReader.from_settings(settings) as own:
        return await own.node_dirty_rates(nodes)


# =============================================================================================== dry plan
async def dry_plan_job(ctx: Ctx, request: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A dry run for a caller (`DrainService.plan`) from this worker's warm view: the caller lists nothing.
    Returns {"plan": plan JSON} or {"refused": [problems]}; the caller's settings, so the answer is the one it
    would have computed itself."""
    drain_request = DrainRequest.from_json(request)
    names = [str(n) for n in drain_request.nodes]
    snapshot = await drain_snapshot(ctx["kube"], names, ctx.get("view"))
    rates = await dirty_rates(ctx, settings, names)
    try:
        plan = plan_drain(snapshot, drain_request, settings, now=ctx["clock"].time(),
                          transfers=await ctx["store"].transfer_samples(names), dirty_rates=rates)
    except PlanError as exc:
        return {"refused": list(exc.problems)}
    return {"plan": plan.to_json()}


# =================================================================================================== plan
async def plan_job(ctx: Ctx, drain_id: str) -> str:
    async def failed(reason: str) -> None:
        await close_drain(ctx, drain_id, DrainPhase.FAILED, f"planning failed: {reason}")

    return await guarded(ctx, _plan(ctx, drain_id), what=f"plan {drain_id}", on_failure=failed)


async def _plan(ctx: Ctx, drain_id: str) -> str:
    store = ctx["store"]
    drain = await store.get(drain_id)
    bound = log.bind(drain_id=drain_id)
    if drain.phase not in (DrainPhase.PENDING, DrainPhase.PLANNING):
        await advance_drain(ctx, drain_id)
        return drain.phase.value
    if drain.phase is DrainPhase.PENDING:
        await store.update(drain_id, _only_from(DrainPhase.PENDING, phase=DrainPhase.PLANNING, message="planning"))
    request = DrainRequest.from_json(drain.request)
    # Planned once: the dry run the drain was submitted with (made with the submitter's settings, the plan it
    # showed and the one carried out) while it still matches this worker's warm view; else plan again here.
    submitted = await store.submitted_plan(drain_id)
    replan = _replan_reason(ctx, submitted)
    if submitted is not None and replan is None:
        plan = dataclasses.replace(submitted, drain_id=drain_id)  # type: ignore[arg-type]
    else:
        names = [str(n) for n in request.nodes]
        snapshot = await drain_snapshot(ctx["kube"], names, ctx.get("view"))
        rates = await dirty_rates(ctx, ctx["settings"], names)
        try:
            plan = plan_drain(snapshot, request, ctx["settings"], now=ctx["clock"].time(), drain_id=drain_id,  # type: ignore[arg-type]
                              transfers=await store.transfer_samples(names), dirty_rates=rates)
        except PlanError as exc:
            await close_drain(ctx, drain_id, DrainPhase.FAILED, f"refused by the planner: {exc}")
            bound.warning("drain.refused", error=str(exc), replanned=replan)
            return DrainPhase.FAILED.value
    nodes: dict[str, NodeRecord] = {}
    vms: dict[str, VmRecord] = {}
    start_on_rung = ctx["settings"].retry.start_on_expected_rung
    for index, node_plan in enumerate(plan.nodes):
        nodes[node_plan.node] = NodeRecord(
            node=node_plan.node, phase=NodePhase.PENDING, index=index, wave=node_plan.wave,
            vms=len(node_plan.jobs) + len(node_plan.skipped) + len(node_plan.blocked))
        for job in node_plan.jobs:
            vms[job.vmi] = _vm_record(job.vmi, node_plan.node, VmPhase.QUEUED, VmVerdict.MIGRATE,
                                      job.reason, memory=job.memory_bytes, proposed=job.proposed_target,
                                      expected_rung=(job.expected_rung if job.expected_hard and start_on_rung
                                                     else None))
        for decision in node_plan.skipped:
            vms[decision.vmi] = _vm_record(decision.vmi, node_plan.node, VmPhase.SKIPPED, decision.verdict,
                                           decision.reason)
        for decision in node_plan.blocked:
            vms[decision.vmi] = _vm_record(decision.vmi, node_plan.node, VmPhase.BLOCKED, decision.verdict,
                                           decision.reason)
    limits = plan.limits
    node_parallel: dict[str, int] = {}
    if plan.tuned and plan.tuning is not None:
        node_parallel = {n["node"]: int(n["parallel"]) for n in plan.tuning["nodes"]}

    def running(d: DrainRecord) -> bool | None:
        if d.phase is not DrainPhase.PLANNING:
            return False  # cancelled meanwhile: keep the cancel
        d.phase = DrainPhase.RUNNING
        d.message = f"draining {', '.join(plan.drain_nodes)}"
        d.plan = plan.to_json()
        d.started_at = ctx["clock"].time()
        d.limits = DrainLimits(cluster=int(limits.in_flight_cluster.effective),
                               per_node=int(limits.outbound_per_node.effective),
                               inbound=int(limits.inbound_per_node.effective),
                               max_attempts=limits.max_attempts,
                               pending_timeout_s=limits.pending_timeout_s,
                               completion_timeout_per_gib=limits.completion_timeout_per_gib.effective,
                               progress_timeout_s=limits.progress_timeout_s.effective,
                               node_parallel=node_parallel)
        d.estimate_s = plan.estimate.total_s
        d.warnings = list(plan.warnings)
        return None

    # Under the drain's lock, so that a cancel's advance step sees either no plan (and closes the drain
    # untouched) or a plan with its nodes cordoned, never a cordon landing after it closed the drain.
    async with ctx["redis"].lock(keys.drain_lock_key(drain_id), timeout=60, blocking_timeout=30):
        if (await store.get(drain_id)).phase is not DrainPhase.PLANNING:
            bound.info("drain.plan_dropped", reason="cancelled while planning")
        else:
            if plan.tuned and plan.tuning is not None:
                try:
                    await apply_tuning(ctx, drain_id, tuned_values(dict(plan.tuning)))
                except TuneConflict as exc:
                    await close_drain(ctx, drain_id, DrainPhase.FAILED, f"cannot tune: {exc}")
                    bound.warning("drain.refused", error=str(exc))
                    return DrainPhase.FAILED.value
            await store.create_children(drain_id, nodes=nodes, vms=vms)
            for node in plan.drain_nodes:
                await ctx["kube"].cordon(node, annotations={NODE_DRAIN_ANNOTATION: drain_id})
                await store.update_node(drain_id, node, assign(phase=NodePhase.CORDONED))
                node_obj = await ctx["kube"].find(k.NODES, node)
                if node_obj is not None:
                    await ctx["kube"].event(involved=node_obj, reason="DrainStarted",
                                            message=f"drainctl drain {drain_id}: node cordoned")
            await store.update(drain_id, running)
    if (await store.get(drain_id)).phase is not DrainPhase.RUNNING:
        await advance_drain(ctx, drain_id)
        return (await store.get(drain_id)).phase.value
    await store.emit(drain_id, "drain.planned", nodes=list(plan.drain_nodes), vms=len(vms),
                     migrate=sum(1 for v in vms.values() if v.phase is VmPhase.QUEUED),
                     estimate_s=plan.estimate.total_s, warnings=list(plan.warnings),
                     submitted_plan=replan is None, replanned=replan)
    bound.info("drain.planned", nodes=list(plan.drain_nodes), vms=len(vms), estimate_s=plan.estimate.total_s,
               submitted_plan=replan is None, replanned=replan)
    await advance_drain(ctx, drain_id)
    return DrainPhase.RUNNING.value


def _replan_reason(ctx: Ctx, submitted: DrainPlan | None) -> str | None:
    """None when the plan the drain was submitted with may be carried out; else why it is made again."""
    view = ctx.get("view")
    if submitted is None or view is None or not view.warm:
        vmis_on, nodes = None, None
    else:
        vmis_on = view.vmis_on([str(n.node) for n in submitted.nodes])
        nodes = {str(n.name): n for n in view.parsed_nodes()}
    return replan_reason(
        submitted, age_s=ctx["clock"].since(submitted.created_at) if submitted is not None else 0.0,
        max_age_s=ctx["settings"].timeouts.plan_reuse_s, vmis_on=vmis_on, nodes=nodes)


def _only_from(expected: DrainPhase, **fields: Any) -> Callable[[DrainRecord], bool | None]:
    """A drain update that sets `fields` only while the drain is still in phase `expected` (a cancel wins)."""
    def apply(record: DrainRecord) -> bool | None:
        if record.phase is not expected:
            return False
        for name, value in fields.items():
            setattr(record, name, value)
        return None
    return apply


def _vm_record(vmi: str, node: str, phase: VmPhase, verdict: VmVerdict, reason: str, *, memory: int = 0,
               proposed: str | None = None, expected_rung: str | None = None) -> VmRecord:
    return VmRecord(vmi=vmi, node=node, phase=phase, verdict=verdict, reason=reason, memory_bytes=memory,
                    proposed_target=proposed, attempt=1 if phase is VmPhase.QUEUED else 0, message=reason,
                    expected_rung=expected_rung)


