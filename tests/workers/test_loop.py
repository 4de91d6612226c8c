"""EventWorker on a real Redis: started jobs leave arq's queue, workers wake on enqueues, orphans run again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.worker import Retry, func

from orchestrator import queue
from tests.redis_db import claimed_db
from workers.loop import EventWorker, alive_key, requeue_orphans, running_key

pytestmark = pytest.mark.timeout(60)
QUEUE = "loop-test"


@pytest.fixture
async def pool() -> AsyncIterator[ArqRedis]:
    async with claimed_db() as url:
        redis = await create_pool(RedisSettings.from_dsn(url))
        try:
            yield redis
        finally:
            await redis.aclose()


def _worker(pool: ArqRedis, *jobs: Any, **kwargs: Any) -> EventWorker:
    options: dict[str, Any] = dict(redis_pool=pool, poll_delay=0.05, handle_signals=False, queue_name=QUEUE,
                                   keep_result=0)
    options.update(kwargs)
    return EventWorker(functions=[func(job, name=job.__name__) for job in jobs], **options)


async def eventually(check: Callable[[], Awaitable[bool]], *, within_s: float = 30.0) -> None:
    for _ in range(int(within_s / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def _gone(pool: ArqRedis, job_id: str) -> bool:
    return not await pool.exists(job_key_prefix + job_id)


async def _queued(pool: ArqRedis, job_id: str, tries: list[int]) -> bool:
    return bool(tries) and await pool.zscore(QUEUE, job_id) is not None


async def _true(value: bool) -> bool:
    return value


@contextlib.asynccontextmanager
async def running(worker: EventWorker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.async_run())
    try:
        yield task
    finally:
        # Stop the loop without closing the pool (the test's fixture owns it).
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_running_job_is_out_of_the_queue_and_registered_as_running(pool: ArqRedis) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def follow(ctx: dict[str, Any]) -> str:
        started.set()
        await release.wait()
        return "done"

    # No slow poll to fall back on: only the enqueue's wake message can start the job.
    worker = _worker(pool, follow, idle_poll_s=3600.0)
    async with running(worker):
        await asyncio.sleep(0.2)  # the worker is waiting
        assert await queue.enqueue_after(pool, QUEUE, "follow", job_id="follow-1")
        async with asyncio.timeout(30):
            await started.wait()
        assert await pool.zscore(QUEUE, "follow-1") is None
        assert await pool.exists(in_progress_key_prefix + "follow-1")
        assert await pool.hget(running_key(QUEUE), "follow-1") == worker.worker_id.encode()
        assert await pool.exists(alive_key(QUEUE, worker.worker_id))
        release.set()
        await eventually(lambda: _gone(pool, "follow-1"))
        assert await pool.zcard(QUEUE) == 0
        assert await pool.hlen(running_key(QUEUE)) == 0
        assert not await pool.exists(in_progress_key_prefix + "follow-1")


async def test_a_retry_goes_back_into_the_queue_at_its_deferred_time(pool: ArqRedis) -> None:
    tries: list[int] = []

    async def flaky(ctx: dict[str, Any]) -> str:
        tries.append(ctx["job_try"])
        if ctx["job_try"] == 1:
            raise Retry(defer=3600)
        return "ok"

    worker = _worker(pool, flaky, idle_poll_s=3600.0)
    async with running(worker):
        assert await queue.enqueue_after(pool, QUEUE, "flaky", job_id="flaky-1")
        await eventually(lambda: _queued(pool, "flaky-1", tries))
        score = await pool.zscore(QUEUE, "flaky-1")
        now_ms = (await pool.time())[0] * 1000
        assert score > now_ms + 3000 * 1000  # an hour away, not re-run at once
        assert tries == [1]
        assert await pool.hlen(running_key(QUEUE)) == 0
        # Made due, a wake message starts it again.
        await pool.zadd(QUEUE, {"flaky-1": now_ms})
        await queue.wake(pool, QUEUE)
        await eventually(lambda: _gone(pool, "flaky-1"))
    assert tries == [1, 2]


async def test_the_job_of_a_dead_worker_runs_again(pool: ArqRedis) -> None:
    # A worker that died mid-job: its job left the queue, is registered as running, its in-progress key is still
    # there (24 h), and its alive key has expired.
    done: list[str] = []

    async def work(ctx: dict[str, Any]) -> str:
        done.append(ctx["job_id"])
        return "ok"

    await pool.enqueue_job("work", _job_id="orphan-1", _queue_name=QUEUE)
    await pool.zrem(QUEUE, "orphan-1")
    await pool.psetex(in_progress_key_prefix + "orphan-1", 24 * 3600 * 1000, b"1")
    await pool.hset(running_key(QUEUE), "orphan-1", "dead-worker")
    # A live worker's job stays where it is.
    await pool.set(alive_key(QUEUE, "live-worker"), b"1", px=60_000)
    await pool.hset(running_key(QUEUE), "busy-1", "live-worker")
    assert await requeue_orphans(pool, QUEUE) == 1
    assert await pool.zscore(QUEUE, "orphan-1") is not None
    assert not await pool.exists(in_progress_key_prefix + "orphan-1")
    assert await pool.hgetall(running_key(QUEUE)) == {b"busy-1": b"live-worker"}
    await pool.hdel(running_key(QUEUE), "busy-1")
    worker = _worker(pool, work, burst=True)
    await worker.async_run()
    assert done == ["orphan-1"]


async def test_the_periodic_task_runs_in_one_worker_per_period(pool: ArqRedis) -> None:
    runs: list[str] = []

    async def noop(ctx: dict[str, Any]) -> None:
        return None

    def periodic_for(name: str) -> Any:
        async def periodic(ctx: dict[str, Any]) -> None:
            runs.append(name)
        return periodic

    workers = [_worker(pool, noop, periodic=periodic_for(f"w{i}"), busy_period_s=30.0, idle_period_s=30.0)
               for i in range(3)]
    async with running(workers[0]), running(workers[1]), running(workers[2]):
        await eventually(lambda: _true(bool(runs)))
        await asyncio.sleep(0.5)
    assert len(runs) == 1
