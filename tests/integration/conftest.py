"""The real path: the simulator over HTTPS, real Redis, `drainctl worker` processes.

Each test gets its own Redis database flushed first (`tests.redis_db`, `DRAIN_TEST_REDIS_URL`), its own queue name,
and a simulated cluster served from the test's event loop; worker processes talk to it over HTTP exactly as
they would to a real cluster. Assertions read the simulator's ground truth over HTTP with the admin kubeconfig
(`await env.stats()`); the workers only ever get the cluster kubeconfig, which gets 403 on `/sim/v1/*`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool

from orchestrator.kube import Kube
from orchestrator.service import DrainService
from orchestrator.settings import Settings
from simulator import scenarios
from simulator.admin import SimAdmin
from simulator.cluster import RunningCluster, running_cluster
from tests import redis_db
from tests.redis_db import claimed_db

DRAINCTL = str(Path(sys.executable).with_name("drainctl"))


# Without Redis these tests skip locally; in CI (CI=true) that is a failure (see tests.redis_db).
requires_redis = redis_db.requires_redis


@dataclass
class Env:
    """One simulated cluster, one Redis database, and the worker processes of one test."""

    rc: RunningCluster
    kubeconfig: Path
    admin_kubeconfig: Path
    settings: Settings
    env: dict[str, str]
    redis: ArqRedis
    tmp: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[Any] = field(default_factory=list)
    _kube: Kube | None = None

    @property
    def cluster(self) -> Any:
        return self.rc.cluster

    async def stats(self) -> dict[str, Any]:
        """GET /sim/v1/stats with the admin credentials."""
        async with SimAdmin.from_kubeconfig(self.admin_kubeconfig) as admin:
            return await admin.stats()

    async def faults(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /sim/v1/faults `body` (GET the faults in force when None) with the admin credentials."""
        async with SimAdmin.from_kubeconfig(self.admin_kubeconfig) as admin:
            return await admin.faults(body)

    def start_workers(self, n: int) -> list[subprocess.Popen[bytes]]:
        started = []
        for i in range(n):
            log = open(self.tmp / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115 - closed in close()
            self._logs.append(log)
            proc = subprocess.Popen([DRAINCTL, "--log-level", "info", "worker"], env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.workers.append(proc)
            started.append(proc)
            del i
        return started

    def worker_logs(self) -> str:
        return "\n".join((self.tmp / f"worker-{i}.log").read_text(errors="replace")[-4000:]
                         for i in range(len(self.workers)))

    async def service(self) -> DrainService:
        if self._kube is None:
            self._kube = await Kube.connect(kubeconfig=self.kubeconfig)
        return DrainService(redis=self.redis, settings=self.settings, kube=self._kube)

    def drainctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DRAINCTL, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    async def adrainctl(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(self.drainctl, *args, timeout=timeout_s)

    async def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
        for log in self._logs:
            log.close()
        if self._kube is not None:
            await self._kube.close()


EnvFactory = Callable[..., contextlib.AbstractAsyncContextManager[Env]]


@pytest.fixture
def cluster_env(tmp_path: Path) -> EnvFactory:
    @contextlib.asynccontextmanager
    async def make(scenario: str | scenarios.Scenario = "small", *, time_scale: float = 40.0, workers: int = 0,
                   extra_env: dict[str, str] | None = None, redis_url: str | None = None,
                   prometheus: bool = False) -> AsyncIterator[Env]:
        """`redis_url`: a Redis of the test's own (one it restarts) instead of a claimed shared database;
        `prometheus`: the cluster serves its Prometheus API too and the workers read it."""
        if redis_url is not None:
            async with _env(scenario, redis_url, time_scale=time_scale, workers=workers, extra_env=extra_env,
                            prometheus=prometheus) as e:
                yield e
            return
        async with claimed_db() as url, _env(scenario, url, time_scale=time_scale, workers=workers,
                                             extra_env=extra_env, prometheus=prometheus) as e:
            yield e

    @contextlib.asynccontextmanager
    async def _env(scenario: str | scenarios.Scenario, redis_url: str, *, time_scale: float, workers: int,
                   extra_env: dict[str, str] | None, prometheus: bool = False) -> AsyncIterator[Env]:
        sc = scenarios.builtin(scenario) if isinstance(scenario, str) else scenario
        kubeconfig = tmp_path / "kubeconfig.yaml"
        admin_kubeconfig = tmp_path / "admin-kubeconfig.yaml"
        queue = f"drainctl-test-{secrets.token_hex(4)}"
        token = secrets.token_hex(8)
        async with running_cluster(sc, time_scale=time_scale, token=token, kubeconfig_out=kubeconfig,
                                   admin_kubeconfig_out=admin_kubeconfig,
                                   prometheus_port=0 if prometheus else None) as rc:
            env = {k: v for k, v in os.environ.items() if not k.startswith("DRAIN_")}
            env.update(KUBECONFIG=str(kubeconfig), DRAIN_REDIS_URL=redis_url, DRAIN_TIME_SCALE=str(time_scale),
                       DRAIN_QUEUE_NAME=queue, HOME=str(tmp_path), PYTHONUNBUFFERED="1")
            if rc.prometheus_url is not None:
                env.update(DRAIN_PROMETHEUS_URL=rc.prometheus_url, DRAIN_PROMETHEUS_TOKEN=token)
            env.update(extra_env or {})
            settings = Settings.from_env(env)
            redis = await create_pool(RedisSettings.from_dsn(redis_url))
            e = Env(rc, kubeconfig, admin_kubeconfig, settings, env, redis, tmp_path)
            try:
                if workers:
                    e.start_workers(workers)
                yield e
            finally:
                await e.close()
                await redis.aclose()

    return make
