"""The drain service: what the CLI, the HTTP API and the DrainRequest controller call.

Submitting a drain plans it first against a fresh snapshot and refuses an infeasible request before anything
is written (DESIGN.md rule 7); then, in one transaction, it records the drain with that plan, takes its nodes
(one open drain per node) and its idempotency key, and queues its plan job, which carries the plan out while it
still matches the cluster (`orchestrator.replan`) instead of planning again. Everything after that happens in
workers.
"""

from __future__ import annotations

import asyncio
import builtins
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
from arq.constants import health_check_key_suffix
from redis.exceptions import RedisError

from orchestrator import keys, queue
from orchestrator.model import DrainPhase, DrainPlan, DrainRequest
from orchestrator.planner import PlanError, plan_drain
from orchestrator.records import CancelRequest, DrainRecord
from orchestrator.settings import Settings
from orchestrator.store import DrainNotFound, DrainStore, DrainView

log = structlog.get_logger("orchestrator.service")

if TYPE_CHECKING:  # the CLI's Redis-only commands must not pay for importing the cluster client
    from arq.connections import ArqRedis

    from orchestrator.kube import Kube

DRY_PLAN_TIMEOUT_S = 20.0
"""Wall seconds a caller waits for a worker's dry run before it plans by itself."""


class NodeConflict(Exception):
    """Another open drain owns some of the requested nodes (HTTP 409)."""

    def __init__(self, taken: dict[str, str]) -> None:
        self.taken = taken
        parts = ", ".join(f"{node} (drain {owner})" for node, owner in sorted(taken.items()))
        super().__init__(f"nodes already being drained: {parts}")


class IdempotencyKeyReused(Exception):
    """The idempotency key already named a drain asked with a different request (HTTP 422); nothing was written."""

    def __init__(self, key: str, drain_id: str, fields: list[str]) -> None:
        super().__init__(f"idempotency key {key!r} was used for drain {drain_id} with a different request "
                         f"(differs in: {', '.join(fields)})")
        self.key = key
        self.drain_id = drain_id
        self.fields = fields


class DrainService:
    def __init__(self, *, redis: ArqRedis, settings: Settings, kube: Kube | None) -> None:
        self.redis = redis
        self.settings = settings
        self._kube = kube
        self.store = DrainStore(redis)

    @property
    def has_kube(self) -> bool:
        return self._kube is not None

    @property
    def kube(self) -> Kube:
        """The cluster connection; reading drain records does not need one (the CLI's status, list, cancel)."""
        if self._kube is None:
            raise RuntimeError("this operation needs a cluster connection and none was opened")
        return self._kube

    async def plan(self, request: DrainRequest) -> DrainPlan:
        """Dry run: raises PlanError (with every problem) when the drain could not be carried out.

        Where workers run, one of them plans from its warm, watch-fed view of the cluster (a caller lists
        nothing: the cost follows the drain, not the cluster); without a live worker, or when none answers in
        time, the caller reads what the drain needs itself (`view.drain_snapshot`)."""
        answer = await self._plan_by_worker(request)
        if answer is not None:
            if "refused" in answer:
                raise PlanError(answer["refused"])
            return DrainPlan.from_json(answer["plan"])
        from orchestrator.prometheus import MigrationMetricsReader  # aiohttp: imported when it is used
        from orchestrator.view import drain_snapshot  # the cluster client: imported when the cluster is read

        names = [str(n) for n in request.nodes]
        snapshot = await drain_snapshot(self.kube, names)
        try:
            transfers = await self.store.transfer_samples(names)
        except (RedisError, OSError):  # a dry run needs no Redis: plan from the configured bandwidth
            transfers = {}
        async with MigrationMetricsReader.from_settings(self.settings) as reader:
            rates = await reader.node_dirty_rates(names)
        return plan_drain(snapshot, request, self.settings, now=time.time(), transfers=transfers,
                          dirty_rates=rates)

    async def _plan_by_worker(self, request: DrainRequest) -> dict[str, Any] | None:
        """The answer of a worker's dry run, or None when no worker is alive or none answered in time."""
        queue_name = self.settings.connection.queue_name
        try:
            if not await self.redis.exists(queue_name + health_check_key_suffix):
                return None
            job = await self.redis.enqueue_job("dry_plan", request.to_json(), self.settings,
                                               _job_id=keys.dry_plan_job_id(uuid.uuid4().hex),
                                               _defer_until=queue.CONTROL_SCORE, _queue_name=queue_name,
                                               _expires=timedelta(seconds=DRY_PLAN_TIMEOUT_S))
            if job is None:
                return None
            await queue.wake(self.redis, queue_name)
            # Job.result() gives up on a job that is not in the queue, and a started job leaves it: read the
            # result key until it appears.
            deadline = time.monotonic() + DRY_PLAN_TIMEOUT_S
            while (info := await job.result_info()) is None:
                if time.monotonic() > deadline:
                    log.warning("plan.worker_silent", timeout_s=DRY_PLAN_TIMEOUT_S)
                    return None
                await asyncio.sleep(0.05)
        except (RedisError, OSError):
            return None
        if not info.success:  # the worker failed: say so, and plan here instead
            log.warning("plan.worker_failed", error=repr(info.result))
            return None
        result = info.result
        return result if isinstance(result, dict) and ("plan" in result or "refused" in result) else None

    async def submit(self, request: DrainRequest, *, idempotency_key: str | None = None,
                     source: str = "cli") -> tuple[DrainRecord, bool]:
        """Record and queue a drain. Returns (drain record, created); created is False when the idempotency
        key named an earlier drain, which is returned instead.

        Raises PlanError (refused by the planner), NodeConflict (an open drain owns a node) or
        IdempotencyKeyReused (the key named a drain of another request); nothing is written then. The record,
        the node locks and the idempotency key are written in one transaction, so a submitter that dies at
        any moment leaves no lock and no key behind (a retried request with the same key simply submits
        again); the plan job is queued afterwards, and the reconciler queues it for a drain whose submitter
        died before that.
        """
        if idempotency_key:
            earlier = await self._earlier(idempotency_key, request)
            if earlier is not None:
                return earlier, False
        plan = await self.plan(request)
        drain_id = uuid.uuid4().hex[:12]
        now = time.time()
        drain = DrainRecord(id=drain_id, phase=DrainPhase.PENDING, message="queued", source=source,
                            created_at=now, updated_at=now, request=request.to_json(),
                            estimate_s=plan.estimate.total_s, warnings=list(plan.warnings),
                            time_scale=self.settings.time_scale)
        done = await self.store.submit(drain, idempotency_key=idempotency_key, plan=plan)
        if done.taken:
            raise NodeConflict(done.taken)
        if not done.created:
            # Another request with the same key won the race while we planned.
            assert idempotency_key is not None
            earlier = await self._earlier(idempotency_key, request)
            if earlier is not None:
                return earlier, False
            raise DrainNotFound(done.drain_id)
        if done.reclaimed:
            log.warning("drain.locks_reclaimed", drain_id=drain_id, locks=done.reclaimed)
            await self.store.emit(drain_id, "drain.locks_reclaimed", locks=done.reclaimed)
        await self.store.emit(drain_id, "drain.submitted", nodes=drain.nodes, source=source)
        await queue.enqueue_control(self.redis, self.settings.connection.queue_name, "plan", drain_id,
                                    job_id=keys.plan_job_id(drain_id))
        return drain, True

    async def _earlier(self, idempotency_key: str, request: DrainRequest) -> DrainRecord | None:
        """The drain an idempotency key names, if it exists; IdempotencyKeyReused if it asked for another thing."""
        named = await self.redis.get(keys.idempotency_key(idempotency_key))
        if named is None:
            return None
        drain_id = named.decode() if isinstance(named, bytes) else str(named)
        drain = await self.store.find(drain_id)
        if drain is None:
            return None  # the key names no drain: the next submit takes it over
        asked, earlier = request.to_json(), drain.request
        differs = sorted(k for k in asked.keys() | earlier.keys() if asked.get(k) != earlier.get(k))
        if differs:
            raise IdempotencyKeyReused(idempotency_key, drain_id, differs)
        return drain

    async def get(self, drain_id: str) -> DrainView:
        return await self.store.view(drain_id)

    async def list(self, *, limit: int = 200) -> builtins.list[DrainRecord]:
        out = []
        for drain_id in reversed(await self.store.ids(limit=limit)):
            drain = await self.store.find(drain_id)
            if drain is not None:
                out.append(drain)
        return out

    async def cancel(self, drain_id: str, *, uncordon: bool | None = None, mode: str = "abort") -> DrainRecord:
        """Ask the workers to stop the drain: queued work does not start, in-flight migrations are aborted
        (mode "abort") or allowed to finish (mode "finish"), nodes are uncordoned if asked."""
        if mode not in ("abort", "finish"):
            raise ValueError(f"cancel mode: {mode!r} is not one of abort, finish")
        drain = await self.store.get(drain_id)
        do_uncordon = drain.uncordon_on_cancel if uncordon is None else uncordon

        def cancel(d: DrainRecord) -> None:
            if d.phase.is_final or d.phase is DrainPhase.CANCELLING:
                return
            d.phase, d.message = DrainPhase.CANCELLING, "cancel requested"
            d.cancel = CancelRequest(requested_at=time.time(), uncordon=do_uncordon,
                                     mode="finish" if mode == "finish" else "abort")

        record = await self.store.update(drain_id, cancel)
        if record.phase is DrainPhase.CANCELLING:
            await self.store.emit(drain_id, "drain.cancelling", uncordon=do_uncordon, mode=mode)
            await self.redis.publish(keys.CANCEL_CHANNEL, drain_id)
            await queue.enqueue_control(self.redis, self.settings.connection.queue_name, "advance", drain_id,
                                        job_id=keys.advance_job_id(drain_id, time.time_ns()))
        return record

    async def wait(self, drain_id: str, *, timeout_s: float | None = None, poll_s: float = 0.5,
                   on_update: Callable[[DrainView], Awaitable[None]] | None = None) -> DrainView:
        """Until the drain is final (or the wall timeout passes); `on_update` sees every poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            view = await self.store.view(drain_id)
            if on_update is not None:
                await on_update(view)
            if view.drain.phase.is_final:
                return view
            if deadline is not None and time.monotonic() > deadline:
                return view
            await asyncio.sleep(poll_s)

    async def events(self, drain_id: str, *, after: str = "0",
                     block_ms: int | None = None) -> builtins.list[dict[str, Any]]:
        return await self.store.events(drain_id, after=after, block_ms=block_ms)
