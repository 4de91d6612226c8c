"""The migration controller's priority queue (controller-runtime's priorityqueue semantics)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import pytest

from simulator import scenarios
from simulator.clock import ManualClock
from simulator.cluster import SimCluster
from simulator.errors import ApiError
from simulator.kubevirt import KubeVirtSim
from simulator.resources import NODES, PODS, VMIMS
from simulator.workqueue import PriorityQueue


def test_ready_items_leave_by_priority_then_add_order() -> None:
    q = PriorityQueue()
    q.add("user-a", priority=0, ready_at=0.0)
    q.add("evac-a", priority=100, ready_at=0.0)
    q.add("user-b", priority=0, ready_at=0.0)
    q.add("evac-b", priority=100, ready_at=0.0)
    q.add("later", priority=1000, ready_at=5.0)
    assert q.take_ready(1.0) == ["evac-a", "evac-b", "user-a", "user-b"]
    assert q.next_ready() == 5.0 and len(q) == 1
    assert q.take_ready(4.999) == []
    assert q.take_ready(5.0) == ["later"]
    assert q.next_ready() == math.inf


def test_adding_a_queued_key_keeps_its_place_raises_priority_and_never_delays_it() -> None:
    q = PriorityQueue()
    q.add("a", priority=0, ready_at=5.0)
    q.add("b", priority=0, ready_at=0.0)
    q.add("a", priority=0, ready_at=10.0)  # a later ready time does not postpone it
    assert q.next_ready() == 0.0
    q.add("a", priority=0, ready_at=0.0)  # an earlier one brings it forward, in its original place
    assert q.take_ready(0.0) == ["a", "b"]
    q.add("c", priority=50, ready_at=3.0)
    q.add("c", priority=0, ready_at=3.0)  # the priority never drops
    q.add("d", priority=20, ready_at=3.0)
    assert q.take_ready(3.0) == ["c", "d"]


def test_a_taken_key_requeued_goes_to_the_end_of_the_add_order_and_discard_removes() -> None:
    q = PriorityQueue()
    for key in ("a", "b", "c"):
        q.add(key, priority=0, ready_at=0.0)
    first = q.take_ready(0.0)
    assert first == ["a", "b", "c"]
    q.add("a", priority=0, ready_at=1.0)
    q.add("b", priority=0, ready_at=1.0)
    q.add("c", priority=0, ready_at=1.0)
    q.discard("b")
    assert "b" not in q and len(q) == 2
    assert q.take_ready(1.0) == ["a", "c"]


# ------------------------------------------------------------------ the migration controller on its queue
def _cluster(**migrations: object) -> tuple[SimCluster, ManualClock]:
    sc = scenarios.builtin("small")
    sc = dataclasses.replace(sc, migrations={**dict(sc.migrations), **migrations})
    clock = ManualClock()
    return SimCluster(sc, clock=clock), clock


def _vmim(cluster: SimCluster, vm: scenarios.VMSpec, name: str) -> None:
    cluster.store.create(VMIMS, {"metadata": {"namespace": vm.namespace, "name": name},
                                 "spec": {"vmiName": vm.name}})


def _run_until(cluster: SimCluster, clock: ManualClock, pred: Callable[[], bool], *, limit_s: float) -> None:
    for _ in range(int(limit_s * 10)):
        if pred():
            return
        clock.advance(0.1)
        cluster.step()
    raise AssertionError("condition not reached")


def next_look(kv: KubeVirtSim, key: str) -> float | None:
    """When the migration controller looks at a Pending VMIM next (queued, or parked until a slot frees)."""
    parked = kv._parked.get(key)
    return parked.next_look(kv.clock.now()) if parked is not None else kv._queue.ready_at(key)


def test_held_back_vmims_are_requeued_by_priority_and_a_free_slot_goes_to_the_highest() -> None:
    """migration.go: at the cluster limit a user VMIM (priority 0) is looked at again after 5 s, an evacuation
    VMIM (system-critical) after 1 s; when a migration ends the highest priority Pending one gets the slot."""
    cluster, clock = _cluster(parallelMigrationsPerCluster=1)
    kv = cluster.kubevirt
    node = cluster.scenario.drain_hint[0]
    on_node = [vm for vm in cluster.scenario.vms if vm.node == node]
    elsewhere = next(vm for vm in cluster.scenario.vms if vm.node != node)
    _vmim(cluster, on_node[0], "first")
    cluster.step()
    assert kv.active and kv.records[0]["admitted_s"] == 0.0
    clock.advance(0.5)
    cluster.step()  # the controllers see a change at the start of the next step: be there first
    _vmim(cluster, elsewhere, "user")
    cluster.step()
    # Held back by the limit: its next look is 5 s away (it waits parked, out of the queue, until a slot frees).
    assert next_look(kv, f"{elsewhere.namespace}/user") == clock.now() + 5.0
    clock.advance(0.5)
    cluster.step()
    pod = next(p for p in cluster.store.on_node(PODS, node)
               if p["metadata"]["annotations"].get("kubevirt.io/domain") == on_node[1].name)
    with contextlib.suppress(ApiError):
        kv.evict(pod["metadata"]["namespace"], pod["metadata"]["name"], None)  # 429: evacuation instead
    cluster.step()
    evac = next(m for m in kv.pending.values() if m.evacuation)
    assert next_look(kv, evac.key) == clock.now() + 1.0
    records = {r["name"]: r for r in kv.records}
    _run_until(cluster, clock, lambda: records["first"]["finished_s"] is not None, limit_s=600)
    # The evacuation VMIM came later than the user's but has the higher priority: it gets the freed slot at once.
    assert records[evac.name]["admitted_s"] == records["first"]["finished_s"]
    assert records["user"]["admitted_s"] is None


def _all_succeeded(records: list[dict[str, object]]) -> bool:
    return all(r["phase"] == "Succeeded" for r in records)


def test_one_target_pod_at_a_time_and_ties_in_a_seeded_arbitrary_order() -> None:
    """podExpectations: a second VMIM processed in the same instant as a target pod creation waits 1 s; the
    re-enqueue after a migration ends picks among equal priorities in an arbitrary order (sort.Slice),
    the same for the same seed."""
    orders = []
    for _ in range(2):
        cluster, clock = _cluster()
        node = cluster.scenario.drain_hint[0]
        cluster.store.mutate(NODES, None, node, lambda o: o["spec"].__setitem__(
            "taints", [{"key": "kubevirt.io/drain", "effect": "NoSchedule"}]))
        cluster.step()
        kv = cluster.kubevirt
        evacuations = [r for r in kv.records if r["origin"] == "evacuation"]
        assert len(evacuations) == 15 and len({r["created_s"] for r in evacuations}) == 1
        _run_until(cluster, clock, functools.partial(_all_succeeded, evacuations), limit_s=3600)
        admitted = sorted((r["admitted_s"], r["vmi"]) for r in evacuations)
        t0 = evacuations[0]["created_s"]
        assert [a for a, _ in admitted[:2]] == [t0, t0 + 1.0]
        assert all(b - a >= 0.05 for (a, _), (b, _) in itertools.pairwise(admitted))
        orders.append([vmi for _, vmi in admitted])
    assert orders[0] == orders[1]
    assert orders[0] != sorted(orders[0]), "admitted in creation order: ties are not arbitrary"


def test_a_held_back_vmim_not_re_enqueued_is_admitted_at_its_own_periodic_look() -> None:
    """When a slot frees, KubeVirt re-enqueues only the highest priority Pending VMIMs; one that is not among them
    gets the slot at its next periodic look (every 5 s for a user's VMIM), not earlier and not never."""
    cluster, clock = _cluster(parallelMigrationsPerCluster=2, parallelOutboundMigrationsPerNode=1)
    kv = cluster.kubevirt
    node = cluster.scenario.drain_hint[0]
    by_node: dict[str, list[scenarios.VMSpec]] = {}
    for vm in cluster.scenario.vms:
        by_node.setdefault(vm.node, []).append(vm)
    n2, n3 = [n for n in sorted(by_node) if n != node][:2]

    def at(seconds: float) -> None:
        clock.advance(seconds)
        cluster.step()

    _vmim(cluster, by_node[node][0], "a")  # runs from the drained node for the whole test
    cluster.step()
    at(0.2)
    _vmim(cluster, by_node[n2][0], "x")  # takes the second slot
    cluster.step()
    at(0.2)
    _vmim(cluster, by_node[n3][0], "c")  # held back: a user VMIM, looked at every 5 s
    cluster.step()
    at(0.2)
    for vm in by_node[node][1:3]:  # two evacuations from the busy node: higher priority, but that node is full
        pod = next(p for p in cluster.store.on_node(PODS, node)
                   if p["metadata"]["annotations"].get("kubevirt.io/domain") == vm.name)
        with contextlib.suppress(ApiError):
            kv.evict(pod["metadata"]["namespace"], pod["metadata"]["name"], None)
    cluster.step()
    at(0.2)
    x = next(m for m in kv.active.values() if m.name == "x")
    cluster.store.delete(VMIMS, x.namespace, "x")  # cancelled before hand-off: the slot frees at once
    cluster.step()
    records = {r["name"]: r for r in kv.records}
    assert records["x"]["phase"] == "Failed"
    _run_until(cluster, clock, lambda: records["c"]["admitted_s"] is not None, limit_s=60)
    assert records["a"]["finished_s"] is None  # the drained node stayed busy throughout
    assert records["c"]["admitted_s"] == pytest.approx(records["c"]["created_s"] + 5.0, abs=1e-6)
    assert [r["admitted_s"] for r in kv.records if r["origin"] == "evacuation"] == [None, None]
