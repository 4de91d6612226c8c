"""A Redis database of one's own for a test, on the real Redis at 127.0.0.1:6379.

Several test runs (and benchmarks) may share one Redis: a test claims database N with a lock key in database 0
that expires (so a killed run cannot keep a database forever), flushes it first (whatever a killed run left
there is gone) and flushes it again when done. Without Redis a test is skipped, except in CI (CI=true), where
that is a failure: the queue and semaphore tests must run against a real connection.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

REDIS = "redis://127.0.0.1:6379"
DATABASES = range(1, 12)
LOCK_TTL_S = 900


def no_redis(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI must provide Redis on 127.0.0.1:6379)")
    pytest.skip(reason)


@contextlib.asynccontextmanager
async def claimed_db() -> AsyncIterator[str]:
    """Yield the URL of an empty database that no other test run uses meanwhile."""
    admin = Redis.from_url(f"{REDIS}/0")
    try:
        await admin.ping()
    except (RedisConnectionError, OSError):
        await admin.aclose()
        no_redis(f"no Redis at {REDIS}")
    me = uuid.uuid4().hex
    try:
        for db in DATABASES:
            lock = f"drainctl-test:db:{db}"
            if not await admin.set(lock, me, nx=True, ex=LOCK_TTL_S):
                continue
            client = Redis.from_url(f"{REDIS}/{db}")
            try:
                await client.flushdb()
                yield f"{REDIS}/{db}"
            finally:
                await client.flushdb()
                await client.aclose()
                if await admin.get(lock) == me.encode():
                    await admin.delete(lock)
            return
        pytest.fail(f"every test database {DATABASES.start}..{DATABASES.stop - 1} is claimed by another run")
    finally:
        await admin.aclose()
