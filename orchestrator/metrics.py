"""Prometheus metrics for drainctl, computed from Redis at scrape time.

Promises:
- Every number comes from Redis when it is scraped (drain, node and VM records, the semaphore, the arq queue),
  never from counters kept in one process. Any number of workers and API replicas may run; every replica
  reports the same totals, and a restarted API process loses nothing.
- Counters only grow while drain records are kept: they are sums over the attempts recorded in every drain.
  A drain that is final (and has been for ``FINAL_GRACE_S``) cannot change any more, so its share is computed
  once per process and cached; a scrape reads only the open drains in full.
- Names follow KubeVirt's style (``kubevirt_vmi_migrations_in_running_phase`` ...): ``drainctl_<noun>...``,
  counters end in ``_total``, durations are ``_seconds`` in cluster seconds (the simulator's time scale is
  applied, so they compare with KubeVirt's timeouts).

Usage: ``source = MetricsSource(redis, queue_name=...)``; per scrape ``body = render(await source.snapshot())``
with ``CONTENT_TYPE`` as the content type. ``render`` builds a fresh ``CollectorRegistry`` around a
``SnapshotCollector``, so nothing is registered in prometheus-client's global registry.

It does not talk to the cluster and never writes to Redis.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from orchestrator import keys
from orchestrator.model import DrainPhase, FailureClass, NodePhase, VmPhase
from orchestrator.records import VmRecord
from orchestrator.store import DrainNotFound, DrainStore
from workers.semaphore import WAITERS_KEY, RedisSemaphore

CONTENT_TYPE = CONTENT_TYPE_LATEST

DURATION_BUCKETS_S: tuple[float, ...] = (5, 10, 15, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900, 1800, 3600)
"""Migration duration buckets in cluster seconds: setup dominates small VMs (about 10 s), while KubeVirt's
completion timeout is 150 s per GiB, so big VMs may legitimately run for many minutes."""

ATTEMPT_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 5, 10)
"""Attempts per VM: the default limit is 3 attempts."""

FINAL_GRACE_S = 60.0
"""A drain must have been final this long (wall seconds) before its tally is cached: a worker that was
recording a last outcome when the drain closed has long finished by then."""

OUTCOMES = ("Succeeded", "Failed")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class HistogramData:
    """A histogram ready to expose: ``cumulative[i]`` observations <= ``bounds[i]``, the last entry is +Inf."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def buckets(self) -> list[tuple[str, float]]:
        labels = [_bound(b) for b in self.bounds] + ["+Inf"]
        return list(zip(labels, (float(c) for c in self.cumulative), strict=True))


def _bound(value: float) -> str:
    return repr(float(value))


class _Hist:
    """A mergeable histogram accumulator (per-bucket counts, not cumulative)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value

    def merge(self, other: _Hist) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.sum += other.sum

    def frozen(self) -> HistogramData:
        running, cumulative = 0, []
        for count in self.counts:
            running += count
            cumulative.append(running)
        return HistogramData(self.bounds, tuple(cumulative), self.sum)


class DrainTally:
    """What one drain's VM records add to the counters and histograms."""

    def __init__(self) -> None:
        self.started = 0
        self.succeeded = 0
        self.failed: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.durations = {outcome: _Hist(DURATION_BUCKETS_S) for outcome in OUTCOMES}
        self.attempts = _Hist(ATTEMPT_BUCKETS)

    def add_vm(self, vm: VmRecord, *, time_scale: float) -> None:
        """Count one VM record: each attempt that created a VMIM is a migration; the others were refused
        before any VMIM existed (no target, admission said no, the VMI was gone)."""
        tried = 0
        for entry in vm.attempts:
            outcome = entry.outcome
            failure = (entry.failure_class or FailureClass.UNKNOWN).value
            if not entry.vmim:
                if outcome is VmPhase.FAILED:
                    self.refused[failure] += 1
                    tried += 1
                continue
            tried += 1
            self.started += 1
            if outcome is VmPhase.SUCCEEDED:
                self.succeeded += 1
            elif outcome is VmPhase.FAILED:
                self.failed[failure] += 1
            else:
                continue
            started, finished = entry.started_at, entry.finished_at
            if started is not None and finished is not None and finished >= started:
                self.durations[outcome.value].observe((finished - started) * time_scale)
        if vm.phase.is_final and tried:
            self.attempts.observe(float(tried))

    def merge(self, other: DrainTally) -> None:
        self.started += other.started
        self.succeeded += other.succeeded
        self.failed.update(other.failed)
        self.refused.update(other.refused)
        for outcome, hist in other.durations.items():
            self.durations[outcome].merge(hist)
        self.attempts.merge(other.attempts)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything one scrape exposes, read from Redis at one moment."""

    drains_by_phase: Mapping[str, int]
    open_nodes_by_phase: Mapping[str, int]
    open_vms_by_phase: Mapping[str, int]
    migrations_started: int
    migrations_succeeded: int
    migrations_failed: Mapping[str, int]
    """By failure class; every class is present (zero when none failed that way)."""
    attempts_refused: Mapping[str, int]
    migration_duration: Mapping[str, HistogramData]
    """By outcome (Succeeded, Failed), in cluster seconds."""
    vm_attempts: HistogramData
    semaphore_in_use: Mapping[str, int]
    """Slots held per semaphore scope (cluster, node:<n>, inbound:<n>), expired-but-unsettled leases included."""
    semaphore_waiters: int
    queue_depth: int
    queue_due: int
    drains_cached: int = 0
    scrape_s: float = 0.0


class MetricsSource:
    """Reads a :class:`MetricsSnapshot` from Redis. One per process; it caches the tallies of final drains."""

    def __init__(self, redis: Redis, *, queue_name: str, semaphore: RedisSemaphore | None = None,
                 now: Callable[[], float] = time.time) -> None:
        # redis-py's stubs type every command as "Awaitable[T] | T"; see orchestrator.store.
        self._redis: Any = redis
        self._store = DrainStore(redis)
        self._queue_name = queue_name
        self._semaphore = semaphore or RedisSemaphore(redis)
        self._now = now
        self._final: dict[str, tuple[str, DrainTally]] = {}

    async def snapshot(self) -> MetricsSnapshot:
        started_at = time.perf_counter()
        now = self._now()
        drain_ids = [_text(x) for x in await self._redis.zrange(keys.DRAINS_INDEX, 0, -1)]
        known = set(drain_ids)
        for gone in [d for d in self._final if d not in known]:
            del self._final[gone]

        drains_by_phase: Counter[str] = Counter()
        nodes_by_phase: Counter[str] = Counter()
        vms_by_phase: Counter[str] = Counter()
        total = DrainTally()
        to_read = [d for d in drain_ids if d not in self._final]
        for phase, cached in self._final.values():
            drains_by_phase[phase] += 1
            total.merge(cached)
        for drain_id in to_read:
            try:
                view = await self._store.view(drain_id)
            except DrainNotFound:
                continue
            drain = view.drain
            phase = drain.phase.value
            drains_by_phase[phase] += 1
            tally = DrainTally()
            scale = drain.time_scale or 1.0
            for vm in view.vms.values():
                tally.add_vm(vm, time_scale=scale)
            total.merge(tally)
            if drain.phase.is_final:
                finished = drain.finished_at
                if finished is not None and now - finished >= FINAL_GRACE_S:
                    self._final[drain_id] = (phase, tally)
                continue
            for node in view.nodes.values():
                nodes_by_phase[node.phase.value] += 1
            for vm in view.vms.values():
                vms_by_phase[vm.phase.value] += 1

        usage = await self._semaphore.usage()
        waiters = int(usage.pop(WAITERS_KEY, 0))
        queue_depth = int(await self._redis.zcard(self._queue_name))
        queue_due = int(await self._redis.zcount(self._queue_name, "-inf", int(now * 1000)))
        return MetricsSnapshot(
            drains_by_phase=_with_zeros(drains_by_phase, (p.value for p in DrainPhase)),
            open_nodes_by_phase=_with_zeros(nodes_by_phase, (p.value for p in NodePhase)),
            open_vms_by_phase=_with_zeros(vms_by_phase, (p.value for p in VmPhase)),
            migrations_started=total.started,
            migrations_succeeded=total.succeeded,
            migrations_failed=_with_zeros(total.failed, (c.value for c in FailureClass)),
            attempts_refused=_with_zeros(total.refused, (c.value for c in FailureClass)),
            migration_duration=MappingProxyType({o: h.frozen() for o, h in total.durations.items()}),
            vm_attempts=total.attempts.frozen(),
            semaphore_in_use=MappingProxyType(dict(sorted(usage.items()))),
            semaphore_waiters=waiters,
            queue_depth=queue_depth,
            queue_due=queue_due,
            drains_cached=len(self._final),
            scrape_s=time.perf_counter() - started_at,
        )


def _with_zeros(counts: Mapping[str, int], names: Iterable[str]) -> Mapping[str, int]:
    """Every known label value, zero included, so that rate() and absent() work from the first scrape."""
    merged = {name: 0 for name in names}
    merged.update(counts)
    return MappingProxyType(merged)


class SnapshotCollector(Collector):
    """Exposes one snapshot through prometheus-client's text rendering."""

    def __init__(self, snapshot: MetricsSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        yield _gauge("drainctl_drains", "Drains recorded in Redis, by phase.", "phase", s.drains_by_phase)
        yield _gauge("drainctl_drain_nodes", "Nodes of open drains, by phase.", "phase", s.open_nodes_by_phase)
        yield _gauge("drainctl_drain_vms", "VMs of open drains, by phase.", "phase", s.open_vms_by_phase)

        started = CounterMetricFamily("drainctl_migrations_started",
                                      "Migration attempts that created (or adopted) a VirtualMachineInstanceMigration.")
        started.add_metric([], s.migrations_started)
        yield started
        succeeded = CounterMetricFamily("drainctl_migrations_succeeded", "Migration attempts that succeeded.")
        succeeded.add_metric([], s.migrations_succeeded)
        yield succeeded
        failed = CounterMetricFamily("drainctl_migrations_failed", "Migration attempts that failed, by failure class.",
                                     labels=["failure_class"])
        for failure, count in sorted(s.migrations_failed.items()):
            failed.add_metric([failure], count)
        yield failed
        refused = CounterMetricFamily("drainctl_migration_attempts_refused",
                                      "Attempts that ended before any migration object existed, by failure class.",
                                      labels=["failure_class"])
        for failure, count in sorted(s.attempts_refused.items()):
            refused.add_metric([failure], count)
        yield refused

        duration = HistogramMetricFamily("drainctl_migration_duration_seconds",
                                         "Duration of finished migration attempts in cluster seconds, by outcome.",
                                         labels=["outcome"])
        for outcome, hist in sorted(s.migration_duration.items()):
            duration.add_metric([outcome], hist.buckets(), hist.sum)
        yield duration
        attempts = HistogramMetricFamily("drainctl_vm_migration_attempts",
                                         "Attempts each finished VM needed (VMs that were never tried are left out).")
        attempts.add_metric([], s.vm_attempts.buckets(), s.vm_attempts.sum)
        yield attempts

        yield _gauge("drainctl_semaphore_slots_in_use", "Migration slots held per semaphore scope.", "scope",
                     s.semaphore_in_use)
        waiters = GaugeMetricFamily("drainctl_semaphore_waiters", "Migrations waiting for a semaphore slot.")
        waiters.add_metric([], s.semaphore_waiters)
        yield waiters
        depth = GaugeMetricFamily("drainctl_queue_depth", "Jobs in the arq queue (deferred retries included).")
        depth.add_metric([], s.queue_depth)
        yield depth
        due = GaugeMetricFamily("drainctl_queue_due", "Jobs in the arq queue whose start time has come.")
        due.add_metric([], s.queue_due)
        yield due
        cached = GaugeMetricFamily("drainctl_metrics_cached_drains",
                                   "Final drains whose tallies this process has cached.")
        cached.add_metric([], s.drains_cached)
        yield cached
        scrape = GaugeMetricFamily("drainctl_metrics_scrape_seconds", "Time spent reading Redis for this scrape.")
        scrape.add_metric([], s.scrape_s)
        yield scrape


def _gauge(name: str, documentation: str, label: str, values: Mapping[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


def render(snapshot: MetricsSnapshot) -> bytes:
    """The Prometheus text exposition of ``snapshot``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)
