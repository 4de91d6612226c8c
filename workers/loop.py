"""An arq worker that waits for work instead of polling for it.

arq's worker polls Redis every `poll_delay` (0.5 s): it reads the queue, re-checks every due job (a running job
stays in the queue until it ends, so every poll re-examines every running migration: four commands each),
reads the abort set and offers its cron jobs. With a drain's migrations following their VMIMs for minutes, that
costs tens of commands per second per worker, idle or not. `EventWorker` keeps arq's job protocol (job keys,
in-progress keys, retries, results) and changes when and what it reads:

- A started job leaves the queue (ZREM in the transaction that takes its in-progress key) and is registered in
  `<queue>:running` (job id -> worker id). It goes back into the queue only to run again: a `Retry` (at its
  deferred time), a cancellation at shutdown, or the death of its worker.
- The worker sleeps until something happens: a message on `<queue>:wake` (published by every enqueue through
  `orchestrator.queue`, and by this class when a job goes back into the queue), the due time of the earliest
  deferred job, a local job ending while the worker was full, or at the latest `idle_poll_s` (pub/sub loses
  messages while a connection is re-made, so a slow poll remains).
- While it runs jobs, the worker renews one key of its own, `<queue>:alive:<worker id>`, every `alive_every_s`;
  idle, it writes nothing. A sweep (run by the periodic task) puts the jobs of a worker whose key expired back
  into the queue and frees their in-progress keys: a worker killed -9 loses no job.
- Periodic work (the reconciler) runs in one worker at a time, chosen by a `SET NX PX` every period, directly in
  the worker's loop rather than as an enqueued cron job; the period is `busy_period_s` while this worker runs
  jobs or saw any start lately, `idle_period_s` otherwise.

Redis cost: per job a fixed number of commands (enqueue, wake, start, finish) whatever its duration; per worker
with running jobs one command per `alive_every_s`; per idle worker a command per `idle_poll_s` and the periodic
lock, well under one per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import arq.worker as arq_worker
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import RedisError, ResponseError, WatchError

from orchestrator.queue import wake, wake_channel

log = logging.getLogger("workers.loop")

Periodic = Callable[[dict[str, Any]], Awaitable[Any]]
ABORT_CHECK_EVERY_S = 60.0
"""How often arq's abort set is read (arq reads it on every 0.5 s poll)."""


def running_key(queue_name: str) -> str:
    return f"{queue_name}:running"


def alive_key(queue_name: str, worker_id: str) -> str:
    return f"{queue_name}:alive:{worker_id}"


def periodic_lock_key(queue_name: str) -> str:
    return f"{queue_name}:periodic"


async def requeue_orphans(redis: ArqRedis, queue_name: str) -> int:
    """Put the running jobs of workers that stopped renewing their alive key back into the queue, with their
    in-progress key freed so any worker can start them again. Returns how many went back."""
    running = await redis.hgetall(running_key(queue_name))  # type: ignore[misc]
    if not running:
        return 0
    owners = {owner.decode() for owner in running.values()}
    dead = set()
    for owner in owners:
        if not await redis.exists(alive_key(queue_name, owner)):
            dead.add(owner)
    orphans = [job.decode() for job, owner in running.items() if owner.decode() in dead]
    if not orphans:
        return 0
    now = timestamp_ms()
    async with redis.pipeline(transaction=True) as pipe:
        for job_id in orphans:
            pipe.delete(in_progress_key_prefix + job_id)
            pipe.zadd(queue_name, {job_id: now}, nx=True)
            pipe.hdel(running_key(queue_name), job_id)
        await pipe.execute()
    log.warning("requeued %d job(s) of stopped worker(s) %s", len(orphans), ", ".join(sorted(dead)))
    await wake(redis, queue_name)
    return len(orphans)


class EventWorker(Worker):
    """arq's Worker, woken by events instead of a 0.5 s poll (see the module docstring)."""

    def __init__(self, *args: Any, periodic: Periodic | None = None, busy_period_s: float = 5.0,
                 idle_period_s: float = 15.0, idle_poll_s: float = 10.0, alive_every_s: float = 5.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_id = uuid.uuid4().hex[:12]
        self.periodic = periodic
        self.busy_period_s = busy_period_s
        self.idle_period_s = idle_period_s
        self.idle_poll_s = idle_poll_s
        self.alive_every_s = alive_every_s
        self._scores: dict[str, int] = {}
        self._next_due_ms: float | None = None
        self._woken = asyncio.Event()
        self._last_start = 0.0
        self._last_alive = 0.0
        self._next_periodic = 0.0
        self._last_abort_check = 0.0
        self._periodic_task: asyncio.Task[Any] | None = None

    # ------------------------------------------------------------------------------------------ loop
    async def main(self) -> None:
        # Through arq.worker's namespace, as arq's own main does: a patch of arq.worker.log_redis_info (the
        # embedded demo's fakeredis has no INFO) applies here too.
        if self._pool is None:
            self._pool = await arq_worker.create_pool(  # type: ignore[attr-defined]
                self.redis_settings, job_deserializer=self.job_deserializer, job_serializer=self.job_serializer,
                default_queue_name=self.queue_name, expires_extra_ms=self.expires_extra_ms)
        log.info("starting worker %s for %d functions: %s", self.worker_id, len(self.functions),
                 ", ".join(self.functions))
        await arq_worker.log_redis_info(self.pool, log.info)  # type: ignore[attr-defined]
        self.ctx["redis"] = self.pool
        self.ctx["worker_id"] = self.worker_id
        if self.on_startup:
            await self.on_startup(self.ctx)
        listener = asyncio.create_task(self._listen(), name="arq-wake-listener")
        try:
            while True:
                await self._poll_iteration()
                await self._keep_alive()
                self._run_periodic()
                if self.burst:
                    if 0 <= self.max_burst_jobs <= self._jobs_started():
                        await asyncio.gather(*self.tasks.values())
                        return
                    if not self._busy() and await self.pool.zcard(self.queue_name) == 0:
                        await asyncio.gather(*self.tasks.values())
                        if await self.pool.zcard(self.queue_name) == 0:
                            return
                await self._wait()
        finally:
            # Cancel the helpers and give them a bounded time to end: a stop never hangs on them.
            helpers = [t for t in (listener, self._periodic_task) if t is not None]
            for helper in helpers:
                helper.cancel()
            await asyncio.wait(helpers, timeout=5.0)

    def _busy(self) -> bool:
        return any(not t.done() for t in self.tasks.values())

    async def _listen(self) -> None:
        """Set the wake event on every message of the wake channel; re-subscribe after a lost connection."""
        backoff = 0.5
        while True:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(wake_channel(self.queue_name))
                backoff = 0.5
                loop = asyncio.get_running_loop()
                while True:
                    started = loop.time()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=60.0)
                    if message is not None:
                        self._woken.set()
                    elif loop.time() - started < 0.5:
                        await asyncio.sleep(0.05)  # a client whose timeout does not wait (fakeredis): no spinning
            except (RedisError, OSError) as exc:
                log.debug("wake listener: %s; reconnecting in %.1f s", exc, backoff)
                self._woken.set()  # let the loop meet the outage (and wait for Redis) rather than sleep through it
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _wait(self) -> None:
        """Until a wake message, a local job end (when full), the earliest deferred job, or `idle_poll_s`."""
        timeout = self.idle_poll_s
        if self.burst:
            timeout = min(timeout, max(self.poll_delay_s, 0.05))
        if self._next_due_ms is not None:
            due_in = (self._next_due_ms - timestamp_ms()) / 1000
            if due_in > 0:
                timeout = min(timeout, due_in)
            elif self.job_counter < self.max_jobs:
                # Due but not started (another worker is starting it, or its in-progress key is still there):
                # look again at arq's pace, not faster.
                timeout = min(timeout, max(self.poll_delay_s, 0.05 if self.burst else 0.5))
        if self._busy():
            timeout = min(timeout, self.alive_every_s)
        timeout = min(timeout, max(0.05, self._next_periodic - time.monotonic()))
        self._woken.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), timeout=timeout)

    async def _poll_iteration(self) -> None:
        """arq's iteration, then the due time of the earliest queued job (what `_wait` sleeps until). Redis errors
        propagate as in arq's loop (a subclass that rides out outages catches them here)."""
        await super()._poll_iteration()
        first = await self.pool.zrange(self.queue_name, 0, 0, withscores=True)
        self._next_due_ms = float(first[0][1]) if first else None

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._woken.set()  # a slot is free: due jobs may start

    async def _cancel_aborted_jobs(self) -> None:
        # Nothing of ours aborts jobs through arq (Job.abort); keep the mechanism, once a minute (four commands).
        now = time.monotonic()
        if now - self._last_abort_check < ABORT_CHECK_EVERY_S:
            return
        self._last_abort_check = now
        await super()._cancel_aborted_jobs()

    async def heart_beat(self) -> None:
        await self.record_health()
        if self.cron_jobs:
            await super().heart_beat()

    async def _keep_alive(self) -> None:
        if not self._busy():
            return
        now = time.monotonic()
        if now - self._last_alive < self.alive_every_s:
            return
        self._last_alive = now
        with contextlib.suppress(RedisError, OSError):
            await self.pool.set(alive_key(self.queue_name, self.worker_id), b"1",
                                px=int(self.alive_every_s * 3 * 1000))

    def _run_periodic(self) -> None:
        now = time.monotonic()
        if self.periodic is None or now < self._next_periodic:
            return
        if self._periodic_task is not None and not self._periodic_task.done():
            return
        busy = self._busy() or now - self._last_start < 60.0
        period = self.busy_period_s if busy else self.idle_period_s
        self._next_periodic = now + period
        self._periodic_task = asyncio.create_task(self._periodic_once(), name="arq-periodic")

    async def _periodic_once(self) -> None:
        assert self.periodic is not None
        try:
            # The lock lasts the busy period whatever this worker's own: a busy worker is never locked out for
            # an idle worker's longer period.
            won = await self.pool.set(periodic_lock_key(self.queue_name), self.worker_id.encode(), nx=True,
                                      px=max(1, int(self.busy_period_s * 1000) - 100))
            if not won:
                return
            await requeue_orphans(self.pool, self.queue_name)
            await self.periodic(dict(self.ctx))
        except Exception:  # a periodic pass that fails is retried next period; never kill the loop
            log.exception("periodic task failed")

    # ------------------------------------------------------------------------------------------ jobs
    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, plus: the started job leaves the queue and is registered as running here."""
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return None
            self.job_counter = self.job_counter + 1
            job_id = job_id_b.decode()
            in_progress_key = in_progress_key_prefix + job_id
            async with self.pool.pipeline(transaction=True) as pipe:
                await pipe.watch(in_progress_key)
                ongoing_exists = await pipe.exists(in_progress_key)
                score = await pipe.zscore(self.queue_name, job_id)
                if ongoing_exists or not score or score > timestamp_ms():
                    self.job_counter = self.job_counter - 1
                    self.sem.release()
                    continue
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.psetex(in_progress_key, int(self.in_progress_timeout_s * 1000), b"1")
                pipe.zrem(self.queue_name, job_id)
                pipe.hset(running_key(self.queue_name), job_id, self.worker_id)
                try:
                    await pipe.execute()
                except (ResponseError, WatchError):
                    self.job_counter = self.job_counter - 1
                    self.sem.release()
                    continue
            if not self._busy():
                self._last_alive = 0.0  # first job after idling: announce we are alive right away
            self._scores[job_id] = int(score)
            self._last_start = time.monotonic()
            t = self.loop.create_task(self.run_job(job_id, int(score)))
            t.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = t
            await self._keep_alive()

    async def finish_job(self, job_id: str, finish: bool, result_data: bytes | None,
                         result_timeout_s: float | None, keep_result_forever: bool, incr_score: int | None,
                         keep_in_progress: float | None) -> None:
        """arq's finish_job for a job that left the queue when it started: a job to run again goes back in (at
        its retry time), and it leaves the running registry."""
        score = self._scores.get(job_id)  # popped once recorded: a caller may retry this after a Redis error
        again = not finish
        await super().finish_job(job_id, finish, result_data, result_timeout_s, keep_result_forever,
                                 None if again else incr_score, keep_in_progress)
        if again:
            # arq would increment the queued score by (defer + now - score); the job left the queue when it
            # started, so it goes back in at that same time: its retry time, or now.
            new_score = (score + incr_score) if (incr_score and score is not None) else timestamp_ms()
            await self.pool.zadd(self.queue_name, {job_id: new_score})
        await self.pool.hdel(running_key(self.queue_name), job_id)  # type: ignore[misc]
        self._scores.pop(job_id, None)
        if again:
            await wake(self.pool, self.queue_name)

    async def give_back(self, job_id: str) -> None:
        """A job that could not start (a Redis error in arq's run_job) goes back into the queue, runnable now."""
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.delete(in_progress_key_prefix + job_id)
            pipe.zadd(self.queue_name, {job_id: timestamp_ms()}, nx=True)
            pipe.hdel(running_key(self.queue_name), job_id)
            await pipe.execute()
        self._scores.pop(job_id, None)
        await wake(self.pool, self.queue_name)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        await super().finish_failed_job(job_id, result_data)
        await self.pool.hdel(running_key(self.queue_name), job_id)  # type: ignore[misc]
        self._scores.pop(job_id, None)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError, AttributeError):
            if self._pool is not None:
                await self.pool.delete(alive_key(self.queue_name, self.worker_id))
        await super().close()
