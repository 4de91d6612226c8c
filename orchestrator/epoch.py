"""The Redis epoch: tell a Redis that kept its data from one that came back empty, and report what was lost.

Promises:
- Every long-lived process that uses Redis (workers, the API) owns an `EpochGuard` and calls `check()` when
  it connects and after every Redis outage. The first check remembers the epoch held in `keys.EPOCH_KEY`,
  creating it (SET NX) when it is missing.
- A Redis that lost its data (restarted without persistence, flushed, failed over to an empty replica) has
  no epoch. One process re-creates it (SET NX decides). Until some process has looked at the cluster for
  what the loss left behind (`keys.EPOCH_SCANNED_KEY` names the epoch scanned last), every check looks:
  nodes cordoned with our `drainctl.io/drain-id` annotation whose drain is no longer recorded. So a scan
  that failed, or whose process died, is done by the next check of any process. Each such drain is
  reported once (`keys.lost_drain_key`, SET NX):
  - an error-level log line `drain.lost` naming the drain, its cordoned nodes and its VMIMs still running;
  - a Warning Event `DrainLost` on every one of those nodes;
  - a drain record in phase Failed (source "recovered") whose node records name each node and its state,
    so `drainctl status`, `GET /v1/drains/ID` and a DrainRequest's status show the loss.
  A process that knew the old epoch also logs `redis.data_lost` with both epochs, whoever reports.
- The same scan runs when the epoch is created on a fresh Redis: a first install finds no annotated node
  and reports nothing; a Redis that lost its data while no process was running is caught here too.

What it does not do:
- Uncordon. A node cordoned by a lost drain stays cordoned: it may be mid-drain or already empty and
  awaiting its maintenance, and letting VMs land on it again is the operator's call. The record and the
  Event say the two ways on: drain the node again (`drainctl drain NODE`; the node lock is free and VMs
  already moved stay moved), or `kubectl uncordon NODE`.
- Stop the lost drain's migrations. KubeVirt finishes the VMIMs that were running; they are named so an
  operator can watch them. Until they end, the new Redis's semaphore does not count them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.model import NODE_DRAIN_ANNOTATION, NODE_DRAINED_ANNOTATION, DrainPhase, DrainRequest, NodePhase
from orchestrator.records import DrainRecord, NodeRecord
from orchestrator.store import DrainStore

log = structlog.get_logger("orchestrator.epoch")

DRAIN_ANNOTATION = NODE_DRAIN_ANNOTATION
DRAINED_ANNOTATION = NODE_DRAINED_ANNOTATION
LOST_SOURCE = "recovered"
LOST_REPORT_TTL_S = 30 * 86_400


@dataclass(frozen=True)
class LostNode:
    name: str
    drained_at: str | None
    """Set when the lost drain had finished this node before the loss (it is empty, still cordoned)."""


@dataclass(frozen=True)
class LostDrain:
    """A drain whose records are gone while the cluster still shows its work."""

    drain_id: str
    nodes: tuple[LostNode, ...]
    running_vmims: tuple[str, ...] = field(default=())

    @property
    def message(self) -> str:
        drained = [n.name for n in self.nodes if n.drained_at]
        mid = [n.name for n in self.nodes if not n.drained_at]
        parts = [f"drain {self.drain_id} was lost: Redis came back without its data"]
        if mid:
            parts.append(f"left cordoned mid-drain: {', '.join(mid)}")
        if drained:
            parts.append(f"drained before the loss, still cordoned: {', '.join(drained)}")
        if self.running_vmims:
            parts.append(f"migrations still running: {', '.join(self.running_vmims)}")
        parts.append("run `drainctl drain NODE` to drain a node again, or `kubectl uncordon NODE`")
        return "; ".join(parts)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def find_lost_drains(redis: Any, kube: k.Kube) -> list[LostDrain]:
    """Drains the cluster still shows (a node cordoned under their annotation) that Redis does not record."""
    nodes, _ = await kube.list(k.NODES)
    by_drain: dict[str, list[LostNode]] = {}
    for node in nodes:
        meta = node.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        drain_id = annotations.get(DRAIN_ANNOTATION)
        if not drain_id or not (node.get("spec") or {}).get("unschedulable"):
            continue
        by_drain.setdefault(str(drain_id), []).append(
            LostNode(str(meta.get("name")), annotations.get(DRAINED_ANNOTATION)))
    lost = []
    for drain_id, lost_nodes in sorted(by_drain.items()):
        if await redis.exists(keys.drain_key(drain_id)):
            continue
        vmims, _ = await kube.list(k.VMIMS, label_selector=f"{DRAIN_ANNOTATION}={drain_id}")
        running = sorted(f"{(o.get('metadata') or {}).get('namespace')}/{(o.get('metadata') or {}).get('name')}"
                         for o in vmims
                         if ((o.get("status") or {}).get("phase")) not in ("Succeeded", "Failed"))
        lost.append(LostDrain(drain_id, tuple(sorted(lost_nodes, key=lambda n: n.name)), tuple(running)))
    return lost


def lost_drain_record(lost: LostDrain, *, now: float) -> tuple[DrainRecord, dict[str, NodeRecord]]:
    """The drain record (phase Failed) and node records that stand for a lost drain in the store."""
    request = DrainRequest.from_json({"nodes": [n.name for n in lost.nodes]})
    drain = DrainRecord(id=lost.drain_id, phase=DrainPhase.FAILED, message=lost.message, source=LOST_SOURCE,
                        created_at=now, finished_at=now, request=request.to_json())
    nodes = {
        n.name: NodeRecord(
            node=n.name, index=i, finished_at=now,
            phase=NodePhase.DRAINED if n.drained_at else NodePhase.FAILED,
            message=(f"drained at {n.drained_at}; the drain's records were lost; still cordoned"
                     if n.drained_at else "left cordoned by a drain whose records were lost"))
        for i, n in enumerate(lost.nodes)
    }
    return drain, nodes


async def report_lost_drain(redis: Any, kube: k.Kube, lost: LostDrain) -> bool:
    """Log, record and announce one lost drain, once across every process. Returns whether we reported it."""
    now = time.time()
    if not await redis.set(keys.lost_drain_key(lost.drain_id), repr(now), nx=True, ex=LOST_REPORT_TTL_S):
        return False
    log.error("drain.lost", drain_id=lost.drain_id, nodes=[n.name for n in lost.nodes],
              mid_drain=[n.name for n in lost.nodes if not n.drained_at],
              running_vmims=list(lost.running_vmims), action="left cordoned; drain again or uncordon")
    store = DrainStore(redis)
    drain, nodes = lost_drain_record(lost, now=now)
    await store.create(drain, nodes=nodes, vms={})
    await store.emit(lost.drain_id, "drain.lost", nodes=[n.name for n in lost.nodes],
                     running_vmims=list(lost.running_vmims), message=lost.message)
    for node in lost.nodes:
        obj = await kube.find(k.NODES, node.name)
        if obj is not None:
            await kube.event(involved=obj, reason="DrainLost", message=lost.message, warning=True,
                             now_iso=_now_iso())
    return True


class EpochGuard:
    """One process's knowledge of the Redis epoch; `check()` after connecting and after every outage."""

    def __init__(self, redis: Redis, kube: k.Kube | None, *, owner: str) -> None:
        # redis-py's stubs type commands as "Awaitable[T] | T"; used untyped here, as in the store.
        self.redis: Any = redis
        self.kube = kube
        self.owner = owner
        self.epoch: str | None = None
        self.losses = 0
        """How many times this process saw Redis come back without its data."""

    async def check(self) -> list[LostDrain]:
        """Compare the epoch with the one we knew; on a loss (or a fresh Redis) report what the cluster shows.

        Returns the lost drains this call reported (empty when another process reported them)."""
        raw, scanned = await self.redis.mget(keys.EPOCH_KEY, keys.EPOCH_SCANNED_KEY)  # one command per check
        created = False
        if raw is None:
            fresh = f"{uuid.uuid4().hex[:16]}@{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
            created = bool(await self.redis.set(keys.EPOCH_KEY, fresh, nx=True))
            raw = fresh if created else await self.redis.get(keys.EPOCH_KEY)
            scanned = None
        current = None if raw is None else _text(raw)
        known, self.epoch = self.epoch, current
        if known is not None and known != current:
            self.losses += 1
            log.error("redis.data_lost", owner=self.owner, epoch_before=known, epoch_now=current,
                      hint="Redis restarted without persistence (or was flushed); see docs/redis.md")
        elif known is None:
            log.info("redis.epoch", owner=self.owner, epoch=current, created=created)
        if self.kube is None or current is None:
            return []
        if scanned is not None and _text(scanned) == current:
            return []
        reported = []
        for lost in await find_lost_drains(self.redis, self.kube):
            if await report_lost_drain(self.redis, self.kube, lost):
                reported.append(lost)
        await self.redis.set(keys.EPOCH_SCANNED_KEY, current)
        return reported


async def check_epoch_forever(guard: EpochGuard, *, every_s: float = 15.0,
                              report: Callable[[str | None], None] | None = None) -> None:
    """Run `guard.check()` every `every_s` (one GET), for a supervised task; `report` gets each failure (or
    None once a check succeeds again). A loss is caught within `every_s` even where no outage was seen."""
    while True:
        try:
            await guard.check()
            if report is not None:
                report(None)
        except (RedisError, OSError, k.KubeError) as exc:
            if report is not None:
                report(f"epoch check failed: {exc or type(exc).__name__}")
        await asyncio.sleep(every_s)
