"""Short-lived, renewed arq in-progress keys, on a real arq Worker and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func

from tests.redis_db import claimed_db
from workers.inprogress import in_progress_key, keep_in_progress_short

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def pool() -> AsyncIterator[ArqRedis]:
    async with claimed_db() as url:
        redis = await create_pool(RedisSettings.from_dsn(url))
        try:
            yield redis
        finally:
            await redis.aclose()


def _worker(pool: ArqRedis, job: Any, *, timeout_s: float, **hooks: Any) -> Worker:
    return Worker(functions=[func(job, name="job", timeout=timeout_s)], redis_pool=pool, burst=True,
                  poll_delay=0.05, handle_signals=False, queue_name="inprogress-test", keep_result=0, **hooks)


async def test_a_long_job_keeps_a_short_key_alive_until_it_ends(pool: ArqRedis) -> None:
    seen: list[int] = []

    async def job(ctx: dict[str, Any]) -> str:
        # Three lifetimes of the key: without renewal it would be gone half-way.
        for _ in range(15):
            seen.append(int(await pool.pttl(in_progress_key(ctx["job_id"]))))
            await asyncio.sleep(0.2)
        return "done"

    worker = keep_in_progress_short(_worker(pool, job, timeout_s=24 * 3600), ttl_s=1.0, every_s=0.2)
    await pool.enqueue_job("job", _job_id="long", _queue_name="inprogress-test")
    await _run(worker)
    assert worker.jobs_complete == 1
    # Alive all along, and never given arq's own lifetime (the longest job timeout + 10 s).
    assert all(0 < ttl <= 1000 for ttl in seen), seen
    assert not await pool.exists(in_progress_key("long"))


async def test_the_workers_own_hooks_still_run(pool: ArqRedis) -> None:
    calls: list[str] = []

    async def startup(ctx: dict[str, Any]) -> None:
        calls.append("startup")

    async def shutdown(ctx: dict[str, Any]) -> None:
        calls.append("shutdown")

    async def job(ctx: dict[str, Any]) -> None:
        calls.append("job")

    worker = keep_in_progress_short(_worker(pool, job, timeout_s=60, on_startup=startup, on_shutdown=shutdown))
    await pool.enqueue_job("job", _queue_name="inprogress-test")
    await _run(worker)
    assert calls == ["startup", "job", "shutdown"]


async def _run(worker: Worker) -> None:
    """Run a burst worker until its queue is empty, then its shutdown hook (arq's close() would also close the
    shared pool with a call redis-py deprecates)."""
    await worker.async_run()
    assert worker.on_shutdown is not None
    await worker.on_shutdown(worker.ctx)


async def test_renewal_must_be_more_frequent_than_the_lifetime() -> None:
    with pytest.raises(ValueError, match="every_s"):
        keep_in_progress_short(Worker(functions=[func(_noop, name="noop")], redis_settings=RedisSettings(),
                                      handle_signals=False), ttl_s=1.0, every_s=1.0)


async def _noop(ctx: dict[str, Any]) -> None:
    return None
