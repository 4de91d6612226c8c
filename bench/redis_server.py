"""A redis-server of our own, on a free port in a temporary directory, that we may stop, kill and restart.

For benchmarks and tests that take Redis away (never the shared server other runs use). With `aof=True` it
runs as `k8s/redis.yaml` does (`appendonly yes`, `appendfsync always`, no RDB snapshots), so a restart
keeps every acknowledged write; with `aof=False` it keeps nothing (a restart comes back empty).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

APPENDFSYNC = "always"
"""The fsync policy of k8s/redis.yaml (a test keeps the two in step)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(self, *, aof: bool, fsync: str = APPENDFSYNC, port: int | None = None,
                 workdir: Path | None = None) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise FileNotFoundError("redis-server is not installed")
        self.binary = binary
        self.aof = aof
        self.fsync = fsync
        self.port = port or free_port()
        self._owned_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="drainctl-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--protected-mode", "yes", "--logfile", str(self.workdir / "redis.log")]
        if self.aof:
            argv += ["--appendonly", "yes", "--appendfsync", self.fsync]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def _reachable(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    async def start(self, *, timeout_s: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Popen returns at once; the server's readiness is awaited below without blocking the loop.
        self.proc = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._reachable():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.workdir}/redis.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not listen on {self.port} within {timeout_s} s")
            await asyncio.sleep(0.05)
        # Loading the AOF happens before it answers commands; a PING answered means the data is back.
        await self._wait_loaded(deadline)

    async def _wait_loaded(self, deadline: float) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url)
        try:
            while True:
                try:
                    await client.ping()
                    return
                except Exception:  # BusyLoadingError or a connection reset while it starts
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (Redis writes and fsyncs what it has, as on a pod deletion) or SIGKILL (a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            await asyncio.to_thread(self.proc.wait, 30)
        self.proc = None

    async def restart(self, *, down_s: float = 3.0, kill: bool = False) -> None:
        await self.stop(kill=kill)
        await asyncio.sleep(down_s)
        await self.start()
        self.restarts += 1

    async def close(self) -> None:
        await self.stop(kill=True)
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
