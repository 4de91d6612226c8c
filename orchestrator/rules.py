"""One rule per question, written once (pure): the planner, the capacity gate, target choice and the finish
step all call these, so they cannot disagree.

- how much memory a pod reserves on its node (the scheduler's effective request);
- how much memory a VM needs on a target (its launcher pod's request, which includes KubeVirt's overhead);
- which nodes count as room for the VMs of a drain, and how much spare memory they have;
- what the finish step does with each pod left on a draining node (evict it, or leave it and why).
What is final is each phase enum's ``is_final`` (``orchestrator.model``); which failures retry or avoid a
target is ``FailureClass.retryable`` / ``avoid_target`` / ``blames_target``.
It performs no I/O and reads no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.model import Node, Pod, Vmi, VmiKey, vmi_key

MiB = 1024**2


# ------------------------------------------------------------------------------------------------ memory
def pod_memory_bytes(*, containers: Sequence[int], init_containers: Sequence[int] = (), overhead: int = 0,
                     final: bool = False) -> int:
    """What a pod reserves on its node, as the scheduler counts it: init containers run one at a time before
    the app containers, so max(sum of containers, largest init container) + the pod overhead. A finished pod
    reserves nothing."""
    if final:
        return 0
    return max(sum(containers), max(init_containers, default=0)) + overhead


def launcher_overhead(memory_bytes: int, cpus: int = 1) -> int:
    """A conservative estimate of KubeVirt's virt-launcher memory overhead (page tables, per-vCPU, QEMU), for
    a VM whose launcher pod we cannot see."""
    return memory_bytes // 512 + cpus * 8 * MiB + 256 * MiB


def vm_memory_on_target(vmi: Vmi, *, launcher_pod_bytes: int | None) -> int:
    """Memory a VM's target pod will reserve on a target node. The launcher pod's request already includes
    KubeVirt's overhead, so it is the answer when known (never below the VM's own request); without it, the
    VM's request plus an estimate of the overhead."""
    if launcher_pod_bytes:
        return max(vmi.memory_request_bytes, launcher_pod_bytes)
    return vmi.memory_request_bytes + launcher_overhead(vmi.memory_request_bytes)


# ------------------------------------------------------------------------------------------------ room
def is_room(node: Node, draining: Iterable[str]) -> bool:
    """Whether a node may receive the drain's VMs: schedulable (Ready, not cordoned, not control plane) and
    not itself being drained."""
    return node.schedulable and node.name not in set(draining)


def spare_memory(nodes: Iterable[Node], *, free: Mapping[str, int], draining: Iterable[str]) -> int:
    """Free memory (allocatable minus pod requests) summed over the nodes that count as room."""
    drained = set(draining)
    return sum(max(0, free.get(n.name, 0)) for n in nodes if is_room(n, drained))


# ------------------------------------------------------------------------------------------------ pods
class PodAction(enum.StrEnum):
    EVICT = "evict"
    LEAVE = "leave"


@dataclass(frozen=True)
class PodVerdict:
    action: PodAction
    reason: str


def pod_verdict(pod: Pod, *, vm_stays: Callable[[VmiKey], bool]) -> PodVerdict:
    """What draining a node does with one of its pods (kubectl drain's filters plus KubeVirt's pods).

    `vm_stays(namespace/name)` says whether a VM's own pod is handled elsewhere: the planner passes "the VMI
    exists" (its launcher leaves with its migration), the finish step passes "the VM stays on this node"."""
    if pod.is_final:
        return PodVerdict(PodAction.LEAVE, "finished")
    if pod.daemonset_owned:
        return PodVerdict(PodAction.LEAVE, "DaemonSet pod")
    if pod.is_mirror:
        return PodVerdict(PodAction.LEAVE, "static (mirror) pod")
    if pod.is_hotplug_disk:
        return PodVerdict(PodAction.LEAVE, "hot-plug volume attachment pod: it goes with its VM")
    if pod.is_virt_launcher and pod.vmi_name and vm_stays(vmi_key(pod.namespace, pod.vmi_name)):
        return PodVerdict(PodAction.LEAVE, "the VM's own pod")
    if pod.is_virt_launcher:
        return PodVerdict(PodAction.EVICT, "virt-launcher pod without a VMI")
    return PodVerdict(PodAction.EVICT, "")
