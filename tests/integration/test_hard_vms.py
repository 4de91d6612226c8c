"""Hard VMs on the real path: a pre-copy that cannot converge is judged from the cluster's Prometheus metrics
and aborted early, instead of holding its slot for KubeVirt's whole completion budget.

Simulator over HTTPS with its Prometheus API, real Redis, `drainctl worker` processes; the assertions read the
simulator's ground truth (how long each migration ran) and the drain's records.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal

import pytest

from orchestrator.report import attempt_rows
from simulator import scenarios
from simulator.policies import MIGRATION_POLICIES
from simulator.resources import VMIS
from tests.integration.conftest import Env, EnvFactory, requires_redis
from tests.integration.test_drain import semaphore_empty, vmis_on

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(300)]

HOT_MEMORY = 8 * 1024**3


def with_hard_vm(sc: scenarios.Scenario) -> tuple[scenarios.Scenario, str]:
    """`sc` with one 8 GiB VM on the drained node whose 4 GiB working set is dirtied faster than any NIC carries
    it, under KubeVirt's default completion budget (150 s per GB: 1,350 s for this VM)."""
    node = sc.drain_hint[0]
    vms = list(sc.vms)
    index = next(i for i, vm in enumerate(vms) if vm.node == node)
    hot = dataclasses.replace(vms[index], dirty_bytes_per_s=20e9, wws_bytes=4 * 1024**3, memory_bytes=HOT_MEMORY,
                              resident_bytes=HOT_MEMORY)
    vms[index] = hot
    return dataclasses.replace(sc, vms=tuple(vms)), f"{hot.namespace}/{hot.name}"


async def test_a_vm_that_cannot_converge_is_aborted_early_with_its_numbers(cluster_env: EnvFactory) -> None:
    sc, hot = with_hard_vm(scenarios.builtin("small"))
    budget = sc.migrations["completionTimeoutPerGiB"] * math.ceil(HOT_MEMORY / 1e9)
    async with cluster_env(sc, workers=2, prometheus=True) as env:
        node = sc.drain_hint[0]
        result = await env.adrainctl("drain", node, "--wait", "-o", "json", timeout_s=280)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        vm = view["vms"][hot]
        assert vm["phase"] == "Failed" and vm["failure_class"] == "NotConverging", vm
        [entry] = vm["attempts"]
        assert entry["convergence"] == "CannotConverge", entry
        # The rates it reports are measured ones (lowest dirty rate, highest transfer rate over its evidence, while
        # the VM shares the NIC with other migrations); the guest really dirties 20 GB/s, beyond any NIC.
        assert entry["transfer_rate"] > 0 and entry["dirty_rate"] > 0, entry
        # No rung allowed: not retried elsewhere under the same conditions, reported with what would move it.
        assert "cannot converge: dirties" in vm["message"] and "the network carries" in vm["message"], vm
        assert "--allow-post-copy" in vm["message"] and "dedicated migration network" in vm["message"], vm
        [row] = [r for r in attempt_rows(await (await env.service()).get(view["id"])) if r.vmi == hot]
        assert "cannot converge: dirties" in row.reason, row  # the report shows it with its numbers
        # Ground truth: the transfer ran far shorter than KubeVirt's budget; aborted, not timed out by KubeVirt.
        [mig] = [m for m in (await env.stats())["migrations"] if m["vmi"] == hot]
        assert mig["phase"] == "Failed", mig
        assert budget >= 1000 and mig["finished_s"] - mig["started_s"] < budget / 2, json.dumps([budget, mig, entry])
        judged_s = entry["judged_at"] - env.cluster.clock.epoch
        assert mig["started_s"] < judged_s < mig["finished_s"] < judged_s + 60, json.dumps([judged_s, mig, entry])
        # Everything else moved, nothing is held.
        assert vmis_on(env, node) == [hot]
        assert await semaphore_empty(env) == {}


def leftovers(env: Env) -> list[str]:
    """MigrationPolicies in the cluster and VMIs still carrying a label of the ladder."""
    policies = [p["metadata"]["name"] for p in env.cluster.store.iter(MIGRATION_POLICIES)]
    labelled = [v["metadata"]["name"] for v in env.cluster.store.iter(VMIS)
                if any(key.startswith("rung.drainctl.io/") for key in (v["metadata"].get("labels") or {}))]
    return policies + labelled


def user_policy(env: Env, vm_namespace: str, vm_name: str) -> None:
    """A user's policy matching the hard VM on two labels, with post-copy off: drainctl's must beat it."""
    env.cluster.store.mutate(VMIS, vm_namespace, vm_name, lambda o: o["metadata"].setdefault("labels", {}).update(
        {"tier": "db", "team": "payments"}))
    env.cluster.store.create(MIGRATION_POLICIES, {
        "apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "aaa-users-db"},
        "spec": {"allowPostCopy": False, "selectors": {"virtualMachineInstanceSelector": {"tier": "db",
                                                                                        "team": "payments"}}}})


async def test_post_copy_rung_moves_the_vm_through_a_drain_owned_policy(cluster_env: EnvFactory) -> None:
    sc, hot = with_hard_vm(scenarios.builtin("small"))
    ns, name = hot.split("/")
    async with cluster_env(sc, workers=2, prometheus=True) as env:
        user_policy(env, ns, name)
        node = sc.drain_hint[0]
        result = await env.adrainctl("drain", node, "--allow-post-copy", "--wait", "-o", "json", timeout_s=280)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        vm = view["vms"][hot]
        assert vm["phase"] == "Succeeded", vm
        first, second = vm["attempts"]
        assert first["convergence"] == "CannotConverge" and first["rung"] is None, first
        assert second["rung"] == "PostCopy" and second["outcome"] == "Succeeded", second
        rows = [r for r in attempt_rows(await (await env.service()).get(view["id"])) if r.vmi == hot]
        assert rows[1].reason.startswith("[PostCopy rung]"), rows
        migrations = [m for m in (await env.stats())["migrations"] if m["vmi"] == hot]
        assert [m["phase"] for m in migrations] == ["Failed", "Succeeded"], migrations
        assert migrations[0]["migration_policy"] == "aaa-users-db", migrations[0]
        assert migrations[1]["migration_policy"] == second["vmim"] and migrations[1]["mode"] == "PostCopy", migrations
        assert vmis_on(env, node) == []
        assert leftovers(env) == ["aaa-users-db"]  # ours are gone, the user's stays
        assert await semaphore_empty(env) == {}


async def test_ladder_objects_are_cleaned_after_a_worker_is_killed(cluster_env: EnvFactory) -> None:
    sc, hot = with_hard_vm(scenarios.builtin("small"))
    async with cluster_env(sc, workers=2, prometheus=True) as env:
        # What a crash of an earlier drain left: a policy and VMI labels of a drain Redis does not know.
        env.cluster.store.create(MIGRATION_POLICIES, {
            "apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
            "metadata": {"name": "drain-0000000000-x-2", "labels": {"drainctl.io/drain-id": "000000000000"}},
            "spec": {"allowPostCopy": True, "selectors": {"virtualMachineInstanceSelector": {
                "rung.drainctl.io/0": "x", "rung.drainctl.io/1": "x"}}}})
        env.cluster.store.mutate(VMIS, "web", "web-00006", lambda o: o["metadata"].setdefault(
            "labels", {}).update({"rung.drainctl.io/0": "x", "rung.drainctl.io/drain-id": "000000000000"}))
        node = sc.drain_hint[0]
        drain = await env.adrainctl("drain", node, "--allow-post-copy", "-o", "json")
        assert drain.returncode == 0, drain.stderr
        drain_id = json.loads(drain.stdout)["id"]

        def ours() -> list[str]:
            return [p["metadata"]["name"] for p in env.cluster.store.iter(MIGRATION_POLICIES)
                    if p["metadata"].get("labels", {}).get("drainctl.io/drain-id") == drain_id]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while not ours():
            assert loop.time() < deadline, env.worker_logs()
            await asyncio.sleep(0.05)
        for proc in env.workers:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        env.start_workers(2)
        view = (await (await env.service()).wait(drain_id, timeout_s=240)).to_json()
        assert view["vms"][hot]["phase"] == "Succeeded", view["vms"][hot]
        deadline = loop.time() + 60
        while leftovers(env):  # the reconciler cleans what the dead drain left
            assert loop.time() < deadline, leftovers(env)
            await asyncio.sleep(0.1)
        assert vmis_on(env, node) == []
        assert await semaphore_empty(env) == {}
