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


class ManualClock(SimClock):
    """A clock that only moves when told to (benchmarks and deterministic tests step the cluster by hand)."""

    def __init__(self, *, start: float = 1_800_000_000.0) -> None:
        super().__init__(1.0, start=start)
        self._t = 0.0

    def now(self) -> float:
        return self.epoch + self._t

    def elapsed(self) -> float:
        return self._t

    def advance(self, cluster_seconds: float) -> None:
        self._t += cluster_seconds
