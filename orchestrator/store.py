"""Drain records in Redis: the drain, its nodes, every VM with every attempt, and an event stream.

Promises:
- every change is a read-modify-write under WATCH/MULTI, so concurrent workers never lose an update;
- nothing is deleted while a drain is open; the event stream is append-only (capped at a generous length);
- records are the typed models of ``orchestrator.records``; only this module turns them into JSON and back
  (stable field names: the API, the CLI and the report show them);
- a drain is born whole: its record, its node locks and its idempotency key are written in one transaction,
  and a lock or key whose drain is missing or over is taken over by the next submit, so none can leak.
It does not talk to the cluster and does not decide anything: jobs decide, the store records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import WatchError

from orchestrator import keys
from orchestrator.model import DrainPlan
from orchestrator.records import DrainRecord, NodeRecord, StoredRecord, TransferRecord, VmRecord
from orchestrator.tuning import OBSERVED_WINDOW, TransferSample

Event = dict[str, Any]
"""One entry of a drain's event stream: id, event, ts and the event's own fields."""
EVENTS_MAXLEN = 100_000

R = TypeVar("R", bound=StoredRecord)


class RecordNotFound(KeyError):
    """A node or VM record (or a drain record) that should exist does not."""


class DrainNotFound(KeyError):
    def __init__(self, drain_id: str) -> None:
        super().__init__(drain_id)
        self.drain_id = drain_id

    def __str__(self) -> str:
        return f"drain {self.drain_id!r} not found"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _loads(model: type[R], value: Any) -> R:
    return model.model_validate_json(value)


def _dumps(record: StoredRecord) -> str:
    return json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class Submission:
    """What :meth:`DrainStore.submit` did: created the drain, or found an earlier one, or found nodes taken."""

    created: bool
    drain_id: str
    """The new drain, or the drain the idempotency key named."""
    taken: dict[str, str] = field(default_factory=dict)
    """Nodes held by other open drains (node -> drain id); nothing was written."""
    reclaimed: dict[str, str] = field(default_factory=dict)
    """Stale node locks taken over (node -> the drain that no longer needed them)."""


@dataclass(frozen=True)
class DrainView:
    """One drain as read from Redis, everything included."""

    drain: DrainRecord
    nodes: dict[str, NodeRecord]
    vms: dict[str, VmRecord]

    def to_json(self) -> dict[str, Any]:
        return {**self.drain.to_json(), "nodes": {k: v.to_json() for k, v in self.nodes.items()},
                "vms": {k: v.to_json() for k, v in self.vms.items()}}

    def nodes_in_order(self) -> list[NodeRecord]:
        return sorted(self.nodes.values(), key=lambda n: n.index)

    def vms_on(self, node: str) -> list[VmRecord]:
        return [vm for vm in self.vms.values() if vm.node == node]


class DrainStore:
    def __init__(self, redis: Redis) -> None:
        # redis-py's stubs type every command as "Awaitable[T] | T" (one class serves sync and async
        # clients), which strict mypy cannot await; the client is used as untyped inside this class.
        self.redis: Any = redis

    # ------------------------------------------------------------------------------------------ drains
    async def submit(self, drain: DrainRecord, *, idempotency_key: str | None = None,
                     idempotency_ttl_s: int = 86_400, plan: DrainPlan | None = None) -> Submission:
        """Write a new drain, its node locks, its idempotency key and the plan it was submitted with (`plan`,
        read back by :meth:`submitted_plan`) in one transaction, or nothing.

        Nothing is written when the idempotency key names a drain that exists (returned instead) or when an
        open drain holds one of the nodes (returned in `taken`). A lock naming a drain that does not exist
        or is over is taken over (`reclaimed`): its owner died before writing its record or before freeing
        its nodes, and nobody else would ever free it. An idempotency key naming no drain is reused the same
        way. So a submitter that dies at any point leaves either everything or nothing behind.
        """
        drain_id, nodes = drain.id, drain.nodes
        lock_keys = [keys.node_lock_key(n) for n in nodes]
        idem = keys.idempotency_key(idempotency_key) if idempotency_key else None
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*lock_keys, *([idem] if idem else []))
                    if idem is not None:
                        named = await pipe.get(idem)
                        if named is not None and await self._watch_drain(pipe, _text(named)) is not None:
                            return Submission(created=False, drain_id=_text(named))
                    taken: dict[str, str] = {}
                    reclaimed: dict[str, str] = {}
                    for node, key in zip(nodes, lock_keys, strict=True):
                        raw_owner = await pipe.get(key)
                        if raw_owner is None or _text(raw_owner) == drain_id:
                            continue
                        owner = _text(raw_owner)
                        record = await self._watch_drain(pipe, owner)
                        if record is None or record.phase.is_final:
                            reclaimed[node] = owner
                        else:
                            taken[node] = owner
                    if taken:
                        return Submission(created=False, drain_id=drain_id, taken=taken)
                    pipe.multi()
                    pipe.set(keys.drain_key(drain_id), _dumps(drain))
                    if plan is not None:
                        pipe.set(keys.drain_plan_key(drain_id),
                                 json.dumps(plan.to_json(), separators=(",", ":")))
                    pipe.zadd(keys.DRAINS_INDEX, {drain_id: drain.created_at or time.time()})
                    for key in lock_keys:
                        pipe.set(key, drain_id)
                    if idem is not None:
                        pipe.set(idem, drain_id, ex=idempotency_ttl_s)
                    await pipe.execute()
                    return Submission(created=True, drain_id=drain_id, reclaimed=reclaimed)
                except WatchError:
                    continue

    async def submitted_plan(self, drain_id: str) -> DrainPlan | None:
        """The plan the drain was submitted with (None when it had none, or it does not load: re-plan then)."""
        raw = await self.redis.get(keys.drain_plan_key(drain_id))
        if raw is None:
            return None
        try:
            return DrainPlan.from_json(json.loads(raw))
        except ValueError:
            return None

    @staticmethod
    async def _watch_drain(pipe: Any, drain_id: str) -> DrainRecord | None:
        """Inside a WATCH: watch a drain record too and read it (None when it does not exist)."""
        key = keys.drain_key(drain_id)
        await pipe.watch(key)
        raw = await pipe.get(key)
        return None if raw is None else _loads(DrainRecord, raw)

    async def create(self, drain: DrainRecord, *, nodes: Mapping[str, NodeRecord],
                     vms: Mapping[str, VmRecord]) -> None:
        """Write a drain with its children, taking no node lock (imports and tests; drains are submitted
        with :meth:`submit`)."""
        drain_id = drain.id
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.drain_key(drain_id), _dumps(drain))
            if nodes:
                pipe.hset(keys.drain_nodes_key(drain_id), mapping={n: _dumps(r) for n, r in nodes.items()})
            if vms:
                pipe.hset(keys.drain_vms_key(drain_id), mapping={v: _dumps(r) for v, r in vms.items()})
            pipe.zadd(keys.DRAINS_INDEX, {drain_id: drain.created_at or time.time()})
            await pipe.execute()

    async def create_children(self, drain_id: str, *, nodes: Mapping[str, NodeRecord],
                              vms: Mapping[str, VmRecord]) -> None:
        """Write a drain's node and VM records at once (the plan job; a re-run rewrites them whole)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.drain_nodes_key(drain_id), keys.drain_vms_key(drain_id))
            if nodes:
                pipe.hset(keys.drain_nodes_key(drain_id), mapping={n: _dumps(r) for n, r in nodes.items()})
            if vms:
                pipe.hset(keys.drain_vms_key(drain_id), mapping={v: _dumps(r) for v, r in vms.items()})
            await pipe.execute()

    async def get(self, drain_id: str) -> DrainRecord:
        raw = await self.redis.get(keys.drain_key(drain_id))
        if raw is None:
            raise DrainNotFound(drain_id)
        return _loads(DrainRecord, raw)

    async def find(self, drain_id: str) -> DrainRecord | None:
        raw = await self.redis.get(keys.drain_key(drain_id))
        return None if raw is None else _loads(DrainRecord, raw)

    async def view(self, drain_id: str) -> DrainView:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.drain_key(drain_id))
            pipe.hgetall(keys.drain_nodes_key(drain_id))
            pipe.hgetall(keys.drain_vms_key(drain_id))
            raw, nodes, vms = await pipe.execute()
        if raw is None:
            raise DrainNotFound(drain_id)
        return DrainView(_loads(DrainRecord, raw),
                         {_text(k): _loads(NodeRecord, v) for k, v in sorted(nodes.items())},
                         {_text(k): _loads(VmRecord, v) for k, v in sorted(vms.items())})

    async def ids(self, *, limit: int = 1000) -> list[str]:
        raw = await self.redis.zrange(keys.DRAINS_INDEX, -limit, -1)
        return [_text(x) for x in raw]

    async def update(self, drain_id: str, fn: Callable[[DrainRecord], bool | None]) -> DrainRecord:
        try:
            return await self._modify(DrainRecord, keys.drain_key(drain_id), None, fn)
        except RecordNotFound:
            raise DrainNotFound(drain_id) from None

    # ----------------------------------------------------------------------------------- nodes, vms
    async def node(self, drain_id: str, node: str) -> NodeRecord:
        raw = await self.redis.hget(keys.drain_nodes_key(drain_id), node)
        if raw is None:
            raise RecordNotFound(f"drain {drain_id}: node {node} not found")
        return _loads(NodeRecord, raw)

    async def nodes(self, drain_id: str) -> dict[str, NodeRecord]:
        raw = await self.redis.hgetall(keys.drain_nodes_key(drain_id))
        return {_text(k): _loads(NodeRecord, v) for k, v in raw.items()}

    async def vm(self, drain_id: str, vmi: str) -> VmRecord | None:
        raw = await self.redis.hget(keys.drain_vms_key(drain_id), vmi)
        return None if raw is None else _loads(VmRecord, raw)

    async def vms(self, drain_id: str) -> dict[str, VmRecord]:
        raw = await self.redis.hgetall(keys.drain_vms_key(drain_id))
        return {_text(k): _loads(VmRecord, v) for k, v in raw.items()}

    async def set_vms(self, drain_id: str, vms: Mapping[str, VmRecord]) -> None:
        if vms:
            await self.redis.hset(keys.drain_vms_key(drain_id), mapping={v: _dumps(r) for v, r in vms.items()})

    async def update_node(self, drain_id: str, node: str, fn: Callable[[NodeRecord], bool | None]) -> NodeRecord:
        return await self._modify(NodeRecord, keys.drain_nodes_key(drain_id), node, fn)

    async def update_vm(self, drain_id: str, vmi: str, fn: Callable[[VmRecord], bool | None]) -> VmRecord:
        return await self._modify(VmRecord, keys.drain_vms_key(drain_id), vmi, fn)

    async def _modify(self, model: type[R], key: str, field: str | None, fn: Callable[[R], bool | None]) -> R:
        """Read-modify-write one record (a string key, or one field of a hash) under WATCH/MULTI, retrying
        when someone else wrote it meanwhile. `fn` changes the record in place; it returns False to leave
        it unchanged (and may run more than once: it must not have other side effects)."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await (pipe.get(key) if field is None else pipe.hget(key, field))
                    if raw is None:
                        raise RecordNotFound(f"{key}: {field or 'record'} not found")
                    record = _loads(model, raw)
                    before = _dumps(record)
                    if fn(record) is False or _dumps(record) == before:
                        return record
                    # Wall clock on purpose: when the record was last written, for people and `progress`.
                    record.updated_at = time.time()
                    pipe.multi()
                    if field is None:
                        pipe.set(key, _dumps(record))
                    else:
                        pipe.hset(key, field, _dumps(record))
                    await pipe.execute()
                    return record
                except WatchError:
                    continue

    # -------------------------------------------------------------------------------------- locks
    async def unlock_nodes(self, drain_id: str, nodes: list[str]) -> None:
        for node in nodes:
            key = keys.node_lock_key(node)
            while True:
                async with self.redis.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(key)
                        owner = await pipe.get(key)
                        if owner is not None and _text(owner) == drain_id:
                            pipe.multi()
                            pipe.delete(key)
                            await pipe.execute()
                        break
                    except WatchError:
                        continue  # the lock changed under us: look at it again

    async def node_owner(self, node: str) -> str | None:
        owner = await self.redis.get(keys.node_lock_key(node))
        return None if owner is None else _text(owner)

    # -------------------------------------------------------------------------------- transfers
    async def record_transfer(self, record: TransferRecord, *, keep: int = OBSERVED_WINDOW) -> None:
        """Keep a finished migration among the last `keep` of its source node (recording it again is a no-op:
        the same record is the same member of the node's sorted set)."""
        key = keys.node_transfers_key(record.source)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True): record.end_s})
            pipe.zremrangebyrank(key, 0, -(keep + 1))
            await pipe.execute()

    async def transfers(self, nodes: list[str]) -> dict[str, list[TransferRecord]]:
        """The recorded migrations out of each of `nodes`, oldest first."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.zrange(keys.node_transfers_key(node), 0, -1)
            found = await pipe.execute()
        return {node: [TransferRecord.model_validate_json(raw) for raw in members]
                for node, members in zip(nodes, found, strict=True)}

    async def transfer_samples(self, nodes: list[str]) -> dict[str, list[TransferSample]]:
        """What the planner takes (`plan_drain(transfers=...)`): each node's recorded migrations as samples."""
        return {node: [r.sample() for r in records] for node, records in (await self.transfers(nodes)).items()}

    # ------------------------------------------------------------------------------------- events
    async def emit(self, drain_id: str, event: str, **fields: Any) -> str:
        """Append to the drain's event stream; returns the stream id."""
        body = {"event": event, "ts": repr(time.time()),
                "data": json.dumps(fields, separators=(",", ":"), default=str)}
        entry = await self.redis.xadd(keys.drain_events_key(drain_id), body, maxlen=EVENTS_MAXLEN,
                                      approximate=True)
        return _text(entry)

    async def events(self, drain_id: str, *, after: str = "0", count: int = 1000,
                     block_ms: int | None = None) -> list[Event]:
        key = keys.drain_events_key(drain_id)
        if block_ms is not None:
            raw = await self.redis.xread({key: after}, count=count, block=block_ms)
            entries = raw[0][1] if raw else []
        else:
            entries = await self.redis.xrange(key, min=f"({after}" if after != "0" else "-", count=count)
        out = []
        for entry_id, body in entries:
            fields = {_text(k): _text(v) for k, v in body.items()}
            out.append({"id": _text(entry_id), "event": fields.get("event"), "ts": float(fields.get("ts", 0)),
                        **json.loads(fields.get("data", "{}"))})
        return out
