"""Engine defects on the real path (simulator over HTTPS, real Redis, `drainctl worker` processes): a cancel
that lost the race to a finished migration, jobs that fail in a way no retry fixes, the wait for someone
else's migration of a VM, and the finish step against the plan's pod rules.

Assertions read the simulator's ground truth (its store, its migrations) and the drain store's records.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from orchestrator import kube as k
from orchestrator.model import DrainRequest, NodePhase, VmPhase
from orchestrator.snapshot import parse_pod
from simulator.resources import NODES, PODS, VMIMS, VMIS
from simulator.scenarios import GBIT, NodeSpec, Scenario, VMSpec, default_migrations
from tests.integration.conftest import Env, EnvFactory, requires_redis

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(300)]

GIB = 1024**3
DRAIN = "worker-01"


async def wait_for(pred: Any, *, within_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        result = pred()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def tiny(vms: list[VMSpec], *, nodes: int = 3, **migrations: Any) -> Scenario:
    """64 GiB workers on 25 GbE; `vms` on them; KubeVirt's migration settings merged with `migrations`."""
    specs = tuple(NodeSpec(name=f"worker-0{i}", memory_bytes=64 * GIB, cpus=16, nic_bytes_per_s=25 * GBIT,
                           cpu_model="Skylake-Server-IBRS") for i in range(1, nodes + 1))
    return Scenario(name="tiny", seed=1, nodes=specs, vms=tuple(vms),
                    migrations={**default_migrations(), **migrations}, drain_hint=(DRAIN,))


def vm(name: str, *, node: str = DRAIN, gib: int = 4, dirty: float = 20e6, namespace: str = "app",
       **kw: Any) -> VMSpec:
    return VMSpec(namespace=namespace, name=name, node=node, memory_bytes=gib * GIB, cpus=1,
                  resident_bytes=gib * GIB * 3 // 4, dirty_bytes_per_s=dirty, wws_bytes=gib * GIB // 8, setup_s=5.0,
                  **kw)


def running_on(env: Env, namespace: str, name: str) -> str | None:
    obj = env.cluster.store.get(VMIS, namespace, name)
    return None if obj is None else (obj.get("status") or {}).get("nodeName")


# ============================================================================================== defect 7
async def test_a_cancel_that_loses_the_race_records_the_vm_where_it_now_runs(cluster_env: EnvFactory) -> None:
    # The VM dirties memory faster than the link: pre-copy never converges, KubeVirt's completion timeout
    # switches it to post-copy, which cannot be aborted. A cancel now is too late: the VM lands on the target.
    sc = tiny([vm("hot", dirty=2e9)], allowPostCopy=True, completionTimeoutPerGiB=5,
              bandwidthPerMigration="128Mi")
    async with cluster_env(sc, time_scale=10, workers=1) as env:
        service = await env.service()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [DRAIN]}))
        await wait_for(lambda: any(m.transfer is not None and m.transfer.phase == "postcopy"
                                   for m in env.cluster.kubevirt.active.values()), within_s=90, what="post-copy")
        await service.cancel(record.id)
        view = await service.wait(record.id, timeout_s=120)
        assert view.drain.phase == "Cancelled", env.worker_logs()
        now_on = running_on(env, "app", "hot")
        assert now_on not in (None, DRAIN)  # ground truth: the VM moved
        ours = [m for m in (await env.stats())["migrations"] if m["vmi"] == "app/hot"]
        assert [m["phase"] for m in ours] == ["Succeeded"], ours
        rec = view.vms["app/hot"]
        assert rec.phase is VmPhase.SUCCEEDED, rec
        assert rec.target == now_on
        assert len(rec.attempts) == 1 and rec.attempts[0].outcome is VmPhase.SUCCEEDED


# ============================================================================================== defect 8
async def test_a_plan_that_cannot_parse_the_cluster_fails_the_drain_with_the_reason(cluster_env: EnvFactory) -> None:
    async with cluster_env(tiny([vm("a"), vm("b")]), workers=0) as env:
        service = await env.service()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [DRAIN]}))
        # Between submission and planning, a VMI turns malformed (a bad quantity): no retry can fix that.
        env.cluster.store.mutate(VMIS, "app", "b", lambda o: o["spec"]["domain"]["resources"]["requests"]
                                 .__setitem__("memory", "4Xi"))
        env.start_workers(1)
        view = await service.wait(record.id, timeout_s=60)
        assert view.drain.phase == "Failed", (view.drain, env.worker_logs())
        assert "app/b" in (view.drain.message or "") and "4Xi" in (view.drain.message or "")
        # Nothing was done to the cluster and the node is free for the next drain.
        assert (await env.stats())["migrations"] == []
        assert await service.store.node_owner(DRAIN) is None


async def test_a_migration_that_cannot_parse_its_vmi_fails_that_vm_and_the_drain_moves_on(
        cluster_env: EnvFactory) -> None:
    # One migration at a time, largest first: while "big" migrates, "mid" waits for the slot and "small" has
    # no job yet (the node's feed window is its outbound limit + 1), so "small" reads its VMI after the change.
    sc = tiny([vm("big", gib=8), vm("mid", gib=4), vm("small", gib=2)], parallelOutboundMigrationsPerNode=1)
    async with cluster_env(sc, workers=0) as env:
        service = await env.service()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [DRAIN]}))
        env.start_workers(1)

        async def big_started() -> bool:
            rec = await service.store.vm(record.id, "app/big")
            return rec is not None and rec.phase is VmPhase.MIGRATING

        await wait_for(big_started, what="the first migration")
        env.cluster.store.mutate(VMIS, "app", "small", lambda o: o["spec"]["domain"]["resources"]["requests"]
                                 .__setitem__("memory", "2Xi"))
        view = await service.wait(record.id, timeout_s=120)
        assert view.drain.phase == "Failed", (view.to_json(), env.worker_logs())
        small = view.vms["app/small"]
        assert small.phase is VmPhase.FAILED and "2Xi" in small.message, small
        assert view.vms["app/big"].phase is VmPhase.SUCCEEDED and view.vms["app/mid"].phase is VmPhase.SUCCEEDED
        assert view.nodes[DRAIN].phase is NodePhase.FAILED
        assert running_on(env, "app", "big") != DRAIN and running_on(env, "app", "small") == DRAIN


async def test_waiting_for_someone_elses_migration_holds_no_slot_and_honours_cancel(
        cluster_env: EnvFactory) -> None:
    # "slow" is already migrating when the drain starts (a user's VMIM): it dirties faster than the capped
    # link, so it runs until KubeVirt's completion timeout, long after the drain is cancelled.
    sc = tiny([vm("slow", gib=8, dirty=2e9), vm("other", gib=2)], bandwidthPerMigration="64Mi")
    async with cluster_env(sc, time_scale=10, workers=0) as env:
        user = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": "user-move", "namespace": "app"}, "spec": {"vmiName": "slow"}}
        service = await env.service()
        await service.kube.create(k.VMIMS, user, "app")
        await wait_for(lambda: any(m.vmi == "slow" and m.phase == "Running"
                                   for m in env.cluster.kubevirt.active.values()), what="the user's migration")
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [DRAIN]}))
        env.start_workers(1)

        async def refused() -> bool:
            rec = await service.store.vm(record.id, "app/slow")
            return rec is not None and "in-flight migration detected" in rec.message

        await wait_for(refused, what="KubeVirt refusing our VMIM")
        from workers.semaphore import RedisSemaphore

        # While it waits, the VM holds no slot of ours: no lease names it ("other" may hold one while it
        # migrates; its record may still say Waiting for a moment after the grant, so leases are read by holder).
        holders = [h.holder for h in await RedisSemaphore(env.redis).holders()]
        assert not [h for h in holders if "/app/slow/" in f"{h}/"], holders
        assert all("/app/other/" in f"{h}/" for h in holders), holders
        await service.cancel(record.id)
        view = await service.wait(record.id, timeout_s=60)
        assert view.drain.phase == "Cancelled", (view.to_json(), env.worker_logs())
        # The cancel did not wait for the user's migration: it is still running in the cluster.
        user_vmim = env.cluster.store.get(VMIMS, "app", "user-move")
        assert user_vmim is not None and user_vmim["status"]["phase"] not in ("Succeeded", "Failed")
        assert view.vms["app/slow"].phase is VmPhase.CANCELLED


# ============================================================================================== defect 9
async def test_finish_leaves_the_hotplug_pods_of_a_vm_that_stays(cluster_env: EnvFactory) -> None:
    # "pinned" cannot move (evictionStrategy None, left by the skip policy) and has a hot-plugged volume: its
    # attachment pod stays with it, as the plan says. "mover" migrates.
    sc = tiny([vm("pinned", eviction_strategy="None"), vm("mover")])
    async with cluster_env(sc, workers=1) as env:
        launcher = next(p for p in env.cluster.store.on_node(PODS, DRAIN)
                        if p["metadata"].get("annotations", {}).get("kubevirt.io/domain") == "pinned")
        hotplug = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "hp-volume-pinned", "namespace": "app",
                                "labels": {"kubevirt.io": "hotplug-disk"},
                                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "controller": True,
                                                     "name": launcher["metadata"]["name"],
                                                     "uid": launcher["metadata"]["uid"]}]},
                   "spec": {"nodeName": DRAIN, "containers": [{"name": "hotplug-disk", "image": "x"}]}}
        service = await env.service()
        await service.kube.create(k.PODS, hotplug, "app")
        plan = await service.plan(DrainRequest.from_json({"nodes": [DRAIN], "non_migratable": "skip"}))
        assert "app/hp-volume-pinned" in plan.node_plan(DRAIN).ignored_pods
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [DRAIN], "non_migratable": "skip"}))
        view = await service.wait(record.id, timeout_s=120)
        assert view.nodes[DRAIN].phase is NodePhase.INCOMPLETE, (view.to_json(), env.worker_logs())
        assert env.cluster.store.get(PODS, "app", "hp-volume-pinned") is not None
        assert running_on(env, "app", "pinned") == DRAIN
        assert running_on(env, "app", "mover") != DRAIN


def pod_memory_on(env: Env, node: str) -> int:
    return sum(parse_pod(p).memory_request_bytes for p in env.cluster.store.on_node(PODS, node))


def set_free(env: Env, node: str, free_bytes: int) -> None:
    """Shrink a node's allocatable memory so that `free_bytes` stay free after its pods' requests."""
    allocatable = str(pod_memory_on(env, node) + free_bytes)
    env.cluster.store.mutate(NODES, None, node,
                             lambda o: o["status"]["allocatable"].__setitem__("memory", allocatable))


def set_ready(env: Env, node: str, ready: bool) -> None:
    def apply(o: dict[str, Any]) -> None:
        for cond in o["status"]["conditions"]:
            if cond["type"] == "Ready":
                cond["status"] = "True" if ready else "False"
    env.cluster.store.mutate(NODES, None, node, apply)


async def needs(env: Env, request: DrainRequest) -> dict[str, int]:
    """What the plan says each VM needs on a target (its launcher pod's request)."""
    plan = await (await env.service()).plan(request)
    return {str(job.vmi): job.memory_bytes for job in plan.jobs()}


async def test_the_capacity_gate_counts_a_vms_launcher_overhead_once(cluster_env: EnvFactory) -> None:
    # Room for exactly what the plan says the two VMs need (plus 64 MiB each): the drain must run.
    request = DrainRequest.from_json({"nodes": [DRAIN]})
    async with cluster_env(tiny([vm("a", gib=8), vm("b", gib=8)]), workers=0) as env:
        need = await needs(env, request)
        set_free(env, "worker-02", need["app/a"] + 64 * 1024**2)
        set_free(env, "worker-03", need["app/b"] + 64 * 1024**2)
        service = await env.service()
        record, _ = await service.submit(request)
        env.start_workers(1)
        view = await service.wait(record.id, timeout_s=90)
        assert view.drain.phase == "Succeeded", (view.to_json(), env.worker_logs())
        assert {running_on(env, "app", "a"), running_on(env, "app", "b")} == {"worker-02", "worker-03"}


async def test_the_capacity_gate_does_not_count_a_notready_node_as_room(cluster_env: EnvFactory) -> None:
    # Drain worker-01, then worker-04. worker-02 has room for one of worker-04's two VMs, worker-03 for
    # everything until it goes NotReady while worker-01 drains: worker-04 must then wait, not start and fail.
    second = "worker-04"
    vms = [vm("a", gib=2), vm("c", gib=8, node=second), vm("d", gib=8, node=second)]
    request = DrainRequest.from_json({"nodes": [DRAIN, second]})
    async with cluster_env(tiny(vms, nodes=4), workers=0) as env:
        need = await needs(env, request)
        set_free(env, "worker-02", need["app/c"] + need["app/a"] + 64 * 1024**2)
        service = await env.service()
        record, _ = await service.submit(request)
        env.start_workers(1)

        async def first_started() -> bool:
            node = (await service.get(record.id)).nodes.get(DRAIN)
            return node is not None and node.phase is not NodePhase.PENDING and node.phase is not NodePhase.CORDONED

        await wait_for(first_started, what="worker-01 to start")
        set_ready(env, "worker-03", False)

        async def settled() -> bool:
            view = await service.get(record.id)
            tried = any(a.outcome is VmPhase.FAILED for v in view.vms.values() for a in v.attempts)
            node = view.nodes.get(second)
            return tried or (node is not None and node.message.startswith("waiting for capacity"))

        await wait_for(settled, what="worker-04 to wait for capacity (or a failed attempt)")
        view = await service.get(record.id)
        assert not any(a.outcome is VmPhase.FAILED for v in view.vms.values() for a in v.attempts), view.to_json()
        assert not view.vms["app/c"].attempts and not view.vms["app/d"].attempts  # nothing started without room
        set_ready(env, "worker-03", True)
        view = await service.wait(record.id, timeout_s=90)
        assert view.drain.phase == "Succeeded", (view.to_json(), env.worker_logs())
        assert {running_on(env, "app", n) for n in ("a", "c", "d")}.isdisjoint({DRAIN, second})
