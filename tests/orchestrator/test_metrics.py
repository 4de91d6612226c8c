"""Metrics computed from Redis at scrape time: tallies of VM records, the semaphore, the arq queue, rendering."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import keys
from orchestrator.metrics import DURATION_BUCKETS_S, FINAL_GRACE_S, DrainTally, MetricsSource, render
from orchestrator.records import DrainRecord, NodeRecord, VmRecord
from orchestrator.store import DrainStore
from tests.redis_db import claimed_db
from workers.semaphore import RedisSemaphore, Scope

REDIS = "redis://127.0.0.1:6379"
NOW = 1_800_000_000.0


def attempt(n: int, *, outcome: str | None, vmim: str | None = "vmim", failure: str | None = None,
            started: float | None = NOW, seconds: float | None = 10.0) -> dict[str, Any]:
    entry: dict[str, Any] = {"attempt": n, "vmim": vmim, "target": "worker-02", "outcome": outcome,
                             "failure_class": failure}
    if started is not None:
        entry["started_at"] = started
    if outcome is not None and started is not None and seconds is not None:
        entry["finished_at"] = started + seconds
    return entry


def vm(name: str, phase: str, attempts: list[dict[str, Any]]) -> VmRecord:
    return VmRecord(vmi=f"ns/{name}", node="worker-01", phase=phase, attempt=len(attempts) or 1,  # type: ignore[arg-type]
                    attempts=attempts)  # type: ignore[arg-type]


# ================================================================================================ pure tally
@pytest.mark.parametrize(("record", "started", "succeeded", "failed", "refused", "tries"), [
    (vm("a", "Succeeded", [attempt(1, outcome="Succeeded")]), 1, 1, {}, {}, 1),
    (vm("b", "Succeeded", [attempt(1, outcome="Failed", failure="NotConverging"),
                           attempt(2, outcome="Succeeded")]), 2, 1, {"NotConverging": 1}, {}, 2),
    (vm("c", "Failed", [attempt(1, outcome="Failed", failure="Unschedulable", vmim=None, started=None)]),
     0, 0, {}, {"Unschedulable": 1}, 1),
    (vm("d", "Migrating", [attempt(1, outcome=None)]), 1, 0, {}, {}, None),
    (vm("e", "Cancelled", [attempt(1, outcome="Failed", failure="Aborted")]), 1, 0, {"Aborted": 1}, {}, 1),
    (vm("f", "Cancelled", []), 0, 0, {}, {}, None),
    (vm("g", "Succeeded", [attempt(1, outcome="Succeeded", vmim=None, started=None)]), 0, 0, {}, {}, None),
    (vm("h", "Failed", [attempt(1, outcome="Failed", failure=None)]), 1, 0, {"Unknown": 1}, {}, 1),
])
def test_tally_counts_each_attempt_once(record: VmRecord, started: int, succeeded: int,
                                        failed: dict[str, int], refused: dict[str, int], tries: int | None) -> None:
    tally = DrainTally()
    tally.add_vm(record, time_scale=1.0)
    assert tally.started == started
    assert tally.succeeded == succeeded
    assert dict(tally.failed) == failed
    assert dict(tally.refused) == refused
    attempts = tally.attempts.frozen()
    if tries is None:
        assert attempts.count == 0
    else:
        assert attempts.count == 1 and attempts.sum == tries


def test_durations_are_cluster_seconds_in_cumulative_buckets() -> None:
    tally = DrainTally()
    records = [vm("a", "Succeeded", [attempt(1, outcome="Succeeded", seconds=0.15)]),  # 7.5 s at scale 50
               vm("b", "Succeeded", [attempt(1, outcome="Succeeded", seconds=2.0)]),   # 100 s
               vm("c", "Succeeded", [attempt(1, outcome="Succeeded", seconds=200.0)])]  # beyond the last bucket
    for record in records:
        tally.add_vm(record, time_scale=50.0)
    hist = tally.durations["Succeeded"].frozen()
    assert hist.count == 3
    assert hist.sum == pytest.approx(7.5 + 100.0 + 10_000.0)
    buckets = dict(hist.buckets())
    assert buckets[repr(5.0)] == 0
    assert buckets[repr(10.0)] == 1
    assert buckets[repr(90.0)] == 1
    assert buckets[repr(120.0)] == 2
    assert buckets[repr(float(DURATION_BUCKETS_S[-1]))] == 2
    assert buckets["+Inf"] == 3
    assert list(buckets.values()) == sorted(buckets.values())
    assert tally.durations["Failed"].frozen().count == 0


# ============================================================================================= from Redis
@pytest.fixture
async def redis() -> AsyncIterator[ArqRedis]:
    """An arq pool on an empty Redis database of our own (see tests.redis_db)."""
    async with claimed_db() as url:
        pool = await create_pool(RedisSettings.from_dsn(url))
        try:
            yield pool
        finally:
            await pool.aclose()


async def put_drain(store: DrainStore, drain_id: str, *, phase: str, vms: list[VmRecord],
                    finished_at: float | None = None, time_scale: float = 1.0,
                    created_at: float = NOW) -> None:
    drain = DrainRecord.model_validate({"id": drain_id, "phase": phase, "created_at": created_at,
                                        "finished_at": finished_at, "time_scale": time_scale,
                                        "request": {"nodes": ["worker-01"]}})
    nodes = {"worker-01": NodeRecord.model_validate({"node": "worker-01",
                                                     "phase": "Drained" if finished_at else "Migrating"})}
    await store.create(drain, nodes=nodes, vms={v.vmi: v for v in vms})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_scrape_reads_drains_semaphore_and_queue(redis: ArqRedis) -> None:
    store = DrainStore(redis)
    await put_drain(store, "done", phase="Succeeded", finished_at=NOW - 3600, time_scale=10.0, created_at=NOW - 7200,
                    vms=[vm("a", "Succeeded", [attempt(1, outcome="Failed", failure="TargetFailed", seconds=1.0),
                                               attempt(2, outcome="Succeeded", seconds=3.0)]),
                         vm("b", "Succeeded", [attempt(1, outcome="Succeeded", seconds=2.0)])])
    await put_drain(store, "open", phase="Running",
                    vms=[vm("c", "Migrating", [attempt(1, outcome=None)]),
                         vm("d", "Queued", []),
                         vm("e", "Failed", [attempt(1, outcome="Failed", failure="Rejected", vmim=None)])])
    semaphore = RedisSemaphore(redis, lease_ttl_s=30.0, poll_interval_s=0.05)
    scopes = [Scope(keys.CLUSTER_SCOPE, 1), Scope(keys.node_scope("worker-01"), 2)]
    assert await semaphore.try_acquire("holder-1", scopes) is not None
    waiting = asyncio.create_task(semaphore.acquire("holder-2", scopes), name="waiting-acquirer")
    queue = "metrics-test"
    await redis.enqueue_job("migrate", "x", _job_id="now", _queue_name=queue)
    await redis.enqueue_job("migrate", "y", _job_id="later", _queue_name=queue, _defer_by=timedelta(hours=1))
    try:
        async with asyncio.timeout(10):
            # The waiter registers in Redis after its first failed attempt; nothing announces it.
            while await semaphore.waiters() == 0:  # noqa: ASYNC110 - polling a Redis count, there is no event
                await asyncio.sleep(0.02)
        text = render(await MetricsSource(redis, queue_name=queue, semaphore=semaphore).snapshot()).decode()
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    got = samples(text)

    assert got[("drainctl_drains", (("phase", "Succeeded"),))] == 1
    assert got[("drainctl_drains", (("phase", "Running"),))] == 1
    assert got[("drainctl_drains", (("phase", "Cancelled"),))] == 0
    # Node and VM gauges describe open drains only.
    assert got[("drainctl_drain_vms", (("phase", "Migrating"),))] == 1
    assert got[("drainctl_drain_vms", (("phase", "Queued"),))] == 1
    assert got[("drainctl_drain_vms", (("phase", "Succeeded"),))] == 0
    assert got[("drainctl_drain_nodes", (("phase", "Migrating"),))] == 1
    assert got[("drainctl_drain_nodes", (("phase", "Drained"),))] == 0

    assert got[("drainctl_migrations_started_total", ())] == 4
    assert got[("drainctl_migrations_succeeded_total", ())] == 2
    assert got[("drainctl_migrations_failed_total", (("failure_class", "TargetFailed"),))] == 1
    assert got[("drainctl_migrations_failed_total", (("failure_class", "NotConverging"),))] == 0
    assert got[("drainctl_migration_attempts_refused_total", (("failure_class", "Rejected"),))] == 1
    # Durations at time scale 10: 30 s and 20 s succeeded, 10 s failed.
    assert got[("drainctl_migration_duration_seconds_count", (("outcome", "Succeeded"),))] == 2
    assert got[("drainctl_migration_duration_seconds_sum", (("outcome", "Succeeded"),))] == pytest.approx(50.0)
    assert got[("drainctl_migration_duration_seconds_bucket", (("le", "30.0"), ("outcome", "Succeeded")))] == 2
    assert got[("drainctl_migration_duration_seconds_bucket", (("le", "15.0"), ("outcome", "Succeeded")))] == 0
    assert got[("drainctl_migration_duration_seconds_sum", (("outcome", "Failed"),))] == pytest.approx(10.0)
    # Attempts per finished VM: a=2, b=1, e=1 (c is still migrating, d never tried).
    assert got[("drainctl_vm_migration_attempts_count", ())] == 3
    assert got[("drainctl_vm_migration_attempts_sum", ())] == 4

    assert got[("drainctl_semaphore_slots_in_use", (("scope", "cluster"),))] == 1
    assert got[("drainctl_semaphore_slots_in_use", (("scope", "node:worker-01"),))] == 1
    assert got[("drainctl_semaphore_waiters", ())] == 1
    assert got[("drainctl_queue_depth", ())] == 2
    assert got[("drainctl_queue_due", ())] == 1


async def test_final_drains_are_cached_only_after_the_grace_period(redis: ArqRedis) -> None:
    store = DrainStore(redis)
    clock = {"now": NOW + 5}
    source = MetricsSource(redis, queue_name="metrics-test", now=lambda: clock["now"])
    await put_drain(store, "d1", phase="Succeeded", finished_at=NOW,
                    vms=[vm("a", "Succeeded", [attempt(1, outcome="Succeeded")])])

    first = await source.snapshot()
    assert first.migrations_succeeded == 1 and first.drains_cached == 0

    # Within the grace period a late record still counts.
    await store.set_vms("d1", {"ns/b": vm("b", "Succeeded", [attempt(1, outcome="Succeeded")])})
    assert (await source.snapshot()).migrations_succeeded == 2

    clock["now"] = NOW + FINAL_GRACE_S + 1
    cached = await source.snapshot()
    assert cached.migrations_succeeded == 2 and cached.drains_cached == 1
    # Once cached, the drain's records are not read again ...
    await store.set_vms("d1", {"ns/c": vm("c", "Succeeded", [attempt(1, outcome="Succeeded")])})
    assert (await source.snapshot()).migrations_succeeded == 2
    # ... while a fresh process (another replica) reads them all and sees the same totals plus the change.
    other = await MetricsSource(redis, queue_name="metrics-test", now=lambda: clock["now"]).snapshot()
    assert other.migrations_succeeded == 3
    assert other.drains_by_phase == (await source.snapshot()).drains_by_phase

    # A drain removed from the index leaves the cache too.
    await redis.zrem(keys.DRAINS_INDEX, "d1")
    gone = await source.snapshot()
    assert gone.drains_cached == 0 and gone.migrations_succeeded == 0
    assert gone.drains_by_phase["Succeeded"] == 0


async def test_an_empty_redis_renders_every_metric_with_zeros(redis: ArqRedis) -> None:
    text = render(await MetricsSource(redis, queue_name="metrics-test").snapshot()).decode()
    got = samples(text)
    names = {name for name, _ in got}
    for expected in ("drainctl_drains", "drainctl_drain_nodes", "drainctl_drain_vms",
                     "drainctl_migrations_started_total", "drainctl_migrations_succeeded_total",
                     "drainctl_migrations_failed_total", "drainctl_migration_attempts_refused_total",
                     "drainctl_migration_duration_seconds_bucket", "drainctl_vm_migration_attempts_bucket",
                     "drainctl_semaphore_waiters", "drainctl_queue_depth", "drainctl_queue_due"):
        assert expected in names, expected
    assert got[("drainctl_drains", (("phase", "Pending"),))] == 0
    assert got[("drainctl_migrations_failed_total", (("failure_class", "Aborted"),))] == 0
    assert got[("drainctl_queue_depth", ())] == 0
    assert "# TYPE drainctl_migrations_started_total counter" in text
    assert "# TYPE drainctl_migration_duration_seconds histogram" in text
