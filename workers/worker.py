"""arq worker settings for drainctl: which jobs, how they retry, what every job's context holds.

Any worker runs any job. Each worker process opens one cluster connection and one shared watch-fed view
(`orchestrator.view`), and runs the reconcile cron (deduplicated across workers by arq's unique cron ids).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog
from arq import cron
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, func

from orchestrator import keys
from orchestrator.clock import ScaledClock
from orchestrator.kube import Kube
from orchestrator.settings import Settings
from orchestrator.store import DrainStore
from orchestrator.view import ClusterView
from workers import jobs
from workers.inprogress import keep_in_progress_short
from workers.semaphore import RedisSemaphore

log = structlog.get_logger("workers.worker")

KubeFactory = Callable[[], Awaitable[Kube]]


def functions() -> list[Any]:
    # Migrations can run long in wall time at time scale 1; crash recovery does not wait for this timeout
    # (every job's in-progress key is short-lived and renewed, see workers.inprogress). Crash re-runs count as
    # tries.
    # The jobs take a TypedDict context; arq types ctx as a plain dict, hence the casts.
    return [
        func(cast(Any, jobs.plan_job), name="plan", timeout=600, max_tries=20),
        func(cast(Any, jobs.migrate_job), name="migrate", timeout=24 * 3600, max_tries=100),
        func(cast(Any, jobs.finish_job), name="finish", timeout=3600, max_tries=50),
        func(cast(Any, jobs.advance_job), name="advance", timeout=300, max_tries=20, keep_result=0),
    ]


def build_worker(settings: Settings, *, redis: ArqRedis | None = None, kube_factory: KubeFactory | None = None,
                 burst: bool = False, handle_signals: bool = True, poll_delay: float = 0.5,
                 max_jobs: int = 50, reconcile_every_s: int = 5) -> Worker:
    """An arq Worker for `settings`; pass `redis` to share a pool (tests, the embedded demo)."""

    async def connect() -> Kube:
        return await Kube.connect(kubeconfig=settings.connection.kubeconfig, context=settings.connection.context)

    factory = kube_factory or connect

    async def startup(ctx: dict[str, Any]) -> None:
        kube = await factory()
        view = ClusterView(kube)
        await view.start()
        view.start_task(view.listen_for_cancels(ctx["redis"], keys.CANCEL_CHANNEL), "view-cancels")
        ctx.update(settings=settings, kube=kube, view=view, store=DrainStore(ctx["redis"]),
                   semaphore=RedisSemaphore(ctx["redis"], lease_ttl_s=settings.timeouts.lease_ttl_s),
                   clock=ScaledClock(settings.time_scale))
        log.info("worker.started", queue=settings.connection.queue_name, time_scale=settings.time_scale)

    async def shutdown(ctx: dict[str, Any]) -> None:
        view = ctx.get("view")
        if view is not None:
            await view.stop()
        kube = ctx.get("kube")
        if kube is not None:
            await kube.close()
        log.info("worker.stopped")

    seconds = set(range(0, 60, max(1, reconcile_every_s)))
    kwargs: dict[str, Any] = dict(
        functions=functions(),
        queue_name=settings.connection.queue_name,
        cron_jobs=[cron(cast(Any, jobs.reconcile_job), name="reconcile", second=seconds, run_at_startup=True,
                        unique=True, timeout=120, keep_result=0, max_tries=1)],
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
    return keep_in_progress_short(Worker(**kwargs))
