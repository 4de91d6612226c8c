"""Can a running pre-copy migration converge? A verdict from KubeVirt's migration metrics, and its reasons.

What it promises: `judge(samples, ...)` is a pure function of a VMI's recent metric samples (oldest first:
time, data remaining, transfer rate, dirty rate, as virt-handler exports them every 5 s) that answers
CONVERGING, CANNOT_CONVERGE or UNKNOWN with the numbers it used and a sentence a user can read. It never
answers CANNOT_CONVERGE without evidence over `min_evidence_s` cluster seconds:

- QEMU measures the dirty rate once per pre-copy round (at the bitmap sync), so samples before the first
  measurement (dirty rate 0) and the first round's measurement, taken over the long first pass, say little;
  only samples from the second measured round on count as evidence.
- A pre-copy cannot converge while the guest dirties memory at least as fast as the network carries it and
  the dirty set does not fit the downtime budget (migration-model.md 1.2: D >= B and W > B x downtime). Once
  the dirty set is capped at the writable working set W, QEMU measures W / round time = the transfer rate
  exactly, so "at or above" (within `tolerance`) is the test, and the remaining bytes stop making new lows.
- With auto-converge the guest is throttled step by step while the measured rate can keep reading the
  transfer rate; the metrics do not show the throttle, so the evidence must span the rounds QEMU needs to
  reach its maximum throttle (`AUTO_CONVERGE_ROUNDS` x the round time, estimated as remaining / rate).

It must stay pure: no I/O, no clock, nothing async. Deciding what to do with a verdict (abort, escalate,
report) belongs to the engine.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.model import format_bytes

__all__ = ["AUTO_CONVERGE_ROUNDS", "Convergence", "Sample", "Verdict", "judge"]

AUTO_CONVERGE_ROUNDS = 20
"""Pre-copy rounds QEMU's auto-converge needs from 0 % to its 99 % maximum throttle: 20 % after two rounds
with a high dirty rate, then +10 % every two rounds (migration/options.c, ram.c defaults)."""


class Convergence(enum.StrEnum):
    CONVERGING = "Converging"
    CANNOT_CONVERGE = "CannotConverge"
    UNKNOWN = "Unknown"


@dataclass(frozen=True)
class Sample:
    """One metrics sample of a running migration (bytes and bytes/s, cluster time in seconds)."""

    t: float
    remaining_bytes: float
    transfer_rate: float
    dirty_rate: float


@dataclass(frozen=True)
class Verdict:
    convergence: Convergence
    reason: str
    """A sentence for status, events and the report."""
    dirty_rate: float | None = None
    """Bytes/s the guest dirties (the lowest measured over the evidence window)."""
    transfer_rate: float | None = None
    """Bytes/s the network carries for this migration (the highest over the evidence window)."""
    evidence_s: float = 0.0
    """Cluster seconds of usable samples the verdict rests on."""


def _rate(value: float) -> str:
    return f"{format_bytes(value)}/s"


def judge(samples: Sequence[Sample], *, downtime_s: float = 0.3, min_evidence_s: float = 30.0,
          tolerance: float = 0.02, auto_converge: bool = False) -> Verdict:
    """The verdict on one running pre-copy from its samples, oldest first (see the module docstring)."""
    if min_evidence_s <= 0 or not 0 <= tolerance < 1 or downtime_s < 0:
        raise ValueError("min_evidence_s must be > 0, tolerance within [0, 1), downtime_s >= 0")
    ordered = sorted(samples, key=lambda s: s.t)
    measured = [s for s in ordered if s.dirty_rate > 0 and s.transfer_rate > 0]
    if not measured:
        return Verdict(Convergence.UNKNOWN, "no dirty rate measured yet (the first pre-copy pass is running)")
    # The first measurement covers the long first pass. Evidence starts when a later round was measured: the
    # rate changed, or one more round surely ended (that round sends what was left: remaining / rate seconds).
    first = measured[0]
    later_round_by = first.t + 1.5 * first.remaining_bytes / first.transfer_rate
    evidence = [s for s in measured if s.dirty_rate != first.dirty_rate or s.t >= later_round_by]
    if evidence:
        evidence = [s for s in measured if s.t >= evidence[0].t]
    latest = measured[-1]
    if latest.dirty_rate < latest.transfer_rate * (1 - tolerance):
        return Verdict(Convergence.CONVERGING,
                       f"the guest dirties {_rate(latest.dirty_rate)}, less than the {_rate(latest.transfer_rate)} "
                       "the network carries", latest.dirty_rate, latest.transfer_rate,
                       max(0.0, latest.t - measured[0].t))
    if not evidence:
        return Verdict(Convergence.UNKNOWN, "waiting for a second measured pre-copy round",
                       latest.dirty_rate, latest.transfer_rate)
    span = evidence[-1].t - evidence[0].t
    dirty = min(s.dirty_rate for s in evidence)
    transfer = max(s.transfer_rate for s in evidence)
    remaining = min(s.remaining_bytes for s in evidence)
    need = min_evidence_s
    if auto_converge:
        round_s = max(s.remaining_bytes / s.transfer_rate for s in evidence)
        need = max(need, AUTO_CONVERGE_ROUNDS * round_s)
    if any(s.dirty_rate < s.transfer_rate * (1 - tolerance) for s in evidence):
        return Verdict(Convergence.UNKNOWN, "the dirty rate fell below the transfer rate in the last rounds",
                       dirty, transfer, span)
    if remaining <= transfer * downtime_s:
        return Verdict(Convergence.CONVERGING, f"the {format_bytes(remaining)} left fit the downtime budget",
                       dirty, transfer, span)
    half = evidence[0].t + span / 2
    early = [s.remaining_bytes for s in evidence if s.t <= half]
    late = [s.remaining_bytes for s in evidence if s.t > half]
    shrinking = bool(early and late) and min(late) < min(early) * (1 - tolerance)
    if shrinking:
        return Verdict(Convergence.UNKNOWN, "the remaining bytes still reach new lows", dirty, transfer, span)
    if span < need:
        return Verdict(Convergence.UNKNOWN, f"gathering evidence ({span:.0f} of {need:.0f} s)", dirty, transfer,
                       span)
    return Verdict(Convergence.CANNOT_CONVERGE,
                   f"cannot converge: dirties {_rate(dirty)}, the network carries {_rate(transfer)}; "
                   f"{format_bytes(remaining)} stay dirty after {span:.0f} s",
                   dirty, transfer, span)
