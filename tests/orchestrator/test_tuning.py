"""Tuned limits for a drain's window (orchestrator.tuning): pure, table by table."""

from __future__ import annotations

import pytest

from orchestrator.tuning import TuneVm, needed_share, node_time_s, tune

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
