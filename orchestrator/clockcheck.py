"""Does the cluster's clock run at the time scale we were told?

Every figure drainctl records (durations, timeouts, backoff, the actual/estimate ratio) converts wall seconds to
cluster seconds with the configured time scale (`--time-scale`, `DRAIN_TIME_SCALE`). Against a simulator that
runs 20x faster while we assume 1x, a 140 s drain is recorded as 7 s and every timeout is 20 times too long.
The API server's `Date` header is its clock: two readings a second apart give its rate against ours.

Promises: `mismatch` is pure (rate in, message or None out); `measure_rate` makes two GET /version calls.
The `Date` header has a resolution of one second, so the tolerance covers that quantisation: a real cluster at
scale 1 always passes, and a factor of 1.5 either way is flagged.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

SAMPLE_GAP_S = 1.0
"""Wall seconds between the two readings."""
TOLERANCE = 1.5
"""Flag a measured rate more than this factor away from the configured one (after quantisation)."""


class DatedServer(Protocol):
    async def server_date(self) -> tuple[float, float]: ...


async def measure_rate(kube: DatedServer, *, gap_s: float = SAMPLE_GAP_S) -> tuple[float, float]:
    """(cluster seconds per wall second as measured, the wall seconds between the readings)."""
    date1, wall1 = await kube.server_date()
    await asyncio.sleep(gap_s)
    date2, wall2 = await kube.server_date()
    elapsed = max(wall2 - wall1, 1e-3)
    return (date2 - date1) / elapsed, elapsed


def mismatch(measured: tuple[float, float], configured: float, *, who: str,
             source: str = "API server Date header") -> str | None:
    """A message naming the problem and the fix when `configured` disagrees with the measured rate."""
    rate, elapsed = measured
    quantum = 1.0 / elapsed  # one-second Date resolution, as a rate
    low = configured / TOLERANCE - quantum
    high = configured * TOLERANCE + quantum
    if low <= rate <= high:
        return None
    shown = f"{rate:.0f}" if rate >= 2 else f"{rate:.1f}"
    return (f"time scale mismatch: {who} runs at time scale {configured:g} but the cluster's clock runs about "
            f"{shown}x wall time ({source}); every duration and timeout would be wrong. "
            f"Set --time-scale {shown} (or DRAIN_TIME_SCALE={shown}) to the cluster's, e.g. the simulator's "
            f"--time-scale")
