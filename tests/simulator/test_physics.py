"""The live-migration physics: closed forms, Transfer, the monitor's timeouts, fair sharing, lower bounds."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from simulator.physics import (
    GB,
    GIB,
    Flow,
    LBVm,
    LowerBound,
    MonitorConfig,
    Transfer,
    VMPhysics,
    acceptable_completion_s,
    drain_lower_bound,
    fair_share,
    precopy_estimate,
)

GBE10 = 10e9 / 8 * 0.9  # 10 GbE at 90 % efficiency, bytes/s
GBE25 = 25e9 / 8 * 0.9
GBE100 = 100e9 / 8 * 0.9
MB = 1e6


def vm(mem_gib: float, *, resident: float = 0.7, dirty: float = 0.0, wws: float = 0.3) -> VMPhysics:
    memory = int(mem_gib * GIB)
    r = int(memory * resident)
    w = min(r, int(memory * wws))
    return VMPhysics(memory_bytes=memory, resident_bytes=r, dirty_bytes_per_s=dirty, wws_bytes=w)


def run(transfer: Transfer, bandwidth: float, *, horizon: float = 1e6) -> Transfer:
    transfer.advance(bandwidth, horizon)
    return transfer


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    ("resident", "dirty", "bandwidth", "downtime"),
    [
        (10 * GB, 100 * MB, 1 * GB, 0.3),      # rho 0.1
        (40 * GB, 500 * MB, 1.125 * GB, 0.3),  # rho 0.44
        (40 * GB, 900 * MB, 1.125 * GB, 0.3),  # rho 0.8, many rounds
        (64 * GB, 2.5 * GB, 2.8125 * GB, 0.3),  # rho 0.89
        (5 * GB, 10 * MB, 11.25 * GB, 0.5),    # fits the threshold after one round
        (200 * MB, 1 * GB, 1.125 * GB, 0.3),   # fits the threshold at once: n = 0
    ],
)
def test_precopy_estimate_matches_geometric_closed_form(
    resident: float, dirty: float, bandwidth: float, downtime: float
) -> None:
    # W = R so the working-set cap never binds and the textbook geometric model applies exactly
    phys = VMPhysics(memory_bytes=int(resident), resident_bytes=int(resident), dirty_bytes_per_s=dirty,
                     wws_bytes=int(resident))
    est = precopy_estimate(phys, bandwidth=bandwidth, downtime_s=downtime)
    m, rho, v_th = float(int(resident)), dirty / bandwidth, bandwidth * downtime
    n = max(0, math.ceil(math.log(v_th / m) / math.log(rho)))
    volume = m * (1 - rho ** (n + 1)) / (1 - rho)
    assert est.converges
    assert est.rounds == n
    assert est.volume_bytes == pytest.approx(volume, rel=1e-9)
    assert est.duration_s == pytest.approx(volume / bandwidth, rel=1e-9)
    assert est.downtime_s == pytest.approx(m * rho**n / bandwidth, rel=1e-9)
    assert est.downtime_s <= downtime + 1e-12


@pytest.mark.parametrize(
    ("mem_gib", "dirty", "bandwidth", "expected_s", "expected_rounds"),
    [
        # migration-model.md 1.2 "model outputs for orientation" (70 % resident, WWS 30 %, eta 0.9)
        (4, 5 * MB, GBE10, 2.7, None),
        (16, 40 * MB, GBE10, 11.1, None),
        (64, 200 * MB, GBE10, 52.0, 3),
        (64, 200 * MB, GBE25, 18.0, None),
        (64, 1.2 * GB, GBE25, 30.0, 5),
    ],
)
def test_precopy_estimate_reproduces_the_reference_table(
    mem_gib: int, dirty: float, bandwidth: float, expected_s: float, expected_rounds: int | None
) -> None:
    est = precopy_estimate(vm(mem_gib, dirty=dirty), bandwidth=bandwidth, downtime_s=0.3)
    assert est.converges
    assert est.duration_s == pytest.approx(expected_s, rel=0.06)
    if expected_rounds is not None:
        assert est.rounds == expected_rounds


@pytest.mark.parametrize(
    ("dirty", "wws_bytes", "bandwidth", "converges"),
    [
        (0.5 * GB, 4 * GB, 1 * GB, True),     # D < B
        (2.0 * GB, 0.25 * GB, 1 * GB, True),  # D > B but the WWS fits the threshold (0.3 GB)
        (2.0 * GB, 0.35 * GB, 1 * GB, False),  # D > B and W > B x d
        (1.0 * GB, 4 * GB, 1 * GB, False),    # D == B does not shrink
    ],
)
def test_convergence_iff_dirty_below_bandwidth_or_wws_fits(
    dirty: float, wws_bytes: float, bandwidth: float, converges: bool
) -> None:
    phys = VMPhysics(memory_bytes=8 * GB, resident_bytes=6 * GB, dirty_bytes_per_s=dirty, wws_bytes=int(wws_bytes))
    est = precopy_estimate(phys, bandwidth=bandwidth, downtime_s=0.3)
    assert est.converges is converges
    if not converges:
        assert math.isinf(est.volume_bytes) and math.isinf(est.duration_s)


def test_wws_caps_the_dirty_set_when_dirty_rate_exceeds_bandwidth() -> None:
    # D > B but W <= threshold: round 1 sends exactly W and fits the switchover budget
    phys = VMPhysics(memory_bytes=8 * GB, resident_bytes=6 * GB, dirty_bytes_per_s=3 * GB, wws_bytes=int(0.2 * GB))
    est = precopy_estimate(phys, bandwidth=1 * GB, downtime_s=0.3)
    assert est.rounds == 1
    assert est.volume_bytes == pytest.approx(6.2 * GB)
    assert est.downtime_s == pytest.approx(0.2)


def test_zero_bandwidth_never_converges() -> None:
    assert not precopy_estimate(vm(4, dirty=1 * MB), bandwidth=0.0, downtime_s=0.3).converges


def test_acceptable_completion_rounds_up_to_decimal_gigabytes() -> None:
    assert acceptable_completion_s(4 * GIB, 150) == 750  # 4.29 GB -> 5 (kubevirt.md 3.5)
    assert acceptable_completion_s(1 * GB, 150) == 150
    assert acceptable_completion_s(8 * GIB, 20) == 180


@pytest.mark.parametrize(
    ("post_copy", "disruption", "expected"),
    [(False, None, False), (True, None, True), (True, False, False), (False, True, True)],
)
def test_workload_disruption_inherits_post_copy(post_copy: bool, disruption: bool | None, expected: bool) -> None:
    cfg = MonitorConfig(allow_post_copy=post_copy, allow_workload_disruption=disruption)
    assert cfg.workload_disruption is expected


# --------------------------------------------------------------------------- Transfer vs the closed form

AGREEMENT_CASES = [
    ("idle 4GiB 10GbE", vm(4, dirty=5 * MB), GBE10, False),
    ("web 16GiB 10GbE", vm(16, dirty=40 * MB), GBE10, False),
    ("db 64GiB 10GbE", vm(64, dirty=200 * MB), GBE10, False),
    ("hot 64GiB 25GbE", vm(64, dirty=1.2 * GB), GBE25, False),
    ("wws-capped 32GiB", vm(32, resident=0.9, dirty=2 * GB, wws=0.005), GBE25, False),
    ("rho 0.95", vm(8, resident=0.9, dirty=0.95 * GBE10, wws=0.9), GBE10, False),
    ("auto-converge D>B", vm(8, resident=0.9, dirty=2 * GB, wws=0.4), GBE10, True),
    ("auto-converge 100G", vm(64, dirty=12 * GB, wws=0.5), GBE100, True),
]


@pytest.mark.parametrize(("label", "phys", "bandwidth", "auto"), AGREEMENT_CASES, ids=[c[0] for c in AGREEMENT_CASES])
@pytest.mark.parametrize("stepping", ["one-call", "events", "fixed-0.37s"])
def test_transfer_agrees_with_precopy_estimate(
    label: str, phys: VMPhysics, bandwidth: float, auto: bool, stepping: str
) -> None:
    est = precopy_estimate(phys, bandwidth=bandwidth, downtime_s=0.3, auto_converge=auto)
    assert est.converges, label
    cfg = MonitorConfig(allow_auto_converge=auto, completion_timeout_per_gib=0, progress_timeout_s=0)
    t = Transfer(phys, cfg, started_at=1000.0)
    if stepping == "one-call":
        t.advance(bandwidth, 1e6)
    elif stepping == "events":
        for _ in range(100_000):
            if t.finished:
                break
            t.advance(bandwidth, t.next_event_in(bandwidth))
    else:
        while not t.finished:
            t.advance(bandwidth, 0.37)
    assert t.phase == "completed"
    assert t.completed_at is not None and t.downtime_s is not None
    assert t.completed_at - 1000.0 == pytest.approx(est.duration_s, rel=1e-9)
    assert t.bytes_sent == pytest.approx(est.volume_bytes, rel=1e-9, abs=2)
    assert t.round == est.rounds
    assert t.downtime_s == pytest.approx(est.downtime_s, rel=1e-6, abs=1e-9)
    assert t.downtime_s <= 0.3 + 1e-9


def test_next_event_in_reports_round_ends_then_completion() -> None:
    phys = vm(64, dirty=200 * MB)
    t = Transfer(phys, MonitorConfig(), started_at=0.0)
    first = t.next_event_in(GBE10)
    assert first == pytest.approx(phys.resident_bytes / GBE10)  # round 0 ends
    t.advance(GBE10, first)
    assert t.round == 1 and t.phase == "precopy"
    assert t.next_event_in(GBE10) == pytest.approx(t.data_remaining / GBE10, rel=1e-6)


def test_next_event_in_can_skip_round_ends() -> None:
    phys = vm(64, dirty=200 * MB)
    est = precopy_estimate(phys, bandwidth=GBE10, downtime_s=0.3)
    t = Transfer(phys, MonitorConfig(), started_at=0.0)
    assert t.next_event_in(GBE10, round_ends=False) == pytest.approx(est.duration_s, rel=1e-9)
    hot = Transfer(HOT_8GIB, MonitorConfig(), started_at=0.0)
    assert hot.next_event_in(GBE10, round_ends=False) == pytest.approx(HOT_8GIB.resident_bytes / GBE10 + 150.0)
    assert hot.phase == "precopy" and hot.bytes_sent == 0  # asking changes nothing


def test_data_remaining_falls_while_converging() -> None:
    t = Transfer(vm(16, dirty=40 * MB), MonitorConfig(), started_at=0.0)
    seen = [t.data_remaining]
    while not t.finished:
        t.advance(GBE10, 0.5)
        seen.append(t.data_remaining)
    assert all(b <= a for a, b in itertools.pairwise(seen))
    assert seen[-1] == 0


def test_zero_bandwidth_moves_nothing_and_trips_the_progress_timeout() -> None:
    t = Transfer(vm(4, dirty=5 * MB), MonitorConfig(), started_at=10.0)
    assert t.next_event_in(0.0) == pytest.approx(150.0)
    t.advance(0.0, 149.0)
    assert (t.phase, t.bytes_sent) == ("precopy", 0)
    t.advance(0.0, 10.0)
    assert t.phase == "aborted"
    assert t.aborted_at == pytest.approx(160.0)
    assert t.abort_reason == "Live migration stuck for 150 seconds and has been aborted"


def test_bandwidth_change_mid_round_is_honoured() -> None:
    phys = vm(4, dirty=0.0)
    t = Transfer(phys, MonitorConfig(), started_at=0.0)
    t.advance(GBE10, 1.0)
    t.advance(GBE10 / 2, 1.0)
    assert t.bytes_sent == pytest.approx(1.5 * GBE10, abs=2)


# --------------------------------------------------------------------------- the monitor's timeouts

HOT_8GIB = VMPhysics(memory_bytes=8 * GIB, resident_bytes=7 * GIB, dirty_bytes_per_s=2 * GB, wws_bytes=3 * GIB)
HOT_1GB = VMPhysics(memory_bytes=1 * GB, resident_bytes=900 * 10**6, dirty_bytes_per_s=2 * GB,
                    wws_bytes=500 * 10**6)


def test_non_converging_vm_is_stuck_after_its_first_round_with_default_monitor() -> None:
    # D > B and W > B x d: after round 0 the pending data returns to W every round, never lower,
    # so the progress timeout (150 s) fires long before the completion timeout (9 GB x 150 = 1350 s).
    assert not precopy_estimate(HOT_8GIB, bandwidth=GBE10, downtime_s=0.3).converges
    t = run(Transfer(HOT_8GIB, MonitorConfig(), started_at=0.0), GBE10)
    assert t.phase == "aborted"
    assert t.abort_reason == "Live migration stuck for 150 seconds and has been aborted"
    assert t.aborted_at == pytest.approx(HOT_8GIB.resident_bytes / GBE10 + 150.0)
    assert t.round > 10  # it kept sending: no iteration cap
    assert t.bytes_sent > HOT_8GIB.resident_bytes * 5


def test_small_non_converging_vm_hits_the_completion_timeout_first() -> None:
    # 1 GB -> 150 s allowed; round 0 ends at 0.8 s, so the progress timeout would fire at 150.8 s
    t = run(Transfer(HOT_1GB, MonitorConfig(), started_at=0.0), GBE10)
    assert t.abort_reason == "Live migration is not completed after 150 seconds and has been aborted"
    assert t.aborted_at == pytest.approx(150.0)


def test_previous_sample_watermark_leaves_only_the_completion_timeout() -> None:
    cfg = MonitorConfig(progress_watermark="previous")
    t = run(Transfer(HOT_8GIB, cfg, started_at=5.0), GBE10)
    assert t.abort_reason == "Live migration is not completed after 1350 seconds and has been aborted"
    assert t.aborted_at == pytest.approx(1355.0)


def test_post_copy_at_the_completion_timeout_completes() -> None:
    cfg = MonitorConfig(allow_post_copy=True)
    t = Transfer(HOT_1GB, cfg, started_at=0.0)
    t.advance(GBE10, 150.0)
    assert (t.phase, t.mode) == ("postcopy", "PostCopy")
    assert t.postcopy_started_at == pytest.approx(150.0)
    pending = t.data_remaining
    assert 0 < pending <= HOT_1GB.resident_bytes
    assert t.abort(151.0, "Live migration aborted ") is False  # post-copy cannot be aborted
    t.advance(GBE10, 1000.0)
    assert t.phase == "completed"
    assert t.completed_at == pytest.approx(150.0 + pending / GBE10, rel=1e-6)
    assert t.downtime_s == 0.0


def test_post_copy_needs_workload_disruption() -> None:
    cfg = MonitorConfig(allow_post_copy=True, allow_workload_disruption=False)
    t = run(Transfer(HOT_1GB, cfg, started_at=0.0), GBE10)
    assert t.abort_reason == "Live migration is not completed after 150 seconds and has been aborted"


def test_pause_at_the_completion_timeout_stops_dirtying_and_completes() -> None:
    cfg = MonitorConfig(allow_workload_disruption=True)
    t = Transfer(HOT_1GB, cfg, started_at=0.0)
    t.advance(GBE10, 150.0)
    assert (t.phase, t.mode) == ("paused", "Paused")
    assert t.acceptable_completion_s == 300
    t.advance(GBE10, 100.0)
    assert t.phase == "completed"
    assert t.completed_at is not None and t.paused_at is not None and t.downtime_s is not None
    assert t.downtime_s == pytest.approx(t.completed_at - t.paused_at)
    assert 0 < t.downtime_s < 2 * HOT_1GB.wws_bytes / GBE10 + 1e-9


def test_paused_migration_that_still_cannot_finish_is_aborted_at_double_the_time() -> None:
    cfg = MonitorConfig(allow_workload_disruption=True, progress_timeout_s=0)
    t = Transfer(HOT_1GB, cfg, started_at=0.0)
    t.advance(GBE10, 150.0)
    assert t.phase == "paused"
    t.advance(0.0, 1000.0)  # the network dies while paused
    assert t.abort_reason == "Live migration is not completed after 300 seconds and has been aborted"
    assert t.aborted_at == pytest.approx(300.0)


def test_auto_converge_lets_a_vm_dirtying_faster_than_the_link_converge() -> None:
    phys = vm(8, resident=0.9, dirty=2 * GB, wws=0.4)
    assert not precopy_estimate(phys, bandwidth=GBE10, downtime_s=0.3).converges
    t = run(Transfer(phys, MonitorConfig(allow_auto_converge=True), started_at=0.0), GBE10)
    assert t.phase == "completed"
    # it had to throttle the guest below B/D = 56 %: at least 50 % (20 % + 3 steps)
    assert t.throttle >= 0.5
    assert t.downtime_s is not None and t.downtime_s <= 0.3


def test_user_abort() -> None:
    t = Transfer(vm(16, dirty=40 * MB), MonitorConfig(), started_at=0.0)
    t.advance(GBE10, 2.0)
    assert t.abort(2.0, "Live migration aborted ") is True
    assert (t.phase, t.abort_reason, t.aborted_at) == ("aborted", "Live migration aborted ", 2.0)
    sent = t.bytes_sent
    t.advance(GBE10, 10.0)
    assert t.bytes_sent == sent
    assert t.abort(3.0, "again") is False
    assert math.isinf(t.next_event_in(GBE10))


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="wws_bytes"):
        VMPhysics(memory_bytes=10, resident_bytes=5, dirty_bytes_per_s=1.0, wws_bytes=6)
    with pytest.raises(ValueError, match="bandwidth"):
        Transfer(vm(1), MonitorConfig(), started_at=0.0).advance(-1.0, 1.0)


# --------------------------------------------------------------------------- fair sharing


def test_two_flows_on_one_source_nic_each_get_half() -> None:
    rates = fair_share([Flow("a", "b"), Flow("a", "c")], egress={"a": 10.0}, ingress={"b": 100.0, "c": 100.0})
    assert rates == [pytest.approx(5.0), pytest.approx(5.0)]


def test_a_capped_flow_leaves_the_rest_to_the_other() -> None:
    rates = fair_share([Flow("a", "b", cap=2.0), Flow("a", "c")], egress={"a": 10.0},
                       ingress={"b": 100.0, "c": 100.0})
    assert rates == [pytest.approx(2.0), pytest.approx(8.0)]


def test_ingress_limits_and_frees_source_capacity() -> None:
    # a->t and b->t share t's ingress (6 -> 3 each); a->u gets what a has left (10 - 3)
    flows = [Flow("a", "t"), Flow("b", "t"), Flow("a", "u")]
    rates = fair_share(flows, egress={"a": 10.0, "b": 10.0}, ingress={"t": 6.0, "u": 100.0})
    assert rates == [pytest.approx(3.0), pytest.approx(3.0), pytest.approx(7.0)]


def test_unconstrained_flow_gets_infinite_rate_and_missing_node_is_an_error() -> None:
    inf = math.inf
    assert fair_share([Flow("a", "b")], egress={"a": inf}, ingress={"b": inf}) == [inf]
    assert fair_share([], egress={}, ingress={}) == []
    with pytest.raises(ValueError, match="ingress capacity given for node 'b'"):
        fair_share([Flow("a", "b")], egress={"a": 1.0}, ingress={})


def test_fair_share_is_feasible_and_max_min_fair_on_a_random_fabric() -> None:
    rng = random.Random(7)
    nodes = [f"n{i}" for i in range(60)]
    egress = {n: rng.choice([1.25e9, 3.125e9, 12.5e9]) for n in nodes}
    ingress = {n: rng.choice([1.25e9, 3.125e9, 12.5e9]) for n in nodes}
    flows = []
    for _ in range(400):
        s, t = rng.sample(nodes, 2)
        flows.append(Flow(s, t, cap=rng.choice([math.inf, math.inf, 0.8e9, 1.6e9])))
    rates = fair_share(flows, egress=egress, ingress=ingress)
    used_e: dict[str, float] = {}
    used_i: dict[str, float] = {}
    for f, r in zip(flows, rates, strict=True):
        assert 0 <= r <= f.cap * (1 + 1e-9)
        used_e[f.source] = used_e.get(f.source, 0.0) + r
        used_i[f.target] = used_i.get(f.target, 0.0) + r
    for n, u in used_e.items():
        assert u <= egress[n] * (1 + 1e-9)
    for n, u in used_i.items():
        assert u <= ingress[n] * (1 + 1e-9)
    # max-min: every flow is at its cap or crosses a saturated NIC where nobody gets more than it
    for f, r in zip(flows, rates, strict=True):
        if r >= f.cap * (1 - 1e-9):
            continue
        bottleneck = False
        if used_e[f.source] >= egress[f.source] * (1 - 1e-9):
            peers = [q for g, q in zip(flows, rates, strict=True) if g.source == f.source]
            bottleneck |= max(peers) <= r * (1 + 1e-9)
        if used_i[f.target] >= ingress[f.target] * (1 - 1e-9):
            peers = [q for g, q in zip(flows, rates, strict=True) if g.target == f.target]
            bottleneck |= max(peers) <= r * (1 + 1e-9)
        assert bottleneck, f


# --------------------------------------------------------------------------- lower bounds


def test_drain_lower_bound_terms() -> None:
    a, z = 10.0, 2.0
    vms = [
        LBVm("n1", resident_bytes=20 * GB, dirty_bytes_per_s=0.0, wws_bytes=0, memory_bytes=32 * GB,
             best_bandwidth=2 * GB),
        LBVm("n1", resident_bytes=10 * GB, dirty_bytes_per_s=0.0, wws_bytes=0, memory_bytes=16 * GB,
             best_bandwidth=2 * GB),
        LBVm("n2", resident_bytes=4 * GB, dirty_bytes_per_s=0.0, wws_bytes=0, memory_bytes=8 * GB,
             best_bandwidth=1 * GB),
    ]
    lb = drain_lower_bound(vms, egress={"n1": 2 * GB, "n2": 1 * GB}, ingress_total=1 * GB, setup_s=a,
                           cleanup_s=z, downtime_s=0.3)
    assert lb.egress_phys == pytest.approx(a + 15 + z)  # n1: 30 GB at 2 GB/s (n2: 4 GB at 1 GB/s)
    assert lb.busiest_source == "n1"
    assert lb.ingress_phys == pytest.approx(a + 34 + z)  # everything through 1 GB/s of ingress
    assert lb.longest_phys == pytest.approx(a + 10 + z)
    assert lb.phys == pytest.approx(46.0)
    # nothing is dirtied, so pre-copy volumes equal resident memory
    assert lb.precopy == pytest.approx(lb.phys)


def test_precopy_bound_exceeds_physical_and_is_infinite_without_convergence() -> None:
    ok = LBVm("n1", resident_bytes=40 * GB, dirty_bytes_per_s=1 * GB, wws_bytes=20 * GB, memory_bytes=64 * GB,
              best_bandwidth=2.8125 * GB)
    hot = LBVm("n1", resident_bytes=7 * GB, dirty_bytes_per_s=5 * GB, wws_bytes=3 * GB, memory_bytes=8 * GB,
               best_bandwidth=2.8125 * GB)
    def bound(vms: list[LBVm], *, post_copy: bool = False, auto_converge: bool = False) -> LowerBound:
        return drain_lower_bound(vms, egress={"n1": 2.8125 * GB}, ingress_total=90 * GB, setup_s=5.0,
                                 cleanup_s=2.0, downtime_s=0.3, allow_post_copy=post_copy,
                                 allow_auto_converge=auto_converge)

    lb = bound([ok])
    assert lb.precopy > lb.phys
    lb = bound([ok, hot])
    assert math.isinf(lb.precopy) and lb.non_converging == 1
    lb_pc = bound([ok, hot], post_copy=True)
    assert math.isfinite(lb_pc.precopy) and lb_pc.precopy > lb_pc.phys
    lb_ac = bound([ok, hot], auto_converge=True)
    assert lb_ac.precopy == pytest.approx(lb_ac.phys)


def test_lower_bound_never_exceeds_a_simulated_single_migration() -> None:
    phys = vm(64, dirty=200 * MB)
    lb = drain_lower_bound(
        [LBVm("n1", phys.resident_bytes, phys.dirty_bytes_per_s, phys.wws_bytes, phys.memory_bytes, GBE10)],
        egress={"n1": GBE10}, ingress_total=GBE10 * 10, setup_s=10.0, cleanup_s=2.0, downtime_s=0.3,
    )
    t = run(Transfer(phys, MonitorConfig(), started_at=10.0), GBE10)
    assert t.completed_at is not None
    assert lb.precopy == pytest.approx(t.completed_at + 2.0, rel=1e-9)
    assert lb.phys < lb.precopy
