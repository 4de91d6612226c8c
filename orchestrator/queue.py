"""Putting jobs on the arq queue: one place for the arguments every enqueue shares.

Control jobs (plan, advance, finish) get an old score so they run before queued migrations; every job key
lives two days (arq's default of one day would expire a long drain's deferred retries). Job ids come from
`orchestrator.keys`. Every enqueue publishes on the queue's wake channel: workers wait for it instead of
polling the queue.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError

CONTROL_SCORE = datetime(2001, 1, 1, tzinfo=UTC)
JOB_EXPIRES = timedelta(days=2)


async def enqueue_control(redis: ArqRedis, queue_name: str, function: str, *args: Any, job_id: str) -> bool:
    """Queue a control job ahead of the migrations; False when a job with this id exists already."""
    job = await redis.enqueue_job(function, *args, _job_id=job_id, _defer_until=CONTROL_SCORE,
                                  _expires=JOB_EXPIRES, _queue_name=queue_name)
    if job is not None:
        await wake(redis, queue_name)
    return job is not None


async def enqueue_after(redis: ArqRedis, queue_name: str, function: str, *args: Any, job_id: str,
                        delay_wall_s: float = 0.0) -> bool:
    """Queue a job in turn (after `delay_wall_s` wall seconds); False when a job with this id exists."""
    job = await redis.enqueue_job(function, *args, _job_id=job_id, _expires=JOB_EXPIRES, _queue_name=queue_name,
                                  _defer_by=timedelta(seconds=delay_wall_s) if delay_wall_s > 0 else None)
    if job is not None:
        await wake(redis, queue_name)
    return job is not None


def wake_channel(queue_name: str) -> str:
    """The pub/sub channel on which workers wait for work (`workers.loop.EventWorker`)."""
    return f"{queue_name}:wake"


async def wake(redis: ArqRedis, queue_name: str) -> None:
    """Tell waiting workers that the queue changed (best effort: they also poll, slowly)."""
    with contextlib.suppress(RedisError, OSError):
        await redis.publish(wake_channel(queue_name), b"1")
