"""Scenarios: built-in sizes and properties, determinism, YAML and kubectl-dump loading."""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from simulator.physics import GIB, precopy_estimate
from simulator.scenarios import (
    BUILTIN_NAMES,
    GBIT,
    NodeSpec,
    Scenario,
    ScenarioError,
    VMSpec,
    builtin,
    load,
    load_dump,
    load_yaml,
    parse_quantity,
    parse_rate,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "simulator" / "scenarios" / "example.yaml"


def workers(s: Scenario) -> list[NodeSpec]:
    return [n for n in s.nodes if not n.control_plane]


def load_of(s: Scenario) -> dict[str, int]:
    out = {n.name: 0 for n in s.nodes}
    for vm in s.vms:
        out[vm.node] += vm.memory_bytes
    return out


def compatible(vm: VMSpec, source: NodeSpec, target: NodeSpec) -> bool:
    """The placement rules KubeVirt applies to a target pod that these scenarios exercise."""
    if target.control_plane or target.name == source.name:
        return False
    if target.cpu_vendor != source.cpu_vendor:
        return False
    if vm.cpu_model in ("host-model", "host-passthrough") and target.cpu_model != source.cpu_model:
        return False
    labels = target.node_labels()
    if vm.cpu_model not in ("host-model", "host-passthrough") and labels.get(
        "cpu-model.node.kubevirt.io/" + vm.cpu_model
    ) != "true":
        return False
    return all(labels.get(k) == v for k, v in vm.node_selector.items())


def packs(s: Scenario, drained: Iterable[str]) -> bool:
    """First-fit decreasing of every movable VM on `drained` onto the other workers' free memory."""
    gone = set(drained)
    free = {n.name: n.memory_bytes - used for n, used in ((n, load_of(s)[n.name]) for n in workers(s))}
    moving = sorted((vm for vm in s.vms if vm.node in gone), key=lambda vm: -vm.memory_bytes)
    for vm in moving:
        source = s.node_by_name[vm.node]
        options = [t for t in workers(s) if t.name not in gone and compatible(vm, source, t)
                   and free[t.name] >= vm.memory_bytes]
        if not options:
            return False
        best = max(options, key=lambda t: (free[t.name], t.name))
        free[best.name] -= vm.memory_bytes
    return True


# --------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("name", "n_workers", "n_control", "n_vms", "drain", "parallel", "nic_gbit", "dedicated"),
    [
        ("small", 6, 0, 45, 1, 1, 25, False),
        ("enterprise", 32, 3, 1280, 4, 4, 25, True),
        ("hostile", 16, 3, 208, 2, 2, 10, True),
        ("large", 1000, 3, 30_000, 100, 100, 100, True),
    ],
)
def test_builtin_sizes(
    name: str, n_workers: int, n_control: int, n_vms: int, drain: int, parallel: int, nic_gbit: int, dedicated: bool
) -> None:
    started = time.perf_counter()
    s = builtin(name)
    print(f"\nbuilt {name}: {len(s.nodes)} nodes, {len(s.vms)} VMs in {time.perf_counter() - started:.3f} s")
    assert (len(workers(s)), len(s.nodes) - len(workers(s)), len(s.vms)) == (n_workers, n_control, n_vms)
    assert len(s.drain_hint) == drain and s.parallel_hint == parallel
    assert {n.nic_bytes_per_s for n in workers(s)} == {nic_gbit * GBIT}
    assert s.dedicated_network is dedicated
    assert len({vm.key for vm in s.vms}) == len(s.vms)
    assert 2 <= len({vm.namespace for vm in s.vms}) <= 6
    # every VM sits on a worker and respects its own invariants
    for vm in s.vms[:2000]:
        assert not s.node_by_name[vm.node].control_plane
        assert 0 < vm.wws_bytes <= vm.resident_bytes <= vm.memory_bytes
        assert 5.0 <= vm.setup_s <= 20.0
    # node memory = 1.6 x the busiest node's VM memory, whole GiB
    busiest = max(load_of(s).values())
    assert {n.memory_bytes for n in workers(s)} == {math.ceil(1.6 * busiest / GIB) * GIB}
    summary = s.summary()
    assert summary["vms"] == n_vms and summary["drain_vms"] == sum(len(s.vms_by_node[n]) for n in s.drain_hint)


def test_small_drains_one_node_of_15_vms_of_2_4_8_gib_and_every_node_has_vms() -> None:
    s = builtin("small")
    assert s.drain_hint == ("worker-01",)
    drained = s.vms_by_node["worker-01"]
    assert len(drained) == 15
    assert {vm.memory_bytes // GIB for vm in s.vms} <= {2, 4, 8}
    assert all(s.vms_by_node[n.name] for n in s.nodes)


def test_small_is_feasible_for_any_node_and_any_three_with_two_in_parallel() -> None:
    s = builtin("small")
    names = [n.name for n in workers(s)]
    largest = max(load_of(s).values())
    for node in names:
        assert packs(s, [node]), node
    for trio in itertools.combinations(names, 3):
        assert packs(s, trio), trio
        # the OpenShift rule for 2 in parallel: spare memory >= 2 x the largest per-node VM memory
        spare = sum(n.memory_bytes - load_of(s)[n.name] for n in workers(s) if n.name not in trio)
        assert spare >= 2 * largest, trio


@pytest.mark.parametrize("name", ["enterprise", "hostile"])
def test_host_model_minority_leaves_few_compatible_targets_but_the_hint_stays_feasible(name: str) -> None:
    s = builtin(name)
    models = {n.cpu_model for n in workers(s)}
    assert len(models) == 2
    minority = min(models, key=lambda m: sum(1 for n in workers(s) if n.cpu_model == m))
    minority_nodes = [n for n in workers(s) if n.cpu_model == minority]
    assert 2 <= len(minority_nodes) <= len(workers(s)) // 4
    drained_minority = [n for n in s.drain_hint if s.node_by_name[n].cpu_model == minority]
    assert drained_minority, "the drain hint should exercise the scarce CPU model"
    host_model = [vm for vm in s.vms_by_node[drained_minority[0]] if vm.cpu_model == "host-model"]
    source = s.node_by_name[drained_minority[0]]
    targets = {t.name for vm in host_model for t in workers(s) if compatible(vm, source, t)}
    assert 1 <= len(targets) <= 2
    assert packs(s, s.drain_hint)


def test_enterprise_drain_is_about_one_and_a_half_tib_resident() -> None:
    s = builtin("enterprise")
    resident = sum(vm.resident_bytes for n in s.drain_hint for vm in s.vms_by_node[n])
    assert 1.0 * 1024**4 < resident < 1.6 * 1024**4
    lb = s.lower_bound()
    # migration-model.md 3.3 worked example: LB_phys ~ 167.5 s for S2
    assert 120 < lb.phys < 220
    assert lb.busiest_source in s.drain_hint


def test_hostile_has_non_convergent_non_migratable_and_none_strategy_vms() -> None:
    s = builtin("hostile")
    drained = [vm for n in s.drain_hint for vm in s.vms_by_node[n]]
    assert len(drained) == 40
    assert all(8 <= vm.memory_bytes // GIB <= 128 for vm in drained)
    assert all(vm.resident_bytes >= 0.7 * vm.memory_bytes - 1 for vm in drained)
    rwo = [vm for vm in drained if vm.not_migratable_reason == "DisksNotLiveMigratable"]
    assert len(rwo) == 2
    assert all(not vm.rwx_storage and vm.not_migratable_message and "ReadWriteMany" in vm.not_migratable_message
               for vm in rwo)
    assert [vm.eviction_strategy for vm in drained].count("None") == 1
    bandwidth = s.migration_bandwidth(s.drain_hint[0])
    stuck = [vm for vm in drained
             if not precopy_estimate(vm.physics(), bandwidth=bandwidth, downtime_s=0.3).converges]
    assert 4 <= len(stuck) <= 16
    assert math.isinf(s.lower_bound().precopy)


@pytest.mark.parametrize("name", ["small", "enterprise", "hostile"])
def test_same_name_and_seed_give_the_same_scenario(name: str) -> None:
    assert builtin(name) == builtin(name)
    assert builtin(name, seed=99) == builtin(name, seed=99)
    assert builtin(name, seed=99) != builtin(name)


def test_large_is_deterministic_too() -> None:
    a, b = builtin("large"), builtin("large")
    assert a.vms[::997] == b.vms[::997] and a.nodes == b.nodes
    assert a.summary() == b.summary()


def test_unknown_builtin_is_a_clear_error() -> None:
    with pytest.raises(ScenarioError, match="unknown built-in 'tiny'"):
        builtin("tiny")
    with pytest.raises(ScenarioError, match="neither a built-in"):
        load("no-such-scenario")


# --------------------------------------------------------------------------- derived physics


def test_pod_network_share_and_flow_caps() -> None:
    s = builtin("small")
    node = s.nodes[0]
    assert not s.dedicated_network
    assert s.migration_bandwidth(node.name) == pytest.approx(25 * GBIT * 0.9 * s.pod_network_share)
    multifd = next(vm for vm in s.vms if vm.multifd)
    assert math.isinf(s.flow_cap(multifd))
    single = replace(multifd, multifd=False)
    assert s.flow_cap(single) == s.single_stream_bytes_per_s
    capped = replace(s, migrations={**s.migrations, "bandwidthPerMigration": "64Mi"})
    assert capped.flow_cap(multifd) == 64 * 1024**2
    dedicated = builtin("enterprise")
    assert dedicated.migration_bandwidth("worker-01") == pytest.approx(25 * GBIT * 0.9)


def test_monitor_config_follows_the_kubevirt_configuration() -> None:
    s = builtin("small")
    cfg = s.monitor_config()
    assert (cfg.downtime_s, cfg.completion_timeout_per_gib, cfg.progress_timeout_s) == (0.3, 150, 150)
    assert not cfg.allow_post_copy and cfg.allow_workload_disruption is None
    custom = replace(s, migrations={**s.migrations, "allowPostCopy": True, "completionTimeoutPerGiB": 20,
                                    "maxDowntimeMs": 900})
    cfg = custom.monitor_config()
    assert cfg.allow_post_copy and cfg.workload_disruption
    # virt-launcher's default path never sets max downtime: QEMU's 300 ms stands whatever maxDowntimeMs says.
    assert (cfg.completion_timeout_per_gib, cfg.downtime_s) == (20, 0.3)


def test_hidden_physics_has_the_documented_shape() -> None:
    doc = builtin("small").hidden_physics()
    json.dumps(doc)  # serialisable as is
    assert {"nodes", "vms", "setup_s", "downtime_s", "migrations"} <= set(doc)
    assert {"name", "nic_bytes_per_s", "memory_bytes", "cpu_model"} <= set(doc["nodes"][0])
    assert {"vmi", "node", "memory_bytes", "resident_bytes", "dirty_bytes_per_s", "wws_bytes"} <= set(doc["vms"][0])
    assert doc["vms"][0]["vmi"].count("/") == 1


def test_node_labels_carry_kubevirt_cpu_labels() -> None:
    node = builtin("enterprise").node_by_name["worker-04"]
    labels = node.node_labels()
    assert labels["host-model-cpu.node.kubevirt.io/Icelake-Server"] == "true"
    assert labels["cpu-model.node.kubevirt.io/Cascadelake-Server"] == "true"
    assert labels["cpu-vendor.node.kubevirt.io/Intel"] == "true"
    assert labels["kubernetes.io/hostname"] == "worker-04"
    assert labels["topology.kubernetes.io/rack"] == "r01"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4Gi", 4 * GIB), ("500M", 5e8), ("250m", 0.25), ("1e3", 1000.0), (42, 42.0), ("0Mi", 0.0),
     ("1.5Ti", 1.5 * 1024**4)],
)
def test_parse_quantity(text: Any, expected: float) -> None:
    assert parse_quantity(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("25Gbit", 25 * GBIT), ("10GbE", 10 * GBIT), ("10Gbps", 10 * GBIT), ("1.5GB/s", 1.5e9),
     ("800MiB/s", 800 * 1024**2), (3e9, 3e9)],
)
def test_parse_rate(text: Any, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


def test_bad_quantities_name_the_field() -> None:
    with pytest.raises(ScenarioError, match=r"nodes\[0\]\.memory: 'lots'"):
        parse_quantity("lots", field="nodes[0].memory")
    with pytest.raises(ScenarioError, match="nic: '25 potatoes'"):
        parse_rate("25 potatoes", field="nic")


# --------------------------------------------------------------------------- YAML


def test_example_yaml_loads() -> None:
    s = load_yaml(EXAMPLE)
    assert s.name == "example-lab" and s.seed == 11
    assert [n.name for n in s.nodes] == ["master-0", "worker-1", "worker-2", "worker-3", "worker-4"]
    assert s.node_by_name["master-0"].control_plane
    assert s.node_by_name["worker-2"].labels == {"topology.kubernetes.io/zone": "zone-2"}
    assert s.node_by_name["worker-4"].nic_bytes_per_s == 25 * GBIT
    assert s.migrations["parallelMigrationsPerCluster"] == 4
    assert s.migrations["progressTimeout"] == 150  # defaults merged in
    assert s.dedicated_network
    assert (s.drain_hint, s.parallel_hint) == (("worker-1",), 1)
    webs = [vm for vm in s.vms if vm.namespace == "web"]
    assert [vm.node for vm in webs] == ["worker-1", "worker-2", "worker-3"] * 2
    db = next(vm for vm in s.vms if vm.name == "orders-db")
    assert (db.resident_bytes, db.wws_bytes, db.dirty_bytes_per_s) == (28 * GIB, 8 * GIB, 250e6)
    assert (db.cpus, db.setup_s, db.multifd) == (8, 12.0, False)
    legacy = next(vm for vm in s.vms if vm.name == "legacy-app")
    assert not legacy.live_migratable and not legacy.rwx_storage
    assert next(vm for vm in s.vms if vm.name == "batch-runner").eviction_strategy == "None"
    assert load(str(EXAMPLE)) == s
    assert load(str(EXAMPLE), seed=5) != s and load(str(EXAMPLE), seed=5).seed == 5


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"nodes": [{"name": "a", "memory": "lots", "cpu_model": "X"}]}, r"nodes\[0\]\.memory"),
        ({"nodes": [{"name": "a", "cpu_model": "X"}]}, r"nodes\[0\]\.memory: required"),
        ({"nodes": [{"name": "a-{i}", "count": 0, "memory": "1Gi", "cpu_model": "X"}]}, r"nodes\[0\]\.count"),
        ({"vms": [{"name": "v", "node": "nowhere", "memory": "1Gi"}]}, r"vms\[0\]\.node: unknown node 'nowhere'"),
        ({"vms": [{"name": "v", "node": "w-1", "memory": "1Gi", "colour": "red"}]},
         r"vms\[0\]: unknown keys \['colour'\]"),
        ({"vms": [{"name": "v", "node": "w-1", "memory": "1Gi", "eviction_strategy": "Sometimes"}]},
         r"vms\[0\]\.eviction_strategy"),
        ({"vms": [{"name": "v", "node": "w-1", "memory": "1Gi", "resident": "2Gi"}]}, r"vms\[0\]\.resident"),
        ({"drain": {"nodes": ["ghost"]}}, r"drain\.nodes: unknown node 'ghost'"),
        ({"flavour": 1}, r"unknown top-level keys \['flavour'\]"),
    ],
)
def test_yaml_errors_name_the_field(tmp_path: Path, patch: dict[str, Any], message: str) -> None:
    doc: dict[str, Any] = {"name": "t", "nodes": [{"name": "w-{i}", "count": 2, "memory": "64Gi",
                                                   "cpu_model": "Skylake-Server-IBRS"}], "vms": []}
    doc.update(patch)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(doc))
    with pytest.raises(ScenarioError, match=message):
        load_yaml(path)


# --------------------------------------------------------------------------- kubectl dumps


def _node(name: str, *, model: str, memory: str = "256Gi", cordoned: bool = False,
          role: str = "worker") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, f"node-role.kubernetes.io/{role}": "",
            f"host-model-cpu.node.kubevirt.io/{model}": "true", "cpu-vendor.node.kubevirt.io/Intel": "true",
            "cpu-model.node.kubevirt.io/Skylake-Server-IBRS": "true", "topology.kubernetes.io/zone": "z1"}},
        "spec": {"unschedulable": True} if cordoned else {},
        "status": {"allocatable": {"memory": memory, "cpu": "63500m"}},
    }


def _vmi(ns: str, name: str, node: str | None, **spec: Any) -> dict[str, Any]:
    domain: dict[str, Any] = {"resources": {"requests": {"memory": "4Gi"}}, "cpu": {"cores": 2}}
    domain.update(spec.pop("domain", {}))
    status: dict[str, Any] = {"phase": "Running", "conditions": spec.pop("conditions", [
        {"type": "LiveMigratable", "status": "True"}])}
    if node:
        status["nodeName"] = node
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
            "spec": {"domain": domain, **spec}, "status": status}


def _dump() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": [
        _node("cp-0", model="Skylake-Server-IBRS", role="control-plane", memory="32Gi"),
        _node("w1", model="Skylake-Server-IBRS", cordoned=True),
        _node("w2", model="Skylake-Server-IBRS"),
        _node("w3", model="Icelake-Server"),
        _vmi("prod", "db", "w1", domain={"memory": {"guest": "16Gi"}, "cpu": {"cores": 4, "sockets": 2,
                                                                              "model": "Skylake-Server-IBRS"},
                                          "resources": {"requests": {"memory": "16Gi"}, "limits": {"cpu": "8"}}}),
        _vmi("prod", "legacy", "w1", evictionStrategy="None", conditions=[
            {"type": "LiveMigratable", "status": "False", "reason": "DisksNotLiveMigratable",
             "message": "PVC legacy-disk is not shared"}]),
        _vmi("dev", "from-pod", None, nodeSelector={"topology.kubernetes.io/zone": "z1"}),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "namespace": "dev", "name": "virt-launcher-from-pod-abcde", "labels": {"kubevirt.io": "virt-launcher"},
            "annotations": {"kubevirt.io/domain": "from-pod"}}, "spec": {"nodeName": "w3"},
         "status": {"phase": "Running"}},
        _vmi("dev", "stopped", "w2") | {"status": {"phase": "Succeeded", "nodeName": "w2"}},
    ]}


def test_load_dump_derives_what_the_api_shows(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(_dump()))
    s = load_dump(path, seed=3)
    nodes = s.node_by_name
    assert nodes["cp-0"].control_plane and not nodes["w1"].control_plane
    assert (nodes["w3"].cpu_model, nodes["w3"].cpu_vendor) == ("Icelake-Server", "Intel")
    assert (nodes["w1"].memory_bytes, nodes["w1"].cpus) == (256 * GIB, 63)
    assert nodes["w1"].labels["topology.kubernetes.io/zone"] == "z1"
    assert s.drain_hint == ("w1",)  # the cordoned node
    vms = {vm.key: vm for vm in s.vms}
    assert set(vms) == {"prod/db", "prod/legacy", "dev/from-pod"}  # the stopped VMI is not running
    db = vms["prod/db"]
    assert (db.memory_bytes, db.cpus, db.cpu_model, db.multifd) == (16 * GIB, 8, "Skylake-Server-IBRS", False)
    assert db.eviction_strategy == "LiveMigrate"
    legacy = vms["prod/legacy"]
    assert (legacy.eviction_strategy, legacy.not_migratable_reason, legacy.rwx_storage) == (
        "None", "DisksNotLiveMigratable", False)
    assert legacy.not_migratable_message == "PVC legacy-disk is not shared"
    pod_vm = vms["dev/from-pod"]
    assert pod_vm.node == "w3" and pod_vm.node_selector == {"topology.kubernetes.io/zone": "z1"}
    for vm in s.vms:  # hidden physics filled in, within the model's ranges
        assert 0.4 * vm.memory_bytes - 1 <= vm.resident_bytes <= 0.9 * vm.memory_bytes
        assert 0 < vm.wws_bytes <= vm.resident_bytes and vm.dirty_bytes_per_s > 0
        assert s.node_by_name[vm.node].nic_bytes_per_s == 25 * GBIT


def test_load_dump_is_deterministic_and_independent_of_item_order(tmp_path: Path) -> None:
    dump = _dump()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(dump))
    shuffled = dict(dump, items=list(dump["items"]))
    random.Random(1).shuffle(shuffled["items"])
    b.write_text(json.dumps(shuffled))
    first = load_dump(a, seed=8)
    assert load_dump(a, seed=8) == first
    assert load(str(a), seed=8) == first  # load() recognises a List
    assert {vm.key: vm for vm in load_dump(b, seed=8).vms} == {vm.key: vm for vm in first.vms}
    assert load_dump(a, seed=9).vms != first.vms


def test_load_dump_rejects_something_else(tmp_path: Path) -> None:
    path = tmp_path / "pod.json"
    path.write_text(json.dumps({"kind": "Pod", "metadata": {"name": "x"}}))
    with pytest.raises(ScenarioError, match="not a kubectl List"):
        load_dump(path)


def test_builtin_names() -> None:
    assert BUILTIN_NAMES == ("small", "enterprise", "hostile", "large")
