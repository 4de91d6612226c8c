"""The drain engine on the real path: simulator over HTTPS, real Redis, `drainctl worker` processes.

Every assertion about what happened in the cluster reads the simulator's ground truth or its store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from simulator import scenarios
from simulator.resources import NODES, VMIS
from tests.integration.conftest import Env, EnvFactory, requires_redis

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(300)]

CANCELLED_IDLE = "the drain was cancelled"
CANCELLED_IN_FLIGHT = "aborted in flight: the drain was cancelled"
STUTTER = re.compile(r"\b(\w+)\W+\1\b", re.IGNORECASE)
"""A word said twice in a row ("cancelled: cancelled", "the the")."""


def vmis_on(env: Env, node: str) -> list[str]:
    return [f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in env.cluster.store.on_node(VMIS, node)]


def assert_limits(stats: dict[str, Any], *, cluster: int = 5, per_node: int = 2, inbound: int = 2) -> None:
    assert stats["max_in_flight_cluster"] <= cluster, stats["max_in_flight_cluster"]
    assert all(v <= per_node for v in stats["max_in_flight_per_node"].values()), stats["max_in_flight_per_node"]
    assert all(v <= inbound for v in stats["max_inbound_per_node"].values()), stats["max_inbound_per_node"]
    assert stats["max_in_flight_per_vmi"] <= 1
    assert stats["vmis_with_concurrent_migrations"] == []


async def semaphore_empty(env: Env) -> dict[str, int]:
    from workers.semaphore import RedisSemaphore

    usage = await RedisSemaphore(env.redis).usage()
    return {k: v for k, v in usage.items() if v}


async def wait_for(pred: Any, *, within_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_drain_one_node_empties_it_within_limits(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=2) as env:
        node = env.cluster.scenario.drain_hint[0]
        before = vmis_on(env, node)
        assert len(before) == 15
        result = await env.adrainctl("drain", node, "--wait", "-o", "json", timeout_s=240)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        assert view["phase"] == "Succeeded"
        assert vmis_on(env, node) == []
        stats = await env.stats()
        assert_limits(stats)
        ours = [m for m in stats["migrations"] if m["labels"].get("drainctl.io/drain-id") == view["id"]]
        assert {m["vmi"] for m in ours if m["phase"] == "Succeeded"} == set(before)
        assert all(m["source"] == node and m["target"] != node for m in ours)
        assert [m for m in stats["migrations"] if m["origin"] == "evacuation"] == []
        assert await semaphore_empty(env) == {}
        node_obj = env.cluster.store.get(NODES, None, node)
        assert node_obj["spec"]["unschedulable"] is True
        assert "drainctl.io/drained-at" in node_obj["metadata"]["annotations"]
        per_migration = stats["api_requests_total"] / max(1, len(ours))
        print(f"\nAPI requests per migration: {per_migration:.1f} ({stats['api_requests']})")


async def test_three_nodes_two_in_parallel(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=3) as env:
        sc = env.cluster.scenario
        nodes = [n.name for n in sc.nodes if not n.control_plane][:3]
        plan = await env.adrainctl("plan", *nodes, "--max-parallel-nodes", "2", "-o", "json")
        assert plan.returncode == 0, plan.stderr + plan.stdout
        assert json.loads(plan.stdout)["capacity"]["ok"] is True
        result = await env.adrainctl("drain", *nodes, "--max-parallel-nodes", "2", "--wait", "-o", "json",
                                     timeout_s=280)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        assert all(n["phase"] == "Drained" for n in view["nodes"].values())
        for node in nodes:
            assert vmis_on(env, node) == []
        stats = await env.stats()
        assert_limits(stats)
        # Nodes of the drain never receive VMs of the drain (they were all cordoned up front).
        assert not [m for m in stats["migrations"] if m["target"] in nodes]
        # Never more than two nodes migrating at once.
        spans = {n: (v["started_at"], v["finished_at"]) for n, v in view["nodes"].items()}
        for node, (start, _) in spans.items():
            running = [o for o, (s, f) in spans.items() if s <= start < f]
            assert len(running) <= 2, (node, spans)


async def test_failing_target_is_never_retried(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=2) as env:
        sc = env.cluster.scenario
        node = sc.drain_hint[0]
        bad = [n.name for n in sc.nodes if not n.control_plane and n.name != node][:2]
        await env.faults({"fail_migrations_to": bad})
        result = await env.adrainctl("drain", node, "--wait", "-o", "json", timeout_s=280)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
        stats = await env.stats()
        failed = [m for m in stats["migrations"] if m["phase"] == "Failed"]
        assert failed, "the faulty nodes were never tried: the test proves nothing"
        assert all(m["target"] in bad for m in failed)
        # After two different VMs failed on a node, the drain sends no VM there any more (quarantine); the
        # migrations already in flight towards it when that happened can still fail there.
        for node in bad:
            assert len([m for m in failed if m["target"] == node]) <= 2 + 2, failed
        view = json.loads(result.stdout)
        assert set(view.get("quarantined") or {}) <= set(bad)
        by_vmi: dict[str, list[dict[str, Any]]] = {}
        for m in sorted(stats["migrations"], key=lambda m: m["created_s"]):
            by_vmi.setdefault(m["vmi"], []).append(m)
        for vmi, attempts in by_vmi.items():
            failed_targets = set()
            for m in attempts:
                assert m["target"] not in failed_targets, f"{vmi} retried onto {m['target']} after it failed there"
                if m["phase"] == "Failed":
                    failed_targets.add(m["target"])
            assert attempts[-1]["phase"] == "Succeeded"
            assert attempts[-1]["target"] not in bad
        assert_limits(stats)


def _with_hot_vm(sc: scenarios.Scenario) -> tuple[scenarios.Scenario, str]:
    """The small scenario with one VM on the drained node that dirties memory faster than any NIC moves it."""
    node = sc.drain_hint[0]
    vms = list(sc.vms)
    index = next(i for i, vm in enumerate(vms) if vm.node == node)
    hot = dataclasses.replace(vms[index], dirty_bytes_per_s=20e9, wws_bytes=2 * 1024**3,
                              memory_bytes=2 * 1024**3, resident_bytes=2 * 1024**3)
    vms[index] = hot
    migrations = {**dict(sc.migrations), "completionTimeoutPerGiB": 5, "progressTimeout": 20}
    return dataclasses.replace(sc, vms=tuple(vms), migrations=migrations), f"{hot.namespace}/{hot.name}"


async def test_non_converging_vm_is_retried_then_reported(cluster_env: EnvFactory) -> None:
    sc, hot = _with_hot_vm(scenarios.builtin("small"))
    async with cluster_env(sc, workers=2, extra_env={"DRAIN_RETRY_BACKOFF": "5"}) as env:
        node = sc.drain_hint[0]
        result = await env.adrainctl("drain", node, "--wait", "-o", "json", timeout_s=280)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        assert view["phase"] == "Failed"
        vm = view["vms"][hot]
        assert vm["phase"] == "Failed"
        assert vm["failure_class"] == "NotConverging"
        assert len(vm["attempts"]) == 3
        assert len({a["target"] for a in vm["attempts"]}) == 3
        assert "has been aborted" in vm["message"]
        stats = await env.stats()
        hot_migrations = [m for m in stats["migrations"] if m["vmi"] == hot]
        assert len(hot_migrations) == 3 and all(m["phase"] == "Failed" for m in hot_migrations)
        # The rest of the node moved.
        assert vmis_on(env, node) == [hot]
        assert view["nodes"][node]["phase"] == "Failed"
        assert await semaphore_empty(env) == {}


async def test_worker_killed_mid_migration(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", time_scale=15, workers=3) as env:
        node = env.cluster.scenario.drain_hint[0]
        service = await env.service()
        from orchestrator.model import DrainRequest

        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node]}))
        await wait_for(lambda: env.cluster.kubevirt.active, within_s=60, what="a migration in flight")
        victim = env.workers[0]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        view = await service.wait(record.id, timeout_s=240)
        assert view.drain.phase == "Succeeded", view.drain
        assert vmis_on(env, node) == []
        stats = await env.stats()
        assert_limits(stats)
        ours = [m for m in stats["migrations"] if m["labels"].get("drainctl.io/drain-id") == record.id]
        succeeded = [m["vmi"] for m in ours if m["phase"] == "Succeeded"]
        assert len(succeeded) == len(set(succeeded)) == 15
        # No migration forgotten: every VMIM we created is final.
        assert all(m["phase"] in ("Succeeded", "Failed") for m in ours)
        assert await semaphore_empty(env) == {}


async def test_cancel_in_the_middle(cluster_env: EnvFactory) -> None:
    # 64 MiB/s per migration (an old HCO default): transfers take long enough to be cancelled mid-flight.
    base = scenarios.builtin("small")
    sc = dataclasses.replace(base, migrations={**dict(base.migrations), "bandwidthPerMigration": "64Mi"})
    async with cluster_env(sc, time_scale=10, workers=2) as env:
        node = env.cluster.scenario.drain_hint[0]
        service = await env.service()
        from orchestrator.model import DrainRequest

        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node]}))
        await wait_for(lambda: any(m.phase == "Running" for m in env.cluster.kubevirt.active.values()),
                       within_s=60, what="a running migration")
        result = await env.adrainctl("cancel", record.id, "--uncordon", "-o", "json")
        assert result.returncode == 0, result.stderr
        cancelled_at = env.cluster.clock.elapsed()
        view = await service.wait(record.id, timeout_s=120)
        assert view.drain.phase == "Cancelled", env.worker_logs()
        stats = await env.stats()
        ours = [m for m in stats["migrations"] if m["labels"].get("drainctl.io/drain-id") == record.id]
        aborted = [m for m in ours if m["phase"] == "Failed"]
        assert aborted and all("abort" in (m["failure_reason"] or "").lower() or "cancel" in
                               (m["failure_reason"] or "").lower() for m in aborted)
        assert all(m["phase"] in ("Succeeded", "Failed") for m in ours)
        assert stats["in_flight"] == 0 and stats["pending"] == 0
        late = [m for m in ours if m["created_s"] > cancelled_at]
        assert late == [], f"{len(late)} migrations started after the cancel"
        n_vmims = len(ours)
        await asyncio.sleep(1.0)
        assert len([m for m in (await env.stats())["migrations"]
                    if m["labels"].get("drainctl.io/drain-id") == record.id]) == n_vmims, "work started after cancel"
        states = {vm.phase for vm in view.vms.values()}
        assert states <= {"Succeeded", "Cancelled"}, states
        assert "Cancelled" in states
        # Each cancelled VM says it once: a VM aborted mid-transfer names KubeVirt's reason for its VMIM in
        # parentheses (none when the VMIM vanished first); one not started yet says only that the drain was.
        failure_reasons = {m["vmi"]: m["failure_reason"] for m in aborted}
        cancelled = {vmi: vm.message for vmi, vm in view.vms.items() if vm.phase == "Cancelled"}
        for vmi, message in cancelled.items():
            assert message in (CANCELLED_IDLE, f"{CANCELLED_IDLE} before the node started", CANCELLED_IN_FLIGHT,
                               f"{CANCELLED_IN_FLIGHT} ({failure_reasons.get(vmi)})"), (vmi, message)
            assert "cancelled: cancelled" not in message and not STUTTER.search(message), (vmi, message)
        assert any(m.startswith(CANCELLED_IN_FLIGHT) for m in cancelled.values()), cancelled
        assert not env.cluster.store.get(NODES, None, node)["spec"].get("unschedulable")
        assert await semaphore_empty(env) == {}
        print(f"\ncancel: {len(aborted)} aborted, {n_vmims - len(aborted)} finished, "
              f"{sum(1 for vm in view.vms.values() if vm.phase == 'Cancelled')} VMs cancelled")


EMPTY_NODE_SCENARIO = """\
name: empty-node
seed: 3
nodes:
  - name: master-0
    memory: 16Gi
    cpus: 4
    nic: 10Gbit
    cpu_model: Skylake-Server-IBRS
    control_plane: true
  - name: "worker-{i}"
    count: 2
    memory: 64Gi
    cpus: 16
    nic: 25Gbit
    cpu_model: Skylake-Server-IBRS
vms:
  - name: web-1
    namespace: web
    node: worker-1
    memory: 2Gi
"""


async def test_drain_of_a_node_without_vms_says_none(cluster_env: EnvFactory, tmp_path: Path) -> None:
    path = tmp_path / "empty-node.yaml"
    path.write_text(EMPTY_NODE_SCENARIO)
    async with cluster_env(scenarios.load_yaml(path), workers=1) as env:
        assert vmis_on(env, "worker-2") == []
        result = await env.adrainctl("drain", "worker-2", "--wait", "-o", "json", timeout_s=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        assert view["phase"] == "Succeeded"
        assert view["message"] == "nodes: 1 Drained; VMs: none"
        assert view["vms"] == {}
        assert env.cluster.store.get(NODES, None, "worker-2")["spec"]["unschedulable"] is True


async def test_drain_survives_api_errors_and_dropped_watches(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", time_scale=20, workers=2) as env:
        node = env.cluster.scenario.drain_hint[0]
        await env.faults({
            "errors": [
                {"verb": "create", "resource": "virtualmachineinstancemigrations", "rate": 0.3, "code": 500},
                {"verb": "get", "resource": "virtualmachineinstances", "rate": 0.2, "code": 503},
                {"verb": "patch", "resource": "nodes", "rate": 0.3, "code": 500},
            ],
            "drop_watches_every_s": 2.0,
        })
        result = await env.adrainctl("drain", node, "--wait", "-o", "json", timeout_s=280)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
        stats = await env.stats()
        injected = (await env.faults())["injected"]
        assert injected > 0, "no fault fired: the test proves nothing"
        assert vmis_on(env, node) == []
        assert_limits(stats)
        assert await semaphore_empty(env) == {}
        print(f"\nfaults injected: {injected}")


async def test_cancel_letting_in_flight_migrations_finish(cluster_env: EnvFactory) -> None:
    base = scenarios.builtin("small")
    sc = dataclasses.replace(base, migrations={**dict(base.migrations), "bandwidthPerMigration": "64Mi"})
    async with cluster_env(sc, time_scale=10, workers=2) as env:
        node = sc.drain_hint[0]
        service = await env.service()
        from orchestrator.model import DrainRequest

        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node], "uncordon_on_cancel": False}))
        await wait_for(lambda: any(m.phase == "Running" for m in env.cluster.kubevirt.active.values()),
                       within_s=60, what="a running migration")
        result = await env.adrainctl("cancel", record.id, "--let-finish", "-o", "json")
        assert result.returncode == 0, result.stderr
        in_flight = {m.vmi for m in env.cluster.kubevirt.active.values()}
        view = await service.wait(record.id, timeout_s=180)
        assert view.drain.phase == "Cancelled", view.drain
        stats = await env.stats()
        ours = [m for m in stats["migrations"] if m["labels"].get("drainctl.io/drain-id") == record.id]
        assert ours and all(m["phase"] == "Succeeded" for m in ours), ours
        assert {m["vmi"].split("/", 1)[1] for m in ours} >= in_flight
        assert {vm.phase for vm in view.vms.values()} == {"Succeeded", "Cancelled"}
        # The request said not to uncordon on cancel.
        assert env.cluster.store.get(NODES, None, node)["spec"]["unschedulable"] is True
        assert await semaphore_empty(env) == {}
