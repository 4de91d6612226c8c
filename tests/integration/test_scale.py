"""Cost follows the work, on the real path: simulator over HTTPS, real Redis, `drainctl worker` processes.

- With a worker running, a dry run is planned from the worker's warm view: the caller lists nothing, and the
  plan equals the one the caller computes from a snapshot of the whole cluster.
- A drain is planned once: the plan job carries out the plan the drain was submitted with (the cluster is not
  listed again between submit and the first migration, and the nodes are cordoned before it); a submitted plan
  that no longer matches the cluster is made again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from arq.constants import health_check_key_suffix

from orchestrator import kube as k
from orchestrator.model import DRAIN_ID_LABEL, DrainRequest
from orchestrator.planner import PlanError, plan_drain
from simulator.resources import VMIS
from tests.integration.conftest import Env, EnvFactory, requires_redis

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(300)]


async def workers_ready(env: Env, within_s: float = 60.0) -> None:
    """A worker has started (its view is warm) once arq writes its health check."""
    deadline = time.monotonic() + within_s
    key = env.settings.connection.queue_name + health_check_key_suffix
    while time.monotonic() < deadline:
        if await env.redis.exists(key):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("no worker started:\n" + env.worker_logs())


async def test_a_dry_run_is_planned_by_a_worker_from_its_warm_view(cluster_env: EnvFactory) -> None:
    async with cluster_env("enterprise", workers=1) as env:
        await workers_ready(env)
        service = await env.service()
        sc = env.cluster.scenario
        request = DrainRequest.from_json({"nodes": list(sc.drain_hint), "max_parallel_nodes": sc.parallel_hint})
        before = service.kube.requests
        plan = await service.plan(request)
        refused = DrainRequest.from_json({"nodes": ["no-such-node"]})
        with pytest.raises(PlanError, match="no-such-node"):
            await service.plan(refused)
        assert service.kube.requests == before  # the caller read nothing of the cluster
        local = plan_drain(await service.kube.snapshot(), request, env.settings, now=plan.created_at)
        assert plan.to_json() == local.to_json()


async def test_without_a_worker_the_caller_plans_from_targeted_reads(cluster_env: EnvFactory) -> None:
    async with cluster_env("enterprise", workers=0) as env:
        service = await env.service()
        sc = env.cluster.scenario
        request = DrainRequest.from_json({"nodes": list(sc.drain_hint), "max_parallel_nodes": sc.parallel_hint})
        plan = await service.plan(request)
        local = plan_drain(await service.kube.snapshot(), request, env.settings, now=plan.created_at)
        assert plan.to_json() == local.to_json()


class RequestLog:
    """Every API request the simulator counts (the ground truth behind /sim/v1/stats `api_requests`), in order."""

    def __init__(self, env: Env) -> None:
        self.entries: list[tuple[str, str]] = []
        count = env.cluster.record_request

        def record(verb: str, resource: str) -> None:
            self.entries.append((verb, resource))
            count(verb, resource)

        env.cluster.record_request = record

    def mark(self) -> int:
        return len(self.entries)

    def until_first(self, start: int, verb: str, resource: str) -> Counter[tuple[str, str]] | None:
        """The requests from `start` up to the first (`verb`, `resource`) after it; None until that came."""
        window = self.entries[start:]
        if (verb, resource) not in window:
            return None
        return Counter(window[:window.index((verb, resource))])


async def wait_for(pred: Any, what: str, within_s: float = 120.0) -> Any:
    async with asyncio.timeout(within_s):
        while not (value := pred()):  # noqa: ASYNC110 - the simulator's store has no event to await here
            await asyncio.sleep(0.02)
    return value


async def planned_event(env: Env, drain_id: str) -> dict[str, Any]:
    service = await env.service()
    async with asyncio.timeout(120):
        while True:
            found = [e for e in await service.events(drain_id) if e["event"] == "drain.planned"]
            if found:
                return found[0]
            await asyncio.sleep(0.1)


async def test_a_drain_is_planned_once(cluster_env: EnvFactory) -> None:
    # A generous reuse window: on a busy machine the worker may take a few wall seconds to the plan job.
    async with cluster_env("small", workers=1, extra_env={"DRAIN_PLAN_REUSE": "3600"}) as env:
        await workers_ready(env)
        service = await env.service()
        node = env.cluster.scenario.drain_hint[0]
        requests = RequestLog(env)
        start = requests.mark()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node]}))
        window = await wait_for(lambda: requests.until_first(start, "create", "virtualmachineinstancemigrations"),
                                "the first migration")
        # One plan (the dry run, by the worker from its warm view): the drained node's pods and VMIs listed once,
        # the VMIMs and the KubeVirt CR once. The reconciler lists VMIs too, each time after MigrationPolicies.
        assert window[("list", "pods")] == 1, window
        assert window[("list", "virtualmachineinstances")] - window[("list", "migrationpolicies")] == 1, window
        assert window[("list", "virtualmachineinstancemigrations")] == 1, window
        assert window[("list", "kubevirts")] == 1, window
        assert window[("patch", "nodes")] >= 1, window  # cordoned before the first migration
        event = await planned_event(env, record.id)
        assert event["submitted_plan"] is True and event["replanned"] is None, event
        view = await service.wait(record.id, timeout_s=240)
        assert view.drain.phase == "Succeeded", view.drain
        assert env.cluster.store.on_node(VMIS, node) == []


async def test_a_stale_submitted_plan_is_made_again(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=0, extra_env={"DRAIN_PLAN_REUSE": "3600"}) as env:
        service = await env.service()
        node = env.cluster.scenario.drain_hint[0]
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node]}))  # planned by the caller
        # Before any worker takes the drain, someone moves one of its VMs away: the submitted plan is stale.
        moved = env.cluster.store.on_node(VMIS, node)[0]["metadata"]
        others = [n.name for n in env.cluster.scenario.nodes if n.name != node and not n.control_plane]
        await service.kube.create(k.VMIMS, {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": f"by-hand-{moved['name']}", "namespace": moved["namespace"]},
            "spec": {"vmiName": moved["name"], "addedNodeSelector": {"kubernetes.io/hostname": others[0]}},
        }, moved["namespace"])
        await wait_for(lambda: moved["name"] not in [o["metadata"]["name"] for o in
                                                     env.cluster.store.on_node(VMIS, node)], "moved by hand")
        requests = RequestLog(env)
        start = requests.mark()
        env.start_workers(1)
        event = await planned_event(env, record.id)
        assert "changed since the plan" in (event["replanned"] or ""), event
        assert f"gone {moved['namespace']}/{moved['name']}" in event["replanned"], event
        assert Counter(requests.entries[start:])[("list", "pods")] >= 1  # the plan job listed again
        view = await service.wait(record.id, timeout_s=240)
        assert view.drain.phase == "Succeeded", view.drain
        assert f"{moved['namespace']}/{moved['name']}" not in view.vms  # the re-made plan left it out
        stats = await env.stats()
        ours = [m for m in stats["migrations"] if m["labels"].get(DRAIN_ID_LABEL) == record.id]
        assert moved["name"] not in {m["vmi"].split("/")[-1] for m in ours}
        assert env.cluster.store.on_node(VMIS, node) == []
