"""The finish job: evict what is left on a node whose VMs are settled, then record the node's end."""

from __future__ import annotations

from orchestrator import kube as k
from orchestrator.model import NODE_DRAIN_ANNOTATION, NODE_DRAINED_ANNOTATION, DrainPhase, NodePhase, VmiKey, VmPhase
from orchestrator.rules import PodAction, pod_verdict
from orchestrator.snapshot import parse_pod
from orchestrator.store import RecordNotFound
from workers.jobs.advance import advance_drain, close_drain
from workers.jobs.common import Ctx, assign, guarded, log, now_iso

EVICTION_DEADLINE_S = 600.0
"""Cluster seconds of evictions (PodDisruptionBudgets refusing) before the node is reported failed."""


# ================================================================================================= finish
async def finish_job(ctx: Ctx, drain_id: str, node: str) -> str:
    async def failed(reason: str) -> None:
        try:
            await ctx["store"].update_node(drain_id, node, assign(phase=NodePhase.FAILED, message=reason,
                                                                  finished_at=ctx["clock"].time()))
        except RecordNotFound:  # no node record to fail: the drain itself cannot finish as asked
            await close_drain(ctx, drain_id, DrainPhase.FAILED, reason)
            return
        await advance_drain(ctx, drain_id)

    return await guarded(ctx, _finish_node(ctx, drain_id, node), what=f"finish {node}", on_failure=failed)


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
        await store.update_node(drain_id, node, assign(phase=NodePhase.CANCELLED, message="drain cancelled",
                                                     finished_at=clock.time()))
        await advance_drain(ctx, drain_id)
        return NodePhase.CANCELLED.value
    left = [v for v in vms if v.phase is not VmPhase.SUCCEEDED]
    failed = any(v.phase is VmPhase.FAILED for v in left)
    staying = {VmiKey(v.vmi) for v in left}
    await store.update_node(drain_id, node, assign(phase=NodePhase.EVICTING, message="evicting the remaining pods"))
    deadline = clock.now() + EVICTION_DEADLINE_S
    evicted = 0
    while True:
        pods, _ = await kube.list(k.PODS, field_selector=f"spec.nodeName={node}")
        pending = []
        for index, pod in enumerate(pods):
            # The plan's rule: a VM that stays keeps its pods (evicting would stop it or start KubeVirt's own
            # evacuation), and so do hot-plug attachment pods, DaemonSet and static pods.
            if pod_verdict(parse_pod(pod, index), vm_stays=staying.__contains__).action is PodAction.EVICT:
                pending.append(pod)
        if not pending:
            break
        if clock.now() > deadline:
            names = ", ".join(f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in pending[:5])
            stuck = f"pods still on the node after {EVICTION_DEADLINE_S:.0f} s of evictions: {names}"
            await store.update_node(drain_id, node, assign(phase=NodePhase.FAILED, finished_at=clock.time(),
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
                await store.update_node(drain_id, node, assign(message=refused))
        await clock.sleep(5.0)
    node_obj = await kube.find(k.NODES, node)
    if left:
        names = ", ".join(f"{v.vmi} ({v.phase.value}: {v.message})" for v in left[:5])
        message = f"{len(left)} VM(s) could not be moved and stay on the node: {names}"
        final = NodePhase.FAILED if failed else NodePhase.INCOMPLETE
        await store.update_node(drain_id, node, assign(phase=final, message=message, finished_at=clock.time(),
                                                     evicted=evicted))
        if node_obj is not None:
            await kube.event(involved=node_obj, reason="DrainFailed", message=message, warning=True)
        await store.emit(drain_id, "node.failed", node=node, message=message)
    else:
        await kube.annotate(k.NODES, node, {NODE_DRAINED_ANNOTATION: now_iso(clock), NODE_DRAIN_ANNOTATION: drain_id})
        await store.update_node(drain_id, node, assign(phase=NodePhase.DRAINED, message="drained",
                                                     finished_at=clock.time(), evicted=evicted))
        if node_obj is not None:
            await kube.event(involved=node_obj, reason="NodeDrained",
                             message=f"drainctl drain {drain_id}: every VM migrated, {evicted} pod(s) evicted")
        await store.emit(drain_id, "node.drained", node=node, evicted=evicted)
    log.info("node.finished", drain_id=drain_id, node=node, left=len(left), evicted=evicted)
    await advance_drain(ctx, drain_id)
    return (NodePhase.FAILED if failed else NodePhase.INCOMPLETE).value if left else NodePhase.DRAINED.value


