"""What every job shares: the worker context, record setters, the enqueue helpers and the retry wrapper."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypedDict, TypeVar

import structlog
from arq.connections import ArqRedis
from arq.worker import Retry
from redis.exceptions import RedisError

from orchestrator import keys, queue
from orchestrator import kube as k
from orchestrator.clock import Clock
from orchestrator.model import (
    VmPhase,
    split_vmi_key,
)
from orchestrator.prometheus import MigrationMetricsReader
from orchestrator.records import DrainLimits, DrainRecord, NodeRecord, VmRecord
from orchestrator.settings import Settings
from orchestrator.store import DrainStore
from orchestrator.view import ClusterView
from workers.semaphore import RedisSemaphore

log = structlog.get_logger("workers.jobs")
T = TypeVar("T")

QUARANTINE_AFTER = 2
"""Distinct VMs a node must fail before the drain stops sending any VM there."""


class Ctx(TypedDict, total=False):
    """What arq passes to every job (`ctx`), filled by the worker's on_startup."""

    redis: ArqRedis
    settings: Settings
    kube: k.Kube
    view: ClusterView
    store: DrainStore
    semaphore: RedisSemaphore
    clock: Clock
    prometheus: MigrationMetricsReader
    job_id: str
    job_try: int


Obj = dict[str, Any]
"""A Kubernetes object as the API returns it."""


def assign(**fields: Any) -> Callable[[NodeRecord | VmRecord | DrainRecord], None]:
    """A record update that sets `fields` (binds the values now, unlike a lambda in a loop)."""
    def apply(record: NodeRecord | VmRecord | DrainRecord) -> None:
        for name, value in fields.items():
            setattr(record, name, value)
    return apply


def now_iso(clock: Clock) -> str:
    """`clock`'s time as a Kubernetes timestamp (for annotations the engine writes on cluster objects)."""
    return datetime.fromtimestamp(clock.time(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def vmim_name(drain_id: str, vmi_name: str, attempt: int) -> str:
    """Deterministic VMIM name of one attempt (a re-run finds it instead of creating another)."""
    base = f"drain-{drain_id[:10]}-{vmi_name}"
    suffix = f"-{attempt}"
    return base[: 253 - len(suffix)].rstrip("-.") + suffix



def limits_of(ctx: Ctx, drain: DrainRecord) -> DrainLimits:
    """The drain's effective limits; before the plan stored them, the settings' own."""
    if drain.limits is not None:
        return drain.limits
    s = ctx["settings"]
    return DrainLimits(cluster=s.limits.max_in_flight_cluster, per_node=s.limits.max_in_flight_per_node,
                       inbound=s.limits.max_inbound_per_node, max_attempts=s.retry.max_attempts,
                       pending_timeout_s=s.timeouts.pending_timeout_s,
                       completion_timeout_per_gib=s.timeouts.completion_timeout_per_gib,
                       progress_timeout_s=s.timeouts.progress_timeout_s)


# ================================================================================================ enqueue
async def enqueue_control(ctx: Ctx, function: str, *args: Any, job_id: str) -> bool:
    return await queue.enqueue_control(ctx["redis"], ctx["settings"].connection.queue_name, function, *args,
                                       job_id=job_id)


async def enqueue_migrate(ctx: Ctx, drain_id: str, vmi: str, attempt: int, *, delay_s: float = 0.0) -> bool:
    ns, name = split_vmi_key(vmi)
    return await queue.enqueue_after(ctx["redis"], ctx["settings"].connection.queue_name, "migrate", drain_id, vmi,
                                     attempt, job_id=keys.migrate_job_id(drain_id, ns, name, attempt=attempt),
                                     delay_wall_s=ctx["settings"].to_wall(delay_s))


async def retrying(ctx: Ctx, work: Awaitable[T], *, what: str) -> T:
    """Run a job's work; a retryable failure (API 5xx/429/410/409, connection errors, Redis errors) runs the
    same job again after a doubling delay (arq Retry keeps its id: no second job, nothing done twice)."""
    try:
        return await work
    except (k.KubeError, RedisError, OSError) as exc:
        if isinstance(exc, k.KubeError) and not exc.retryable:
            raise
        job_try = int(ctx.get("job_try") or 1)
        delay = min(30.0, 0.5 * 2 ** min(job_try, 6))
        log.warning("job.retry", what=what, error=str(exc), try_=job_try, defer_s=delay)
        raise Retry(defer=delay) from exc


async def guarded(ctx: Ctx, work: Awaitable[str], *, what: str,
                  on_failure: Callable[[str], Awaitable[None]]) -> str:
    """`retrying`, plus: a failure that no retry can fix (a malformed object, a refused request, a record
    that is not there, a bug) is recorded where the drain shows it (`on_failure(reason)`: the VM, node or
    drain fails with the reason) and the drain moves on. Raising it to arq instead would leave the record in
    Planning, Waiting or Migrating, and arq keeps the failed job's result, refusing the same job id for the
    result's lifetime."""
    try:
        return await retrying(ctx, work, what=what)
    except (Retry, asyncio.CancelledError):
        raise
    except Exception as exc:  # reported in the records, not hidden: see the docstring
        reason = f"{what}: {type(exc).__name__}: {exc}"
        log.error("job.failed", what=what, error=reason, exc_info=True)
        await retrying(ctx, on_failure(reason), what=f"record the failure of {what}")
        return f"failed: {reason}"



async def cancel_vm_if_idle(ctx: Ctx, drain_id: str, vmi: str, reason: str) -> None:
    changed: list[bool] = []

    def cancel(vm: VmRecord) -> bool | None:
        changed.clear()
        if vm.phase.is_final or vm.phase is VmPhase.MIGRATING:
            return False
        vm.phase, vm.message, vm.finished_at = VmPhase.CANCELLED, reason, ctx["clock"].time()
        changed.append(True)
        return None

    await ctx["store"].update_vm(drain_id, vmi, cancel)
    if changed:
        await ctx["store"].emit(drain_id, "vm.cancelled", vmi=vmi, reason=reason)


