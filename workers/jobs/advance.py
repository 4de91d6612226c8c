"""Advancing a drain: level-based, safe to run any time from any worker (start nodes, feed migrate jobs,
finish nodes, close the drain)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio.lock import Lock
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.model import (
    NODE_DRAIN_ANNOTATION,
    DrainPhase,
    NodePhase,
    VmPhase,
)
from orchestrator.records import DrainRecord, NodeRecord, VmRecord
from orchestrator.rules import spare_memory
from workers.jobs.common import (
    Ctx,
    assign,
    cancel_vm_if_idle,
    enqueue_control,
    enqueue_migrate,
    log,
    retrying,
)
from workers.jobs.decisions import (
    capacity_verdict,
    drain_verdict,
    feed_window,
    migration_work_s,
    node_priorities,
)
from workers.jobs.tune import restore_tuning

PRIORITIES_TTL_S = 2 * 24 * 3600
"""The priorities hash lives as long as a drain's queued jobs may (rewritten on every advance)."""


# ================================================================================================ advance
async def advance_job(ctx: Ctx, drain_id: str) -> str:
    async def work() -> str:
        await advance_drain(ctx, drain_id)
        return "ok"

    return await retrying(ctx, work(), what=f"advance {drain_id}")


async def advance_drain(ctx: Ctx, drain_id: str, *, ensure: bool = False) -> None:
    """Do whatever the drain needs next; safe to call any time, from any worker, any number of times.
    `ensure` (the reconciler) also re-enqueues the jobs of VMs that should have one, in case one was lost."""
    lock = ctx["redis"].lock(keys.drain_lock_key(drain_id), timeout=ADVANCE_LOCK_S, blocking_timeout=30)
    async with _held(lock):
        await _advance(ctx, drain_id, ensure=ensure)


ADVANCE_LOCK_S = 60
_releasing: set[asyncio.Task[None]] = set()
"""Lock releases still waiting for Redis (referenced until done)."""


@contextlib.asynccontextmanager
async def _held(lock: Lock) -> AsyncIterator[None]:
    """Hold `lock` for the block. A release that fails because Redis is away goes on in the background until
    Redis answers or the lock expires: otherwise a Redis restart during an advance left the drain's advance
    step locked for the lock's whole timeout (every advance meanwhile waited 30 s and retried)."""
    if not await lock.acquire():
        # A RedisError, so `retrying` runs the job again later (redis-py leaves LockError's __init__ unannotated).
        raise LockError("Unable to acquire lock within the time specified")  # type: ignore[no-untyped-call]
    token = lock.local.token
    try:
        yield
    finally:
        try:
            await lock.release()
        except LockNotOwnedError:
            pass  # expired meanwhile: nothing of ours to free
        except (RedisError, OSError) as exc:
            log.warning("advance.unlock_waits_for_redis", error=str(exc) or type(exc).__name__)
            task = asyncio.create_task(_release_when_back(lock, token), name="advance-unlock")
            _releasing.add(task)
            task.add_done_callback(_releasing.discard)


async def _release_when_back(lock: Lock, token: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline, backoff = loop.time() + ADVANCE_LOCK_S, 0.25
    while loop.time() < deadline:
        await asyncio.sleep(backoff)
        try:
            await lock.do_release(token)
            return
        except LockNotOwnedError:
            return
        except (RedisError, OSError):
            backoff = min(backoff * 2, 5.0)


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
    if cancelling and not view.nodes:
        # Cancelled before it was planned: nothing was cordoned or started (the plan job writes the node
        # records and cordons under this lock, and drops its plan once it sees the cancel).
        await close_drain(ctx, drain_id, DrainPhase.CANCELLED, "cancelled before it was planned")
        return
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
                await cancel_vm_if_idle(ctx, drain_id, vm.vmi, "the drain was cancelled before the node started")
            await store.update_node(drain_id, name, assign(
                phase=NodePhase.CANCELLED, message="cancelled before it started", finished_at=ctx["clock"].time()))
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
                        await cancel_vm_if_idle(ctx, drain_id, vm.vmi, "the drain was cancelled")
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
        await _write_priorities(ctx, drain_id, drain, nodes, by_node)
    nodes_now = await store.nodes(drain_id)
    verdict = drain_verdict([n.phase for n in nodes_now.values()], cancelling=cancelling)
    if verdict is not None:
        await close_drain(ctx, drain_id, DrainPhase(verdict), _summary(nodes_now, await store.vms(drain_id)))


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
                await store.update_node(drain_id, name, assign(message=message))
                await store.emit(drain_id, "node.waiting", node=name, message=message)
            return

        def start(n: NodeRecord) -> bool | None:
            if n.phase not in (NodePhase.PENDING, NodePhase.CORDONED):
                return False
            n.phase, n.started_at, n.message = NodePhase.MIGRATING, ctx["clock"].time(), "migrating VMs"
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
    feed = feed_window(open_vms, window=window)
    if ensure:
        for vm in feed.live:
            await enqueue_migrate(ctx, drain_id, vm.vmi, vm.attempt,
                                  delay_s=max(0.0, (vm.not_before_s or 0.0) - ctx["clock"].time())
                                  * ctx["settings"].time_scale)
    for vm in feed.start:
        await ctx["store"].update_vm(drain_id, vm.vmi, assign(enqueued=vm.attempt))
        await enqueue_migrate(ctx, drain_id, vm.vmi, vm.attempt)


async def _write_priorities(ctx: Ctx, drain_id: str, drain: DrainRecord, nodes: list[NodeRecord],
                            by_node: dict[str, list[VmRecord]]) -> None:
    """Publish each open node's semaphore priority (decisions.node_priorities) for its migrate jobs."""
    estimate = ctx["settings"].estimate
    per_node = drain.limits.per_node if drain.limits else ctx["settings"].limits.max_in_flight_per_node
    bandwidth = estimate.node_bandwidth_bytes_per_s / max(1, per_node)
    work = {node.node: sum(migration_work_s(vm.memory_bytes, setup_s=estimate.setup_s,
                                            bandwidth_bytes_per_s=bandwidth)
                           for vm in by_node.get(node.node, []) if vm.phase in (VmPhase.QUEUED, VmPhase.WAITING))
            for node in nodes if not node.phase.is_final}
    if not work:
        return
    key = keys.drain_priorities_key(drain_id)
    async with ctx["redis"].pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={n: repr(p) for n, p in node_priorities(work, [n.node for n in nodes]).items()})
        pipe.expire(key, PRIORITIES_TTL_S)
        await pipe.execute()


def _capacity_gate(ctx: Ctx, drain_nodes: set[str], nodes: list[NodeRecord],
                   by_node: dict[str, list[VmRecord]], name: str) -> tuple[bool, str]:
    """The spare-memory rule, live: free memory on the nodes that count as room must hold what is still to
    move from the running nodes plus everything of the node about to start. A VM's memory_bytes is what the
    plan found it needs on a target (its launcher pod, overhead included): the planner's numbers."""
    view = ctx.get("view")
    if view is None or not view.nodes:
        return True, ""
    cluster_nodes = view.parsed_nodes()
    spare = spare_memory(cluster_nodes, free={n.name: view.free_memory(n) for n in cluster_nodes},
                         draining=drain_nodes)
    running = {n.node for n in nodes if n.phase is NodePhase.MIGRATING}
    need = sum(vm.memory_bytes for node_name in running | {name} for vm in by_node.get(node_name, [])
               if not vm.phase.is_final)
    return capacity_verdict(spare_bytes=spare, need_bytes=need, node=name)



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


async def close_drain(ctx: Ctx, drain_id: str, phase: DrainPhase, message: str) -> None:
    """End the drain: uncordon the nodes it cordoned if a cancel asked so, record the end, free the nodes.

    The cluster is touched before the record turns final, so a failure there re-runs this step (the drain is
    still open); a crash between the record and the unlock leaves a lock the next submit takes over."""
    store = ctx["store"]
    drain = await store.get(drain_id)
    nodes = drain.nodes
    if not drain.phase.is_final:
        # Before the record turns final: a failed restore runs this step again (the reconciler also
        # restores for drains that ended without it).
        await restore_tuning(ctx, drain_id)
    if not drain.phase.is_final and phase is DrainPhase.CANCELLED and drain.cancel is not None \
            and drain.cancel.uncordon:
        uncordoned = []
        for node in nodes:
            obj = await ctx["kube"].find(k.NODES, node)
            annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
            if obj is None or annotations.get(NODE_DRAIN_ANNOTATION) != drain_id:
                continue  # not cordoned by this drain: leave it as it was
            with contextlib.suppress(k.NotFound):
                await ctx["kube"].cordon(node, unschedulable=False, annotations={NODE_DRAIN_ANNOTATION: None})
            uncordoned.append(node)
        if uncordoned:
            await store.emit(drain_id, "nodes.uncordoned", nodes=uncordoned)

    def close(d: DrainRecord) -> None:
        if not d.phase.is_final:
            d.phase, d.message, d.finished_at = phase, message, ctx["clock"].time()

    await store.update(drain_id, close)
    await store.unlock_nodes(drain_id, nodes)
    await store.emit(drain_id, "drain.finished", phase=phase.value, message=message)
    log.info("drain.finished", drain_id=drain_id, phase=phase.value, message=message)


