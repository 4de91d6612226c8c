"""The pure planner: verdicts with reasons, capacity with numbers, placement constraints, order, waves,
limits, estimate and the refusals. Snapshots come from KubeVirt-shaped JSON (factories.py)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest

from bench.speed import large_snapshot
from orchestrator.escalation import Rung
from orchestrator.model import (
    DrainId,
    DrainPlan,
    DrainRequest,
    NodeName,
    NodeOrder,
    NonMigratablePolicy,
    VmVerdict,
)
from orchestrator.planner import JUDGE_S, PlanError, expect_hard, plan_drain
from orchestrator.settings import Limits, Settings
from tests.orchestrator import factories as f

GI = 1024**3
NOW = 1767225700.0  # 2026-01-01T00:01:40Z


def request(*nodes: str, **kwargs: Any) -> DrainRequest:
    return DrainRequest(nodes=tuple(NodeName(n) for n in nodes), **kwargs)


def plan(
    cluster: f.Cluster, *nodes: str, settings: Settings | None = None, drain_id: str | None = None, **kwargs: Any
) -> DrainPlan:
    return plan_drain(
        cluster.snapshot(),
        request(*nodes, **kwargs),
        settings or Settings(),
        now=NOW,
        drain_id=DrainId(drain_id) if drain_id else None,
    )


def refusal(cluster: f.Cluster, *nodes: str, settings: Settings | None = None, **kwargs: Any) -> str:
    with pytest.raises(PlanError) as info:
        plan(cluster, *nodes, settings=settings, **kwargs)
    return str(info.value)


def decision(result: DrainPlan, vmi: str) -> tuple[VmVerdict, str]:
    for node in result.nodes:
        for job in node.jobs:
            if job.vmi == vmi:
                return VmVerdict.MIGRATE, job.reason
        for d in (*node.skipped, *node.blocked):
            if d.vmi == vmi:
                return d.verdict, d.reason
    raise AssertionError(f"{vmi} not in plan")


def target_of(result: DrainPlan, vmi: str) -> str:
    for job in result.jobs():
        if job.vmi == vmi:
            return job.proposed_target
    raise AssertionError(f"{vmi} has no job")


# --- capacity ------------------------------------------------------------------------------------------


def capacity_cluster() -> f.Cluster:
    """d1, d2: 4 x 16 GiB VMs each (64 GiB load). t1, t2: 64 GiB with a 16 GiB pod -> 48 GiB free each."""
    cluster = f.Cluster()
    for name in ("d1", "d2"):
        cluster.node(name, memory="128Gi")
        for i in range(4):
            cluster.vm(f"{name}-vm{i}", name, memory="16Gi")
    for name in ("t1", "t2"):
        cluster.node(name, memory="64Gi").pod(f"{name}-app", name, memory="16Gi")
    return cluster


@pytest.mark.parametrize(
    ("nodes", "parallel", "message"),
    [
        (("d1",), 1, "spare 160 GiB >= 1 x 64 GiB needed"),
        (("d2",), 1, "spare 160 GiB >= 1 x 64 GiB needed"),
    ],
)
def test_capacity_ok_with_numbers(nodes: tuple[str, ...], parallel: int, message: str) -> None:
    result = plan(capacity_cluster(), *nodes, max_parallel_nodes=parallel)
    cap = result.capacity
    assert cap.ok and cap.message == message
    assert (cap.spare_bytes, cap.required_bytes, cap.largest_node_load_bytes) == (160 * GI, 64 * GI, 64 * GI)
    assert cap.placed_vms == 4 and cap.unplaced_vms == 0 and cap.target_nodes == 3


def test_capacity_rule_refuses_with_numbers() -> None:
    message = refusal(capacity_cluster(), "d1", "d2", max_parallel_nodes=2)
    assert "not enough capacity: spare 96 GiB < 2 x 64 GiB needed (largest load: d2" in message


def test_rule_holds_but_placement_runs_out_of_memory() -> None:
    # 128 GiB of VMs onto 2 x 48 GiB: the rule (96 >= 1 x 64) passes, the real placement does not.
    message = refusal(capacity_cluster(), "d1", "d2", max_parallel_nodes=1)
    assert "2 VM(s) cannot be migrated" in message
    assert "no fitting target: needs 16 GiB of memory; the most free among the 2 matching node(s) is 0 GiB" in message


def test_placement_shortfall_is_reported_under_skip_policy() -> None:
    result = plan(capacity_cluster(), "d1", "d2", non_migratable=NonMigratablePolicy.SKIP)
    assert not result.capacity.ok
    assert result.capacity.unplaced_vms == 2 and result.capacity.placed_vms == 6
    assert "2 VM(s) found no fitting target" in result.capacity.message
    assert len(result.blocked) == 2
    assert any("will not finish drained" in w for w in result.warnings)


def test_placement_spreads_onto_most_free_node() -> None:
    cluster = f.Cluster().node("src").node("big", memory="100Gi").node("small", memory="50Gi")
    for i in range(3):
        cluster.vm(f"vm{i}", "src", memory="30Gi")
    result = plan(cluster, "src")
    # big 100 -> vm0 (70 left); big 70 > small 50 -> vm1 (40 left); small 50 > big 40 -> vm2.
    assert [target_of(result, f"default/vm{i}") for i in range(3)] == ["big", "big", "small"]


def test_launcher_pod_overhead_counts_toward_placement() -> None:
    cluster = f.Cluster().node("src").node("t1", memory="8Gi")
    cluster.vm("vm", "src", memory="8Gi", launcher_memory="8392Mi")
    message = refusal(cluster, "src")
    assert "needs 8.2 GiB of memory" in message


# --- placement constraints -----------------------------------------------------------------------------


def cpu_cluster(**source: Any) -> f.Cluster:
    cluster = f.Cluster().node("src", **source)
    cluster.node("sky1").node("sky2")
    return cluster


PlacementCase = tuple[str, Callable[[], f.Cluster], dict[str, Any], str]

PLACEMENT_CASES: list[PlacementCase] = [
    (
        "host-model: only the one node with the source's host CPU model",
        lambda: cpu_cluster(host_model="Cascadelake").node("cas", host_model="Cascadelake", memory="16Gi"),
        {},
        "cas",
    ),
    (
        "host-model: no node with the source's model",
        lambda: cpu_cluster(host_model="Cascadelake"),
        {},
        "no fitting target: no schedulable node outside the drain supports host-model CPU 'Cascadelake' of "
        "source node src (label host-model-cpu.node.kubevirt.io/Cascadelake=true)",
    ),
    (
        "host-model: the only compatible node is too small",
        lambda: cpu_cluster(host_model="Cascadelake").node("cas", host_model="Cascadelake", memory="2Gi"),
        {},
        "no fitting target: needs 4 GiB of memory; the most free among the 1 matching node(s) is 2 GiB (cas)",
    ),
    (
        "host-passthrough follows the source's host model too",
        lambda: cpu_cluster(host_model="Cascadelake").node("cas", host_model="Cascadelake"),
        {"cpu_model": "host-passthrough"},
        "cas",
    ),
    (
        "named model needs the cpu-model label",
        lambda: cpu_cluster().node("epyc", cpu_models=("EPYC",)),
        {"cpu_model": "EPYC"},
        "epyc",
    ),
    (
        "named model nobody supports",
        cpu_cluster,
        {"cpu_model": "Icelake-Server"},
        "no fitting target: no schedulable node outside the drain supports CPU model 'Icelake-Server'",
    ),
    (
        "vendor must match the source",
        lambda: cpu_cluster(vendor="AMD", host_model=None).node("amd", vendor="AMD", host_model=None),
        {},
        "amd",
    ),
    (
        "no node of the source's vendor",
        lambda: cpu_cluster(vendor="AMD"),
        {},
        "no fitting target: no schedulable node outside the drain has CPU vendor label "
        "cpu-vendor.node.kubevirt.io/AMD=true",
    ),
    (
        "nodeSelector picks the labelled node",
        lambda: cpu_cluster().node("zb", labels={"zone": "b"}),
        {"node_selector": {"zone": "b"}},
        "zb",
    ),
    (
        "nodeSelector nobody matches",
        cpu_cluster,
        {"node_selector": {"zone": "c"}},
        "no fitting target: no schedulable node outside the drain matches nodeSelector {'zone': 'c'}",
    ),
    (
        "tainted nodes are avoided",
        lambda: (
            f.Cluster()
            .node("src")
            .node("t1", taints=[{"key": "dedicated", "value": "db", "effect": "NoSchedule"}])
            .node("t2", memory="8Gi")
        ),
        {},
        "t2",
    ),
    (
        "a tolerated taint is fine",
        lambda: (
            f.Cluster().node("src").node("t1", taints=[{"key": "dedicated", "value": "db", "effect": "NoSchedule"}])
        ),
        {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]},
        "t1",
    ),
    (
        "only an untolerated taint left",
        lambda: f.Cluster().node("src").node("t1", taints=[{"key": "gpu", "effect": "NoExecute"}]),
        {},
        "no fitting target: no schedulable node outside the drain has no taint the VM does not tolerate",
    ),
    (
        "not ready, cordoned and control-plane nodes are not targets",
        lambda: (
            f.Cluster()
            .node("src")
            .node("a-notready", ready=False, memory="512Gi")
            .node("b-cordoned", unschedulable=True, memory="512Gi")
            .node("c-cp", control_plane=True, memory="512Gi")
            .node("z-ok", memory="8Gi")
        ),
        {},
        "z-ok",
    ),
]


@pytest.mark.parametrize(
    ("title", "build", "vm_kwargs", "expected"), PLACEMENT_CASES, ids=[c[0] for c in PLACEMENT_CASES]
)
def test_placement_constraints(
    title: str, build: Callable[[], f.Cluster], vm_kwargs: dict[str, Any], expected: str
) -> None:
    cluster = build()
    cluster.vm("vm", "src", memory="4Gi", **vm_kwargs)
    result = plan(cluster, "src", non_migratable=NonMigratablePolicy.SKIP)
    verdict, reason = decision(result, "default/vm")
    if expected.startswith("no fitting target"):
        assert verdict is VmVerdict.BLOCK
        assert reason.startswith(expected), reason
    else:
        assert verdict is VmVerdict.MIGRATE, reason
        assert target_of(result, "default/vm") == expected


def test_other_draining_nodes_are_not_targets() -> None:
    cluster = f.Cluster().node("a", memory="512Gi").node("b", memory="512Gi").node("c", memory="8Gi")
    cluster.vm("vm", "a", memory="4Gi")
    result = plan(cluster, "a", "b")
    assert target_of(result, "default/vm") == "c"


def test_host_model_with_one_compatible_node_is_warned() -> None:
    cluster = cpu_cluster(host_model="Cascadelake").node("cas", host_model="Cascadelake")
    cluster.vm("vm", "src")
    result = plan(cluster, "src")
    assert any(
        "host-model CPU 'Cascadelake' has 1 compatible target node(s)" in w and "default/vm" in w
        for w in result.warnings
    )


# --- verdicts ------------------------------------------------------------------------------------------

NOT_MIGRATABLE = [
    ("InterfaceNotLiveMigratable", "cannot migrate VMI which does not use masquerade to connect to the pod network"),
    ("CPUModeLiveMigratable", "VMI uses host-passthrough CPU model"),
    ("HostDeviceNotLiveMigratable", "VMI uses a PCI host devices"),
    ("SEVNotLiveMigratable", "VMI uses SEV"),
    ("DisksNotLiveMigratable", "PVC data is not shared, live migration requires that all PVCs must be shared"),
    ("HypervPassthroughNotLiveMigratable", "VMI uses hyperv passthrough"),
]


@pytest.mark.parametrize(("reason", "message"), NOT_MIGRATABLE)
def test_not_live_migratable_blocks_with_kubevirt_reason(reason: str, message: str) -> None:
    cluster = f.Cluster().node("src").node("t1")
    cluster.vm("vm", "src", live_migratable=("False", reason, message))
    result = plan(cluster, "src", non_migratable=NonMigratablePolicy.SKIP)
    assert decision(result, "default/vm") == (VmVerdict.BLOCK, f"LiveMigratable=False: {reason}: {message}")
    assert not result.node_plan("src").can_finish_drained
    refused = refusal(cluster, "src")
    assert f"default/vm (LiveMigratable=False: {reason}: {message})" in refused
    assert "non_migratable=skip" in refused


@pytest.mark.parametrize(
    ("strategy", "cluster_strategy", "live", "policy", "verdict", "reason"),
    [
        ("None", None, "True", "skip", VmVerdict.SKIP, "evictionStrategy None: the VM would be stopped, not migrated"),
        ("None", None, "True", "block", None, "evictionStrategy None: the VM would be stopped, not migrated"),
        (
            None,
            None,
            "True",
            "skip",
            VmVerdict.SKIP,
            "evictionStrategy None (KubeVirt default): the VM would be stopped",
        ),
        (None, "LiveMigrate", "True", "block", VmVerdict.MIGRATE, "evictionStrategy LiveMigrate (cluster setting)"),
        ("External", None, "True", "skip", VmVerdict.BLOCK, "evictionStrategy External: an external controller"),
        ("External", None, "True", "block", None, "evictionStrategy External: an external controller"),
        ("LiveMigrateIfPossible", None, "True", "block", VmVerdict.MIGRATE, "evictionStrategy LiveMigrateIfPossible"),
        (
            "LiveMigrateIfPossible",
            None,
            "False",
            "skip",
            VmVerdict.SKIP,
            "evictionStrategy LiveMigrateIfPossible and LiveMigratable=False: DisksNotLiveMigratable: PVC x is not "
            "shared: the VM would be stopped, not migrated",
        ),
        ("LiveMigrateIfPossible", None, "False", "block", None, "LiveMigrateIfPossible and LiveMigratable=False"),
        ("LiveMigrate", None, "True", "block", VmVerdict.MIGRATE, "evictionStrategy LiveMigrate, LiveMigratable=True"),
    ],
)
def test_eviction_strategies(
    strategy: str | None,
    cluster_strategy: str | None,
    live: str,
    policy: str,
    verdict: VmVerdict | None,
    reason: str,
) -> None:
    cluster = f.Cluster(kubevirt_obj=f.kubevirt(eviction_strategy=cluster_strategy)).node("src").node("t1")
    cluster.vm(
        "vm",
        "src",
        eviction_strategy=strategy,
        live_migratable=(live, "DisksNotLiveMigratable", "PVC x is not shared")
        if live == "False"
        else ("True", "", ""),
    )
    if verdict is None:
        assert reason in refusal(cluster, "src", non_migratable=NonMigratablePolicy(policy))
        return
    got_verdict, got_reason = decision(plan(cluster, "src", non_migratable=NonMigratablePolicy(policy)), "default/vm")
    assert got_verdict is verdict
    assert got_reason.startswith(reason), got_reason


def test_skip_policy_leaves_node_incomplete_and_warns() -> None:
    cluster = f.Cluster().node("src").node("t1")
    cluster.vm("keep", "src", eviction_strategy="None").vm("move", "src")
    result = plan(cluster, "src", non_migratable=NonMigratablePolicy.SKIP)
    node = result.node_plan("src")
    assert [j.vmi for j in node.jobs] == ["default/move"]
    assert [d.vmi for d in node.skipped] == ["default/keep"]
    assert not node.can_finish_drained
    assert "node src will not finish drained: 1 VM(s) skipped, 0 blocked" in result.warnings


@pytest.mark.parametrize(
    ("phase", "verdict", "fragment"),
    [
        ("Unknown", VmVerdict.BLOCK, "VMI phase Unknown: node src is not reporting its state"),
        ("Scheduled", VmVerdict.MIGRATE, "VMI is Scheduled; migrated once Running"),
    ],
)
def test_vmi_phase(phase: str, verdict: VmVerdict, fragment: str) -> None:
    cluster = f.Cluster().node("src").node("t1")
    cluster.vm("vm", "src", phase=phase)
    got, reason = decision(plan(cluster, "src", non_migratable=NonMigratablePolicy.SKIP), "default/vm")
    assert got is verdict and fragment in reason


def test_final_vmis_are_not_planned() -> None:
    cluster = f.Cluster().node("src").node("t1")
    cluster.vm("done", "src", phase="Succeeded")
    result = plan(cluster, "src")
    assert result.node_plan("src").jobs == () and result.node_plan("src").can_finish_drained


def test_foreign_in_flight_migration_is_noted() -> None:
    cluster = f.Cluster().node("src").node("t1")
    cluster.vm("vm", "src", evacuation_node="src")
    cluster.migration(
        "kubevirt-evacuation-x1",
        "vm",
        annotations={"kubevirt.io/evacuationMigration": "src"},
        created="2026-01-01T00:00:10Z",
    )
    cluster.migration("old", "vm", phase="Failed")
    result = plan(cluster, "src")
    job = next(result.jobs())
    assert job.in_flight_migration == "default/kubevirt-evacuation-x1"
    assert (
        "already migrating: VMIM default/kubevirt-evacuation-x1 (evacuation, phase Running, 90 s old); "
        "the job waits for it" in job.reason
    )
    assert "KubeVirt evacuation already requested (evacuationNodeName=src)" in job.reason
    assert any("1 VM(s) already have a migration in flight: default/vm" in w for w in result.warnings)


def test_own_in_flight_migration_is_adopted() -> None:
    cluster = f.Cluster().node("src").node("t1")
    cluster.vm("vm", "src").migration("drain-d1-vm-1", "vm", labels={"drainctl.io/drain-id": "d1"})
    job = next(plan(cluster, "src", drain_id="d1").jobs())
    assert "adopts in-flight VMIM default/drain-d1-vm-1 of this drain" in job.reason


# --- pods ----------------------------------------------------------------------------------------------


def test_non_vm_pods() -> None:
    cluster = f.Cluster().node("src").node("t1")
    cluster.vm("vm", "src")
    cluster.pod("virt-handler-x", "src", owner_kind="DaemonSet", namespace="kubevirt")
    cluster.pod("kube-apiserver-src", "src", owner_kind="Node", mirror=True, namespace="kube-system")
    cluster.pod("web", "src", empty_dir=True)
    cluster.pod("bare", "src", owner_kind=None)
    cluster.pod("job-done", "src", phase="Succeeded")
    orphan = f.launcher_pod(f.vmi("gone", "src"))
    cluster.pods.append(orphan)
    node = plan(cluster, "src").node_plan("src")
    assert {p.pod: p.notes for p in node.evict_pods} == {
        "default/web": ("emptyDir data is lost",),
        "default/bare": ("no controller: the pod is deleted and not recreated",),
        "default/virt-launcher-gone-abcde": ("virt-launcher pod without a VMI",),
    }
    assert set(node.ignored_pods) == {
        "kubevirt/virt-handler-x",
        "kube-system/kube-apiserver-src",
        "default/virt-launcher-vm-abcde",
    }


# --- order, waves --------------------------------------------------------------------------------------


def test_jobs_largest_first_per_node() -> None:
    cluster = f.Cluster().node("src").node("t1", memory="256Gi")
    for name, memory in [("a", "2Gi"), ("b", "8Gi"), ("c", "4Gi"), ("d", "8Gi"), ("e", "16Gi")]:
        cluster.vm(name, "src", memory=memory)
    jobs = plan(cluster, "src").node_plan("src").jobs
    assert [j.vmi.split("/")[1] for j in jobs] == ["e", "b", "d", "c", "a"]
    assert [j.memory_bytes // GI for j in jobs] == [16, 8, 8, 4, 2]


def order_cluster() -> f.Cluster:
    cluster = f.Cluster().node("t1", memory="512Gi")
    loads = {"n1": ["8Gi", "8Gi", "8Gi"], "n2": ["2Gi"], "n3": ["4Gi", "4Gi"], "n4": [], "n5": ["16Gi"]}
    for node, memories in loads.items():
        cluster.node(node)
        for i, memory in enumerate(memories):
            cluster.vm(f"{node}-{i}", node, memory=memory)
    return cluster


@pytest.mark.parametrize(
    ("order", "parallel", "waves"),
    [
        (NodeOrder.GIVEN, 1, [["n1"], ["n2"], ["n3"], ["n4"], ["n5"]]),
        (NodeOrder.GIVEN, 2, [["n1", "n2"], ["n3", "n4"], ["n5"]]),
        (NodeOrder.PLANNER, 2, [["n4", "n2"], ["n3", "n5"], ["n1"]]),
        (NodeOrder.PLANNER, 5, [["n4", "n2", "n3", "n5", "n1"]]),
    ],
)
def test_node_order_and_waves(order: NodeOrder, parallel: int, waves: list[list[str]]) -> None:
    result = plan(order_cluster(), "n1", "n2", "n3", "n4", "n5", order=order, max_parallel_nodes=parallel)
    assert [list(w) for w in result.waves] == waves
    assert list(result.drain_nodes) == [n for w in waves for n in w]
    assert [(p.node, p.wave) for p in result.nodes] == [(n, i) for i, w in enumerate(waves) for n in w]


# --- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "kwargs", "message"),
    [
        ((), {}, "no nodes to drain"),
        (("n1", "ghost", "phantom"), {}, "unknown node(s): ghost, phantom"),
        (("n1", "n2", "n1"), {}, "duplicate node(s) in the request: n1"),
        (("n1", "n2"), {"max_parallel_nodes": 3}, "max_parallel_nodes 3 must be between 1"),
        (("n1", "n2", "n3"), {}, "the request drains every schedulable node (n1, n2, n3); no node would remain"),
    ],
)
def test_refusals(nodes: tuple[str, ...], kwargs: dict[str, Any], message: str) -> None:
    cluster = f.Cluster().node("n1").node("n2").node("n3").node("cp", control_plane=True)
    assert message in refusal(cluster, *nodes, **kwargs)


def test_refusal_collects_every_request_problem() -> None:
    cluster = f.Cluster().node("n1").node("n2")
    with pytest.raises(PlanError) as info:
        plan(cluster, "n1", "n1", "x", max_parallel_nodes=5)
    assert len(info.value.problems) == 3
    assert not info.value.retryable


def test_drain_nodes_already_cordoned_still_plan() -> None:
    cluster = f.Cluster().node("src", unschedulable=True).node("t1")
    cluster.vm("vm", "src")
    assert target_of(plan(cluster, "src"), "default/vm") == "t1"


# --- limits, estimate, warnings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kubevirt_migrations", "limits", "effective", "warned"),
    [
        ({}, Limits(), (5, 2, 2), []),
        (
            {"parallelMigrationsPerCluster": 3, "parallelOutboundMigrationsPerNode": 1},
            Limits(),
            (3, 1, 2),
            [
                "parallelMigrationsPerCluster=3 is below our max_in_flight_cluster=5: using 3",
                "parallelOutboundMigrationsPerNode=1 is below our max_in_flight_per_node=2: using 1",
            ],
        ),
        ({}, Limits(max_in_flight_cluster=2, max_in_flight_per_node=1, max_inbound_per_node=3), (2, 1, 3), []),
        ({"parallelMigrationsPerCluster": 50}, Limits(max_in_flight_cluster=20), (20, 2, 2), []),
    ],
)
def test_effective_limits(
    kubevirt_migrations: dict[str, Any], limits: Limits, effective: tuple[int, int, int], warned: list[str]
) -> None:
    cluster = f.Cluster(kubevirt_obj=f.kubevirt(kubevirt_migrations)).node("src").node("t1")
    result = plan(cluster, "src", settings=Settings(limits=limits))
    got = result.limits
    assert (
        got.in_flight_cluster.effective,
        got.outbound_per_node.effective,
        got.inbound_per_node.effective,
    ) == effective
    assert got.in_flight_cluster.ours == limits.max_in_flight_cluster
    assert got.in_flight_cluster.kubevirt == kubevirt_migrations.get("parallelMigrationsPerCluster", 5)
    assert got.inbound_per_node.kubevirt is None
    for text in warned:
        assert any(text in w for w in result.warnings), result.warnings
    if not warned:
        assert not any("is below our" in w for w in result.warnings)


def test_timeouts_take_request_overrides_and_kubevirt_minimum() -> None:
    cluster = f.Cluster(kubevirt_obj=f.kubevirt({"completionTimeoutPerGiB": 20})).node("src").node("t1")
    cluster.vm("vm", "src", memory="4Gi")
    result = plan(cluster, "src", progress_timeout_s=60.0, max_attempts=5, pending_timeout_s=120.0)
    limits = result.limits
    assert (limits.completion_timeout_per_gib.ours, limits.completion_timeout_per_gib.effective) == (150, 20)
    assert (limits.progress_timeout_s.ours, limits.progress_timeout_s.effective) == (60.0, 60.0)
    assert (limits.max_attempts, limits.pending_timeout_s) == (5, 120.0)
    # 4 GiB = 4.29 decimal GB, rounded up to 5 as KubeVirt does: 20 s x 5.
    assert next(result.jobs()).completion_timeout_s == 100


def test_kubevirt_allowing_no_migrations_is_refused() -> None:
    cluster = f.Cluster(kubevirt_obj=f.kubevirt({"parallelMigrationsPerCluster": 0})).node("src").node("t1")
    assert "KubeVirt allows no migrations (parallelMigrationsPerCluster=0" in refusal(cluster, "src")


@pytest.mark.parametrize(
    ("vms_per_node", "nodes", "kubevirt_migrations", "per_vm", "total"),
    [
        (1, 1, {}, 12.0, 12.0),
        (2, 1, {}, 12.0, 12.0),  # two outbound slots: both at once
        (3, 1, {}, 12.0, 24.0),
        (3, 2, {}, 12.0, 24.0),  # 6 jobs, 4 slots (2 nodes x 2)
        (3, 2, {"parallelMigrationsPerCluster": 2}, 12.0, 36.0),  # 6 jobs on 2 cluster slots
        (1, 1, {"bandwidthPerMigration": "112500000"}, 20.0, 20.0),  # capped: 1.125e9 B / 1.125e8 B/s
        (2, 1, {"parallelOutboundMigrationsPerNode": 1}, 11.0, 22.0),  # one slot gets the whole NIC
    ],
)
def test_estimate(
    vms_per_node: int, nodes: int, kubevirt_migrations: dict[str, Any], per_vm: float, total: float
) -> None:
    # 1.125e9 bytes at 1.125e9 B/s per node split over 2 slots = 2 s transfer + 10 s setup.
    cluster = f.Cluster(kubevirt_obj=f.kubevirt(kubevirt_migrations)).node("t1", memory="512Gi")
    names = [f"n{i}" for i in range(nodes)]
    for name in names:
        cluster.node(name)
        for v in range(vms_per_node):
            cluster.vm(f"{name}-{v}", name, memory="1125000000")
    result = plan(cluster, *names, max_parallel_nodes=nodes)
    assert {job.estimated_s for job in result.jobs()} == {per_vm}
    assert result.estimate.total_s == total
    assert result.estimate.wave_s == (total,)
    assert "estimate" in result.estimate.model


def test_estimate_sums_waves() -> None:
    cluster = f.Cluster().node("t1", memory="512Gi").node("a").node("b")
    cluster.vm("a0", "a", memory="1125000000").vm("b0", "b", memory="1125000000").vm("b1", "b", memory="1125000000")
    result = plan(cluster, "a", "b")
    assert result.estimate.wave_s == (12.0, 12.0)
    assert result.estimate.total_s == 24.0


def test_warnings_for_network_and_storage() -> None:
    cluster = f.Cluster().node("src").node("t1")
    cluster.vm("rwo", "src", claims=["data"]).vm("rwx", "src", claims=["shared"]).vm("plain", "src")
    cluster.pvcs = [f.pvc("data", access_modes=["ReadWriteOnce"]), f.pvc("shared")]
    result = plan(cluster, "src")
    assert any(w.startswith("no dedicated migration network") for w in result.warnings)
    assert any(
        "1 VM(s) to migrate have volumes that are not ReadWriteMany: default/rwo (data)" in w for w in result.warnings
    )
    assert not any("unknown" in w for w in result.warnings)

    dedicated = f.Cluster(kubevirt_obj=f.kubevirt({"network": "migration"})).node("src").node("t1")
    dedicated.vm("vm", "src", claims=["data"])
    warnings = plan(dedicated, "src").warnings
    assert not any("migration network" in w for w in warnings)
    assert "access modes of 1 VM(s)' volumes are unknown (their PVCs were not read)" in warnings


# --- serialisation and purity --------------------------------------------------------------------------


def rich_plan() -> DrainPlan:
    cluster = order_cluster()
    cluster.vm("skipme", "n2", eviction_strategy="None")
    cluster.vm("stuck", "n3", live_migratable=("False", "DisksNotLiveMigratable", "PVC d is not shared"))
    cluster.pod("web", "n1", empty_dir=True)
    cluster.migration("m1", "n1-0", annotations={"kubevirt.io/evacuationMigration": "n1"})
    return plan(
        cluster,
        "n1",
        "n2",
        "n3",
        order=NodeOrder.PLANNER,
        max_parallel_nodes=2,
        non_migratable=NonMigratablePolicy.SKIP,
        drain_id="d-42",
    )


def test_plan_json_round_trip() -> None:
    result = rich_plan()
    data = result.to_json()
    text = json.dumps(data)
    assert DrainPlan.from_json(json.loads(text)) == result
    assert data["policy"] == "skip" and data["order"] == "planner" and data["drain_id"] == "d-42"
    assert data["nodes"][0]["skipped"] == [] or isinstance(data["nodes"][0]["skipped"], list)
    assert {d["verdict"] for n in data["nodes"] for d in n["skipped"] + n["blocked"]} == {"Skip", "Block"}


def test_malformed_plan_json_is_a_value_error() -> None:
    data = rich_plan().to_json()
    del data["capacity"]
    with pytest.raises(ValueError, match="drain plan: malformed JSON"):
        DrainPlan.from_json(data)


def test_planning_is_deterministic() -> None:
    assert rich_plan() == rich_plan()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"nodes": "n1"}, "nodes: expected a list of node names"),
        ({"nodes": ["n1", 3]}, "nodes: 3 is not a node name"),
        ({"nodes": ["n1"], "order": "random"}, "order: 'random' is not one of given, planner"),
        ({"nodes": ["n1"], "non_migratable": "stop"}, "non_migratable: 'stop' is not one of block, skip"),
        ({"nodes": ["n1"], "max_parallel_nodes": "2"}, "max_parallel_nodes: expected an integer"),
        ({"nodes": ["n1"], "progress_timeout_s": "fast"}, "progress_timeout_s: expected a number of seconds"),
        ({"nodes": ["n1"], "uncordon_on_cancel": "yes"}, "uncordon_on_cancel: expected true or false"),
        ({"nodes": ["n1"], "force": True}, "unknown field(s) force"),
        # The numeric ranges are DrainRequest's own (REQUEST_BOUNDS), whoever builds one.
        ({"nodes": ["n1"], "max_parallel_nodes": 0}, "max_parallel_nodes: 0 is out of range (1..10000)"),
        ({"nodes": ["n1"], "max_attempts": 0}, "max_attempts: 0 is out of range (1..100)"),
        ({"nodes": ["n1"], "pending_timeout_s": 1e300}, "pending_timeout_s: 1e+300 is out of range (1..86400)"),
    ],
)
def test_drain_request_from_json_rejects(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="drain request") as info:
        DrainRequest.from_json(body)
    assert message in str(info.value)


def test_drain_request_json_round_trip() -> None:
    req = request("a", "b", max_parallel_nodes=2, order=NodeOrder.PLANNER, max_attempts=4, progress_timeout_s=90.0)
    assert DrainRequest.from_json(json.loads(json.dumps(req.to_json()))) == req


# --- scale ---------------------------------------------------------------------------------------------


def test_large_cluster_plans_every_vm() -> None:
    # How long this takes is measured by `python -m bench.speed`, not asserted here.
    snapshot = large_snapshot(1000, 30)
    drain = tuple(NodeName(f"node-{n:04d}") for n in range(100))
    result = plan_drain(
        snapshot, DrainRequest(nodes=drain, max_parallel_nodes=10, order=NodeOrder.PLANNER), Settings(), now=NOW
    )
    assert result.capacity.ok and result.capacity.placed_vms == 3000
    assert len(result.waves) == 10
    # Host-model VMs from Cascadelake nodes land on Cascadelake nodes only.
    cascadelake = {f"node-{n:04d}" for n in range(0, 1000, 4)}
    for job in result.jobs():
        assert (job.source_node in cascadelake) == (job.proposed_target in cascadelake)


def test_drain_request_accepts_plain_strings() -> None:
    req = DrainRequest(nodes=["a", "b"], order="planner", non_migratable="skip")  # type: ignore[arg-type]
    assert req.nodes == ("a", "b")
    assert req.order is NodeOrder.PLANNER and req.non_migratable is NonMigratablePolicy.SKIP
    with pytest.raises(ValueError, match="'sideways' is not a valid NodeOrder"):
        DrainRequest(nodes=("a",), order="sideways")  # type: ignore[arg-type]


# --- hard VMs --------------------------------------------------------------------------------------------------

S, A, P = Rung.SOLO, Rung.AUTO_CONVERGE, Rung.POST_COPY
GB = 1e9


def _backoff(attempt: int) -> float:
    return 20.0 * 2 ** (attempt - 2)


@pytest.mark.parametrize(("dirty", "allowed", "rung", "extra_s"), [
    (0.4 * GB, {S, A}, None, None),                 # below its bandwidth: not hard
    (0.5 * GB, {S, A}, S, 20 + 10 + 8),             # at its bandwidth, below the NIC: solo (8 GB at 1 GB/s)
    (0.9 * GB, {A}, A, 20 + 10 + 32),               # solo not allowed: auto-converge (twice 8 GB at 0.5 GB/s)
    (2.0 * GB, {S, A}, A, 20 + 10 + 8 + JUDGE_S + 40 + 10 + 32),  # more than the NIC: solo judged, then throttled
    (2.0 * GB, {S, P}, P, 20 + 10 + 8 + JUDGE_S + 40 + 10 + 16 + 8),  # post-copy: first pass + 1 s per GB
    (2.0 * GB, {S}, None, 20 + 10 + 8 + JUDGE_S),   # nothing above solo: reported after its verdict
    (2.0 * GB, set(), None, 0),
])
def test_expect_hard_names_the_rung_and_counts_the_attempts_before_it(
        dirty: float, allowed: set[Rung], rung: Rung | None, extra_s: float | None) -> None:
    hard = expect_hard(dirty_rate=dirty, memory_bytes=int(8 * GB), bandwidth=0.5 * GB, nic_bytes_per_s=1 * GB,
                       cap_bytes_per_s=0, allowed=frozenset(allowed), setup_s=10, backoff=_backoff)
    if extra_s is None:
        assert hard is None
        return
    assert hard is not None and hard.rung is rung
    plain = 10 + 16 + JUDGE_S  # setup, 8 GB at 0.5 GB/s, the verdict
    assert hard.estimated_s == pytest.approx(plain + extra_s)
    assert "at or above the 476.8 MiB/s a migration of it gets" in hard.reason
    if rung is None:
        assert "it would be reported, not moved" in hard.reason


@pytest.mark.parametrize(("dirty", "allowed", "rung", "seconds"), [
    (0.5 * GB, {S, A, P}, S, 10 + 8),           # solo helps: the NIC to itself (8 GB at 1 GB/s)
    (2.0 * GB, {S, A}, A, 10 + 32),             # more than the NIC carries: throttled (twice 8 GB at 0.5 GB/s)
    (2.0 * GB, {S, A, P}, P, 10 + 16 + 8),      # post-copy allowed: one pass and 1 s per GB, quicker than throttling
    (2.0 * GB, {S}, None, None),                # nothing expected to move it: reported
])
def test_a_first_attempt_on_its_rung_takes_the_quickest_allowed(dirty: float, allowed: set[Rung],
                                                                  rung: Rung | None, seconds: float | None) -> None:
    hard = expect_hard(dirty_rate=dirty, memory_bytes=int(8 * GB), bandwidth=0.5 * GB, nic_bytes_per_s=1 * GB,
                       cap_bytes_per_s=0, allowed=frozenset(allowed), setup_s=10, backoff=_backoff,
                       start_on_rung=True)
    assert hard is not None and hard.rung is rung
    if seconds is not None:
        assert hard.estimated_s == pytest.approx(seconds)
        assert "where its first attempt starts" in hard.reason


def test_a_bandwidth_cap_keeps_solo_from_helping() -> None:
    hard = expect_hard(dirty_rate=0.7 * GB, memory_bytes=int(8 * GB), bandwidth=0.5 * GB, nic_bytes_per_s=1 * GB,
                       cap_bytes_per_s=0.6 * GB, allowed=frozenset({S, A}), setup_s=10, backoff=_backoff)
    assert hard is not None and hard.rung is A


def _hard_cluster() -> f.Cluster:
    return f.Cluster().node("src").node("t1").node("t2").vm("hot", "src", memory="8Gi").vm("calm", "src")


def test_the_plan_marks_a_vm_whose_dirty_rate_reaches_its_bandwidth_and_counts_its_rung() -> None:
    settings = Settings()  # 1.125 GB/s per node, 2 at once: 562 MB/s per migration
    snapshot = _hard_cluster().snapshot()
    plain = plan_drain(snapshot, request("src"), settings, now=NOW)
    result = plan_drain(snapshot, request("src"), settings, now=NOW,
                        dirty_rates={"default/hot": 0.8e9, "default/calm": 0.1e9})
    jobs = {job.vmi: job for job in result.nodes[0].jobs}
    before = {job.vmi: job for job in plain.nodes[0].jobs}
    hot, calm = jobs["default/hot"], jobs["default/calm"]
    assert hot.expected_hard and hot.expected_rung == "Solo" and hot.dirty_rate_bytes_per_s == 0.8e9, hot
    # The workers start it on that rung (the default): its estimate is one solo attempt, the NIC to itself.
    assert "expected to move on the solo rung, where its first attempt starts" in (hot.hard_reason or "")
    assert hot.estimated_s == pytest.approx(settings.estimate.setup_s + 8 * 1024**3 / 1.125e9, rel=0.01)
    assert not calm.expected_hard and calm.expected_rung is None
    assert calm.estimated_s == before["default/calm"].estimated_s
    assert result.estimate.total_s >= hot.estimated_s
    # Workers that climb from a plain attempt: the estimate includes the judged attempt before the rung.
    climbing = dataclasses.replace(settings, retry=dataclasses.replace(settings.retry, start_on_expected_rung=False))
    [slow] = [j for j in plan_drain(snapshot, request("src"), climbing, now=NOW,
                                    dirty_rates={"default/hot": 0.8e9}).nodes[0].jobs if j.vmi == "default/hot"]
    assert "expected to move on the solo rung after 1 judged attempt(s)" in (slow.hard_reason or "")
    assert slow.estimated_s > before["default/hot"].estimated_s + JUDGE_S
    assert any("1 VM(s) expected to be hard" in w and "default/hot (solo)" in w for w in result.warnings)
    again = DrainPlan.from_json(json.loads(json.dumps(result.to_json())))
    assert again.nodes[0].jobs == result.nodes[0].jobs


def test_the_plan_follows_the_drain_and_the_vm_annotation() -> None:
    cluster = _hard_cluster()
    cluster.vmis[0]["metadata"]["annotations"]["drainctl.io/escalation"] = "post-copy"
    snapshot = cluster.snapshot()
    rates = {"default/hot": 0.8e9}
    [hot] = [j for j in plan_drain(snapshot, request("src"), Settings(), now=NOW, dirty_rates=rates).nodes[0].jobs
             if j.vmi == "default/hot"]
    assert hot.expected_rung == "PostCopy"  # the VM opted in to post-copy and out of the others
    [off] = [j for j in plan_drain(snapshot, request("src", escalation=()), Settings(), now=NOW,
                                   dirty_rates=rates).nodes[0].jobs if j.vmi == "default/hot"]
    assert off.expected_hard and off.expected_rung is None and "allowed: none" in (off.hard_reason or "")


def test_a_bad_escalation_annotation_is_a_plan_warning_naming_it() -> None:
    cluster = _hard_cluster()
    cluster.vmis[0]["metadata"]["annotations"]["drainctl.io/escalation"] = "turbo"
    result = plan_drain(cluster.snapshot(), request("src"), Settings(), now=NOW, dirty_rates={"default/hot": 0.8e9})
    assert any("annotation drainctl.io/escalation on VMI default/hot: unknown rung(s) 'turbo'" in w
               for w in result.warnings), result.warnings


def test_the_tuner_gets_the_dirty_rates_where_solo_is_not_allowed() -> None:
    snapshot = _hard_cluster().snapshot()
    rates = {"default/hot": 0.5e9}
    no_solo = request("src", escalation=("auto-converge",))
    calm = plan_drain(snapshot, no_solo, Settings(), now=NOW)
    hot = plan_drain(snapshot, no_solo, Settings(), now=NOW, dirty_rates=rates)
    # The convergence cap applies: a VM that needs more bandwidth makes the node run fewer at once.
    assert hot.tuning != calm.tuning
    # Where solo is allowed (the default) that VM goes solo instead: the node keeps its parallelism.
    default_calm = plan_drain(snapshot, request("src"), Settings(), now=NOW)
    default_hot = plan_drain(snapshot, request("src"), Settings(), now=NOW, dirty_rates=rates)
    assert default_hot.tuning == default_calm.tuning
