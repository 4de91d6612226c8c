"""`drainctl demo`: the whole system in one process, with nothing to install or start first.

It serves a simulated cluster (the `small` scenario by default) over HTTP on a free local port, opens an
embedded Redis (fakeredis) unless `--redis-url` names a real one, runs workers in-process, and drains the
scenario's drain-hint nodes through the ordinary path: `DrainService.submit` -> plan job -> migrate jobs ->
finish jobs, every cluster call over HTTP exactly as against a real cluster. It shows live progress, prints
the summary, writes the HTML report and then the simulator's ground truth (what really happened, measured
by the simulator, not by us: concurrency high-water marks, migrations, bytes).

Exit code: 0 when every requested node drained, 1 when the drain ended otherwise, 6 when it did not end in
`--timeout` wall seconds. The demo never touches a real cluster and ignores KUBECONFIG.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.model import GIB, DrainRequest, NodeName, NonMigratablePolicy
from orchestrator.store import DrainView

if TYPE_CHECKING:
    from rich.console import Console

EXIT_OK, EXIT_NOT_DRAINED, EXIT_TIMEOUT = 0, 1, 6
DEFAULT_TIME_SCALE = 30.0


@dataclass(frozen=True)
class DemoResult:
    """What one demo run produced: the final drain view and the simulator's ground truth."""

    view: DrainView
    truth: dict[str, Any]
    report: Path | None
    timed_out: bool

    @property
    def exit_code(self) -> int:
        if self.timed_out:
            return EXIT_TIMEOUT
        return EXIT_OK if self.view.drain.phase == "Succeeded" else EXIT_NOT_DRAINED


async def _no_redis_info(*_args: Any, **_kwargs: Any) -> None:
    """fakeredis has no INFO command; arq only logs its output at worker start."""


@contextlib.asynccontextmanager
async def _redis(redis_url: str | None, *, queue_name: str) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """A factory of ArqRedis clients, each with its own connection pool, over one fresh in-memory fakeredis
    server or over `redis_url`. Every worker needs a pool of its own: arq's Worker.close() disconnects the
    pool it was given, which would cut a shared pool from under the other workers and the service."""
    import arq.worker
    from arq.connections import ArqRedis, RedisSettings, create_pool

    opened: list[Any] = []
    fake_server: Any = None
    if redis_url is None:
        import fakeredis

        fake_server = fakeredis.FakeServer()

    async def new_pool() -> Any:
        if redis_url is not None:
            pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue_name)
        else:
            from fakeredis.aioredis import FakeAsyncRedisConnection
            from redis.asyncio import ConnectionPool

            connections = ConnectionPool(connection_class=FakeAsyncRedisConnection, server=fake_server)
            pool = ArqRedis(connections, default_queue_name=queue_name)
        opened.append(pool)
        return pool

    # arq.worker imported the function by name, so that is the binding its Worker calls.
    arq_worker: Any = arq.worker
    original = arq_worker.log_redis_info
    if redis_url is None:
        arq_worker.log_redis_info = _no_redis_info
    try:
        yield new_pool
    finally:
        arq_worker.log_redis_info = original
        for pool in opened:
            await pool.aclose(close_connection_pool=True)


async def run_demo(*, scenario: str = "small", seed: int | None = None, time_scale: float = DEFAULT_TIME_SCALE,
                   redis_url: str | None = None, workers: int = 2, report: Path | None = None,
                   timeout_s: float = 900.0, console: Console | None = None,
                   env: dict[str, str] | None = None, non_migratable: str = "block") -> DemoResult:
    """Run the demo end to end; `console` None means silent (the JSON output uses that)."""
    from orchestrator.kube import Kube
    from orchestrator.progress import follow, print_summary
    from orchestrator.report import render_html
    from orchestrator.service import DrainService
    from orchestrator.settings import Settings
    from simulator import scenarios
    from simulator.cluster import running_cluster
    from workers.worker import build_worker

    loaded = scenarios.load(scenario, seed=seed)
    nodes = list(loaded.drain_hint) or [n.name for n in loaded.nodes if not n.control_plane][:1]
    queue_name = f"drainctl-demo-{secrets.token_hex(4)}"
    token = secrets.token_hex(16)
    say: Callable[[str], None] = (lambda text: console.print(text, highlight=False)) if console else (lambda _: None)
    with tempfile.TemporaryDirectory(prefix="drainctl-demo-") as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        async with running_cluster(loaded, time_scale=time_scale, token=token, kubeconfig_out=kubeconfig) as rc, \
                _redis(redis_url, queue_name=queue_name) as new_pool:
            # DRAIN_* tuning applies; where the cluster and Redis are is the demo's to decide.
            settings = Settings.from_env(env if env is not None else dict(os.environ), kubeconfig=str(kubeconfig),
                                         context=None, redis_url=redis_url, queue_name=queue_name,
                                         time_scale=time_scale)
            summary = loaded.summary()
            say(f"simulated cluster [bold]{loaded.name}[/] (seed {loaded.seed}) at {rc.url}: "
                f"{summary.get('nodes')} nodes, {summary.get('vms')} VMs; time scale {time_scale:g} "
                f"(1 wall s = {time_scale:g} cluster s)")
            say(f"Redis: {'embedded (fakeredis)' if redis_url is None else redis_url}; {workers} workers in-process, "
                f"queue {queue_name}")

            def connect() -> Awaitable[Kube]:
                return Kube.connect(kubeconfig=kubeconfig)

            redis = await new_pool()
            kube = await Kube.connect(kubeconfig=kubeconfig)
            pool: list[Any] = []
            tasks: list[asyncio.Task[Any]] = []
            try:
                service = DrainService(redis=redis, settings=settings, kube=kube)
                parallel = max(1, min(loaded.parallel_hint, len(nodes)))
                request = DrainRequest(nodes=tuple(NodeName(n) for n in nodes), max_parallel_nodes=parallel,
                                       non_migratable=NonMigratablePolicy(non_migratable))
                # Plan before any worker starts: a refused drain (PlanError) leaves nothing running.
                plan = await service.plan(request)
                say(f"draining [bold]{', '.join(nodes)}[/]: {sum(1 for _ in plan.jobs())} VMs to migrate, "
                    f"{len(plan.blocked)} blocked, {len(plan.skipped)} skipped; capacity: {plan.capacity.message}; "
                    f"estimate {plan.estimate.total_s:.0f} cluster s")
                pool = [build_worker(settings, redis=await new_pool(), handle_signals=False, kube_factory=connect,
                                     poll_delay=0.05) for _ in range(workers)]
                tasks = [asyncio.create_task(w.async_run(), name=f"demo-worker-{i}") for i, w in enumerate(pool)]
                record, _ = await service.submit(request, source="demo")
                drain_id = record.id
                followed = await follow(service, drain_id, console=console, timeout_s=timeout_s,
                                        notice=lambda text: console.print(text, markup=False, highlight=False)
                                        if console is not None else None)
                view, timed_out = followed.view, not followed.final
                if console is not None:
                    console.print()
                    print_summary(view, console)
                if report is not None:
                    await asyncio.to_thread(report.write_text, render_html(view), encoding="utf-8")
                    say(f"report written to {report}")
                async with rc.admin() as admin:  # the ground truth needs the simulator's admin token
                    truth = await admin.stats()
                if console is not None:
                    _print_truth(console, truth, view)
            finally:
                await kube.close()
                for w in pool:
                    await w.close()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    return DemoResult(view=view, truth=truth, report=report, timed_out=timed_out)


def _print_truth(console: Console, truth: dict[str, Any], view: DrainView) -> None:
    migrations = truth.get("migrations") or []
    phases: dict[str, int] = {}
    for m in migrations:
        phases[str(m.get("phase"))] = phases.get(str(m.get("phase")), 0) + 1
    sent = sum(int(m.get("bytes_sent") or 0) for m in migrations)
    limits = view.drain.limits.to_json() if view.drain.limits else {}
    per_node = truth.get("max_in_flight_per_node") or {}
    per_node_text = ", ".join(f"{n} {v}" for n, v in sorted(per_node.items())) or "-"
    console.print("[bold]ground truth (measured by the simulator)[/]", highlight=False)
    console.print(f"  migrations: {len(migrations)} ({', '.join(f'{v} {k}' for k, v in sorted(phases.items()))})",
                  highlight=False)
    console.print(f"  bytes sent: {sent / GIB:.1f} GiB", highlight=False)
    console.print(f"  max in flight cluster-wide: {truth.get('max_in_flight_cluster')} "
                  f"(limit {limits.get('cluster', '-')})", highlight=False)
    console.print(f"  max in flight per source node: {per_node_text} (limit {limits.get('per_node', '-')})",
                  highlight=False)
    concurrent = truth.get("vmis_with_concurrent_migrations") or []
    console.print(f"  VMIs with two migrations at once: {len(concurrent)}", highlight=False)
    console.print(f"  cluster time: {float(truth.get('sim_time_s') or 0):.0f} s; API requests: "
                  f"{truth.get('api_requests_total')}", highlight=False)
