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
from typing import Any

import pytest

from orchestrator.report import attempt_rows
from simulator import scenarios
from simulator.policies import MIGRATION_POLICIES
from simulator.resources import NAMESPACES, VMIS
from tests.integration.conftest import Env, EnvFactory, requires_redis
from tests.integration.test_drain import semaphore_empty, vmis_on

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(300)]

HOT_MEMORY = 8 * 1024**3
CLIMB = {"DRAIN_START_ON_EXPECTED_RUNG": "false"}
"""Workers that climb the ladder from a plain attempt, whatever the plan expects."""


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
        result = await env.adrainctl("drain", node, "--escalation", "none", "--wait", "-o", "json", timeout_s=280)
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
    async with cluster_env(sc, workers=2, prometheus=True, extra_env=CLIMB) as env:
        user_policy(env, ns, name)
        node = sc.drain_hint[0]
        result = await env.adrainctl("drain", node, "--escalation", "post-copy", "--wait", "-o", "json",
                                     timeout_s=280)
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
        drain = await env.adrainctl("drain", node, "--escalation", "none", "--allow-post-copy", "-o", "json")
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


def with_solo_vm(sc: scenarios.Scenario) -> tuple[scenarios.Scenario, str, str]:
    """`sc` with two VMs on the drained node that migrate first, side by side (the largest go first):

    - "bulk", 64 GiB that converge slowly (0.4 GB/s over a 16 GiB working set): its transfer shares the node's
      NIC for minutes;
    - "hot", 16 GiB whose 4 GiB working set is dirtied at 1 GB/s: more than the half of the NIC's share for
      migrations (25 GbE, half of it for the pod network: about 0.7 GB/s) it gets beside bulk, less than the
      whole share (about 1.4 GB/s). Alone it converges in seconds.
    """
    node = sc.drain_hint[0]
    vms = list(sc.vms)
    on_node = [i for i, vm in enumerate(vms) if vm.node == node]
    hot = dataclasses.replace(vms[on_node[0]], memory_bytes=16 * 1024**3, resident_bytes=8 * 1024**3,
                              dirty_bytes_per_s=1e9, wws_bytes=4 * 1024**3)
    bulk = dataclasses.replace(vms[on_node[1]], memory_bytes=64 * 1024**3, resident_bytes=60 * 1024**3,
                               dirty_bytes_per_s=0.4e9, wws_bytes=16 * 1024**3)
    vms[on_node[0]], vms[on_node[1]] = hot, bulk
    return dataclasses.replace(sc, vms=tuple(vms)), f"{hot.namespace}/{hot.name}", f"{bulk.namespace}/{bulk.name}"


async def drain_moving(env: Env, node: str, hot: str, *args: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Drain `node` (with `args`) to success; the hot VM's record, which must have moved, and the ground truth's
    migrations."""
    result = await env.adrainctl("drain", node, *args, "--wait", "-o", "json", timeout_s=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
    vm = json.loads(result.stdout)["vms"][hot]
    assert vm["phase"] == "Succeeded", vm
    return vm, (await env.stats())["migrations"]


async def assert_nothing_left(env: Env, node: str) -> None:
    """The node is empty, no policy or VMI label of ours remains, and the semaphore holds nothing."""
    assert vmis_on(env, node) == []
    assert leftovers(env) == []
    assert await semaphore_empty(env) == {}


def overlapping(migrations: list[dict[str, Any]], mig: dict[str, Any]) -> list[dict[str, Any]]:
    """The other migrations from or to `mig`'s source or target node that ran while it ran (ground truth)."""
    nodes = {mig["source"], mig["target"]}
    end = mig["finished_s"] if mig["finished_s"] is not None else math.inf
    return [m for m in migrations if m is not mig and ({m["source"], m["target"]} & nodes)
            and m["created_s"] < end and (m["finished_s"] is None or m["finished_s"] > mig["created_s"])]


async def test_a_vm_that_cannot_converge_beside_others_moves_alone_on_the_solo_rung(cluster_env: EnvFactory) -> None:
    sc, hot, bulk = with_solo_vm(scenarios.builtin("small"))
    async with cluster_env(sc, workers=2, prometheus=True, extra_env=CLIMB) as env:
        node = sc.drain_hint[0]
        vm, migrations = await drain_moving(env, node, hot)  # the default ladder
        assert len(vm["attempts"]) == 2, json.dumps(vm["attempts"], indent=0)
        first, second = vm["attempts"]
        assert first["convergence"] == "CannotConverge" and first["rung"] is None, first
        assert second["rung"] == "Solo" and second["outcome"] == "Succeeded", second
        plain, solo = [m for m in migrations if m["vmi"] == hot]
        # The premise: the plain attempt shared the node's NIC with bulk; the solo one had its NICs to itself.
        assert any(m["vmi"] == bulk for m in overlapping(migrations, plain)), json.dumps(plain)
        assert solo["phase"] == "Succeeded" and solo["migration_policy"] is None, solo
        assert overlapping(migrations, solo) == [], json.dumps([solo, overlapping(migrations, solo)])
        await assert_nothing_left(env, node)


async def test_a_vm_that_cannot_converge_even_alone_climbs_to_auto_converge(cluster_env: EnvFactory) -> None:
    sc, hot = with_hard_vm(scenarios.builtin("small"))  # dirties 20 GB/s: more than any NIC carries
    async with cluster_env(sc, workers=2, prometheus=True, extra_env=CLIMB) as env:
        node = sc.drain_hint[0]
        vm, everything = await drain_moving(env, node, hot)  # the default ladder
        plain, solo, throttled = vm["attempts"]
        assert plain["convergence"] == "CannotConverge" and plain["rung"] is None, plain
        assert solo["convergence"] == "CannotConverge" and solo["rung"] == "Solo", solo
        assert throttled["rung"] == "AutoConverge" and throttled["outcome"] == "Succeeded", throttled
        migrations = [m for m in everything if m["vmi"] == hot]
        assert [m["phase"] for m in migrations] == ["Failed", "Failed", "Succeeded"], migrations
        # Auto-converge for this VM only, through the attempt's own MigrationPolicy; never post-copy.
        assert migrations[2]["migration_policy"] == throttled["vmim"] and migrations[2]["mode"] == "PreCopy", migrations
        await assert_nothing_left(env, node)


@pytest.mark.parametrize("on", ["vmi", "namespace"])
async def test_a_vm_annotated_escalation_none_is_reported_after_its_first_hopeless_verdict(
        cluster_env: EnvFactory, on: str) -> None:
    sc, hot = with_hard_vm(scenarios.builtin("small"))
    ns, name = hot.split("/")
    async with cluster_env(sc, workers=2, prometheus=True) as env:
        def annotate(obj: dict[str, Any]) -> None:
            obj["metadata"].setdefault("annotations", {})["drainctl.io/escalation"] = "none"

        if on == "vmi":
            env.cluster.store.mutate(VMIS, ns, name, annotate)
        else:
            env.cluster.store.mutate(NAMESPACES, None, ns, annotate)
        node = sc.drain_hint[0]
        result = await env.adrainctl("drain", node, "--allow-post-copy", "--wait", "-o", "json", timeout_s=280)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
        vm = json.loads(result.stdout)["vms"][hot]
        assert vm["phase"] == "Failed" and vm["failure_class"] == "NotConverging", vm
        [entry] = vm["attempts"]  # no rung for it, although the drain allows every one
        assert entry["convergence"] == "CannotConverge" and entry["dirty_rate"] > 0, entry
        assert "cannot converge: dirties" in vm["message"] and "the network carries" in vm["message"], vm
        assert "rungs allowed for it: none" in vm["message"], vm
        [mig] = [m for m in (await env.stats())["migrations"] if m["vmi"] == hot]
        assert mig["phase"] == "Failed", mig
        assert vmis_on(env, node) == [hot]
        assert leftovers(env) == []
        assert await semaphore_empty(env) == {}


async def test_the_plan_lists_the_vms_it_expects_to_be_hard_with_their_rung(cluster_env: EnvFactory) -> None:
    sc, hot, bulk = with_solo_vm(scenarios.builtin("small"))
    async with cluster_env(sc, prometheus=True) as env:
        node = sc.drain_hint[0]
        # The caller plans itself (no worker runs), then a worker plans for it: both read the dirty rates.
        for workers in (0, 1):
            if workers:
                env.start_workers(1)
            result = await env.adrainctl("plan", node, "-o", "json")
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
            jobs = {job["vmi"]: job for plan in json.loads(result.stdout)["nodes"] for job in plan["jobs"]}
            # 1 GB/s (its 4 GiB working set, dirtied each second) against half of the assumed 1.125 GB/s NIC.
            assert jobs[hot]["expected_hard"] and jobs[hot]["expected_rung"] == "Solo", jobs[hot]
            assert jobs[hot]["dirty_rate_bytes_per_s"] == pytest.approx(1e9, rel=0.01), jobs[hot]
            # Its first attempt starts on the solo rung: no judged plain attempt in the estimate, the NIC to itself.
            assert "where its first attempt starts" in jobs[hot]["hard_reason"], jobs[hot]
            assert jobs[hot]["estimated_s"] < 16 * 1024**3 / 0.5625e9, jobs[hot]
            assert not jobs[bulk]["expected_hard"] and jobs[bulk]["expected_rung"] is None, jobs[bulk]
            assert all(not job["expected_hard"] for vmi, job in jobs.items() if vmi != hot), jobs
        table = await env.adrainctl("plan", node, "--escalation", "auto-converge")
        assert table.returncode == 0, table.stderr
        assert "expected hard" in table.stdout and hot.split("/")[1] in table.stdout, table.stdout
        assert "auto-converge" in table.stdout, table.stdout
        # Planning wrote nothing and started nothing.
        assert (await env.stats())["migrations"] == []


@pytest.mark.parametrize("kind", ["solo", "auto-converge", "post-copy"])
async def test_a_vm_the_plan_expects_to_be_hard_starts_on_its_rung(cluster_env: EnvFactory, kind: str) -> None:
    """The plan reads the guests' dirty rates; a VM no plain attempt can carry starts on the quickest rung
    expected to move it (the default), so it moves in one attempt and no slot is spent on a verdict."""
    if kind == "solo":
        sc, hot, _bulk = with_solo_vm(scenarios.builtin("small"))
    else:
        sc, hot = with_hard_vm(scenarios.builtin("small"))
    rung = {"solo": "Solo", "auto-converge": "AutoConverge", "post-copy": "PostCopy"}[kind]
    async with cluster_env(sc, workers=2, prometheus=True) as env:
        node = sc.drain_hint[0]
        vm, migrations = await drain_moving(env, node, hot, *(["--allow-post-copy"] if kind == "post-copy" else []))
        assert len(vm["attempts"]) == 1, json.dumps(vm["attempts"], indent=0)
        assert vm["attempts"][0]["rung"] == rung and vm["attempts"][0]["outcome"] == "Succeeded", vm["attempts"]
        [mig] = [m for m in migrations if m["vmi"] == hot]
        assert mig["phase"] == "Succeeded", mig
        if kind == "solo":
            assert mig["migration_policy"] is None and overlapping(migrations, mig) == [], json.dumps(mig)
        else:
            mode = "PostCopy" if kind == "post-copy" else "PreCopy"
            assert mig["migration_policy"] == vm["attempts"][0]["vmim"] and mig["mode"] == mode, mig
        assert not [m for m in migrations if m["phase"] == "Failed"], migrations
        await assert_nothing_left(env, node)
