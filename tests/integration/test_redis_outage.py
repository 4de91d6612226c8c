"""Redis taken away mid-drain, on the real path: a redis-server of the test's own (never the shared one),
`drainctl worker` processes, the simulator over HTTPS. With persistence (AOF) the drain completes as if
nothing happened; without it the loss is detected and the drains and cordoned nodes it left are reported.
Assertions read the simulator's ground truth and Redis, plus the workers' log lines where the log line is the
promised behaviour."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.exceptions import RedisError

from bench.redis_server import RedisServer
from orchestrator.kube import EVENTS, NODES, VMIMS
from orchestrator.model import DrainRequest
from orchestrator.service import DrainService
from tests.integration.conftest import Env, EnvFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NODE = "worker-01"


async def until(check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> None:
    """Poll `check` (Redis errors while Redis is away count as "not yet")."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    if await check():
                        return
                except (RedisError, OSError):
                    pass
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def succeeded_from(e: Env, node: str) -> list[dict[str, Any]]:
    return [m for m in (await e.stats())["migrations"] if m["source"] == node and m["phase"] == "Succeeded"]


def full_logs(e: Env) -> str:
    return "\n".join((e.tmp / f"worker-{i}.log").read_text(errors="replace") for i in range(len(e.workers)))


async def moved(e: Env, n: int) -> bool:
    return len(await succeeded_from(e, NODE)) >= n


async def leftovers(e: Env) -> dict[str, list[str]]:
    """Semaphore leases, node locks and non-final VMIMs of ours still standing."""
    redis: Any = e.redis
    leases = [k.decode() for k in await redis.keys("{drainctl:sem:*}:lease:*")]
    locks = [k.decode() for k in await redis.keys("drainctl:node:*:drain")]
    service = await e.service()
    vmims, _ = await service.kube.list(VMIMS, label_selector="drainctl.io/drain-id")
    running = [o["metadata"]["name"] for o in vmims
               if (o.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    return {"leases": leases, "locks": locks, "vmims": running}


@contextlib.asynccontextmanager
async def restarted_mid_drain(cluster_env: EnvFactory, *, aof: bool, kill: bool,
                              after_moves: int) -> AsyncIterator[tuple[Env, DrainService, str]]:
    """Two worker processes drain NODE on a redis-server of the test's own, restarted (down 3 s) once
    `after_moves` VMs have moved; yields the environment, a service and the drain id."""
    async with RedisServer(aof=aof) as server, \
            cluster_env("small", time_scale=30.0, workers=2, redis_url=server.url) as e:
        service = await e.service()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [NODE]}))
        await until(lambda: moved(e, after_moves), timeout_s=90, what=f"{after_moves} migrations done")
        await server.restart(down_s=3.0, kill=kill)
        yield e, service, record.id


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_a_redis_restart_with_aof_loses_nothing(cluster_env: EnvFactory, kill: bool) -> None:
    async with restarted_mid_drain(cluster_env, aof=True, kill=kill, after_moves=3) as (e, service, drain_id):

        async def final() -> bool:
            return (await service.get(drain_id)).drain.phase.is_final

        await until(final, timeout_s=150, what="the drain to end")
        view = await service.get(drain_id)
        assert view.drain.phase.value == "Succeeded", view.drain.message
        # Ground truth: every VM of the node moved exactly once, never two migrations of one VM at once.
        truth = await e.stats()
        moves = collections.Counter(m["vmi"] for m in (await succeeded_from(e, NODE)))
        assert len(moves) == 15 and set(moves.values()) == {1}, moves
        assert truth["max_in_flight_per_vmi"] <= 1
        assert truth["max_in_flight_cluster"] <= 5
        assert await leftovers(e) == {"leases": [], "locks": [], "vmims": []}
        # Both workers rode the outage out and said so.
        assert all(p.poll() is None for p in e.workers), e.worker_logs()
        logs = full_logs(e)
        assert "redis.unavailable" in logs and "redis.available" in logs, logs
        assert "redis.data_lost" not in logs


async def test_a_redis_that_comes_back_empty_is_reported(cluster_env: EnvFactory) -> None:
    async with restarted_mid_drain(cluster_env, aof=False, kill=False, after_moves=2) as (e, service, drain_id):

        async def reported() -> bool:
            found = await service.store.find(drain_id)
            return found is not None and found.source == "recovered"

        await until(reported, timeout_s=60, what="the lost drain to be reported")
        view = await service.get(drain_id)
        assert view.drain.phase.value == "Failed" and view.drain.message is not None
        assert f"drain {drain_id} was lost" in view.drain.message and NODE in view.drain.message
        assert view.nodes[NODE].phase.value == "Failed" and "cordoned" in view.nodes[NODE].message
        assert drain_id in [d.id for d in await service.list()]
        # In the cluster: the node is still cordoned (nothing uncordons it silently) and carries a Warning Event.
        node = await service.kube.get(NODES, NODE)
        assert node["spec"].get("unschedulable") is True
        events, _ = await service.kube.list(EVENTS, "default")
        lost = [ev for ev in events if ev.get("reason") == "DrainLost"
                and ev["involvedObject"].get("name") == NODE]
        assert len(lost) == 1 and drain_id in lost[0]["message"] and lost[0]["type"] == "Warning"
        assert all(p.poll() is None for p in e.workers), e.worker_logs()
        assert "drain.lost" in full_logs(e) and "redis.data_lost" in full_logs(e)
        # The way on that the report names: draining the node again finishes the job, each VM moved once.
        again, _ = await service.submit(DrainRequest.from_json({"nodes": [NODE]}))

        async def drained() -> bool:
            return (await service.get(again.id)).drain.phase.value == "Succeeded"

        await until(drained, timeout_s=150, what="the second drain to succeed")
        moves = collections.Counter(m["vmi"] for m in (await succeeded_from(e, NODE)))
        assert len(moves) == 15 and set(moves.values()) == {1}, moves
        assert (await e.stats())["max_in_flight_per_vmi"] <= 1
        assert await leftovers(e) == {"leases": [], "locks": [], "vmims": []}
