"""Tuned limits for a drain's window (orchestrator.tuning): pure, table by table."""

from __future__ import annotations

import pytest

from orchestrator.model import DrainRequest, NodeName
from orchestrator.planner import plan_drain
from orchestrator.settings import EstimateModel, Settings
from orchestrator.snapshot import migration_transfer_s
from orchestrator.tuning import (
    TransferSample,
    TuneVm,
    needed_share,
    node_time_s,
    observed_bandwidth,
    transfer_sample,
    tune,
)
from tests.orchestrator import factories as f

GB = 10**9
NIC = 2.8e9  # 25 GbE at 90 %


def vms(node: str, count: int, memory: int = 8 * GB, dirty: float | None = None, wws: int | None = None,
        prefix: str = "vm") -> list[TuneVm]:
    return [TuneVm(vmi=f"ns/{prefix}-{node}-{i}", node=node, memory_bytes=memory, dirty_bytes_per_s=dirty,
                   wws_bytes=wws) for i in range(count)]


@pytest.mark.parametrize(("vm", "expected"), [
    # unknown dirty rate: the floor
    (TuneVm("ns/a", "n", GB), 125e6),
    # twice the dirty rate
    (TuneVm("ns/a", "n", GB, dirty_bytes_per_s=400e6), 800e6),
    # a working set that fits the downtime budget at the floor needs no more than the floor
    (TuneVm("ns/a", "n", GB, dirty_bytes_per_s=900e6, wws_bytes=30_000_000), 125e6),
    # a slow dirtier still gets the floor
    (TuneVm("ns/a", "n", GB, dirty_bytes_per_s=1e6), 125e6),
])
def test_needed_share(vm: TuneVm, expected: float) -> None:
    assert needed_share(vm, min_share=125e6) == pytest.approx(expected)


@pytest.mark.parametrize(("case", "node_vms", "bandwidth", "max_per_node", "parallel", "limited_by"), [
    # setup dominates: setups would add 40*12 s / 8 = 60 s to 114 s of NIC time; the cap (8) holds it there
    # (a quarter of the NIC time would need 40*12 / (0.25 * 114) -> 17 at once)
    ("setup-bound", vms("n", 40), NIC, 8, 8, None),
    # a higher cap: the quarter rule decides
    ("setup-bound, cap 32", vms("n", 40), NIC, 32, 17, None),
    # the cap wins
    ("capped", vms("n", 40), NIC, 3, 3, None),
    # never more at once than VMs on the node
    ("few VMs", vms("n", 2), NIC, 8, 2, None),
    # a VM that dirties 700 MB/s needs 1.4 GB/s: two at once on this NIC
    ("hot VM", vms("n", 39) + vms("n", 1, dirty=700e6, prefix="hot"), NIC, 8, 2, "ns/hot-n-0"),
    # on a 10 GbE NIC the hot VM needs the whole NIC
    ("hot VM, 10 GbE", vms("n", 10) + vms("n", 1, dirty=700e6, prefix="hot"), 1.125e9, 8, 1, "ns/hot-n-0"),
    # big VMs: transfer dominates, few at once suffice (10*12 / (0.25 * 228.6) -> 3)
    ("transfer-bound", vms("n", 10, memory=64 * GB), NIC, 8, 3, None),
])
def test_per_node_parallelism(case: str, node_vms: list[TuneVm], bandwidth: float, max_per_node: int,
                              parallel: int, limited_by: str | None) -> None:
    t = tune(node_vms, bandwidth={"n": bandwidth}, waves=[["n"]], setup_s=10.0, max_per_node=max_per_node)
    got = t.node("n")
    assert got is not None
    assert (got.parallel, got.limited_by) == (parallel, limited_by), case
    assert t.parallel_outbound_per_node == parallel
    assert t.parallel_per_cluster == parallel


def test_every_vm_keeps_the_share_it_needs_to_converge() -> None:
    node_vms = vms("a", 20) + vms("a", 1, dirty=500e6, prefix="hot") + vms("b", 20, dirty=100e6)
    t = tune(node_vms, bandwidth={"a": NIC, "b": NIC}, waves=[["a", "b"]], setup_s=10.0)
    for vm in node_vms:
        node = t.node(vm.node)
        assert node is not None
        assert node.bandwidth_bytes_per_s / node.parallel >= needed_share(vm, min_share=125e6)


def test_cluster_limit_is_the_largest_wave_and_makespan_adds_waves() -> None:
    node_vms = vms("a", 40) + vms("b", 40) + vms("c", 2)
    t = tune(node_vms, bandwidth={"a": NIC, "b": NIC, "c": NIC}, waves=[["a", "b"], ["c"]], setup_s=10.0)
    a, b, c = t.node("a"), t.node("b"), t.node("c")
    assert a is not None and b is not None and c is not None
    assert t.parallel_per_cluster == a.parallel + b.parallel
    assert t.predicted_makespan_s == pytest.approx(max(a.predicted_s, b.predicted_s) + c.predicted_s)


def test_tuned_makespan_beats_the_default_limits() -> None:
    node_vms = vms("n", 40)
    t = tune(node_vms, bandwidth={"n": NIC}, waves=[["n"]], setup_s=12.0)
    default = node_time_s(node_vms, parallel=2, bandwidth=NIC, setup_s=12.0, cleanup_s=2.0)
    assert t.predicted_makespan_s < default / 2


@pytest.mark.parametrize(("current", "expected"), [
    (0, 0),  # unlimited stays unlimited
    (2 * GB, 2 * GB),  # a cap above every need is kept
    (64 * 2**20, 1_400_000_000),  # a cap below the hot VM's need is raised to it
])
def test_bandwidth_per_migration(current: int, expected: int) -> None:
    node_vms = vms("n", 5) + vms("n", 1, dirty=700e6, prefix="hot")
    t = tune(node_vms, bandwidth={"n": NIC}, waves=[["n"]], setup_s=10.0, current_bandwidth_per_migration=current)
    assert t.bandwidth_per_migration_bytes == expected


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_per_node": 0}, "max_per_node"),
    ({"bandwidth": {"n": 0.0}}, "bandwidth of n"),
])
def test_bad_input_is_named(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"bandwidth": {"n": NIC}, "waves": [["n"]], "setup_s": 10.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        tune(vms("n", 3), **args)  # type: ignore[arg-type]


def test_cluster_limit_stops_at_the_targets_inbound_room() -> None:
    node_vms = vms("a", 40) + vms("b", 40)
    free = tune(node_vms, bandwidth={"a": NIC, "b": NIC}, waves=[["a", "b"]], setup_s=10.0)
    capped = tune(node_vms, bandwidth={"a": NIC, "b": NIC}, waves=[["a", "b"]], setup_s=10.0, max_cluster=6)
    assert free.parallel_per_cluster == 16
    assert capped.parallel_per_cluster == 6
    assert capped.predicted_makespan_s > free.predicted_makespan_s
    assert any("inbound" in r for r in capped.reasons)


def t(start: float, end: float, memory: int = 4 * GB) -> TransferSample:
    return TransferSample(start_s=start, end_s=end, memory_bytes=memory)


@pytest.mark.parametrize(("case", "samples", "window", "expected"), [
    ("nothing seen", [], 20, None),
    ("one migration alone on the NIC", [t(0, 2)], 20, (2 * GB, 1)),
    # two at once share the NIC: the node moved 8 GB in 2 s, not 4 GB per 2 s
    ("two sharing the NIC", [t(0, 2), t(0, 2)], 20, (4 * GB, 2)),
    # setup and idle time between transfers do not count: 8 GB over 2 + 2 transfer seconds
    ("a gap between transfers is not busy time", [t(0, 2), t(100, 102)], 20, (2 * GB, 2)),
    ("overlapping transfers count their union", [t(0, 2), t(1, 3)], 20, (8 * GB / 3, 2)),
    # only the last `window` (by end) count: an old slow one is forgotten
    ("the window keeps the newest", [t(0, 40), t(100, 102), t(200, 202)], 2, (2 * GB, 2)),
    ("too little transfer time to judge", [t(0, 0.5)], 20, None),
    ("samples that make no sense are ignored", [t(5, 5), t(7, 6), t(0, 2, memory=0)], 20, None),
])
def test_observed_bandwidth(case: str, samples: list[TransferSample], window: int,
                            expected: tuple[float, int] | None) -> None:
    seen = observed_bandwidth(samples, window=window)
    if expected is None:
        assert seen is None, case
    else:
        assert seen is not None, case
        assert (seen.bytes_per_s, seen.migrations) == (pytest.approx(expected[0]), expected[1]), case


def test_the_plan_prefers_a_nodes_observed_bandwidth_and_says_so() -> None:
    cluster = f.Cluster().node("a").node("b").node("c")
    for i in range(4):
        cluster.vm(f"vm-{i}", "a", memory="4Gi")
    settings = Settings(estimate=EstimateModel(node_bandwidth_bytes_per_s=200e6))
    request = DrainRequest(nodes=(NodeName("a"),))
    configured = plan_drain(cluster.snapshot(), request, settings, now=0.0)
    seen = plan_drain(cluster.snapshot(), request, settings, now=0.0,
                      transfers={"a": [t(0, 2, memory=5 * GB), t(10, 12, memory=5 * GB)]})
    before, after = configured.tuning["nodes"][0], seen.tuning["nodes"][0]  # type: ignore[index]
    assert (before["bandwidth_bytes_per_s"], before["bandwidth_source"]) == (200e6, "setting")
    assert after["bandwidth_bytes_per_s"] == pytest.approx(2.5 * GB)
    assert after["bandwidth_source"] == "observed (2 migrations)"
    assert after["predicted_s"] < before["predicted_s"]
    assert seen.estimate.total_s < configured.estimate.total_s  # the untuned estimate follows it too


@pytest.mark.parametrize(("case", "kwargs", "expected"), [
    # ours: wall 100.0 -> 100.5 at time scale 20 is 10 cluster s; the cluster's stamps say 12 s: theirs win
    ("long: the cluster's span", {"cluster_span_s": 12.0}, (2000.0 - 12.0, 2000.0)),
    # a short span in whole seconds says little: our stamps decide
    ("short: our span", {"cluster_span_s": 1.0}, (1990.0, 2000.0)),
    ("no cluster stamps: our span", {"cluster_span_s": None}, (1990.0, 2000.0)),
    ("Running never seen, cluster span known", {"running_at": None, "cluster_span_s": 8.0}, (1992.0, 2000.0)),
    ("Running never seen, nothing to go by", {"running_at": None, "cluster_span_s": None}, None),
    ("no memory", {"memory_bytes": 0}, None),
])
def test_transfer_sample(case: str, kwargs: dict[str, object], expected: tuple[float, float] | None) -> None:
    args: dict[str, object] = {"running_at": 99.5, "finished_at": 100.0, "time_scale": 20.0,
                               "cluster_span_s": None, "memory_bytes": GB, **kwargs}
    sample = transfer_sample(**args)  # type: ignore[arg-type]
    if expected is None:
        assert sample is None, case
    else:
        assert sample is not None and (sample.start_s, sample.end_s) == pytest.approx(expected), case


def test_migration_transfer_s_reads_the_phase_transitions() -> None:
    def vmim(*phases: tuple[str, str]) -> dict[str, object]:
        return {"status": {"phaseTransitionTimestamps": [{"phase": p, "phaseTransitionTimestamp": ts}
                                                         for p, ts in phases]}}

    done = vmim(("Pending", "2026-01-01T00:00:00Z"), ("Running", "2026-01-01T00:00:07Z"),
                ("Succeeded", "2026-01-01T00:00:19Z"))
    assert migration_transfer_s(done) == 12.0
    assert migration_transfer_s(vmim(("Running", "2026-01-01T00:00:07Z"))) is None
    assert migration_transfer_s({}) is None
