"""The priority work queue KubeVirt's migration controller runs on, on cluster time.

It follows controller-runtime's `pkg/controller/priorityqueue` as KubeVirt's
`pkg/virt-controller/watch/migration/migration.go` uses it (`AddWithOpts{Priority, After}`):
- an item is ready at its `ready_at`; ready items leave highest priority first, then in the order they were
  added (controller-runtime's AddedCounter);
- adding a key that is already queued does not add it twice: it keeps its place in the add order, its
  priority only rises and its ready time only moves earlier;
- taking an item removes it; the controller adds it again when it wants another look (a requeue gets a new
  place at the end of the add order).

It promises nothing about wall time and keeps no references to the controller's objects: keys are strings.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass


@dataclass
class _Item:
    priority: int
    ready_at: float
    added: int
    version: int


class PriorityQueue:
    """Keys waiting for the controller, with a priority and a time from which they are ready."""

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._heap: list[tuple[float, int, str]] = []  # (ready_at, version, key); stale entries are skipped
        self._counter = itertools.count()
        self._versions = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def add(self, key: str, *, priority: int, ready_at: float) -> None:
        """AddWithOpts: queue `key`, or raise its priority / bring its ready time forward if already queued."""
        item = self._items.get(key)
        if item is None:
            item = _Item(priority, ready_at, next(self._counter), next(self._versions))
            self._items[key] = item
        else:
            if priority <= item.priority and ready_at >= item.ready_at:
                return
            item.priority = max(item.priority, priority)
            item.ready_at = min(item.ready_at, ready_at)
            item.version = next(self._versions)
        heapq.heappush(self._heap, (item.ready_at, item.version, key))

    def ready_at(self, key: str) -> float | None:
        """When a queued key is next ready (None: not queued)."""
        item = self._items.get(key)
        return None if item is None else item.ready_at

    def discard(self, key: str) -> None:
        self._items.pop(key, None)

    def take_ready(self, now: float) -> list[str]:
        """Take every key ready at `now`, in the order the controller's workers would get them."""
        ready: list[tuple[int, int, str]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, version, key = heapq.heappop(heap)
            item = self._items.get(key)
            if item is None or item.version != version:
                continue
            del self._items[key]
            ready.append((-item.priority, item.added, key))
        ready.sort()
        return [key for _, _, key in ready]

    def next_ready(self) -> float:
        """The earliest ready time of a queued key (inf when empty)."""
        heap = self._heap
        while heap:
            ready_at, version, key = heap[0]
            item = self._items.get(key)
            if item is not None and item.version == version:
                return ready_at
            heapq.heappop(heap)
        return math.inf
