"""arq's in-progress keys, kept short-lived and alive: a job whose worker died runs again within seconds.

arq marks a job as running with the key ``arq:in-progress:<job id>``, set when a worker picks the job and
deleted when it ends. A worker killed with SIGKILL deletes nothing, so the job runs again only once that key
expires, and arq gives it the longest timeout of any function on the worker plus 10 s (`Worker.__init__`:
``in_progress_timeout_s = max(function timeouts) + 10``, arq #402): with migrate's 24 h timeout, a plan or
finish job of a killed worker waited a day, and every re-enqueue of its deterministic id was dropped as a
duplicate meanwhile.

What this promises: every job of a kept worker (plan, advance, migrate, finish, the reconcile cron) gets an
in-progress key of ``ttl_s`` seconds from the moment the worker picks it, renewed every ``every_s`` seconds
by one task per worker process for as long as the job's task runs. After a kill -9 the key expires within
``ttl_s`` and any worker picks the job again (arq counts it as a new try). Job timeouts are unchanged.

What it does not do: it cannot tell a dead worker from one whose event loop stalled longer than ``ttl_s``;
then the job may run twice at once, which every job tolerates (they are idempotent and fenced, DESIGN.md
rules 1-3). It does not touch results, retries or the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import structlog
from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.exceptions import RedisError

log = structlog.get_logger("workers.inprogress")

TTL_S: Final = 15.0
"""Lifetime of an in-progress key without renewal: how long a killed worker's jobs wait to run again."""
EVERY_S: Final = 3.0
"""Renewal period (five renewals per lifetime: a slow Redis round trip or two changes nothing)."""

W = TypeVar("W", bound=Worker)
Hook = Callable[[dict[str, Any]], Awaitable[None]]


def in_progress_key(job_id: str) -> str:
    """arq's in-progress key of a job (arq names it; we only renew it)."""
    return in_progress_key_prefix + job_id


def running_job_ids(worker: Worker) -> list[str]:
    """The jobs this worker has picked and not finished (arq's ``Worker.tasks``: one task per picked job)."""
    return [job_id for job_id, task in list(worker.tasks.items()) if not task.done()]


async def renew(redis: Any, job_ids: list[str], *, ttl_s: float) -> None:
    """Give each job's in-progress key `ttl_s` more seconds (PEXPIRE: a key already gone stays gone)."""
    if not job_ids:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.pexpire(in_progress_key(job_id), round(ttl_s * 1000))
        await pipe.execute()


async def renew_forever(worker: Worker, redis: Any, *, ttl_s: float, every_s: float) -> None:
    """Renew the in-progress keys of `worker`'s running jobs until cancelled; a Redis error waits a round."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await renew(redis, running_job_ids(worker), ttl_s=ttl_s)
        except (RedisError, OSError) as exc:
            # The keys keep their remaining lifetime; the next round tries again.
            log.warning("inprogress.renew_failed", error=str(exc) or type(exc).__name__)


def keep_in_progress_short(worker: W, *, ttl_s: float = TTL_S, every_s: float = EVERY_S) -> W:
    """Make `worker` set `ttl_s`-second in-progress keys and renew them while its jobs run; returns it.

    The renewing task starts with the worker (after its own ``on_startup``) and stops with it (before its
    own ``on_shutdown``).
    """
    if not 0 < every_s < ttl_s:
        raise ValueError(f"in-progress keys: need 0 < every_s < ttl_s, got every_s={every_s}, ttl_s={ttl_s}")
    worker.in_progress_timeout_s = ttl_s
    started: Hook | None = worker.on_startup
    stopped: Hook | None = worker.on_shutdown
    tasks: list[asyncio.Task[None]] = []

    async def startup(ctx: dict[str, Any]) -> None:
        if started is not None:
            await started(ctx)
        tasks.append(asyncio.create_task(renew_forever(worker, ctx["redis"], ttl_s=ttl_s, every_s=every_s),
                                         name="arq-in-progress-renewal"))

    async def shutdown(ctx: dict[str, Any]) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        tasks.clear()
        if stopped is not None:
            await stopped(ctx)

    worker.on_startup = startup
    worker.on_shutdown = shutdown
    return worker
