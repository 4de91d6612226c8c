"""`drain --tune` on the real path: KubeVirt's migration limits set for the drain's window and put back
afterwards, also after a worker is killed -9 or the drain is cancelled. Assertions read the simulator's store
and ground truth."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest

from orchestrator import keys
from orchestrator.model import DrainPhase, DrainRequest
from orchestrator.records import DrainRecord
from orchestrator.service import DrainService
from simulator.resources import KUBEVIRTS, VMIS
from tests.integration.conftest import Env, EnvFactory, requires_redis

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(300)]

# The small scenario's NICs are 25 GbE: tell the planner so (a setting; a node annotation works too).
NIC = {"DRAIN_ESTIMATE_NODE_BANDWIDTH": "2800000000"}
TUNED = ("parallelMigrationsPerCluster", "parallelOutboundMigrationsPerNode", "bandwidthPerMigration")


def migrations_config(env: Env) -> dict[str, Any]:
    kv = env.cluster.store.get(KUBEVIRTS, "kubevirt", "kubevirt")
    cfg = ((kv or {}).get("spec") or {}).get("configuration", {}).get("migrations") or {}
    return {f: cfg.get(f) for f in TUNED}


def vmis_on(env: Env, node: str) -> list[str]:
    return [o["metadata"]["name"] for o in env.cluster.store.on_node(VMIS, node)]


async def until(pred: Any, what: str, within_s: float = 120.0) -> None:
    async with asyncio.timeout(within_s):
        while not pred():  # noqa: ASYNC110 - the simulator's store has no event to await here
            await asyncio.sleep(0.05)


async def start_tuned(env: Env, node: str) -> tuple[DrainService, DrainRecord, dict[str, Any]]:
    """Submit a tuned drain of `node`; return once KubeVirt's settings are tuned (with the ones before)."""
    before = migrations_config(env)
    service = await env.service()
    record, _ = await service.submit(DrainRequest.from_json({"nodes": [node], "tune": True}))
    await until(lambda: migrations_config(env) != before, "tuned")
    return service, record, before


def kill_workers(env: Env) -> None:
    for victim in list(env.workers):
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)


def ours(stats: dict[str, Any], drain_id: str) -> list[dict[str, Any]]:
    return [m for m in stats["migrations"] if m["labels"].get("drainctl.io/drain-id") == drain_id]


async def test_tuned_drain_runs_above_the_defaults_and_restores_them(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=2, extra_env=NIC) as env:
        node = env.cluster.scenario.drain_hint[0]
        before = migrations_config(env)
        plan = await env.adrainctl("plan", node, "--tune", "-o", "json")
        assert plan.returncode == 0, plan.stderr
        tuning = json.loads(plan.stdout)["tuning"]
        per_node = tuning["parallel_outbound_per_node"]
        assert per_node > 2, tuning  # more than KubeVirt's default, or the test proves nothing

        result = await env.adrainctl("drain", node, "--tune", "--wait", "-o", "json", timeout_s=240)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        stats = await env.stats()
        mine = ours(stats, view["id"])
        # Tuned limits were in force, and kept: more than 2 out of the node at once, never more than tuned.
        assert 2 < stats["max_in_flight_per_node"][node] <= per_node, stats["max_in_flight_per_node"]
        assert stats["max_in_flight_cluster"] <= tuning["parallel_per_cluster"]
        # Every VM moved once and converged (none failed because of the tuning).
        assert sorted(m["vmi"] for m in mine if m["phase"] == "Succeeded") == sorted({m["vmi"] for m in mine})
        assert [m for m in mine if m["phase"] == "Failed"] == []
        assert vmis_on(env, node) == []
        # Restored, and nothing left to restore.
        assert migrations_config(env) == before
        assert await env.redis.get(keys.TUNE_KEY) is None


async def test_worker_killed_during_a_tuned_drain_still_restores(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", time_scale=15, workers=2, extra_env=NIC) as env:
        node = env.cluster.scenario.drain_hint[0]
        service, record, before = await start_tuned(env, node)
        await until(lambda: bool(env.cluster.kubevirt.active), "migrating")
        kill_workers(env)
        assert migrations_config(env) != before  # nobody left to restore: still tuned
        env.start_workers(2)
        view = await service.wait(record.id, timeout_s=240)
        assert view.drain.phase == "Succeeded", view.drain
        assert migrations_config(env) == before
        assert await env.redis.get(keys.TUNE_KEY) is None
        assert vmis_on(env, node) == []


async def test_cancelled_tuned_drain_restores(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", time_scale=10, workers=2, extra_env=NIC) as env:
        node = env.cluster.scenario.drain_hint[0]
        service, record, before = await start_tuned(env, node)
        result = await env.adrainctl("cancel", record.id, "-o", "json")
        assert result.returncode == 0, result.stderr
        view = await service.wait(record.id, timeout_s=120)
        assert view.drain.phase == "Cancelled", env.worker_logs()
        assert migrations_config(env) == before
        assert await env.redis.get(keys.TUNE_KEY) is None


async def test_reconciler_restores_for_a_drain_that_ended_without_restoring(cluster_env: EnvFactory) -> None:
    # Every worker dies while the settings are tuned, and the drain record ends meanwhile (here: written
    # final directly, as a lost or expired record would look): the next worker's reconciler restores.
    async with cluster_env("small", time_scale=10, workers=1, extra_env=NIC) as env:
        node = env.cluster.scenario.drain_hint[0]
        service, record, before = await start_tuned(env, node)
        kill_workers(env)

        def end(d: DrainRecord) -> None:
            d.phase = DrainPhase.FAILED

        await service.store.update(record.id, end)
        env.start_workers(1)
        await until(lambda: migrations_config(env) == before, "restored by the reconciler")
        async with asyncio.timeout(30):
            while await env.redis.get(keys.TUNE_KEY) is not None:  # noqa: ASYNC110 - a Redis key, no event
                await asyncio.sleep(0.1)


async def test_a_second_tuned_drain_is_refused_while_one_runs(cluster_env: EnvFactory) -> None:
    base_nodes = 2
    async with cluster_env("small", time_scale=10, workers=2, extra_env=NIC) as env:
        workers = [n.name for n in env.cluster.scenario.nodes if not n.control_plane][:base_nodes]
        service, first, before = await start_tuned(env, workers[0])
        second, _ = await service.submit(DrainRequest.from_json({"nodes": [workers[1]], "tune": True}))
        view = await service.wait(second.id, timeout_s=120)
        assert view.drain.phase == "Failed"
        assert "tuned" in (view.drain.message or ""), view.drain.message
        assert json.loads(await env.redis.get(keys.TUNE_KEY))["drain_id"] == first.id
        done = await service.wait(first.id, timeout_s=240)
        assert done.drain.phase == "Succeeded"
        assert migrations_config(env) == before


async def test_simulator_applies_a_changed_kubevirt_cr_to_new_migrations_only(cluster_env: EnvFactory) -> None:
    # What --tune relies on, as KubeVirt does it: the limits are read at admission (a changed
    # parallelMigrationsPerCluster admits a held-back VMIM), the options are copied into the VMI's
    # migrationState when a migration is handed off and kept there (a running migration keeps its
    # bandwidthPerMigration).
    from orchestrator import kube as k

    async with cluster_env("small", time_scale=2) as env:
        kube = (await env.service()).kube
        node = env.cluster.scenario.drain_hint[0]
        vmis = [o for o in env.cluster.store.on_node(VMIS, node)][:2]
        await kube.patch(k.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {"migrations": {
            "parallelMigrationsPerCluster": 1, "bandwidthPerMigration": "64Mi"}}}}, "kubevirt")

        async def migrate(vmi: dict[str, Any]) -> None:
            ns, name = vmi["metadata"]["namespace"], vmi["metadata"]["name"]
            await kube.create(k.VMIMS, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                                        "metadata": {"name": f"m-{name}", "namespace": ns},
                                        "spec": {"vmiName": name}}, ns)

        def phase(vmi: dict[str, Any]) -> str | None:
            from simulator.resources import VMIMS

            obj = env.cluster.store.get(VMIMS, vmi["metadata"]["namespace"], f"m-{vmi['metadata']['name']}")
            return ((obj or {}).get("status") or {}).get("phase")

        def options(vmi: dict[str, Any]) -> dict[str, Any]:
            obj = env.cluster.store.get(VMIS, vmi["metadata"]["namespace"], vmi["metadata"]["name"]) or {}
            return ((obj.get("status") or {}).get("migrationState") or {}).get("migrationConfiguration") or {}

        first, second = vmis
        await migrate(first)
        await until(lambda: phase(first) == "Running", "the first migration transfers")
        await migrate(second)
        await asyncio.sleep(0.5)
        assert phase(second) == "Pending"  # held back by parallelMigrationsPerCluster 1
        await kube.patch(k.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {"migrations": {
            "parallelMigrationsPerCluster": 5, "bandwidthPerMigration": None}}}}, "kubevirt")
        await until(lambda: phase(second) not in (None, "Pending"), "the second one admitted after the change")
        await until(lambda: bool(options(second)), "the second one handed off")
        assert options(first).get("bandwidthPerMigration") == "64Mi"  # kept while it runs
        assert options(second).get("bandwidthPerMigration") in (None, "0", "0Mi")  # the new value: unlimited


def _union_s(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            busy, end = busy + (b - a), b
        elif b > end:
            busy, end = busy + (b - end), b
    return busy


async def _plan_figures(env: Env, node: str) -> dict[str, Any]:
    result = await env.adrainctl("plan", node, "--tune", "-o", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    return {**plan["tuning"]["nodes"][0], "estimate_s": plan["estimate"]["total_s"]}


async def test_observed_throughput_refines_the_next_plans_bandwidth(cluster_env: EnvFactory) -> None:
    # The setting says 200 MB/s; the small scenario's NICs are 25 GbE. A drain's migrations show better.
    from orchestrator import kube as k

    async with cluster_env("small", time_scale=10, workers=2,
                           extra_env={"DRAIN_ESTIMATE_NODE_BANDWIDTH": "200000000"}) as env:
        node = env.cluster.scenario.drain_hint[0]
        first = await _plan_figures(env, node)
        assert (first["bandwidth_bytes_per_s"], first["bandwidth_source"]) == (200e6, "setting"), first

        service = await env.service()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node]}))
        view = await service.wait(record.id, timeout_s=240)
        assert view.drain.phase == "Succeeded", view.drain
        # Every migration out of the node that succeeded is recorded in Redis, once.
        mine = [m for m in ours(await env.stats(), record.id) if m["phase"] == "Succeeded"]
        recorded = (await service.store.transfers([node]))[node]
        assert sorted(r.vmi for r in recorded) == sorted(m["vmi"] for m in mine)
        # What they add up to agrees with the cluster's ground truth: memory over the node's transfer time.
        memory = {r.vmi: r.memory_bytes for r in recorded}
        truth = sum(memory.values()) / _union_s([(m["started_s"], m["finished_s"]) for m in mine])
        observed = sum(memory.values()) / _union_s([(r.start_s, r.end_s) for r in recorded])
        assert 2 / 3 < observed / truth < 1.5, (observed, truth)

        # Some VMs come back to the node (by hand), and the next plan of it uses what was observed.
        await service.kube.cordon(node, unschedulable=False)
        back = [m["vmi"] for m in mine[:3]]
        for key in back:
            ns, name = key.split("/", 1)
            await service.kube.create(k.VMIMS, {
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                "metadata": {"name": f"back-{name}", "namespace": ns},
                "spec": {"vmiName": name, "addedNodeSelector": {"kubernetes.io/hostname": node}}}, ns)
        await until(lambda: len(vmis_on(env, node)) == len(back), "moved back")
        second = await _plan_figures(env, node)
        assert second["bandwidth_source"].startswith("observed"), second
        assert second["bandwidth_bytes_per_s"] == pytest.approx(observed, rel=0.01)
        assert second["bandwidth_bytes_per_s"] > 2 * first["bandwidth_bytes_per_s"], second
        # Without what was observed, the same plan predicts the configured, slower figures.
        await env.redis.delete(keys.node_transfers_key(node))
        third = await _plan_figures(env, node)
        assert third["bandwidth_source"] == "setting", third
        assert second["predicted_s"] < third["predicted_s"] and second["estimate_s"] < third["estimate_s"]
