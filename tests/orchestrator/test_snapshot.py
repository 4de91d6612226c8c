"""Snapshot parsing: quantities, every kind's fields as KubeVirt / Kubernetes serve them, and clear errors."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from orchestrator.model import EvictionStrategy, MigrationConfig
from orchestrator.snapshot import (
    build_snapshot,
    parse_kubevirt,
    parse_migration,
    parse_node,
    parse_pod,
    parse_quantity,
    parse_vmi,
    quantity_to_int,
    quantity_to_millis,
)
from tests.orchestrator import factories as f

GI = 1024**3


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4Gi", Decimal(4 * GI)),
        ("4294967296", Decimal(4294967296)),
        ("500Mi", Decimal(500 * 1024**2)),
        ("1G", Decimal(10**9)),
        ("1.5Gi", Decimal(3 * GI // 2)),
        ("100m", Decimal("0.1")),
        ("1Ki", Decimal(1024)),
        ("2Ti", Decimal(2 * 1024**4)),
        ("1Ei", Decimal(1024**6)),
        ("1k", Decimal(1000)),
        ("3M", Decimal(3 * 10**6)),
        ("1T", Decimal(10**12)),
        ("1P", Decimal(10**15)),
        ("1E", Decimal(10**18)),
        ("250u", Decimal("0.000250")),
        ("5n", Decimal("0.000000005")),
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("12e-1", Decimal("1.2")),
        (".5Gi", Decimal(GI // 2)),
        ("5.", Decimal(5)),
        ("+1Ki", Decimal(1024)),
        ("-1Ki", Decimal(-1024)),
        ("0", Decimal(0)),
        (4294967296, Decimal(4294967296)),
        (1.5, Decimal("1.5")),
    ],
)
def test_parse_quantity(text: object, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize(
    "text", ["", "Gi", "4GB", "4gi", "1ki", " 1Gi", "1Gi ", "1.2.3", "1e", "e3", "1 Gi", "--1", "1e99", True, None, [1]]
)
def test_parse_quantity_rejects(text: object) -> None:
    with pytest.raises(ValueError, match=r"quantity|exponent"):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("text", "as_int", "as_millis"),
    [("1.5", 2, 1500), ("100m", 1, 100), ("4Gi", 4 * GI, 4 * GI * 1000), ("2", 2, 2000), ("3500m", 4, 3500)],
)
def test_quantity_rounds_up_like_kubernetes(text: str, as_int: int, as_millis: int) -> None:
    assert quantity_to_int(text) == as_int
    assert quantity_to_millis(text) == as_millis


def test_node_fields() -> None:
    raw = f.node(
        "n1",
        memory="128Gi",
        cpu="31500m",
        host_model="Cascadelake-Server",
        vendor="AMD",
        cpu_models=("EPYC", "Haswell"),
        unschedulable=True,
        taints=[{"key": "kubevirt.io/drain", "effect": "NoSchedule"}],
    )
    node = parse_node(raw)
    assert node.name == "n1"
    assert node.allocatable_memory_bytes == 128 * GI
    assert node.allocatable_cpu_millis == 31500
    assert node.cpus == 31.5
    assert node.host_model_cpus == frozenset({"Cascadelake-Server"})
    assert node.cpu_models == frozenset({"EPYC", "Haswell"})
    assert node.cpu_vendor == "AMD"
    assert node.unschedulable and node.ready and not node.control_plane
    assert not node.schedulable
    assert node.taints[0].key == "kubevirt.io/drain" and node.taints[0].repels
    assert node.labels["kubernetes.io/hostname"] == "n1"


@pytest.mark.parametrize(
    ("kwargs", "schedulable"),
    [({}, True), ({"ready": False}, False), ({"unschedulable": True}, False), ({"control_plane": True}, False)],
)
def test_node_schedulable(kwargs: dict[str, Any], schedulable: bool) -> None:
    assert parse_node(f.node("n", **kwargs)).schedulable is schedulable


def test_node_label_value_false_is_not_support() -> None:
    raw = f.node("n", host_model=None, labels={"host-model-cpu.node.kubevirt.io/Old": "false"})
    assert parse_node(raw).host_model_cpus == frozenset()


@pytest.mark.parametrize(
    ("kwargs", "request_bytes", "guest_bytes"),
    [
        ({"memory": "4Gi"}, 4 * GI, 4 * GI),
        ({"memory": "4Gi", "guest": "3Gi"}, 4 * GI, 3 * GI),
        ({"memory": None, "guest": "2Gi"}, 2 * GI, 2 * GI),
        ({"memory": "1.5Gi"}, 3 * GI // 2, 3 * GI // 2),
    ],
)
def test_vmi_memory(kwargs: dict[str, Any], request_bytes: int, guest_bytes: int) -> None:
    vmi = parse_vmi(f.vmi("vm", "n1", **kwargs))
    assert vmi.memory_request_bytes == request_bytes
    assert vmi.guest_memory_bytes == guest_bytes


def test_vmi_memory_from_limits_only() -> None:
    raw = f.vmi("vm", "n1", memory=None)
    raw["spec"]["domain"]["resources"] = {"limits": {"memory": "8Gi"}}
    assert parse_vmi(raw).memory_request_bytes == 8 * GI


def test_vmi_fields() -> None:
    raw = f.vmi(
        "db",
        "n1",
        namespace="prod",
        cpu_model="Haswell-noTSX",
        node_selector={"zone": "a"},
        live_migratable=("False", "DisksNotLiveMigratable", "PVC data is not shared"),
        claims=["data"],
        data_volumes=["root"],
        evacuation_node="n1",
        tolerations=[{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"podAntiAffinity": {}},
        migration_state={
            "migrationUid": "u1",
            "sourceNode": "n0",
            "targetNode": "n1",
            "startTimestamp": "2026-01-01T00:00:00Z",
            "endTimestamp": "2026-01-01T00:01:00Z",
            "completed": True,
            "failed": False,
            "mode": "PreCopy",
        },
    )
    snap = build_snapshot(
        nodes=[],
        vmis=[raw],
        pods=[],
        migrations=[],
        kubevirt=None,
        pvcs=[f.pvc("data", namespace="prod", access_modes=["ReadWriteOnce"]), f.pvc("root", namespace="prod")],
    )
    vmi = snap.vmis[0]
    assert vmi.key == "prod/db"
    assert vmi.uid == "uid-vmi-prod-db"
    assert vmi.node == "n1"
    assert vmi.phase == "Running"
    assert vmi.cpu_model == "Haswell-noTSX"
    assert dict(vmi.node_selector) == {"zone": "a"}
    assert (vmi.live_migratable, vmi.live_migratable_reason) == ("False", "DisksNotLiveMigratable")
    assert vmi.live_migratable_message == "PVC data is not shared"
    assert [(v.claim_name, v.source, v.rwx) for v in vmi.volumes] == [
        ("data", "persistentVolumeClaim", False),
        ("root", "dataVolume", True),
    ]
    assert vmi.evacuation_node == "n1"
    assert vmi.tolerations[0].operator == "Exists"
    assert vmi.has_affinity
    state = vmi.migration_state
    assert state is not None
    assert (state.migration_uid, state.source_node, state.target_node, state.completed) == ("u1", "n0", "n1", True)
    assert state.end_time is not None and state.start_time is not None
    assert state.end_time - state.start_time == 60.0


def test_vmi_defaults() -> None:
    raw = f.vmi("vm", None, eviction_strategy=None, live_migratable=None, phase="Pending")
    vmi = parse_vmi(raw)
    assert vmi.cpu_model == "host-model"
    assert vmi.node is None
    assert vmi.live_migratable is None
    assert vmi.volumes == ()
    assert vmi.migration_state is None


@pytest.mark.parametrize(
    ("vmi_strategy", "cluster_strategy", "expected", "source"),
    [
        ("LiveMigrate", None, EvictionStrategy.LIVE_MIGRATE, "vmi"),
        ("None", "LiveMigrate", EvictionStrategy.NONE, "vmi"),
        (None, "LiveMigrateIfPossible", EvictionStrategy.LIVE_MIGRATE_IF_POSSIBLE, "cluster"),
        (None, "External", EvictionStrategy.EXTERNAL, "cluster"),
        (None, None, EvictionStrategy.NONE, "default"),
    ],
)
def test_eviction_strategy_vmi_then_cluster_then_none(
    vmi_strategy: str | None, cluster_strategy: str | None, expected: EvictionStrategy, source: str
) -> None:
    kv = f.kubevirt(eviction_strategy=cluster_strategy)
    snap = build_snapshot(
        nodes=[], vmis=[f.vmi("vm", "n1", eviction_strategy=vmi_strategy)], pods=[], migrations=[], kubevirt=kv
    )
    assert snap.vmis[0].eviction_strategy is expected
    assert snap.vmis[0].eviction_strategy_source == source
    assert snap.cluster_eviction_strategy == (EvictionStrategy(cluster_strategy) if cluster_strategy else None)


@pytest.mark.parametrize(
    ("kwargs", "memory"),
    [
        ({"memory": "1Gi"}, GI),
        ({"memory": "1Gi", "init_memory": "3Gi"}, 3 * GI),
        ({"memory": "1Gi", "init_memory": "512Mi"}, GI),
        ({"memory": "1Gi", "overhead": "100Mi"}, GI + 100 * 1024**2),
        ({"memory": None}, 0),
    ],
)
def test_pod_memory_request(kwargs: dict[str, Any], memory: int) -> None:
    assert parse_pod(f.pod("p", "n1", **kwargs)).memory_request_bytes == memory


def test_pod_limits_only_counts_as_request() -> None:
    raw = f.pod("p", "n1", memory=None)
    raw["spec"]["containers"][0]["resources"] = {"limits": {"memory": "2Gi"}}
    assert parse_pod(raw).memory_request_bytes == 2 * GI


def test_launcher_pod() -> None:
    vmi_raw = f.vmi("vm", "n1", namespace="ns", memory="8Gi")
    pod = parse_pod(f.launcher_pod(vmi_raw))
    assert pod.is_virt_launcher and pod.vmi_name == "vm"
    assert pod.memory_request_bytes == 8 * GI
    assert pod.has_empty_dir
    assert (pod.owner_kind, pod.owner_name) == ("VirtualMachineInstance", "vm")
    assert not pod.daemonset_owned


@pytest.mark.parametrize(
    ("kwargs", "attr", "expected"),
    [
        ({"owner_kind": "DaemonSet"}, "daemonset_owned", True),
        ({"owner_kind": None}, "owner_kind", None),
        ({"mirror": True}, "is_mirror", True),
        ({"empty_dir": True}, "has_empty_dir", True),
        ({"phase": "Succeeded"}, "is_final", True),
        ({}, "is_virt_launcher", False),
    ],
)
def test_pod_flags(kwargs: dict[str, Any], attr: str, expected: object) -> None:
    assert getattr(parse_pod(f.pod("p", "n1", **kwargs)), attr) == expected


def test_migration_fields() -> None:
    raw = f.vmim(
        "m1",
        "vm",
        namespace="ns",
        phase="Scheduling",
        target="n2",
        source="n1",
        labels={"drainctl.io/drain-id": "d1"},
        created="2026-01-01T00:00:10Z",
    )
    migration = parse_migration(raw)
    assert migration.vmi_key == "ns/vm"
    assert migration.target_node == "n2"
    assert migration.source_node == "n1"
    assert migration.phase == "Scheduling" and not migration.is_final
    assert migration.drain_id == "d1" and migration.origin == "drainctl"
    assert migration.creation_time == 1767225610.0


@pytest.mark.parametrize(
    ("annotations", "origin"),
    [
        ({"kubevirt.io/evacuationMigration": "n1"}, "evacuation"),
        ({"kubevirt.io/workloadUpdateMigration": ""}, "workload-update"),
        ({}, "user"),
    ],
)
def test_migration_origin(annotations: dict[str, str], origin: str) -> None:
    assert parse_migration(f.vmim("m", "vm", annotations=annotations)).origin == origin


def test_kubevirt_defaults_when_absent() -> None:
    assert parse_kubevirt(None) == (MigrationConfig(), None)
    config, strategy = parse_kubevirt(f.kubevirt())
    assert config == MigrationConfig()
    assert config.parallel_migrations_per_cluster == 5
    assert config.parallel_outbound_migrations_per_node == 2
    assert config.bandwidth_per_migration_bytes == 0
    assert config.completion_timeout_per_gib == 150
    assert config.progress_timeout_s == 150
    assert config.max_downtime_ms == 300
    assert not config.allow_post_copy and not config.effective_allow_workload_disruption
    assert config.network is None
    assert strategy is None


def test_kubevirt_configuration() -> None:
    config, strategy = parse_kubevirt(
        f.kubevirt(
            {
                "parallelMigrationsPerCluster": 3,
                "parallelOutboundMigrationsPerNode": 1,
                "bandwidthPerMigration": "64Mi",
                "completionTimeoutPerGiB": 20,
                "progressTimeout": 60,
                "allowPostCopy": True,
                "network": "migration-net",
                "maxDowntimeMs": 900,
            },
            eviction_strategy="LiveMigrate",
        )
    )
    assert config.parallel_migrations_per_cluster == 3
    assert config.parallel_outbound_migrations_per_node == 1
    assert config.bandwidth_per_migration_bytes == 64 * 1024**2
    assert config.completion_timeout_per_gib == 20
    assert config.progress_timeout_s == 60
    assert config.allow_post_copy and config.effective_allow_workload_disruption
    assert config.network == "migration-net"
    assert config.max_downtime_ms == 900
    assert strategy is EvictionStrategy.LIVE_MIGRATE


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    current = obj
    parts = path.split(".")
    for part in parts[:-1]:
        current = current.setdefault(part, {})
    current[parts[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("kind", "raw", "message"),
    [
        (
            "nodes",
            _with(f.node("n1"), "status.allocatable.memory", "lots"),
            "Node n1: status.allocatable.memory: 'lots'",
        ),
        ("nodes", _with(f.node("n1"), "status.allocatable", {}), "Node n1: status.allocatable.memory: missing"),
        ("nodes", _with(f.node("n1"), "spec.unschedulable", "yes"), "Node n1: spec.unschedulable: expected true"),
        ("nodes", _with(f.node("n1"), "metadata.name", None), "Node #0: metadata.name: missing"),
        ("nodes", _with(f.node("n1"), "kind", "Pod"), "Node n1: kind: expected Node, got 'Pod'"),
        (
            "vmis",
            f.vmi("vm", "n1", namespace="ns", memory="4Xi"),
            "VirtualMachineInstance ns/vm: spec.domain.resources.requests.memory: '4Xi' is not a quantity",
        ),
        (
            "vmis",
            f.vmi("vm", "n1", namespace="ns", memory=None),
            "VirtualMachineInstance ns/vm: spec.domain.resources.requests.memory: missing",
        ),
        (
            "vmis",
            f.vmi("vm", "n1", namespace="ns", memory="-1Gi"),
            "VirtualMachineInstance ns/vm: spec.domain.resources.requests.memory: '-1Gi' is negative",
        ),
        (
            "vmis",
            f.vmi("vm", "n1", namespace="ns", eviction_strategy="Migrate"),
            "VirtualMachineInstance ns/vm: spec.evictionStrategy: 'Migrate' is not one of None, LiveMigrate",
        ),
        (
            "vmis",
            f.vmi("vm", "n1", namespace="ns", live_migratable=("Maybe", "", "")),
            "VirtualMachineInstance ns/vm: status.conditions[1].status: 'Maybe'",
        ),
        (
            "vmis",
            _with(f.vmi("vm", "n1", namespace="ns"), "spec.domain", "x"),
            "VirtualMachineInstance ns/vm: spec.domain: expected an object, got str",
        ),
        (
            "vmis",
            _with(f.vmi("vm", "n1"), "metadata.namespace", None),
            "VirtualMachineInstance vm: metadata.namespace: missing",
        ),
        (
            "vmis",
            _with(f.vmi("vm", "n1"), "status.migrationState", {"startTimestamp": "yesterday"}),
            "VirtualMachineInstance default/vm: status.migrationState.startTimestamp: 'yesterday'",
        ),
        (
            "pods",
            f.pod("p", "n1", memory="1 Gi"),
            "Pod default/p: spec.containers[0].resources.requests.memory: '1 Gi'",
        ),
        ("pods", _with(f.pod("p", "n1"), "spec.containers", {}), "Pod default/p: spec.containers: expected a list"),
        (
            "migrations",
            _with(f.vmim("m", "vm"), "spec.vmiName", None),
            "VirtualMachineInstanceMigration default/m: spec.vmiName: missing",
        ),
        (
            "migrations",
            _with(f.vmim("m", "vm"), "metadata.creationTimestamp", "now"),
            "VirtualMachineInstanceMigration default/m: metadata.creationTimestamp: 'now'",
        ),
        (
            "kubevirt",
            f.kubevirt({"parallelMigrationsPerCluster": "5"}),
            "KubeVirt kubevirt/kubevirt: spec.configuration.migrations.parallelMigrationsPerCluster: expected",
        ),
        (
            "kubevirt",
            f.kubevirt({"bandwidthPerMigration": "fast"}),
            "spec.configuration.migrations.bandwidthPerMigration: 'fast' is not a quantity",
        ),
        ("kubevirt", f.kubevirt(eviction_strategy="Evict"), "spec.configuration.evictionStrategy: 'Evict'"),
    ],
)
def test_malformed_input_names_object_and_field(kind: str, raw: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"nodes": [], "vmis": [], "pods": [], "migrations": [], "kubevirt": None}
    if kind == "kubevirt":
        args["kubevirt"] = raw
    else:
        args[kind] = [raw]
    with pytest.raises(ValueError) as info:
        build_snapshot(**args)
    assert message in str(info.value)


def test_snapshot_indexes() -> None:
    cluster = f.Cluster().node("n1").node("n2")
    cluster.vm("a", "n1").vm("b", "n1").vm("c", "n2")
    cluster.pod("web", "n1").migration("m1", "a", phase="Succeeded").migration("m2", "a", phase="Pending")
    snap = cluster.snapshot()
    assert [v.name for v in snap.vmis_on("n1")] == ["a", "b"]
    assert [v.name for v in snap.vmis_on("nope")] == []
    assert len(snap.pods_on("n1")) == 3
    assert snap.node("n2") is not None and snap.node("n9") is None
    assert [m.name for m in snap.migrations_for("default/a")] == ["m1", "m2"]
    assert [m.name for m in snap.active_migrations()] == ["m2"]
    vmi = snap.vmi("default/c")
    assert vmi is not None and vmi.node == "n2"


def test_duplicate_objects_are_rejected() -> None:
    with pytest.raises(ValueError, match="Node n1: appears twice"):
        f.Cluster().node("n1").node("n1").snapshot()


def test_volume_access_modes_come_from_the_vmis_volume_status() -> None:
    from orchestrator.snapshot import parse_vmi

    raw = {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"namespace": "ns", "name": "vm", "uid": "u"},
        "spec": {"domain": {"resources": {"requests": {"memory": "1Gi"}}},
                 "volumes": [{"name": "root", "persistentVolumeClaim": {"claimName": "root-pvc"}},
                             {"name": "data", "persistentVolumeClaim": {"claimName": "data-pvc"}}]},
        "status": {"phase": "Running", "nodeName": "n1", "volumeStatus": [
            {"name": "root", "persistentVolumeClaimInfo": {"claimName": "root-pvc", "accessModes": ["ReadWriteMany"]}},
            {"name": "data", "persistentVolumeClaimInfo": {"claimName": "data-pvc", "accessModes": ["ReadWriteOnce"]}},
        ]},
    }
    vmi = parse_vmi(raw)
    assert {v.name: v.rwx for v in vmi.volumes} == {"root": True, "data": False}
