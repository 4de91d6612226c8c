"""The live-migration physics of the simulated cluster: pre-copy rounds, KubeVirt's monitor, fair sharing.

This module promises a deterministic fluid model of one live migration's data transfer, as QEMU and
KubeVirt's virt-launcher monitor behave (reference: migration-model.md sections 1 and 3,
kubevirt.md sections 2.1 and 3.5):

- `Transfer` moves one migration's bytes forward in time at a bandwidth the caller chooses, exactly
  for a constant bandwidth however many pre-copy rounds end inside a step. It applies QEMU's
  stop-and-copy rule (remaining dirty data <= bandwidth x downtime limit, checked at every bitmap
  sync), auto-converge throttling, and the virt-launcher monitor: progress timeout, completion
  timeout, and at the completion timeout post-copy or pausing the guest when workload disruption
  is allowed. It reports KubeVirt's own failure texts (<= v1.8).
- `fair_share` splits node NIC capacity between concurrent migrations max-min fairly.
- `precopy_estimate` and `drain_lower_bound` are the closed forms used by tests, by the planner's
  estimates and by the lower-bound benchmark; `precopy_estimate` agrees with `Transfer` driven at
  a constant bandwidth.

It must stay pure: no I/O, no clock reads, no asyncio, no imports from the rest of the simulator.
Units are bytes, bytes per second and cluster seconds throughout.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "GB",
    "GIB",
    "Flow",
    "LBVm",
    "LowerBound",
    "MonitorConfig",
    "PrecopyEstimate",
    "Transfer",
    "TransferPhase",
    "VMPhysics",
    "acceptable_completion_s",
    "drain_lower_bound",
    "fair_share",
    "precopy_estimate",
]

GIB = 1024**3
GB = 1000**3

TransferPhase = Literal["precopy", "postcopy", "paused", "completed", "aborted"]

# QEMU auto-converge defaults (migration/options.c, ram.c): cpu-throttle-initial 20 %,
# cpu-throttle-increment 10 %, max-cpu-throttle 99 %, throttle-trigger-threshold 50 %, and a step
# only after two "dirty rate high" sync periods.
THROTTLE_INITIAL = 0.20
THROTTLE_INCREMENT = 0.10
THROTTLE_MAX = 0.99
THROTTLE_TRIGGER = 0.50
THROTTLE_HIGH_ROUNDS = 2

# libvirt reports whole bytes, so a drop of less than half a byte is no drop; this also keeps float
# noise at round boundaries from counting as progress.
_PROGRESS_EPS = 0.5
# Absolute slack (seconds) when deciding that a deadline computed in floats has been reached.
_TIME_EPS = 1e-9


@dataclass(frozen=True)
class VMPhysics:
    """The hidden memory behaviour of one guest."""

    memory_bytes: int
    """Configured guest memory (the memory request); sizes the completion timeout."""
    resident_bytes: int
    """Non-zero pages that must cross at least once (<= memory_bytes)."""
    dirty_bytes_per_s: float
    """Page dirty rate D while the guest runs unthrottled."""
    wws_bytes: int
    """Writable working set W (<= resident_bytes): the dirty set never exceeds it."""

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {self.memory_bytes}")
        if not 0 <= self.resident_bytes <= self.memory_bytes:
            raise ValueError(
                f"resident_bytes must be within [0, memory_bytes={self.memory_bytes}], "
                f"got {self.resident_bytes}"
            )
        if not 0 <= self.wws_bytes <= self.resident_bytes:
            raise ValueError(
                f"wws_bytes must be within [0, resident_bytes={self.resident_bytes}], got {self.wws_bytes}"
            )
        if not (self.dirty_bytes_per_s >= 0 and math.isfinite(self.dirty_bytes_per_s)):
            raise ValueError(f"dirty_bytes_per_s must be finite and >= 0, got {self.dirty_bytes_per_s}")


QEMU_DEFAULT_DOWNTIME_S = 0.3
"""QEMU's default max downtime (migrationutils.QEMUDefaultTargetDowntimeMS = 300). On KubeVirt's default path
(stall detector and downtime tuning off, both Alpha feature gates) virt-launcher's migration monitor never sets
max downtime (pkg/virt-launcher/virtwrap/live-migration-source.go: tuneDowntime returns without the
DowntimeTuning options, handleLegacyConvergence only pauses or aborts), so `maxDowntimeMs` in the KubeVirt CR
changes nothing and 300 ms decides convergence."""


@dataclass(frozen=True)
class MonitorConfig:
    """The effective KubeVirt migration configuration for one migration (kubevirt.md 2.1, 3.5)."""

    downtime_s: float = 0.3
    """Switchover budget in seconds: QEMU's own 300 ms on KubeVirt's default (legacy) path, where
    virt-launcher never calls MigrateSetMaxDowntime (see QEMU_DEFAULT_DOWNTIME_S)."""
    completion_timeout_per_gib: int = 150
    """completionTimeoutPerGiB; 0 disables the completion timeout, as in virt-launcher."""
    progress_timeout_s: int = 150
    """progressTimeout; 0 disables the progress timeout, as in virt-launcher."""
    allow_auto_converge: bool = False
    allow_post_copy: bool = False
    allow_workload_disruption: bool | None = None
    """None inherits allow_post_copy (KubeVirt's GetMigrationConfiguration rule)."""
    progress_watermark: Literal["lowest", "previous"] = "lowest"
    """What counts as progress. "lowest": data_remaining reaches a new low since the monitor started
    (the rule KubeVirt documents and older virt-launchers implement). "previous": data_remaining is
    lower than at the previous sample, which is what current virt-launcher code does (it overwrites
    the watermark with every sample); then a migration that keeps sending is almost never "stuck"."""

    def __post_init__(self) -> None:
        if not (self.downtime_s >= 0 and math.isfinite(self.downtime_s)):
            raise ValueError(f"downtime_s must be finite and >= 0, got {self.downtime_s}")
        if self.completion_timeout_per_gib < 0:
            raise ValueError(
                f"completion_timeout_per_gib must be >= 0, got {self.completion_timeout_per_gib}"
            )
        if self.progress_timeout_s < 0:
            raise ValueError(f"progress_timeout_s must be >= 0, got {self.progress_timeout_s}")
        if self.progress_watermark not in ("lowest", "previous"):
            raise ValueError(
                f"progress_watermark must be 'lowest' or 'previous', got {self.progress_watermark!r}"
            )

    @property
    def workload_disruption(self) -> bool:
        """Whether the completion timeout forces completion (post-copy or pause) instead of aborting."""
        if self.allow_workload_disruption is None:
            return self.allow_post_copy
        return self.allow_workload_disruption


def acceptable_completion_s(memory_bytes: int, per_gib: int) -> int:
    """virt-launcher's acceptable completion time: per_gib x the memory rounded up to whole decimal GB.

    KubeVirt converts the size with `ScaledValue(resource.Giga)`, so 4 GiB (4.29 GB) counts as 5.
    """
    return per_gib * -(-memory_bytes // GB)


def _throttle_step(throttle: float) -> float:
    if throttle <= 0.0:
        return THROTTLE_INITIAL
    return min(THROTTLE_MAX, throttle + THROTTLE_INCREMENT)


class Transfer:
    """The data-moving part of one live migration (after its setup), as virt-launcher + QEMU see it.

    Drive it with `advance(bandwidth, dt)`; ask `next_event_in(bandwidth)` how long until its state
    changes so a discrete-event loop can step exactly to it. Pre-copy round i sends V_i bytes; the
    guest dirties pages at D_eff = D x (1 - throttle) meanwhile, at most the writable working set W,
    and the dirtied set becomes V_(i+1). At every round boundary (QEMU's bitmap sync) the transfer
    enters stop-and-copy if V_(i+1) <= bandwidth x downtime_s; the guest is then stopped and the
    final round's duration is the downtime. QEMU has no iteration cap, so a VM that cannot converge
    sends forever until a timeout fires.

    `data_remaining` is the pending dirty data QEMU would report after a bitmap sync: the unsent part
    of the current round plus what the guest dirtied since the round began (capped at W). It is a
    continuous function of time, so the progress watermark compares it both across round boundaries
    and as bytes move. A VM with D > bandwidth and W above the threshold returns to exactly W at
    every round end and so never makes progress after round 0.

    Not modelled: virt-launcher's 400 ms polling and integer-second comparisons (timeouts fire here
    at exactly their configured seconds), VFIO devices, and the v1.9 stall detector. Timeouts are
    not evaluated during the final stop-and-copy round, which lasts at most the downtime budget at
    the bandwidth that started it.
    """

    def __init__(self, vm: VMPhysics, config: MonitorConfig, *, started_at: float) -> None:
        self.vm = vm
        self.config = config
        self.started_at = float(started_at)
        self._now = self.started_at
        self._phase: TransferPhase = "precopy"
        self._mode = "PreCopy"
        self._round = 0
        self._volume = float(vm.resident_bytes)  # V of the current round (or of the final push)
        self._round_sent = 0.0
        self._dirtied = 0.0
        self._dirtying = True  # False once the guest no longer runs on the source (stop-and-copy, post-copy)
        self._decision_pending = True  # stop-or-iterate decision for the current round's volume
        self._switchover_at: float | None = None
        self._sent = 0.0
        self._throttle = 0.0
        self._high_rounds = 0
        self._acceptable_s = acceptable_completion_s(vm.memory_bytes, config.completion_timeout_per_gib)
        self._watermark = float(vm.resident_bytes)
        self._last_progress = self.started_at
        self._paused_at: float | None = None
        self._postcopy_at: float | None = None
        self._completed_at: float | None = None
        self._aborted_at: float | None = None
        self._abort_reason: str | None = None
        self._downtime: float | None = None
        self._round_started = self.started_at
        self._measured_dirty_rate = 0.0

    # ----------------------------------------------------------------- read-only state

    @property
    def phase(self) -> TransferPhase:
        return self._phase

    @property
    def mode(self) -> str:
        """KubeVirt's `migrationState.mode`: "PreCopy", "PostCopy" or "Paused"."""
        return self._mode

    @property
    def now(self) -> float:
        """The cluster time this transfer has been advanced to."""
        return self._now

    @property
    def bytes_sent(self) -> int:
        return round(self._sent)

    @property
    def data_remaining(self) -> int:
        """What libvirt reports as DataRemaining now (see the class docstring)."""
        return max(0, round(self._remaining()))

    @property
    def round(self) -> int:
        """Index of the current pre-copy round; the stop-and-copy round keeps the last index."""
        return self._round

    @property
    def measured_dirty_rate(self) -> float:
        """QEMU's dirty-pages-rate x page size, bytes/s: the distinct pages the guest dirtied during the last
        completed pre-copy round over that round's duration (0 until the first round ends). Once the dirty
        set is capped at the writable working set it reads W / round time, which equals the transfer rate
        of a VM that cannot converge."""
        return self._measured_dirty_rate

    @property
    def throttle(self) -> float:
        """Auto-converge CPU throttle in force, 0.0 .. 0.99."""
        return self._throttle

    @property
    def in_switchover(self) -> bool:
        """True during the final stop-and-copy round (the guest is stopped)."""
        return self._switchover_at is not None and self._phase not in ("completed", "aborted")

    @property
    def acceptable_completion_s(self) -> int:
        """Acceptable completion time in force (doubled once the guest was paused); 0 = no limit."""
        return self._acceptable_s

    @property
    def completion_deadline(self) -> float:
        """Cluster time at which the completion timeout fires, inf if disabled."""
        if self._acceptable_s <= 0:
            return math.inf
        return self.started_at + self._acceptable_s

    @property
    def progress_deadline(self) -> float:
        """Cluster time at which the progress timeout fires unless progress is made first."""
        if self.config.progress_timeout_s <= 0:
            return math.inf
        return self._last_progress + self.config.progress_timeout_s

    @property
    def paused_at(self) -> float | None:
        return self._paused_at

    @property
    def postcopy_started_at(self) -> float | None:
        return self._postcopy_at

    @property
    def completed_at(self) -> float | None:
        return self._completed_at

    @property
    def aborted_at(self) -> float | None:
        return self._aborted_at

    @property
    def abort_reason(self) -> str | None:
        return self._abort_reason

    @property
    def downtime_s(self) -> float | None:
        """Switchover downtime of a completed migration.

        Stop-and-copy: the final round's duration. Paused: from the pause to completion. Post-copy:
        0.0, because the guest runs on the target while the remaining pages are pulled (degraded,
        not down); `completed_at - postcopy_started_at` is that degradation window.
        """
        return self._downtime

    @property
    def finished(self) -> bool:
        return self._phase in ("completed", "aborted")

    # ----------------------------------------------------------------- driving

    def advance(self, bandwidth: float, dt: float) -> None:
        """Move time forward by dt seconds during which the migration gets `bandwidth` bytes/s."""
        _check_bandwidth(bandwidth)
        if not (dt >= 0 and math.isfinite(dt)):
            raise ValueError(f"dt must be finite and >= 0, got {dt}")
        end = self._now + dt
        while not self.finished:
            left = max(0.0, end - self._now)
            used, event = self._step(bandwidth, left)
            if not event and used >= left:
                self._now = max(self._now, end)
                if left <= 0:
                    break
                # one more zero-length step: a timeout due exactly at `end` fires within this call

    def next_event_in(self, bandwidth: float, *, round_ends: bool = True) -> float:
        """Seconds until this transfer changes state at that bandwidth, inf if it never does.

        State changes are a round end, stop-and-copy or post-copy completion, a switch to post-copy
        or to paused, and a timeout abort. With `round_ends=False` round ends are skipped: they
        change nothing a bandwidth allocator cares about, so an event loop can step further.
        The answer is exact for a constant bandwidth.
        """
        _check_bandwidth(bandwidth)
        if self.finished:
            return math.inf
        probe = copy.copy(self)
        total = 0.0
        steps = 0
        while True:
            phase = probe._phase
            used, event = probe._step(bandwidth, math.inf)
            if math.isinf(used):
                return math.inf
            total += used
            if event and (round_ends or probe._phase != phase):
                return total
            steps += 1
            # Between two round ends a step can stop only at the working-set cap, so without an
            # event in a handful of steps the model is broken, not slow.
            if not event and steps > 16:
                raise RuntimeError("transfer made no progress towards an event; this is a bug")
            if event:
                steps = 0

    def abort(self, now: float, reason: str) -> bool:
        """Cancel the migration (the user deleted the VMIM). Returns whether it was aborted.

        A finished transfer cannot be aborted, and neither can one in post-copy: the guest's state
        already lives on the target, so virt-launcher refuses and the migration runs to completion.
        """
        if self.finished or self._phase == "postcopy":
            return False
        self._now = max(self._now, now)
        self._finish_aborted(reason)
        return True

    # ----------------------------------------------------------------- internals

    def _remaining(self) -> float:
        if self._phase == "completed":
            return 0.0
        return (self._volume - self._round_sent) + self._dirtied

    def _dirty_rate(self) -> float:
        if not self._dirtying or self._phase == "paused":
            return 0.0
        return self.vm.dirty_bytes_per_s * (1.0 - self._throttle)

    def _monitored(self) -> bool:
        """Whether virt-launcher's timeouts apply right now."""
        return self._phase in ("precopy", "paused") and self._switchover_at is None

    def _finish_aborted(self, reason: str) -> None:
        self._phase = "aborted"
        self._aborted_at = self._now
        self._abort_reason = reason

    def _enter_switchover(self) -> None:
        self._switchover_at = self._now
        self._dirtying = False
        self._decision_pending = False

    def _step(self, bandwidth: float, max_dt: float) -> tuple[float, bool]:
        """Advance over one linear segment, at most max_dt. Returns (seconds used, state changed)."""
        if self.finished:
            return (max_dt, False)
        cfg = self.config
        wws = float(self.vm.wws_bytes)

        if self._decision_pending and (bandwidth > 0 or self._volume <= 0):
            self._decision_pending = False
            if self._volume <= bandwidth * cfg.downtime_s:
                self._enter_switchover()
                if self._volume <= 0:
                    return (0.0, self._complete())

        if self._monitored():
            deadline = self.completion_deadline
            if self._phase == "precopy" and cfg.workload_disruption and self._now >= deadline - _TIME_EPS:
                self._assist_completion()
                return (0.0, True)
            if self._now >= self.progress_deadline - _TIME_EPS:
                stuck_for = round(self._now - self._last_progress)
                self._finish_aborted(f"Live migration stuck for {stuck_for} seconds and has been aborted")
                return (0.0, True)
            if self._now >= deadline - _TIME_EPS:
                self._finish_aborted(
                    f"Live migration is not completed after {self._acceptable_s} seconds and has been aborted"
                )
                return (0.0, True)

        dirty_rate = self._dirty_rate()
        unsent = self._volume - self._round_sent
        to_round_end = unsent / bandwidth if bandwidth > 0 else math.inf
        capped = self._dirtied >= wws
        to_cap = (wws - self._dirtied) / dirty_rate if dirty_rate > 0 and not capped else math.inf
        slope = (0.0 if capped else dirty_rate) - bandwidth
        to_deadline = math.inf
        to_stuck = math.inf
        if self._monitored():
            to_deadline = self.completion_deadline - self._now
            to_stuck = self.progress_deadline - self._now
            if slope < 0:
                if cfg.progress_watermark == "previous":
                    first_low = 0.0
                else:
                    first_low = max(0.0, (self._remaining() - self._watermark + _PROGRESS_EPS) / -slope)
                if first_low <= to_stuck:
                    # progress resumes before the progress timeout could fire in this segment
                    to_stuck = math.inf
        seg = min(max_dt, to_round_end, to_cap, to_deadline, to_stuck)
        if math.isinf(seg):
            return (math.inf, False)

        start_remaining = self._remaining()
        # Within a nanosecond of a breakpoint counts as reaching it: otherwise float absorption
        # (now + 1e-15 == now) could leave a sliver of a round that time can no longer move.
        round_end = to_round_end - seg <= _TIME_EPS
        self._now += seg
        if round_end:
            self._sent += unsent
            self._round_sent = self._volume
        else:
            moved = bandwidth * seg
            self._sent += moved
            self._round_sent = min(self._volume, self._round_sent + moved)
        if to_cap - seg <= _TIME_EPS:
            self._dirtied = wws
        elif dirty_rate > 0 and not capped:
            self._dirtied = min(wws, self._dirtied + dirty_rate * seg)
        if seg == to_deadline:
            self._now = self.completion_deadline
        elif seg == to_stuck:
            self._now = self.progress_deadline
        self._note_progress(start_remaining, seg)

        if round_end:
            return (seg, self._end_round(bandwidth))
        return (seg, False)

    def _note_progress(self, start_remaining: float, seg: float) -> None:
        remaining = self._remaining()
        if self.config.progress_watermark == "previous":
            if seg > 0 and remaining < start_remaining - _PROGRESS_EPS * 1e-6:
                self._last_progress = self._now
            self._watermark = remaining
        elif remaining < self._watermark - _PROGRESS_EPS:
            # remaining is linear within a segment, so a new low at its end is the lowest point
            self._watermark = remaining
            self._last_progress = self._now

    def _end_round(self, bandwidth: float) -> bool:
        if self._switchover_at is not None or self._phase == "postcopy":
            return self._complete()
        dirtied = self._dirtied
        elapsed = self._now - self._round_started
        if elapsed > 0:
            self._measured_dirty_rate = dirtied / elapsed
        self._round_started = self._now
        high = dirtied > THROTTLE_TRIGGER * self._volume
        if self.config.allow_auto_converge and self._phase == "precopy" and high:
            self._high_rounds += 1
            if self._high_rounds >= THROTTLE_HIGH_ROUNDS:
                self._high_rounds = 0
                self._throttle = _throttle_step(self._throttle)
        self._round += 1
        self._volume = dirtied
        self._round_sent = 0.0
        self._dirtied = 0.0
        self._decision_pending = True
        if bandwidth > 0 or self._volume <= 0:
            self._decision_pending = False
            if self._volume <= bandwidth * self.config.downtime_s:
                self._enter_switchover()
                if self._volume <= 0:
                    self._complete()
        return True

    def _complete(self) -> bool:
        self._phase = "completed"
        self._completed_at = self._now
        if self._postcopy_at is not None:
            self._downtime = 0.0
        elif self._paused_at is not None:
            self._downtime = self._now - self._paused_at
        else:
            assert self._switchover_at is not None
            self._downtime = self._now - self._switchover_at
        return True

    def _assist_completion(self) -> None:
        """The completion timeout fired and workload disruption is allowed (virt-launcher legacy path)."""
        if self.config.allow_post_copy:
            # Post-copy: every page not yet current on the target crosses exactly once more.
            self._phase = "postcopy"
            self._mode = "PostCopy"
            self._postcopy_at = self._now
            self._volume = min(self._remaining(), float(self.vm.resident_bytes))
            self._round_sent = 0.0
            self._dirtied = 0.0
            self._dirtying = False
            self._decision_pending = False
        else:
            self._phase = "paused"
            self._mode = "Paused"
            self._paused_at = self._now
            self._acceptable_s *= 2


def _check_bandwidth(bandwidth: float) -> None:
    if not (bandwidth >= 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be finite and >= 0 bytes/s, got {bandwidth}")


# --------------------------------------------------------------------------- bandwidth sharing


@dataclass(frozen=True)
class Flow:
    """One migration's data stream from a source node's NIC to a target node's NIC."""

    source: str
    target: str
    cap: float = math.inf
    """Per-flow cap in bytes/s (bandwidthPerMigration, single-stream cap); inf if none."""


def fair_share(
    flows: Sequence[Flow], *, egress: Mapping[str, float], ingress: Mapping[str, float]
) -> list[float]:
    """Max-min fair rates (progressive filling) for `flows`, in the same order.

    `egress` / `ingress` are each node's capacity available to migrations in bytes/s (full duplex,
    so they are separate resources). All unfrozen flows rise together; a flow freezes when it hits
    its cap or when a NIC it uses saturates. A flow limited by nothing gets inf.
    """
    n = len(flows)
    rates = [0.0] * n
    if n == 0:
        return rates
    left: dict[tuple[str, str], float] = {}
    initial: dict[tuple[str, str], float] = {}
    members: dict[tuple[str, str], list[int]] = {}
    for i, flow in enumerate(flows):
        if not flow.cap >= 0:
            raise ValueError(f"flows[{i}].cap must be >= 0, got {flow.cap}")
        for kind, node, table in (("egress", flow.source, egress), ("ingress", flow.target, ingress)):
            key = (kind, node)
            if key not in left:
                if node not in table:
                    raise ValueError(f"flows[{i}]: no {kind} capacity given for node {node!r}")
                capacity = float(table[node])
                if not capacity >= 0:
                    raise ValueError(f"{kind} capacity of node {node!r} must be >= 0, got {capacity}")
                left[key] = capacity
                initial[key] = capacity
                members[key] = []
            members[key].append(i)

    active = [True] * n
    count = {key: len(idx) for key, idx in members.items()}
    by_cap = sorted(range(n), key=lambda i: flows[i].cap)
    cap_pos = 0
    n_active = n
    level = 0.0
    while n_active:
        while cap_pos < n and not active[by_cap[cap_pos]]:
            cap_pos += 1
        step = flows[by_cap[cap_pos]].cap - level if cap_pos < n else math.inf
        for key, cnt in count.items():
            if cnt:
                step = min(step, left[key] / cnt)
        if math.isinf(step):
            for i in range(n):
                if active[i]:
                    rates[i] = math.inf
            break
        step = max(step, 0.0)
        level += step
        frozen: list[int] = []
        for key, cnt in count.items():
            if cnt:
                left[key] -= step * cnt
                # the resource that set `step` lands on zero up to rounding
                if left[key] <= 1e-9 * initial[key]:
                    left[key] = 0.0
                    frozen.extend(i for i in members[key] if active[i])
        while cap_pos < n and flows[by_cap[cap_pos]].cap <= level * (1 + 1e-12):
            frozen.append(by_cap[cap_pos])
            cap_pos += 1
        for i in frozen:
            if active[i]:
                active[i] = False
                n_active -= 1
                rates[i] = min(level, flows[i].cap)
                for key in (("egress", flows[i].source), ("ingress", flows[i].target)):
                    count[key] -= 1
    return rates


# --------------------------------------------------------------------------- closed forms


@dataclass(frozen=True)
class PrecopyEstimate:
    """Pre-copy at a constant bandwidth (migration-model.md 1.2, with the WWS cap)."""

    converges: bool
    rounds: int
    """Index n of the stop-and-copy round: n rounds ran with the guest live (0 if it does not converge)."""
    volume_bytes: float
    """Total bytes sent, sum of V_0..V_n; inf if it does not converge."""
    duration_s: float
    """Transfer time volume / bandwidth (no setup or cleanup); inf if it does not converge."""
    downtime_s: float
    """Stop-and-copy time V_n / bandwidth; inf if it does not converge."""


def precopy_estimate(
    vm: VMPhysics, *, bandwidth: float, downtime_s: float, auto_converge: bool = False
) -> PrecopyEstimate:
    """Pre-copy volume, duration and downtime of `vm` at a constant `bandwidth`.

    Runs the round recurrence V_0 = R, V_(i+1) = min(D_eff x V_i / B, W) and stops at the first n
    with V_n <= B x downtime_s, exactly as `Transfer` does (same arithmetic, same auto-converge
    rule when `auto_converge`). Without auto-converge it converges iff D < B or W <= B x downtime_s.
    """
    if not bandwidth >= 0:
        raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
    never = PrecopyEstimate(converges=False, rounds=0, volume_bytes=math.inf, duration_s=math.inf,
                            downtime_s=math.inf)
    resident = float(vm.resident_bytes)
    if resident <= 0:
        return PrecopyEstimate(converges=True, rounds=0, volume_bytes=0.0, duration_s=0.0, downtime_s=0.0)
    if bandwidth <= 0:
        return never
    if math.isinf(bandwidth):
        return PrecopyEstimate(converges=True, rounds=0, volume_bytes=resident, duration_s=0.0,
                               downtime_s=0.0)
    threshold = bandwidth * downtime_s
    wws = float(vm.wws_bytes)
    dirty = vm.dirty_bytes_per_s
    if not auto_converge and dirty >= bandwidth and wws > threshold:
        return never
    throttle = 0.0
    high = 0
    volume = resident
    total = 0.0
    n = 0
    while volume > threshold:
        total += volume
        dirtied = min(wws, dirty * (1.0 - throttle) * (volume / bandwidth))
        if auto_converge and dirtied > THROTTLE_TRIGGER * volume:
            high += 1
            if high >= THROTTLE_HIGH_ROUNDS:
                high = 0
                throttle = _throttle_step(throttle)
        elif auto_converge and throttle >= THROTTLE_MAX and dirtied >= volume:
            return never  # 99 % throttling is not enough: the dirty set no longer shrinks
        volume = dirtied
        n += 1
        if volume <= 0:
            break
    total += volume
    return PrecopyEstimate(converges=True, rounds=n, volume_bytes=total, duration_s=total / bandwidth,
                           downtime_s=volume / bandwidth)


@dataclass(frozen=True)
class LBVm:
    """One VM to drain, as the lower bound sees it."""

    source: str
    resident_bytes: int
    dirty_bytes_per_s: float
    wws_bytes: int
    memory_bytes: int
    best_bandwidth: float
    """b*_i = min(per-flow cap, source egress, best target ingress) in bytes/s."""


@dataclass(frozen=True)
class LowerBound:
    """Makespan lower bounds of a drain (migration-model.md 3.3); seconds unless named otherwise."""

    phys: float
    """max(B1, B2, B4) with V_i = R_i: no algorithm, pre-copy or post-copy, beats it."""
    precopy: float
    """The same maxima with pre-copy volumes V*_i; inf if some VM cannot converge by pre-copy."""
    egress_phys: float
    ingress_phys: float
    longest_phys: float
    egress_precopy: float
    ingress_precopy: float
    longest_precopy: float
    busiest_source: str | None
    """The source node that sets the physical egress bound B1."""
    resident_bytes: float
    """sum R_i."""
    precopy_volume_bytes: float
    """sum V*_i (inf if some VM cannot converge)."""
    non_converging: int
    """VMs whose pre-copy never converges at their best bandwidth."""


def drain_lower_bound(
    vms: Sequence[LBVm],
    *,
    egress: Mapping[str, float],
    ingress_total: float,
    setup_s: float,
    cleanup_s: float,
    downtime_s: float,
    allow_auto_converge: bool = False,
    allow_post_copy: bool = False,
) -> LowerBound:
    """Lower bounds B1 (source egress), B2 (target ingress) and B4 (longest job) of a drain.

    B1 = max_n [a + sum_{i@n} V_i / E_n + z], B2 = a + sum_i V_i / sum_t G_t + z,
    B4 = max_i [a + V_i / b*_i + z], with a = setup_s and z = cleanup_s the same for every VM.
    B2 adds z like B1 does: the VM whose last byte arrives last still needs its cleanup.
    Pre-copy volumes V*_i come from `precopy_estimate` at b*_i. A VM that cannot converge counts
    R_i instead when auto-converge or post-copy could finish it, else makes the pre-copy bound inf;
    with auto-converge allowed every VM counts R_i (throttling can only shrink volumes).
    """
    if not vms:
        return LowerBound(phys=0.0, precopy=0.0, egress_phys=0.0, ingress_phys=0.0, longest_phys=0.0,
                          egress_precopy=0.0, ingress_precopy=0.0, longest_precopy=0.0, busiest_source=None,
                          resident_bytes=0.0, precopy_volume_bytes=0.0, non_converging=0)
    phys_by_node: dict[str, float] = {}
    pre_by_node: dict[str, float] = {}
    longest_phys = 0.0
    longest_pre = 0.0
    non_converging = 0
    for i, vm in enumerate(vms):
        if vm.source not in egress:
            raise ValueError(f"vms[{i}]: no egress capacity given for source node {vm.source!r}")
        b = vm.best_bandwidth
        resident = float(vm.resident_bytes)
        est = precopy_estimate(
            VMPhysics(memory_bytes=vm.memory_bytes, resident_bytes=vm.resident_bytes,
                      dirty_bytes_per_s=vm.dirty_bytes_per_s, wws_bytes=vm.wws_bytes),
            bandwidth=b, downtime_s=downtime_s,
        )
        if not est.converges:
            non_converging += 1
        finishable = allow_auto_converge or (not est.converges and allow_post_copy)
        volume = resident if finishable else est.volume_bytes
        phys_by_node[vm.source] = phys_by_node.get(vm.source, 0.0) + resident
        pre_by_node[vm.source] = pre_by_node.get(vm.source, 0.0) + volume
        longest_phys = max(longest_phys, setup_s + _div(resident, b) + cleanup_s)
        longest_pre = max(longest_pre, setup_s + _div(volume, b) + cleanup_s)

    def egress_bound(by_node: Mapping[str, float]) -> tuple[float, str | None]:
        best, who = 0.0, None
        for node in sorted(by_node):
            value = setup_s + _div(by_node[node], float(egress[node])) + cleanup_s
            if who is None or value > best:
                best, who = value, node
        return best, who

    egress_phys, busiest = egress_bound(phys_by_node)
    egress_pre, _ = egress_bound(pre_by_node)
    resident_total = sum(phys_by_node.values())
    pre_total = sum(pre_by_node.values())
    ingress_phys = setup_s + _div(resident_total, ingress_total) + cleanup_s
    ingress_pre = setup_s + _div(pre_total, ingress_total) + cleanup_s
    return LowerBound(
        phys=max(egress_phys, ingress_phys, longest_phys),
        precopy=max(egress_pre, ingress_pre, longest_pre),
        egress_phys=egress_phys,
        ingress_phys=ingress_phys,
        longest_phys=longest_phys,
        egress_precopy=egress_pre,
        ingress_precopy=ingress_pre,
        longest_precopy=longest_pre,
        busiest_source=busiest,
        resident_bytes=resident_total,
        precopy_volume_bytes=pre_total,
        non_converging=non_converging,
    )


def _div(volume: float, rate: float) -> float:
    """volume / rate where nothing to send takes no time and a zero rate takes forever."""
    if volume <= 0:
        return 0.0
    if rate <= 0:
        return math.inf
    return volume / rate
