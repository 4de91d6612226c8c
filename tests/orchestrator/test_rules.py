"""One rule per question (orchestrator.rules): the planner, the capacity gate, target choice and the finish step
call these, so a table here pins what all of them do."""

from __future__ import annotations

import pytest

from orchestrator.model import Node, NodeName, Pod, Vmi, VmiKey
from orchestrator.rules import (
    PodAction,
    is_room,
    launcher_overhead,
    pod_memory_bytes,
    pod_verdict,
    spare_memory,
    vm_memory_on_target,
)

GIB = 1024**3


@pytest.mark.parametrize(("containers", "init", "overhead", "final", "expect"), [
    ([1, 2], [], 0, False, 3),
    ([1, 2], [5], 0, False, 5),         # init containers run alone, before the others
    ([1, 2], [2], 4, False, 7),         # the pod overhead (KubeVirt's launchers) comes on top
    ([1, 2], [], 0, True, 0),           # a finished pod reserves nothing
])
def test_pod_memory(containers: list[int], init: list[int], overhead: int, final: bool, expect: int) -> None:
    assert pod_memory_bytes(containers=containers, init_containers=init, overhead=overhead, final=final) == expect


def vmi(memory: int = 4 * GIB) -> Vmi:
    return Vmi(namespace="ns", name="vm", uid="u", node=NodeName("n1"), phase="Running",
               memory_request_bytes=memory, guest_memory_bytes=memory)


def test_a_vm_needs_its_launcher_pods_request_on_a_target_overhead_included() -> None:
    assert vm_memory_on_target(vmi(), launcher_pod_bytes=int(4.3 * GIB)) == int(4.3 * GIB)
    assert vm_memory_on_target(vmi(), launcher_pod_bytes=GIB) == 4 * GIB  # never below the VM's own request


def test_without_its_launcher_pod_a_vm_needs_its_request_plus_estimated_overhead() -> None:
    assert vm_memory_on_target(vmi(), launcher_pod_bytes=None) == 4 * GIB + launcher_overhead(4 * GIB)


def node(name: str, **kw: bool) -> Node:
    return Node(name=NodeName(name), allocatable_memory_bytes=64 * GIB, allocatable_cpu_millis=8000, **kw)


@pytest.mark.parametrize(("n", "room"), [
    (node("w"), True),
    (node("w", unschedulable=True), False),
    (node("w", ready=False), False),
    (node("w", control_plane=True), False),
    (node("drained"), False),
])
def test_which_nodes_count_as_room(n: Node, room: bool) -> None:
    assert is_room(n, {"drained"}) is room


def test_spare_memory_counts_only_room_and_never_below_zero() -> None:
    nodes = [node("a"), node("b", control_plane=True), node("c", ready=False), node("d"), node("e")]
    free = {"a": 10 * GIB, "b": 50 * GIB, "c": 50 * GIB, "d": -3 * GIB, "e": 7 * GIB}
    assert spare_memory(nodes, free=free, draining={"e"}) == 10 * GIB


def pod(name: str, *, labels: dict[str, str] | None = None, owner: str | None = "ReplicaSet", phase: str = "Running",
        launcher_of: str | None = None, mirror: bool = False, namespace: str = "ns") -> Pod:
    return Pod(namespace=namespace, name=name, node=NodeName("n1"), phase=phase, memory_request_bytes=GIB,
               owner_kind=owner, owner_name="x" if owner else None, labels=labels or {},
               is_virt_launcher=launcher_of is not None, vmi_name=launcher_of, is_mirror=mirror)


STAYING = {VmiKey("ns/stays")}


@pytest.mark.parametrize(("p", "action"), [
    (pod("web"), PodAction.EVICT),
    (pod("done", phase="Succeeded"), PodAction.LEAVE),
    (pod("ds", owner="DaemonSet"), PodAction.LEAVE),
    (pod("static", mirror=True), PodAction.LEAVE),
    (pod("hp-volume-x", labels={"kubevirt.io": "hotplug-disk"}), PodAction.LEAVE),
    (pod("virt-launcher-stays", labels={"kubevirt.io": "virt-launcher"}, launcher_of="stays"), PodAction.LEAVE),
    # Same VM name in another namespace: not the VM that stays.
    (pod("virt-launcher-stays", labels={"kubevirt.io": "virt-launcher"}, launcher_of="stays", namespace="other"),
     PodAction.EVICT),
    (pod("virt-launcher-gone", labels={"kubevirt.io": "virt-launcher"}, launcher_of="gone"), PodAction.EVICT),
])
def test_what_draining_does_with_each_pod(p: Pod, action: PodAction) -> None:
    assert pod_verdict(p, vm_stays=STAYING.__contains__).action is action
