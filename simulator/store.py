"""The object store behind the simulated API server.

Promises:
- one global, monotonic resourceVersion; every committed write bumps it and is appended to a bounded
  event log, so a watch can resume from any version still in the log and gets 410 Expired otherwise;
- committed objects are never mutated in place (copy on write), so readers, the log and watchers can share
  them; callers must treat what `get`/`list` return as read-only;
- deletion honours finalizers (`deletionTimestamp` first, removal when the last finalizer goes) and the
  graceful deletion of running pods (a kubelet stand-in finishes it);
- admission hooks (KubeVirt's webhooks) run on API writes; listeners (controllers) hear every commit.

It knows nothing of HTTP: `server.py` maps requests onto it.
"""

from __future__ import annotations

import asyncio
import builtins
import random
import string
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from simulator.errors import ApiError
from simulator.resources import PODS, Registry, ResourceType
from simulator.selectors import compile_filter

Obj = dict[str, Any]
Predicate = Callable[[Obj], bool]
AdmissionHook = Callable[[str, ResourceType, Obj | None, Obj | None], None]
Listener = Callable[[str, ResourceType, Obj, Obj | None], None]

_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server uses for generateName


def clone(value: Any) -> Any:
    """A deep copy for JSON-shaped data, several times faster than copy.deepcopy."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    rv: int


@dataclass(eq=False)  # identity equality and hashing: watchers live in sets
class Watcher:
    """One open watch: the server drains `queue`; None in the queue means the watch was closed."""

    rt: ResourceType
    namespace: str | None
    pred: Predicate | None
    queue: asyncio.Queue[WatchEvent | None] = field(default_factory=asyncio.Queue)
    closed: bool = False

    def offer(self, etype: str, obj: Obj, old: Obj | None, rv: int) -> None:
        if self.closed:
            return
        if self.namespace is not None and (obj.get("metadata") or {}).get("namespace") != self.namespace:
            return
        if self.pred is None:
            self.queue.put_nowait(WatchEvent(etype, obj, rv))
            return
        now_match = self.pred(obj)
        if etype == "MODIFIED" and old is not None:
            was_match = self.pred(old)
            if was_match and not now_match:
                self.queue.put_nowait(WatchEvent("DELETED", obj, rv))
            elif now_match and not was_match:
                self.queue.put_nowait(WatchEvent("ADDED", obj, rv))
            elif now_match:
                self.queue.put_nowait(WatchEvent("MODIFIED", obj, rv))
        elif now_match:
            self.queue.put_nowait(WatchEvent(etype, obj, rv))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


@dataclass(frozen=True)
class _Logged:
    rv: int
    rt_key: str
    type: str
    obj: Obj
    old: Obj | None


class Store:
    """In-memory objects keyed by resource, namespace and name."""

    def __init__(self, registry: Registry, *, now: Callable[[], float], history: int = 50_000,
                 seed: int = 0) -> None:
        self.registry = registry
        self._now = now
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {}
        self._log: deque[_Logged] = deque(maxlen=history)
        self._watchers: dict[str, set[Watcher]] = {}
        self._admission: list[AdmissionHook] = []
        self._listeners: list[Listener] = []
        self._node_index: dict[str, dict[str, set[tuple[str, str]]]] = {}
        self._node_of: dict[str, Callable[[Obj], str | None]] = {}
        self._rand = random.Random(seed)

        self.writes = 0

    # ----------------------------------------------------------------------------------------------- setup
    def add_admission(self, hook: AdmissionHook) -> None:
        self._admission.append(hook)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def index_by_node(self, rt: ResourceType, node_of: Callable[[Obj], str | None]) -> None:
        """Keep an index of `rt` objects by the node `node_of` names (pods by spec.nodeName, ...)."""
        self._node_of[rt.key] = node_of
        index: dict[str, set[tuple[str, str]]] = {}
        for key, obj in self._objects.get(rt.key, {}).items():
            node = node_of(obj)
            if node:
                index.setdefault(node, set()).add(key)
        self._node_index[rt.key] = index

    # ------------------------------------------------------------------------------------------------ time
    @property
    def rv(self) -> int:
        return self._rv

    @property
    def oldest_rv(self) -> int:
        """The oldest version a watch can still resume from."""
        return self._log[0].rv - 1 if len(self._log) == self._log.maxlen else 0

    def now(self) -> float:
        return self._now()

    def new_uid(self) -> str:
        # Random like a real API server's: a uid must not repeat across runs (controllers key on it).
        return str(uuid.uuid4())

    # ----------------------------------------------------------------------------------------------- reads
    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj | None:
        return self._objects.get(rt.key, {}).get((namespace or "", name))

    def require(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self.get(rt, namespace, name)
        if obj is None:
            raise ApiError.not_found(rt.plural, name, rt.group)
        return obj

    def list(self, rt: ResourceType, namespace: str | None = None, *, label_selector: str | None = None,
             field_selector: str | None = None, pred: Predicate | None = None) -> list[Obj]:
        sel = compile_filter(label_selector, field_selector, rt.field_selectors)
        objs: Iterable[Obj]
        fast_node = _single_node_field(field_selector)
        if fast_node is not None and rt.key in self._node_index and rt is PODS:
            table = self._objects.get(rt.key, {})
            objs = [table[k] for k in self._node_index[rt.key].get(fast_node, ())]
        else:
            objs = self._objects.get(rt.key, {}).values()
        out = []
        for obj in objs:
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                continue
            if sel is not None and not sel(obj):
                continue
            if pred is not None and not pred(obj):
                continue
            out.append(obj)
        out.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return out

    def on_node(self, rt: ResourceType, node: str) -> builtins.list[Obj]:
        """Objects the node index places on `node` (see index_by_node)."""
        table = self._objects.get(rt.key, {})
        return [table[k] for k in sorted(self._node_index.get(rt.key, {}).get(node, ()))]

    def count(self, rt: ResourceType) -> int:
        return len(self._objects.get(rt.key, {}))

    def iter(self, rt: ResourceType) -> Iterator[Obj]:
        return iter(list(self._objects.get(rt.key, {}).values()))

    # ---------------------------------------------------------------------------------------------- writes
    def create(self, rt: ResourceType, obj: Obj, *, dry_run: bool = False, admit: bool = True) -> Obj:
        new: Obj = clone(obj)
        meta = new.setdefault("metadata", {})
        if rt.namespaced:
            ns = meta.get("namespace") or "default"
            meta["namespace"] = ns
            if ns not in {k[1] for k in self._objects.get("namespaces", {})}:
                raise ApiError(404, f'namespaces "{ns}" not found',
                               details={"name": ns, "kind": "namespaces"})
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise ApiError.invalid(rt.kind, "", "metadata.name: Required value: name or generateName "
                                       "is required", rt.group)
            for _ in range(100):
                candidate = prefix + "".join(self._rand.choice(_NAME_ALPHABET) for _ in range(5))
                if self.get(rt, meta.get("namespace"), candidate) is None:
                    meta["name"] = candidate
                    break
        _validate_name(rt, meta["name"])
        key = (meta.get("namespace", ""), meta["name"])
        if key in self._objects.get(rt.key, {}):
            raise ApiError.already_exists(rt.plural, meta["name"], rt.group)
        new["apiVersion"] = rt.api_version
        new["kind"] = rt.kind
        meta["uid"] = self.new_uid()
        meta["creationTimestamp"] = iso(self._now())
        meta["generation"] = 1
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(k, None)
        if admit:
            for hook in self._admission:
                hook("CREATE", rt, new, None)
        if dry_run:
            meta["resourceVersion"] = str(self._rv)
            return new
        return self._commit(rt, "ADDED", new, None)

    def update(self, rt: ResourceType, obj: Obj, *, subresource: str | None = None, dry_run: bool = False,
               admit: bool = True, check_rv: bool = True) -> Obj:
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        ns = meta.get("namespace") if rt.namespaced else None
        current = self.require(rt, ns, name)
        if check_rv and meta.get("resourceVersion") and meta["resourceVersion"] != \
                current["metadata"]["resourceVersion"]:
            raise ApiError.conflict(rt.plural, name, rt.group)
        new: Obj = clone(obj)
        if "status" in rt.subresources:
            if subresource == "status":
                # Only status changes through /status; everything else keeps its current value.
                status = new.get("status")
                new = clone(current)
                if status is None:
                    new.pop("status", None)
                else:
                    new["status"] = status
            elif current.get("status") is not None:
                new["status"] = clone(current["status"])
            else:
                new.pop("status", None)
        return self._replace(rt, current, new, dry_run=dry_run, admit=admit)

    def mutate(self, rt: ResourceType, namespace: str | None, name: str,
               fn: Callable[[Obj], None]) -> Obj | None:
        """Controller write: apply `fn` to a copy and commit it if anything changed; no admission."""
        current = self.get(rt, namespace, name)
        if current is None:
            return None
        new = clone(current)
        fn(new)
        if new == current:
            return current
        return self._replace(rt, current, new, dry_run=False, admit=False)

    def _replace(self, rt: ResourceType, current: Obj, new: Obj, *, dry_run: bool, admit: bool) -> Obj:
        cmeta = current["metadata"]
        meta = new.setdefault("metadata", {})
        for k in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp",
                  "deletionGracePeriodSeconds"):
            if k in cmeta:
                meta[k] = cmeta[k]
            else:
                meta.pop(k, None)
        new["apiVersion"] = rt.api_version
        new["kind"] = rt.kind
        meta["generation"] = cmeta.get("generation", 1) + (1 if new.get("spec") != current.get("spec") else 0)
        if admit:
            for hook in self._admission:
                hook("UPDATE", rt, new, current)
        if dry_run:
            return new
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(rt, new)
        return self._commit(rt, "MODIFIED", new, current)

    def delete(self, rt: ResourceType, namespace: str | None, name: str, *,
               grace_seconds: int | None = None, precondition_uid: str | None = None,
               precondition_rv: str | None = None, dry_run: bool = False, admit: bool = True) -> Obj:
        current = self.require(rt, namespace, name)
        meta = current["metadata"]
        if precondition_uid and precondition_uid != meta["uid"]:
            raise ApiError(409, f"Precondition failed: UID in precondition: {precondition_uid}, UID in "
                                f"object meta: {meta['uid']}", reason="Conflict")
        if precondition_rv and precondition_rv != meta["resourceVersion"]:
            raise ApiError(409, f"Precondition failed: ResourceVersion in precondition: {precondition_rv}, "
                                f"ResourceVersion in object meta: {meta['resourceVersion']}",
                           reason="Conflict")
        if admit:
            for hook in self._admission:
                hook("DELETE", rt, None, current)
        if dry_run:
            return current
        graceful = (rt is PODS and (current.get("spec") or {}).get("nodeName")
                    and (current.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))
        if graceful:
            grace = grace_seconds if grace_seconds is not None else \
                (current.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        else:
            grace = 0
        if meta.get("finalizers") or grace:
            if meta.get("deletionTimestamp") and not (grace == 0 and not meta.get("finalizers")):
                return current

            def mark(o: Obj) -> None:
                m = o["metadata"]
                m.setdefault("deletionTimestamp", iso(self._now() + grace))
                m["deletionGracePeriodSeconds"] = grace

            new = clone(current)
            mark(new)
            if not grace and not new["metadata"].get("finalizers"):
                return self._remove(rt, new)
            return self._commit(rt, "MODIFIED", new, current)
        return self._remove(rt, clone(current))

    def _remove(self, rt: ResourceType, obj: Obj) -> Obj:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        old = self._objects.get(rt.key, {}).pop(key, None)
        if old is not None:
            self._unindex(rt, key, old)
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._publish(rt, "DELETED", obj, old)
        return obj

    def _commit(self, rt: ResourceType, etype: str, obj: Obj, old: Obj | None) -> Obj:
        self._rv += 1
        self.writes += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        key = (meta.get("namespace", ""), meta["name"])
        table = self._objects.setdefault(rt.key, {})
        if old is not None:
            self._unindex(rt, key, old)
        table[key] = obj
        node_of = self._node_of.get(rt.key)
        if node_of is not None:
            node = node_of(obj)
            if node:
                self._node_index[rt.key].setdefault(node, set()).add(key)
        self._publish(rt, etype, obj, old)
        return obj

    def _unindex(self, rt: ResourceType, key: tuple[str, str], old: Obj) -> None:
        node_of = self._node_of.get(rt.key)
        if node_of is None:
            return
        node = node_of(old)
        if node:
            bucket = self._node_index[rt.key].get(node)
            if bucket is not None:
                bucket.discard(key)

    def _publish(self, rt: ResourceType, etype: str, obj: Obj, old: Obj | None) -> None:
        self._log.append(_Logged(self._rv, rt.key, etype, obj, old))
        for w in list(self._watchers.get(rt.key, ())):
            w.offer(etype, obj, old, self._rv)
        for listener in self._listeners:
            listener(etype, rt, obj, old)

    # ----------------------------------------------------------------------------------------------- watch
    def watch(self, rt: ResourceType, namespace: str | None = None, *, since: str | None = None,
              label_selector: str | None = None, field_selector: str | None = None) -> Watcher:
        """Open a watch. `since` None or "0": ADDED for every current object first; a version: replay
        what came after it, or 410 Expired if it has fallen off the log."""
        pred = compile_filter(label_selector, field_selector, rt.field_selectors)
        w = Watcher(rt, namespace, pred)
        if since in (None, "", "0"):
            for obj in self.list(rt, namespace):
                w.offer("ADDED", obj, None, self._rv)
        else:
            try:
                start = int(since)
            except ValueError as exc:
                raise ApiError.bad_request(f"invalid resourceVersion {since!r}") from exc
            if start < self.oldest_rv:
                raise ApiError.gone(f"too old resource version: {start} ({self._rv})")
            for entry in self._log:
                if entry.rv > start and entry.rt_key == rt.key:
                    w.offer(entry.type, entry.obj, entry.old, entry.rv)
        self._watchers.setdefault(rt.key, set()).add(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        self._watchers.get(w.rt.key, set()).discard(w)
        w.close()

    def close_watches(self, rt: ResourceType | None = None) -> int:
        """Close open watches (fault injection, shutdown); returns how many."""
        n = 0
        for key, ws in list(self._watchers.items()):
            if rt is not None and key != rt.key:
                continue
            for w in list(ws):
                self.unwatch(w)
                n += 1
        return n

    def watcher_count(self) -> int:
        return sum(len(ws) for ws in self._watchers.values())


def _single_node_field(field_selector: str | None) -> str | None:
    if not field_selector:
        return None
    for part in field_selector.split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip() == "spec.nodeName" and not key.endswith("!"):
            return value.lstrip("=").strip()
    return None


_DNS1123 = set(string.ascii_lowercase + string.digits + "-.")


def _validate_name(rt: ResourceType, name: str) -> None:
    if len(name) > 253 or not name or not set(name) <= _DNS1123 or not name[0].isalnum() \
            or not name[-1].isalnum():
        raise ApiError.invalid(
            rt.kind, name,
            f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower '
            "case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            rt.group)
