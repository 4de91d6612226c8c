"""Cost follows the work, on the real path: simulator over HTTPS, real Redis, `drainctl worker` processes.

- With a worker running, a dry run is planned from the worker's warm view: the caller lists nothing, and the
  plan equals the one the caller computes from a snapshot of the whole cluster.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from arq.constants import health_check_key_suffix

from orchestrator.model import DrainRequest
from orchestrator.planner import PlanError, plan_drain
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
