"""arq worker settings for drainctl: which jobs, how they retry, what every job's context holds.

Any worker runs any job. Each worker process opens one cluster connection and one shared watch-fed view
(`orchestrator.view`), waits for work instead of polling for it and runs the reconciler in one worker at a time
(`workers.loop.EventWorker`).

A worker rides out a Redis outage (`DrainWorker`): it logs `redis.unavailable` once, probes with a doubling
backoff, logs `redis.available` when Redis answers again and carries on; nothing it was doing is dropped. After
every outage, and every few seconds anyway, it compares the Redis epoch (`orchestrator.epoch`): a Redis that
came back without its data is reported with the drains it lost and the nodes they left cordoned. Its
long-running tasks (the view's watches, the cancel listener, the epoch check) are supervised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import func
from redis.exceptions import RedisError

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.clock import ScaledClock
from orchestrator.epoch import EpochGuard, check_epoch_forever
from orchestrator.kube import Kube
from orchestrator.prometheus import MigrationMetricsReader
from orchestrator.settings import Settings
from orchestrator.store import DrainStore
from orchestrator.supervise import Supervisor
from orchestrator.view import ClusterView
from workers import jobs
from workers.loop import EventWorker
from workers.semaphore import RedisSemaphore

log = structlog.get_logger("workers.worker")

KubeFactory = Callable[[], Awaitable[Kube]]

REDIS_ERRORS = (RedisError, OSError)
"""What a Redis outage raises: redis-py's ConnectionError/TimeoutError (RedisError), socket errors (OSError)."""
EPOCH_CHECK_EVERY_S = 15.0
"""Wall seconds between epoch checks besides the one after every outage (one MGET: an idle worker's largest cost)."""
SEMAPHORE_POLL_S = 5.0


class DrainWorker(EventWorker):
    """arq's Worker (waiting for work: `EventWorker`), made to ride out a Redis outage instead of dying with it.

    arq lets a Redis error escape its poll loop (`main` -> `_poll_iteration`), which ends `run()`: a 3 s Redis
    restart killed every worker. Here:
    - the poll loop catches Redis errors and waits for Redis (`wait_for_redis`): one `redis.unavailable` line,
      probes with a doubling backoff up to `max_backoff_s`, a `redis.still_unavailable` line every 30 s, then
      `redis.available` and `on_reconnect` (the epoch check) before polling again;
    - a worker started while Redis is away waits for it instead of exiting;
    - a job's bookkeeping after it ran (`finish_job`, `finish_failed_job`) waits for Redis instead of being
      dropped, so its result, retry or completion is recorded once Redis is back;
    - a job whose start failed on a Redis error goes back into the queue with its in-progress key freed once
      Redis is back, so it runs again at once.
    While stopping, nothing waits for Redis: what could not be recorded is logged (`job.bookkeeping_lost`) and
    the job runs again (jobs are idempotent)."""

    def __init__(self, *args: Any, on_reconnect: Callable[[], Awaitable[None]] | None = None,
                 max_backoff_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_reconnect = on_reconnect
        self.max_backoff_s = max_backoff_s
        self.outages = 0
        self.redis_down_since: float | None = None
        self._closing = False

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await self._connect()
        await super().main()

    async def _connect(self) -> ArqRedis:
        backoff, first = 0.5, True
        while True:
            try:
                return await create_pool(self.redis_settings, job_deserializer=self.job_deserializer,
                                         job_serializer=self.job_serializer, default_queue_name=self.queue_name,
                                         expires_extra_ms=self.expires_extra_ms)
            except REDIS_ERRORS as exc:
                if first:
                    log.warning("redis.unavailable", phase="startup", error=str(exc) or type(exc).__name__)
                    first = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_ERRORS as exc:
            await self.wait_for_redis(exc)

    async def wait_for_redis(self, exc: BaseException) -> None:
        """Block the poll loop until Redis answers a PING; jobs already running carry on meanwhile."""
        started = time.monotonic()
        self.outages += 1
        self.redis_down_since = started
        log.warning("redis.unavailable", error=str(exc) or type(exc).__name__, running_jobs=len(self.tasks),
                    retry_up_to_s=self.max_backoff_s)
        backoff, last_line = 0.25, started
        while True:
            await asyncio.sleep(backoff)
            try:
                async with asyncio.timeout(5.0):
                    await self.pool.ping()
                break
            except (*REDIS_ERRORS, TimeoutError) as again:
                backoff = min(backoff * 2, self.max_backoff_s)
                if time.monotonic() - last_line >= 30.0:
                    last_line = time.monotonic()
                    log.warning("redis.still_unavailable", down_s=round(last_line - started, 1),
                                error=str(again) or type(again).__name__)
        self.redis_down_since = None
        log.info("redis.available", down_s=round(time.monotonic() - started, 2))
        if self.on_reconnect is not None:
            try:
                await self.on_reconnect()
            except (*REDIS_ERRORS, k.KubeError) as failed:
                # The periodic epoch check runs it again; Redis failing again is met by the next poll.
                log.warning("redis.reconnect_check_failed", error=str(failed))

    async def _until_recorded(self, what: str, job_id: str, step: Callable[[], Awaitable[None]]) -> None:
        backoff = 0.25
        while True:
            try:
                await step()
                return
            except REDIS_ERRORS as exc:
                if self._closing:
                    log.warning("job.bookkeeping_lost", job_id=job_id, step=what, error=str(exc))
                    return
                log.info("job.bookkeeping_waits_for_redis", job_id=job_id, step=what, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def finish_job(self, job_id: str, finish: bool, result_data: bytes | None, result_timeout_s: float | None,
                         keep_result_forever: bool, incr_score: int | None, keep_in_progress: float | None) -> None:
        await self._until_recorded("finish", job_id, lambda: super(DrainWorker, self).finish_job(
            job_id, finish, result_data, result_timeout_s, keep_result_forever, incr_score, keep_in_progress))

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        await self._until_recorded("finish_failed", job_id,
                                   lambda: super(DrainWorker, self).finish_failed_job(job_id, result_data))

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except REDIS_ERRORS as exc:
            log.warning("job.start_failed", job_id=job_id, error=str(exc) or type(exc).__name__)
            await self._until_recorded("release", job_id, lambda: self.give_back(job_id))
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # A stop cancels every job task (arq's handle_sig); arq absorbs that inside the job function, but not
            # in its start or bookkeeping pipelines. Ending here lets close() go on (its gather would pass the
            # CancelledError to the caller); the job is still registered as running for this worker, whose alive
            # key close() deletes, so the sweep puts it back in the queue for another worker.
            log.info("job.cancelled_by_stop", job_id=job_id)

    async def close(self) -> None:
        self._closing = True
        try:
            await super().close()
        except REDIS_ERRORS as exc:
            log.warning("worker.close_without_redis", error=str(exc))


def functions() -> list[Any]:
    # Migrations can run long in wall time at time scale 1; crash recovery does not wait for this timeout
    # (a started job leaves the queue; when its worker's alive key expires, the job goes back in and its
    # in-progress key is freed, see workers.loop). Crash re-runs count as tries.
    # The jobs take a TypedDict context; arq types ctx as a plain dict, hence the casts.
    return [
        func(cast(Any, jobs.plan_job), name="plan", timeout=600, max_tries=20),
        func(cast(Any, jobs.migrate_job), name="migrate", timeout=24 * 3600, max_tries=100),
        func(cast(Any, jobs.finish_job), name="finish", timeout=3600, max_tries=50),
        func(cast(Any, jobs.advance_job), name="advance", timeout=300, max_tries=20, keep_result=0),
        func(cast(Any, jobs.dry_plan_job), name="dry_plan", timeout=120, max_tries=3, keep_result=120),
    ]


def build_worker(settings: Settings, *, redis: ArqRedis | None = None, kube_factory: KubeFactory | None = None,
                 burst: bool = False, handle_signals: bool = True, poll_delay: float = 0.5,
                 max_jobs: int = 50, reconcile_every_s: int = 5) -> DrainWorker:
    """An arq Worker for `settings`; pass `redis` to share a pool (tests, the embedded demo)."""

    async def connect() -> Kube:
        return await Kube.connect(kubeconfig=settings.connection.kubeconfig, context=settings.connection.context)

    factory = kube_factory or connect

    supervisor = Supervisor("worker")
    guard: list[EpochGuard] = []

    async def check_epoch() -> None:
        if guard:
            await guard[0].check()

    async def startup(ctx: dict[str, Any]) -> None:
        kube = await factory()
        view = ClusterView(kube)
        await view.start()
        view.listen_for_cancels(ctx["redis"], keys.CANCEL_CHANNEL)
        guard.append(EpochGuard(ctx["redis"], kube, owner="worker"))
        supervisor.spawn("redis-epoch", lambda: check_epoch_forever(
            guard[0], every_s=EPOCH_CHECK_EVERY_S, report=lambda problem: supervisor.degraded("redis-epoch", problem)))
        ctx.update(settings=settings, kube=kube, view=view, store=DrainStore(ctx["redis"]),
                   # Waiters wake on every release (pub/sub); the poll only covers a lost message, so it is slow:
                   # a waiting migration costs Redis commands per release, hardly per second.
                   semaphore=RedisSemaphore(ctx["redis"], lease_ttl_s=settings.timeouts.lease_ttl_s,
                                            poll_interval_s=SEMAPHORE_POLL_S),
                   clock=ScaledClock(settings.time_scale), prometheus=MigrationMetricsReader.from_settings(settings))
        log.info("worker.started", queue=settings.connection.queue_name, time_scale=settings.time_scale)

    async def shutdown(ctx: dict[str, Any]) -> None:
        await supervisor.stop()
        view = ctx.get("view")
        if view is not None:
            await view.stop()
        kube = ctx.get("kube")
        if kube is not None:
            await kube.close()
        prometheus = ctx.get("prometheus")
        if prometheus is not None:
            await prometheus.close()
        log.info("worker.stopped")

    kwargs: dict[str, Any] = dict(
        functions=functions(),
        queue_name=settings.connection.queue_name,
        # The reconciler runs in one worker at a time, every reconcile_every_s while work runs (EventWorker).
        periodic=cast(Any, jobs.reconcile_job),
        busy_period_s=float(max(1, reconcile_every_s)),
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=max_jobs,
        poll_delay=poll_delay,
        keep_result=3600,
        allow_abort_jobs=True,
        handle_signals=handle_signals,
        burst=burst,
        health_check_interval=30,
        max_tries=20,
    )
    if redis is not None:
        kwargs["redis_pool"] = redis
    else:
        kwargs["redis_settings"] = RedisSettings.from_dsn(settings.connection.redis_url)
    # No per-job in-progress renewal: it costs a command per running job every few
    # seconds, for as long as a migration runs; EventWorker's one alive key per busy worker replaces it.
    return DrainWorker(on_reconnect=check_epoch, **kwargs)
