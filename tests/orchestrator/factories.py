"""JSON factories shaped like real Kubernetes / KubeVirt objects, for snapshot and planner tests.

Each function returns the dict the API server would serve (kubevirt.io/v1 and v1 field names), so the tests
exercise the same parsing path as a live cluster. ``Cluster`` collects objects and builds a snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from orchestrator.model import ClusterSnapshot
from orchestrator.snapshot import build_snapshot

Obj = dict[str, Any]

DEFAULT_CPU = "Skylake-Server-IBRS"


def node(
    name: str,
    *,
    memory: str = "64Gi",
    cpu: str = "16",
    host_model: str | None = DEFAULT_CPU,
    vendor: str | None = "Intel",
    cpu_models: Iterable[str] = ("Skylake-Server-IBRS", "Haswell-noTSX"),
    labels: Mapping[str, str] | None = None,
    ready: bool = True,
    unschedulable: bool = False,
    control_plane: bool = False,
    taints: Iterable[Mapping[str, str]] = (),
) -> Obj:
    all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    if host_model:
        all_labels[f"host-model-cpu.node.kubevirt.io/{host_model}"] = "true"
    if vendor:
        all_labels[f"cpu-vendor.node.kubevirt.io/{vendor}"] = "true"
    for model in cpu_models:
        all_labels[f"cpu-model.node.kubevirt.io/{model}"] = "true"
    if control_plane:
        all_labels["node-role.kubernetes.io/control-plane"] = ""
    else:
        all_labels["node-role.kubernetes.io/worker"] = ""
    all_labels.update(labels or {})
    spec: Obj = {}
    if unschedulable:
        spec["unschedulable"] = True
    if taints:
        spec["taints"] = [dict(t) for t in taints]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "uid": f"uid-node-{name}", "labels": all_labels, "annotations": {}},
        "spec": spec,
        "status": {
            "allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
            "capacity": {"cpu": cpu, "memory": memory, "pods": "110"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                {
                    "type": "Ready",
                    "status": "True" if ready else "Unknown",
                    "reason": "KubeletReady" if ready else "NodeStatusUnknown",
                },
            ],
        },
    }


def vmi(
    name: str,
    node_name: str | None,
    *,
    namespace: str = "default",
    memory: str | None = "4Gi",
    guest: str | None = None,
    cpu_model: str | None = None,
    eviction_strategy: str | None = "LiveMigrate",
    live_migratable: tuple[str, str, str] | None = ("True", "", ""),
    node_selector: Mapping[str, str] | None = None,
    claims: Iterable[str] = (),
    data_volumes: Iterable[str] = (),
    phase: str = "Running",
    migration_state: Mapping[str, Any] | None = None,
    evacuation_node: str | None = None,
    tolerations: Iterable[Mapping[str, str]] = (),
    affinity: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """A VMI; ``live_migratable`` is (status, reason, message) of the LiveMigratable condition or None."""
    domain: Obj = {
        "devices": {"disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}]},
        "resources": {"requests": {"memory": memory}} if memory else {},
    }
    if guest:
        domain["memory"] = {"guest": guest}
    if cpu_model:
        domain["cpu"] = {"model": cpu_model, "cores": 2}
    volumes: list[Obj] = [{"name": "rootdisk", "containerDisk": {"image": "quay.io/containerdisks/fedora:40"}}]
    volumes += [{"name": f"pvc-{c}", "persistentVolumeClaim": {"claimName": c}} for c in claims]
    volumes += [{"name": f"dv-{d}", "dataVolume": {"name": d}} for d in data_volumes]
    spec: Obj = {"domain": domain, "volumes": volumes}
    if eviction_strategy is not None:
        spec["evictionStrategy"] = eviction_strategy
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    if affinity:
        spec["affinity"] = dict(affinity)
    conditions: list[Obj] = [{"type": "Ready", "status": "True"}]
    if live_migratable is not None:
        status, reason, message = live_migratable
        condition: Obj = {"type": "LiveMigratable", "status": status}
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        conditions.append(condition)
    status_obj: Obj = {"phase": phase, "conditions": conditions, "migrationMethod": "LiveMigration"}
    if node_name:
        status_obj["nodeName"] = node_name
    if migration_state:
        status_obj["migrationState"] = dict(migration_state)
    if evacuation_node:
        status_obj["evacuationNodeName"] = evacuation_node
    all_labels = {"kubevirt.io/nodeName": node_name} if node_name else {}
    all_labels.update(labels or {})
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-vmi-{namespace}-{name}",
            "labels": all_labels,
            "annotations": {"kubevirt.io/latest-observed-api-version": "v1"},
        },
        "spec": spec,
        "status": status_obj,
    }


def launcher_pod(vmi_obj: Obj, *, memory: str | None = None, phase: str = "Running") -> Obj:
    """The virt-launcher pod of a VMI (memory defaults to the VMI's request, i.e. no overhead)."""
    meta = vmi_obj["metadata"]
    name = meta["name"]
    request = memory or vmi_obj["spec"]["domain"]["resources"].get("requests", {}).get("memory", "1Gi")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"virt-launcher-{name}-abcde",
            "namespace": meta["namespace"],
            "labels": {
                "kubevirt.io": "virt-launcher",
                "kubevirt.io/created-by": meta["uid"],
                "vm.kubevirt.io/name": name,
            },
            "annotations": {"kubevirt.io/domain": name},
            "ownerReferences": [
                {
                    "apiVersion": "kubevirt.io/v1",
                    "kind": "VirtualMachineInstance",
                    "name": name,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": vmi_obj["status"].get("nodeName"),
            "containers": [
                {"name": "compute", "resources": {"requests": {"memory": request, "cpu": "100m"}}},
                {"name": "guest-console-log", "resources": {}},
            ],
            "volumes": [{"name": "private", "emptyDir": {}}, {"name": "sockets", "emptyDir": {}}],
        },
        "status": {"phase": phase},
    }


def pod(
    name: str,
    node_name: str | None,
    *,
    namespace: str = "default",
    memory: str | None = "1Gi",
    owner_kind: str | None = "ReplicaSet",
    empty_dir: bool = False,
    mirror: bool = False,
    phase: str = "Running",
    init_memory: str | None = None,
    overhead: str | None = None,
) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "labels": {"app": name}, "annotations": {}}
    if owner_kind:
        meta["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner_kind, "name": f"{name}-owner", "uid": "u", "controller": True}
        ]
    if mirror:
        meta["annotations"]["kubernetes.io/config.mirror"] = "abc123"
    resources: Obj = {"requests": {"memory": memory}} if memory else {}
    spec: Obj = {"containers": [{"name": "main", "image": "busybox", "resources": resources}]}
    if node_name:
        spec["nodeName"] = node_name
    if init_memory:
        spec["initContainers"] = [{"name": "init", "resources": {"requests": {"memory": init_memory}}}]
    if overhead:
        spec["overhead"] = {"memory": overhead}
    if empty_dir:
        spec["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": {"phase": phase}}


def vmim(
    name: str,
    vmi_name: str,
    *,
    namespace: str = "default",
    phase: str = "Running",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    target: str | None = None,
    created: str = "2026-01-01T00:00:00Z",
    source: str | None = None,
) -> Obj:
    spec: Obj = {"vmiName": vmi_name}
    if target:
        spec["addedNodeSelector"] = {"kubernetes.io/hostname": target}
    status: Obj = {"phase": phase}
    if source:
        status["migrationState"] = {"sourceNode": source, "sourcePod": f"virt-launcher-{vmi_name}-abcde"}
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-vmim-{name}",
            "creationTimestamp": created,
            "labels": {"kubevirt.io/vmi-name": vmi_name, **(labels or {})},
            "annotations": dict(annotations or {}),
            "finalizers": ["kubevirt.io/migrationJobFinalize"],
        },
        "spec": spec,
        "status": status,
    }


def kubevirt(migrations: Mapping[str, Any] | None = None, *, eviction_strategy: str | None = None) -> Obj:
    configuration: Obj = {"developerConfiguration": {"featureGates": []}}
    if migrations is not None:
        configuration["migrations"] = dict(migrations)
    if eviction_strategy is not None:
        configuration["evictionStrategy"] = eviction_strategy
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "KubeVirt",
        "metadata": {"name": "kubevirt", "namespace": "kubevirt"},
        "spec": {"configuration": configuration},
        "status": {"phase": "Deployed"},
    }


def pvc(name: str, *, namespace: str = "default", access_modes: Iterable[str] = ("ReadWriteMany",)) -> Obj:
    modes = list(access_modes)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"accessModes": modes, "resources": {"requests": {"storage": "10Gi"}}},
        "status": {"phase": "Bound", "accessModes": modes},
    }


class Cluster:
    """Collects raw objects; ``vm()`` adds a VMI together with its virt-launcher pod."""

    def __init__(self, *, kubevirt_obj: Obj | None = None) -> None:
        self.nodes: list[Obj] = []
        self.vmis: list[Obj] = []
        self.pods: list[Obj] = []
        self.migrations: list[Obj] = []
        self.pvcs: list[Obj] = []
        self.kubevirt: Obj | None = kubevirt_obj

    def node(self, name: str, **kwargs: Any) -> Cluster:
        self.nodes.append(node(name, **kwargs))
        return self

    def vm(self, name: str, node_name: str, *, launcher_memory: str | None = None, **kwargs: Any) -> Cluster:
        obj = vmi(name, node_name, **kwargs)
        self.vmis.append(obj)
        self.pods.append(launcher_pod(obj, memory=launcher_memory))
        return self

    def pod(self, name: str, node_name: str, **kwargs: Any) -> Cluster:
        self.pods.append(pod(name, node_name, **kwargs))
        return self

    def migration(self, name: str, vmi_name: str, **kwargs: Any) -> Cluster:
        self.migrations.append(vmim(name, vmi_name, **kwargs))
        return self

    def snapshot(self) -> ClusterSnapshot:
        return build_snapshot(
            nodes=self.nodes,
            vmis=self.vmis,
            pods=self.pods,
            migrations=self.migrations,
            kubevirt=self.kubevirt,
            pvcs=self.pvcs or None,
        )
