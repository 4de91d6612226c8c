"""The orchestrator's clock: cluster seconds at `time_scale` cluster seconds per wall second.

Timeouts and backoff are written in cluster seconds; against an accelerated simulator the clock runs at the
simulator's time scale, so a 150 s timeout is 150 cluster seconds, not 150 wall seconds. `time()` is wall
epoch seconds: what records store (they outlive a process, unlike monotonic readings). The engine reads time
only through this object; tests inject another object with the same methods.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic cluster seconds (only differences mean anything)."""
        ...

    def time(self) -> float:
        """Wall epoch seconds (stamps in records; comparable across processes)."""
        ...

    def since(self, wall_stamp: float) -> float:
        """Cluster seconds elapsed since a wall stamp taken with `time()` (never negative)."""
        ...

    async def sleep(self, cluster_seconds: float) -> None: ...


class ScaledClock:
    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time scale must be > 0, got {time_scale}")
        self.time_scale = time_scale

    def now(self) -> float:
        return time.monotonic() * self.time_scale

    def time(self) -> float:
        return time.time()

    def since(self, wall_stamp: float) -> float:
        return max(0.0, time.time() - wall_stamp) * self.time_scale

    def wall(self, cluster_seconds: float) -> float:
        return max(0.0, cluster_seconds) / self.time_scale

    async def sleep(self, cluster_seconds: float) -> None:
        await asyncio.sleep(self.wall(cluster_seconds))
