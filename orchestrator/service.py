"""The drain service: what the CLI, the HTTP API and the DrainRequest controller call.

Submitting a drain plans it first against a fresh snapshot and refuses an infeasible request before anything
is written (DESIGN.md rule 7); then it takes the nodes (one drain per node at a time), records the drain and
queues its plan job. Everything after that happens in workers.
"""

from __future__ import annotations

import asyncio
import builtins
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from orchestrator import keys, queue
from orchestrator.model import DrainPhase, DrainPlan, DrainRequest
from orchestrator.planner import plan_drain
from orchestrator.records import CancelRequest, DrainRecord
from orchestrator.settings import Settings
from orchestrator.store import DrainStore, DrainView

if TYPE_CHECKING:  # the CLI's Redis-only commands must not pay for importing the cluster client
    from arq.connections import ArqRedis

    from orchestrator.kube import Kube


class NodeConflict(Exception):
    """Another open drain owns some of the requested nodes (HTTP 409)."""

    def __init__(self, taken: dict[str, str]) -> None:
        self.taken = taken
        parts = ", ".join(f"{node} (drain {owner})" for node, owner in sorted(taken.items()))
        super().__init__(f"nodes already being drained: {parts}")


class IdempotencyInProgress(Exception):
    """A request with the same idempotency key is still being processed (HTTP 409; retry later)."""

    def __init__(self, key: str, drain_id: str) -> None:
        super().__init__(f"a request with idempotency key {key!r} is still being processed (drain {drain_id})")
        self.key = key
        self.drain_id = drain_id


class DrainService:
    def __init__(self, *, redis: ArqRedis, settings: Settings, kube: Kube | None) -> None:
        self.redis = redis
        self.settings = settings
        self._kube = kube
        self.store = DrainStore(redis)

    @property
    def kube(self) -> Kube:
        """The cluster connection; reading drain records does not need one (the CLI's status, list, cancel)."""
        if self._kube is None:
            raise RuntimeError("this operation needs a cluster connection and none was opened")
        return self._kube

    async def plan(self, request: DrainRequest) -> DrainPlan:
        """Dry run: raises PlanError (with every problem) when the drain could not be carried out."""
        snapshot = await self.kube.snapshot()
        return plan_drain(snapshot, request, self.settings, now=time.time())

    async def submit(self, request: DrainRequest, *, idempotency_key: str | None = None,
                     source: str = "cli") -> tuple[DrainRecord, bool]:
        """Record and queue a drain. Returns (drain record, created); created is False when the idempotency
        key named an earlier drain, which is returned instead."""
        drain_id = uuid.uuid4().hex[:12]
        if idempotency_key:
            existing = await self.store.claim_idempotency(idempotency_key, drain_id)
            if existing is not None:
                # The first request with this key may still be planning: wait for its record.
                for _ in range(120):
                    found = await self.store.find(existing)
                    if found is not None:
                        return found, False
                    if await self.redis.get(keys.idempotency_key(idempotency_key)) is None:
                        break  # the first request failed and gave the key back: go ahead ourselves
                    await asyncio.sleep(0.25)
                else:
                    raise IdempotencyInProgress(idempotency_key, existing)
                existing = await self.store.claim_idempotency(idempotency_key, drain_id)
                if existing is not None:
                    raise IdempotencyInProgress(idempotency_key, existing)
        try:
            plan = await self.plan(request)
        except Exception:
            if idempotency_key:
                await self.redis.delete(keys.idempotency_key(idempotency_key))
            raise
        nodes = [str(n) for n in request.nodes]
        taken = await self.store.lock_nodes(drain_id, nodes)
        if taken:
            if idempotency_key:
                await self.redis.delete(keys.idempotency_key(idempotency_key))
            raise NodeConflict(taken)
        now = time.time()
        drain = DrainRecord(id=drain_id, phase=DrainPhase.PENDING, message="queued", source=source,
                            created_at=now, updated_at=now, request=request.to_json(),
                            estimate_s=plan.estimate.total_s, warnings=list(plan.warnings),
                            time_scale=self.settings.time_scale)
        await self.store.create(drain, nodes={}, vms={})
        await self.store.emit(drain_id, "drain.submitted", nodes=nodes, source=source)
        await queue.enqueue_control(self.redis, self.settings.connection.queue_name, "plan", drain_id,
                                    job_id=keys.plan_job_id(drain_id))
        return drain, True

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
