"""Hard VMs on the real path: a pre-copy that cannot converge is judged from the cluster's Prometheus metrics
and aborted early, instead of holding its slot for KubeVirt's whole completion budget.

Simulator over HTTPS with its Prometheus API, real Redis, `drainctl worker` processes; the assertions read the
simulator's ground truth (how long each migration ran) and the drain's records.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from simulator import scenarios
from tests.integration.conftest import EnvFactory, requires_redis
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
        result = await env.adrainctl("drain", node, "--max-attempts", "1", "--wait", "-o", "json", timeout_s=280)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        vm = view["vms"][hot]
        assert vm["phase"] == "Failed" and vm["failure_class"] == "NotConverging", vm
        [entry] = vm["attempts"]
        assert entry["convergence"] == "CannotConverge", entry
        assert entry["transfer_rate"] > 0 and entry["dirty_rate"] >= 0.98 * entry["transfer_rate"], entry
        assert "cannot converge: dirties" in vm["message"] and "the network carries" in vm["message"], vm
        # Ground truth: the transfer ran far shorter than KubeVirt's budget; aborted, not timed out by KubeVirt.
        [mig] = [m for m in (await env.stats())["migrations"] if m["vmi"] == hot]
        assert mig["phase"] == "Failed", mig
        assert budget >= 1000 and mig["finished_s"] - mig["started_s"] < budget / 2, json.dumps([budget, mig, entry])
        judged_s = entry["judged_at"] - env.cluster.clock.epoch
        assert mig["started_s"] < judged_s < mig["finished_s"] < judged_s + 60, json.dumps([judged_s, mig, entry])
        # Everything else moved, nothing is held.
        assert vmis_on(env, node) == [hot]
        assert await semaphore_empty(env) == {}
