"""Factories for the raw objects a KubeVirt cluster holds, with the real field names.

Nodes carry the labels virt-handler's node labeller sets (host-model CPU, CPU models, vendor); every VMI has
a running virt-launcher pod on its node with KubeVirt's labels, annotations, owner reference, emptyDir
volumes and a memory request that adds KubeVirt's overhead to the guest memory. Objects are schema-valid for
kubernetes-asyncio's typed models (containers have names, node conditions have a status, ...).
"""

from __future__ import annotations

from typing import Any

from simulator.store import iso

GiB = 1024**3
MiB = 1024**2

HOST_MODEL_LABEL = "host-model-cpu.node.kubevirt.io/"
CPU_MODEL_LABEL = "cpu-model.node.kubevirt.io/"
CPU_VENDOR_LABEL = "cpu-vendor.node.kubevirt.io/"
VMI_NODE_LABEL = "kubevirt.io/nodeName"
LAUNCHER_IMAGE = "quay.io/kubevirt/virt-launcher:v1.8.0"
KUBELET_VERSION = "v1.32.4"

Obj = dict[str, Any]


class IpAllocator:
    """Pod IPs from 10.128.0.0/10, never handed out twice in one cluster."""

    def __init__(self) -> None:
        self._n = 0

    def next(self) -> str:
        self._n += 1
        n = self._n
        return f"10.{128 + (n >> 16) % 64}.{(n >> 8) % 256}.{n % 256}"


def quantity(n_bytes: int) -> str:
    """Bytes as a Kubernetes quantity, exact (Gi/Mi/Ki when they divide evenly)."""
    for suffix, unit in (("Ti", 1024**4), ("Gi", GiB), ("Mi", MiB), ("Ki", 1024)):
        if n_bytes and n_bytes % unit == 0:
            return f"{n_bytes // unit}{suffix}"
    return str(n_bytes)


def launcher_overhead(memory_bytes: int, cpus: int) -> int:
    """virt-launcher memory overhead, after KubeVirt's GetMemoryOverhead (rounded): page tables
    (memory/512), ~8 MiB per vCPU, the launcher and QEMU fixed costs (~220 MiB)."""
    return memory_bytes // 512 + cpus * 8 * MiB + 220 * MiB


def node(name: str, *, memory_bytes: int, cpus: int, cpu_model: str, cpu_vendor: str,
         labels: dict[str, str], control_plane: bool, now: float, index: int) -> Obj:
    lbl = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": "amd64",
    }
    if control_plane:
        lbl["node-role.kubernetes.io/control-plane"] = ""
    else:
        lbl.update({
            "node-role.kubernetes.io/worker": "",
            "kubevirt.io/schedulable": "true",
            f"{HOST_MODEL_LABEL}{cpu_model}": "true",
            f"{CPU_MODEL_LABEL}{cpu_model}": "true",
            f"{CPU_VENDOR_LABEL}{cpu_vendor}": "true",
        })
    lbl.update(labels)
    ts = iso(now)
    alloc = {"cpu": str(cpus), "memory": quantity(memory_bytes), "pods": "250",
             "devices.kubevirt.io/kvm": "1k"}
    taints = [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}] if control_plane else []
    obj: Obj = {
        "metadata": {"name": name, "labels": lbl,
                     "annotations": {"kubevirt.io/heartbeat": ts}},
        "spec": {"podCIDR": f"10.128.{index % 256}.0/24"},
        "status": {
            "capacity": dict(alloc),
            "allocatable": alloc,
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": ts,
                 "lastTransitionTime": ts}
                for t, s, r, m in (
                    ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
                    ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                    ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID"),
                    ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                )
            ],
            "addresses": [{"type": "InternalIP", "address": f"10.0.{index // 250}.{index % 250 + 2}"},
                          {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "architecture": "amd64", "bootID": f"boot-{name}", "containerRuntimeVersion": "cri-o://1.32.2",
                "kernelVersion": "5.14.0-427.el9.x86_64", "kubeProxyVersion": KUBELET_VERSION,
                "kubeletVersion": KUBELET_VERSION, "machineID": f"machine-{name}", "operatingSystem": "linux",
                "osImage": "Red Hat Enterprise Linux CoreOS 9.4", "systemUUID": f"uuid-{name}",
            },
        },
    }
    if taints:
        obj["spec"]["taints"] = taints
    return obj


def migratable_conditions(name: str, *, not_migratable_reason: str | None, not_migratable_message: str | None,
                          rwx: bool, now: float) -> tuple[Obj, Obj]:
    """The LiveMigratable and StorageLiveMigratable conditions virt-handler computes for a VMI (its
    calculateLiveMigrationCondition), from what the scenario says makes the VM unmovable."""
    ts = iso(now)
    if not_migratable_reason:
        migratable: Obj = {"type": "LiveMigratable", "status": "False", "reason": not_migratable_reason,
                           "message": not_migratable_message or not_migratable_reason,
                           "lastProbeTime": None, "lastTransitionTime": ts}
    else:
        migratable = {"type": "LiveMigratable", "status": "True", "lastProbeTime": None, "lastTransitionTime": ts}
    storage: Obj = {"type": "StorageLiveMigratable", "status": "True" if rwx else "False",
                    "lastProbeTime": None, "lastTransitionTime": ts}
    if not rwx:
        storage["reason"] = "DisksNotLiveMigratable"
        storage["message"] = (f"PVC {name}-rootdisk is not shared, live migration requires that all PVCs must "
                              "be shared (using ReadWriteMany access mode)")
    return migratable, storage


def vmi(namespace: str, name: str, *, node_name: str | None, memory_bytes: int, cpus: int, cpu_model: str,
        eviction_strategy: str | None, not_migratable_reason: str | None,
        not_migratable_message: str | None, rwx: bool, node_selector: dict[str, str],
        labels: dict[str, str], vm_uid: str | None, now: float) -> Obj:
    ts = iso(now)
    claim = f"{name}-rootdisk"
    spec: Obj = {
        "domain": {
            "cpu": {"cores": cpus, "sockets": 1, "threads": 1, "model": cpu_model},
            "memory": {"guest": quantity(memory_bytes)},
            "resources": {"requests": {"memory": quantity(memory_bytes)}},
            "devices": {"disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}],
                        "interfaces": [{"name": "default", "masquerade": {}}]},
            "machine": {"type": "pc-q35-rhel9.4.0"},
        },
        "networks": [{"name": "default", "pod": {}}],
        "volumes": [{"name": "rootdisk", "persistentVolumeClaim": {"claimName": claim}}],
        "terminationGracePeriodSeconds": 30,
    }
    if eviction_strategy is not None:
        spec["evictionStrategy"] = eviction_strategy
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    migratable, storage = migratable_conditions(name, not_migratable_reason=not_migratable_reason,
                                                not_migratable_message=not_migratable_message, rwx=rwx, now=now)
    meta: Obj = {"namespace": namespace, "name": name,
                 "labels": {"vm.kubevirt.io/name": name, **labels},
                 "annotations": {"kubevirt.io/latest-observed-api-version": "v1",
                                 "kubevirt.io/storage-observed-api-version": "v1"}}
    if vm_uid:
        meta["ownerReferences"] = [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": name,
                                    "uid": vm_uid, "controller": True, "blockOwnerDeletion": True}]
    status: Obj = {
        "phase": "Scheduling" if node_name is None else "Running",
        "conditions": [
            {"type": "Ready", "status": "True" if node_name else "False", "lastProbeTime": None,
             "lastTransitionTime": ts},
            migratable,
            storage,
        ],
        "qosClass": "Burstable",
        "migrationMethod": "LiveMigration" if rwx else "BlockMigration",
        "migrationTransport": "Unix",
        "guestOSInfo": {},
        "launcherContainerImageVersion": LAUNCHER_IMAGE,
        "activePods": {},
        "volumeStatus": [{"name": "rootdisk", "target": "vda",
                          "persistentVolumeClaimInfo": {"claimName": claim,
                                                        "accessModes": ["ReadWriteMany" if rwx else
                                                                        "ReadWriteOnce"]}}],
    }
    if node_name:
        status["nodeName"] = node_name
        meta["labels"][VMI_NODE_LABEL] = node_name
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": meta, "spec": spec,
            "status": status}


def vm(namespace: str, name: str, *, template_spec: Obj, labels: dict[str, str]) -> Obj:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"namespace": namespace, "name": name, "labels": dict(labels)},
        "spec": {"runStrategy": "Always",
                 "template": {"metadata": {"labels": {"vm.kubevirt.io/name": name}}, "spec": template_spec}},
        "status": {"printableStatus": "Running", "ready": True, "created": True},
    }


def launcher_pod(vmi_obj: Obj, *, node_name: str | None, memory_request: int, cpus: int,
                 node_selector: dict[str, str], target_of: str | None, pod_ip: str, now: float,
                 name_suffix: str) -> Obj:
    """A virt-launcher pod for `vmi_obj`; `target_of` is the VMIM name when this is a migration target."""
    meta = vmi_obj["metadata"]
    ts = iso(now)
    labels = {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": meta["uid"],
              "vm.kubevirt.io/name": meta["name"], "vmi.kubevirt.io/id": meta["name"]}
    annotations = {"kubevirt.io/domain": meta["name"], "kubevirt.io/migrationTransportUnix": "true",
                   "kubectl.kubernetes.io/default-container": "compute"}
    if target_of:
        annotations["kubevirt.io/migrationJobName"] = target_of
    pod: Obj = {
        "metadata": {
            "namespace": meta["namespace"],
            "name": f"virt-launcher-{meta['name']}-{name_suffix}",
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                                 "name": meta["name"], "uid": meta["uid"], "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": {
            "containers": [{
                "name": "compute",
                "image": LAUNCHER_IMAGE,
                "command": ["/usr/bin/virt-launcher-monitor", "--qemu-timeout", "250s", "--name", meta["name"]],
                "resources": {
                    "requests": {"cpu": f"{cpus * 100}m", "memory": quantity(memory_request),
                                 "devices.kubevirt.io/kvm": "1"},
                    "limits": {"devices.kubevirt.io/kvm": "1"},
                },
            }],
            "volumes": [{"name": n, "emptyDir": {}} for n in ("private", "public", "sockets", "libvirt-runtime")]
            + [{"name": "rootdisk", "persistentVolumeClaim": {
                "claimName": vmi_obj["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]}}],
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30,
            "schedulerName": "default-scheduler",
            "serviceAccountName": "default",
            "nodeSelector": {"kubevirt.io/schedulable": "true", **node_selector},
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"},
    }
    if node_name:
        pod["spec"]["nodeName"] = node_name
        set_pod_running(pod, pod_ip=pod_ip, now=now)
    else:
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "lastProbeTime": None,
                                        "lastTransitionTime": ts}]
    return pod


def set_pod_running(pod: Obj, *, pod_ip: str, now: float) -> None:
    ts = iso(now)
    pod["status"] = {
        "phase": "Running",
        "qosClass": "Burstable",
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "hostIP": "10.0.0.1",
        "startTime": ts,
        "conditions": [{"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": ts}
                       for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        "containerStatuses": [{"name": c["name"], "ready": True, "restartCount": 0, "started": True,
                               "image": c["image"], "imageID": c["image"], "containerID": f"cri-o://{pod_ip}",
                               "state": {"running": {"startedAt": ts}}}
                              for c in pod["spec"]["containers"]],
    }


def set_pod_finished(pod: Obj, *, phase: str, now: float, reason: str = "Completed") -> None:
    ts = iso(now)
    status = pod.setdefault("status", {})
    status["phase"] = phase
    status["conditions"] = [{"type": t, "status": "False" if t in ("Ready", "ContainersReady") else "True",
                             "lastProbeTime": None, "lastTransitionTime": ts}
                            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
    status["containerStatuses"] = [
        {"name": c["name"], "ready": False, "restartCount": 0, "started": False, "image": c["image"],
         "imageID": c["image"],
         "state": {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1, "reason": reason,
                                  "finishedAt": ts, "startedAt": status.get("startTime", ts)}}}
        for c in pod["spec"]["containers"]]


def daemonset(namespace: str, name: str, *, labels: dict[str, str], desired: int) -> Obj:
    return {
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": name, "image": f"quay.io/kubevirt/{name}:v1.8.0"}]}},
            "updateStrategy": {"type": "RollingUpdate"},
        },
        "status": {"currentNumberScheduled": desired, "desiredNumberScheduled": desired,
                   "numberMisscheduled": 0, "numberReady": desired, "numberAvailable": desired,
                   "updatedNumberScheduled": desired, "observedGeneration": 1},
    }


def daemon_pod(ds: Obj, *, node_name: str, pod_ip: str, now: float) -> Obj:
    meta = ds["metadata"]
    pod: Obj = {
        "metadata": {
            "namespace": meta["namespace"], "name": f"{meta['name']}-{node_name}",
            "labels": dict(ds["spec"]["template"]["metadata"]["labels"]),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {"nodeName": node_name,
                 "containers": [dict(c, resources={"requests": {"memory": "100Mi", "cpu": "10m"}})
                                for c in ds["spec"]["template"]["spec"]["containers"]],
                 "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
                 "schedulerName": "default-scheduler", "serviceAccountName": "default"},
        "status": {},
    }
    set_pod_running(pod, pod_ip=pod_ip, now=now)
    return pod


def kubevirt_cr(migrations: dict[str, Any], *, eviction_strategy: str | None) -> Obj:
    config: Obj = {"migrations": dict(migrations),
                   "developerConfiguration": {"featureGates": ["MigrationPriorityQueue"]}}
    if eviction_strategy:
        config["evictionStrategy"] = eviction_strategy
    return {
        "metadata": {"namespace": "kubevirt", "name": "kubevirt"},
        "spec": {"configuration": config, "workloadUpdateStrategy": {}},
        "status": {"phase": "Deployed", "observedKubeVirtVersion": "v1.8.0",
                   "targetKubeVirtVersion": "v1.8.0"},
    }


def event(*, involved: Obj, reason: str, message: str, etype: str, component: str, now: float,
          name_suffix: str) -> Obj:
    meta = involved["metadata"]
    ts = iso(now)
    return {
        "metadata": {"namespace": meta.get("namespace", "default"),
                     "name": f"{meta['name']}.{name_suffix}"},
        "involvedObject": {"kind": involved.get("kind"), "apiVersion": involved.get("apiVersion"),
                           "name": meta["name"], "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                           "resourceVersion": meta.get("resourceVersion")},
        "reason": reason,
        "message": message,
        "type": etype,
        "source": {"component": component},
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "count": 1,
        "reportingComponent": component,
        "reportingInstance": "",
    }
