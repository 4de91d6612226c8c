"""The simulator's clock: cluster time runs `time_scale` times faster than the wall clock.

Every timestamp the simulator writes is cluster time. Cluster time starts at the wall time the clock was
made (so ages printed by kubectl look natural) and then advances at the scaled rate.
"""

from __future__ import annotations

import asyncio
import time


class SimClock:
    def __init__(self, time_scale: float = 1.0, *, start: float | None = None) -> None:
        if time_scale <= 0:
            raise ValueError(f"time scale must be > 0, got {time_scale}")
        self.time_scale = time_scale
        self.epoch = time.time() if start is None else start
        self._mono0 = time.monotonic()

    def now(self) -> float:
        """Cluster time, in seconds since the Unix epoch."""
        return self.epoch + (time.monotonic() - self._mono0) * self.time_scale

    def elapsed(self) -> float:
        """Cluster seconds since the clock started."""
        return (time.monotonic() - self._mono0) * self.time_scale

    def wall(self, cluster_seconds: float) -> float:
        """Wall seconds that `cluster_seconds` of cluster time take."""
        return cluster_seconds / self.time_scale

    async def sleep(self, cluster_seconds: float) -> None:
        await asyncio.sleep(max(0.0, cluster_seconds) / self.time_scale)
