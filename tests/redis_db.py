"""Redis for the tests: a database of one's own on the shared test Redis, or a redis-server of one's own.

The shared test Redis is `DRAIN_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`; a database number in the
URL is ignored). Several test runs (and benchmarks) may share it: a test claims database N with a lock key in
database 0 that expires (so a killed run cannot keep a database forever), flushes it first (whatever a killed
run left there is gone) and flushes it again when done.

Without that Redis a test is skipped locally, but fails in CI (`CI=true`): the queue and semaphore tests must
run against a real connection, and a green run that skipped them would prove nothing.

A test that stops or restarts Redis never touches the shared one: `own_redis_server` starts a redis-server on a
free port in a directory of the test's own, which it can stop and start again (with AOF, data survives).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

URL_VAR = "DRAIN_TEST_REDIS_URL"
DATABASES = range(1, 12)
LOCK_TTL_S = 900


def base_url() -> str:
    """The shared test Redis, without a database number."""
    parts = urlsplit(os.environ.get(URL_VAR) or "redis://127.0.0.1:6379")
    return urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))


def db_url(db: int) -> str:
    """The URL of database `db` on the shared test Redis."""
    parts = urlsplit(base_url())
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


REDIS = base_url()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def redis_available() -> bool:
    import redis

    try:
        client = redis.Redis.from_url(db_url(0), socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


requires_redis = pytest.mark.skipif(not in_ci() and not redis_available(),
                                    reason=f"needs Redis at {base_url()} (set {URL_VAR})")
"""Skips without Redis, except in CI, where the test runs and fails."""


def no_redis(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI must provide Redis: at 127.0.0.1:6379 or set {URL_VAR})")
    pytest.skip(f"{reason} (set {URL_VAR} to a Redis the tests may use)")


@contextlib.asynccontextmanager
async def claimed_db() -> AsyncIterator[str]:
    """Yield the URL of an empty database that no other test run uses meanwhile."""
    admin = Redis.from_url(db_url(0))
    try:
        await admin.ping()
    except (RedisConnectionError, OSError):
        await admin.aclose()
        no_redis(f"no Redis at {base_url()}")
    me = uuid.uuid4().hex
    try:
        for db in DATABASES:
            lock = f"drainctl-test:db:{db}"
            if not await admin.set(lock, me, nx=True, ex=LOCK_TTL_S):
                continue
            client = Redis.from_url(db_url(db))
            try:
                await client.flushdb()
                yield db_url(db)
            finally:
                await client.flushdb()
                await client.aclose()
                if await admin.get(lock) == me.encode():
                    await admin.delete(lock)
            return
        pytest.fail(f"every test database {DATABASES.start}..{DATABASES.stop - 1} is claimed by another run")
    finally:
        await admin.aclose()


# ------------------------------------------------------------------------------------ a server of one's own
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server of a test's own; `stop()` and `start()` it at will (same port, same directory)."""

    binary: str
    directory: Path
    port: int
    appendonly: bool
    proc: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.directory}/redis.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not listen on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it hard (SIGKILL: like a crash or an evicted pod); with AOF fsync always, nothing is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def own_redis_server(directory: Path, *, appendonly: bool = True) -> Iterator[RedisServer]:
    """A running redis-server on a free port in `directory`, stopped when the block ends."""
    binary = shutil.which("redis-server")
    if binary is None:
        if in_ci():
            pytest.fail("redis-server is not installed (CI must provide it)")
        pytest.skip("redis-server is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, directory, free_port(), appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop()
