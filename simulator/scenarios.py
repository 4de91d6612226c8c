"""The clusters the simulator can serve: built-in scenarios, custom YAML clusters and kubectl dumps.

A `Scenario` is plain frozen data: nodes, VMs with their hidden memory physics, the KubeVirt
migration configuration and a drain hint. This module promises that

- the built-ins follow migration-model.md section 5.3 (S1 small, S2 enterprise, S3 hostile,
  S4 large) and the parameter distributions of section 5.1;
- the same name and seed always give the identical scenario (only `random.Random(seed)` draws,
  never Python's salted `hash`);
- `load_yaml` reads the documented custom-cluster format (see `load_yaml` and
  simulator/scenarios/example.yaml), and `load_dump` reads `kubectl get nodes,pods,vmi -A -o json`,
  deriving what the API shows and filling the hidden physics from seeded defaults;
- the derived quantities the simulator and the benchmarks share (effective NIC rates, per-flow caps,
  monitor configuration, the drain lower bound) are computed here once.

It is pure: files are read only by the loaders, nothing here is async, and it imports nothing of the
simulator's server or of the orchestrator.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from simulator.physics import (
    GIB,
    QEMU_DEFAULT_DOWNTIME_S,
    LBVm,
    LowerBound,
    MonitorConfig,
    VMPhysics,
    drain_lower_bound,
)

__all__ = [
    "BUILTIN_NAMES",
    "DEFAULT_SEEDS",
    "EVICTION_STRATEGIES",
    "NodeSpec",
    "Scenario",
    "ScenarioError",
    "VMSpec",
    "builtin",
    "default_migrations",
    "load",
    "load_dump",
    "load_yaml",
    "parse_quantity",
    "parse_rate",
]

BUILTIN_NAMES: tuple[str, ...] = ("small", "enterprise", "hostile", "large")
DEFAULT_SEEDS: Mapping[str, int] = {"small": 1, "enterprise": 2, "hostile": 3, "large": 4}
EVICTION_STRATEGIES = ("None", "LiveMigrate", "LiveMigrateIfPossible", "External")

GBIT = 1e9 / 8  # bytes/s per Gbit/s
MB = 1e6

HOST_MODEL_LABEL = "host-model-cpu.node.kubevirt.io/"
CPU_MODEL_LABEL = "cpu-model.node.kubevirt.io/"
CPU_VENDOR_LABEL = "cpu-vendor.node.kubevirt.io/"
ZONE_LABEL = "topology.kubernetes.io/zone"
RACK_LABEL = "topology.kubernetes.io/rack"

# Named CPU models each host model can also run (newer Intel generations run older named models).
# Only used to label nodes; a VM with host-model needs a node whose host model equals its source's.
_MODEL_FAMILY: Mapping[str, tuple[str, ...]] = {
    "Skylake-Server-IBRS": ("Skylake-Server-IBRS", "Broadwell-IBRS"),
    "Cascadelake-Server": ("Cascadelake-Server", "Skylake-Server-IBRS", "Broadwell-IBRS"),
    "Icelake-Server": ("Icelake-Server", "Cascadelake-Server", "Skylake-Server-IBRS", "Broadwell-IBRS"),
    "EPYC-Milan": ("EPYC-Milan", "EPYC-Rome", "EPYC"),
}


class ScenarioError(ValueError):
    """A scenario definition is invalid; the message names the field and the problem."""


def _empty_labels() -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class NodeSpec:
    """One node of the simulated cluster."""

    name: str
    memory_bytes: int
    """Allocatable memory."""
    cpus: int
    nic_bytes_per_s: float
    """Line rate of the migration NIC, before efficiency."""
    cpu_model: str
    """Host CPU model, e.g. "Skylake-Server-IBRS": label host-model-cpu.node.kubevirt.io/<model>=true."""
    cpu_vendor: str = "Intel"
    labels: Mapping[str, str] = field(default_factory=_empty_labels)
    """Extra labels (zone, rack)."""
    control_plane: bool = False
    """Never schedulable for VMs."""

    def node_labels(self) -> dict[str, str]:
        """The labels a real node would carry: hostname, roles, KubeVirt CPU labels, then `labels`."""
        out: dict[str, str] = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        if self.control_plane:
            out["node-role.kubernetes.io/control-plane"] = ""
            out["node-role.kubernetes.io/master"] = ""
        else:
            out["node-role.kubernetes.io/worker"] = ""
            out["kubevirt.io/schedulable"] = "true"
            out[HOST_MODEL_LABEL + self.cpu_model] = "true"
            out[CPU_VENDOR_LABEL + self.cpu_vendor] = "true"
            for model in _MODEL_FAMILY.get(self.cpu_model, (self.cpu_model,)):
                out[CPU_MODEL_LABEL + model] = "true"
        out.update(self.labels)
        return out


@dataclass(frozen=True)
class VMSpec:
    """One running VM (a VMI) with its hidden memory physics."""

    namespace: str
    name: str
    node: str
    memory_bytes: int
    """spec.domain.resources.requests.memory."""
    cpus: int
    resident_bytes: int
    dirty_bytes_per_s: float
    wws_bytes: int
    cpu_model: str = "host-model"
    """"host-model", "host-passthrough" or a named model."""
    eviction_strategy: str = "LiveMigrate"
    not_migratable_reason: str | None = None
    """A KubeVirt LiveMigratable=False reason, e.g. "DisksNotLiveMigratable"."""
    not_migratable_message: str | None = None
    rwx_storage: bool = True
    """All PVCs ReadWriteMany."""
    node_selector: Mapping[str, str] = field(default_factory=_empty_labels)
    labels: Mapping[str, str] = field(default_factory=_empty_labels)
    setup_s: float = 10.0
    """This migration's fixed pre-transfer overhead a_i (migration-model.md 5.1)."""
    multifd: bool = True
    """False e.g. when the VM sets a CPU limit: the migration is capped at one stream."""

    @property
    def key(self) -> str:
        """"namespace/name", the id the simulator's ground truth uses."""
        return f"{self.namespace}/{self.name}"

    @property
    def live_migratable(self) -> bool:
        return self.not_migratable_reason is None

    def physics(self) -> VMPhysics:
        return VMPhysics(memory_bytes=self.memory_bytes, resident_bytes=self.resident_bytes,
                         dirty_bytes_per_s=self.dirty_bytes_per_s, wws_bytes=self.wws_bytes)


def default_migrations() -> dict[str, Any]:
    """KubeVirt's `spec.configuration.migrations` defaults (kubevirt.md 2.1); `network` unset."""
    return {
        "parallelMigrationsPerCluster": 5,
        "parallelOutboundMigrationsPerNode": 2,
        "bandwidthPerMigration": "0Mi",
        "completionTimeoutPerGiB": 150,
        "progressTimeout": 150,
        "allowAutoConverge": False,
        "allowPostCopy": False,
        "unsafeMigrationOverride": False,
        "disableTLS": False,
        "nodeDrainTaintKey": "kubevirt.io/drain",
    }


@dataclass(frozen=True)
class Scenario:
    """A whole simulated cluster: nodes, VMs, KubeVirt's migration configuration, and a drain hint."""

    name: str
    seed: int
    nodes: tuple[NodeSpec, ...]
    vms: tuple[VMSpec, ...]
    migrations: Mapping[str, Any] = field(default_factory=default_migrations)
    """KubeVirt spec.configuration.migrations as JSON (camelCase keys)."""
    nic_efficiency: float = 0.9
    """Share of line rate a migration stream achieves (TCP, TLS, framing)."""
    pod_network_share: float = 0.5
    """Fraction of the (efficiency-scaled) NIC that migrations get when `migrations.network` is unset.
    They then share the pod network with tenant traffic and its overlay; we assume tenants keep about
    half of it busy. A dedicated Multus migration network gets the whole NIC."""
    single_stream_bytes_per_s: float = 13 * GBIT
    """Stream cap of a migration without multifd (about 12-14 Gbit/s, migration-model.md 5.1)."""
    cleanup_s: float = 2.0
    """Post-transfer overhead z_i."""
    drain_hint: tuple[str, ...] = ()
    """The nodes the scenario's benchmark drains."""
    parallel_hint: int = 1
    """How many of them drain in parallel."""

    # ------------------------------------------------------------------ lookups

    @cached_property
    def node_by_name(self) -> Mapping[str, NodeSpec]:
        return {n.name: n for n in self.nodes}

    @cached_property
    def vms_by_node(self) -> Mapping[str, tuple[VMSpec, ...]]:
        out: dict[str, list[VMSpec]] = {n.name: [] for n in self.nodes}
        for vm in self.vms:
            out.setdefault(vm.node, []).append(vm)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def dedicated_network(self) -> bool:
        return bool(self.migrations.get("network"))

    # ------------------------------------------------------------------ derived physics

    def migration_bandwidth(self, node: str) -> float:
        """Bytes/s the node's NIC offers migrations in each direction (full duplex)."""
        spec = self.node_by_name[node]
        rate = spec.nic_bytes_per_s * self.nic_efficiency
        return rate if self.dedicated_network else rate * self.pod_network_share

    def flow_cap(self, vm: VMSpec) -> float:
        """Per-migration cap: bandwidthPerMigration (0 = unlimited) and the single-stream cap."""
        cap = math.inf
        per_migration = parse_quantity(self.migrations.get("bandwidthPerMigration", 0), field="bandwidthPerMigration")
        if per_migration > 0:
            cap = per_migration
        if not vm.multifd:
            cap = min(cap, self.single_stream_bytes_per_s)
        return cap

    def monitor_config(self) -> MonitorConfig:
        """The virt-launcher monitor configuration the cluster-wide settings give every migration."""
        m = self.migrations
        awd = m.get("allowWorkloadDisruption")
        return MonitorConfig(
            downtime_s=QEMU_DEFAULT_DOWNTIME_S,  # maxDowntimeMs is ignored on the default path
            completion_timeout_per_gib=int(m.get("completionTimeoutPerGiB", 150)),
            progress_timeout_s=int(m.get("progressTimeout", 150)),
            allow_auto_converge=bool(m.get("allowAutoConverge", False)),
            allow_post_copy=bool(m.get("allowPostCopy", False)),
            allow_workload_disruption=None if awd is None else bool(awd),
        )

    def setup_s_min(self) -> float:
        return min((vm.setup_s for vm in self.vms), default=0.0)

    def lower_bound(self, drain: Sequence[str] | None = None) -> LowerBound:
        """migration-model.md 3.3 bounds for draining `drain` (default: the drain hint) at once.

        Movable VMs are the live-migratable ones whose eviction strategy migrates; targets are the
        schedulable workers outside the drain set. The setup overhead used is the smallest a_i.
        """
        nodes = tuple(drain if drain is not None else self.drain_hint)
        unknown = [n for n in nodes if n not in self.node_by_name]
        if unknown:
            raise ScenarioError(f"drain: unknown nodes {unknown}")
        draining = set(nodes)
        targets = [n for n in self.nodes if not n.control_plane and n.name not in draining]
        best_ingress = max((self.migration_bandwidth(t.name) for t in targets), default=0.0)
        ingress_total = sum(self.migration_bandwidth(t.name) for t in targets)
        movable = [
            vm for n in nodes for vm in self.vms_by_node.get(n, ())
            if vm.live_migratable and vm.eviction_strategy in ("LiveMigrate", "LiveMigrateIfPossible")
        ]
        lb_vms = [
            LBVm(source=vm.node, resident_bytes=vm.resident_bytes, dirty_bytes_per_s=vm.dirty_bytes_per_s,
                 wws_bytes=vm.wws_bytes, memory_bytes=vm.memory_bytes,
                 best_bandwidth=min(self.flow_cap(vm), self.migration_bandwidth(vm.node), best_ingress))
            for vm in movable
        ]
        cfg = self.monitor_config()
        return drain_lower_bound(
            lb_vms,
            egress={n: self.migration_bandwidth(n) for n in nodes},
            ingress_total=ingress_total,
            setup_s=min((vm.setup_s for vm in movable), default=0.0),
            cleanup_s=self.cleanup_s,
            downtime_s=cfg.downtime_s,
            allow_auto_converge=cfg.allow_auto_converge,
            allow_post_copy=cfg.allow_post_copy and cfg.workload_disruption,
        )

    # ------------------------------------------------------------------ reporting

    def summary(self) -> dict[str, Any]:
        """Counts and totals for printing."""
        workers = [n for n in self.nodes if not n.control_plane]
        drain_vms = [vm for n in self.drain_hint for vm in self.vms_by_node.get(n, ())]
        return {
            "name": self.name,
            "seed": self.seed,
            "nodes": len(self.nodes),
            "workers": len(workers),
            "control_plane_nodes": len(self.nodes) - len(workers),
            "vms": len(self.vms),
            "namespaces": sorted({vm.namespace for vm in self.vms}),
            "vm_memory_bytes": sum(vm.memory_bytes for vm in self.vms),
            "vm_resident_bytes": sum(vm.resident_bytes for vm in self.vms),
            "node_memory_bytes": sum(n.memory_bytes for n in workers),
            "nic_bytes_per_s": sorted({n.nic_bytes_per_s for n in workers}),
            "cpu_models": dict(sorted(Counter(n.cpu_model for n in workers).items())),
            "not_live_migratable": sum(1 for vm in self.vms if not vm.live_migratable),
            "eviction_strategies": dict(sorted(Counter(vm.eviction_strategy for vm in self.vms).items())),
            "single_stream_vms": sum(1 for vm in self.vms if not vm.multifd),
            "dedicated_migration_network": self.dedicated_network,
            "drain_hint": list(self.drain_hint),
            "parallel_hint": self.parallel_hint,
            "drain_vms": len(drain_vms),
            "drain_resident_bytes": sum(vm.resident_bytes for vm in drain_vms),
        }

    def hidden_physics(self) -> dict[str, Any]:
        """The cluster's hidden physics as JSON, the shape `GET /sim/v1/scenario` serves."""
        return {
            "name": self.name,
            "seed": self.seed,
            "nodes": [
                {"name": n.name, "nic_bytes_per_s": n.nic_bytes_per_s, "memory_bytes": n.memory_bytes,
                 "cpu_model": n.cpu_model, "control_plane": n.control_plane,
                 "migration_bytes_per_s": self.migration_bandwidth(n.name)}
                for n in self.nodes
            ],
            "vms": [
                {"vmi": vm.key, "node": vm.node, "memory_bytes": vm.memory_bytes,
                 "resident_bytes": vm.resident_bytes, "dirty_bytes_per_s": vm.dirty_bytes_per_s,
                 "wws_bytes": vm.wws_bytes, "setup_s": vm.setup_s, "multifd": vm.multifd,
                 "flow_cap_bytes_per_s": _json_float(self.flow_cap(vm))}
                for vm in self.vms
            ],
            "setup_s": self.setup_s_min(),
            "cleanup_s": self.cleanup_s,
            "downtime_s": self.monitor_config().downtime_s,
            "nic_efficiency": self.nic_efficiency,
            "pod_network_share": self.pod_network_share,
            "single_stream_bytes_per_s": self.single_stream_bytes_per_s,
            "migrations": dict(self.migrations),
            "drain_hint": list(self.drain_hint),
            "parallel_hint": self.parallel_hint,
        }


def _json_float(x: float) -> float | None:
    return None if math.isinf(x) else x


# =========================================================================== parsing helpers

_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
            "E": 1e18}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$")


def parse_quantity(value: object, *, field: str = "quantity") -> float:
    """A Kubernetes resource quantity ("4Gi", "500M", "250m", "1e3", 42) as a float."""
    if isinstance(value, bool):
        raise ScenarioError(f"{field}: expected a quantity, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ScenarioError(f"{field}: expected a quantity, got {value!r}")
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ScenarioError(f"{field}: {value!r} is not a Kubernetes quantity (e.g. 4Gi, 500M)")
    number, exponent, suffix = match.groups()
    base = float(number)
    if exponent:
        return base * 10.0 ** int(exponent[1:])
    suffix = suffix or ""
    return base * (_BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix])


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(bit|bps|B/s|iB/s|bE)\s*$")


def parse_rate(value: object, *, field: str = "rate") -> float:
    """A rate in bytes/s: a number, "25Gbit", "25GbE", "10Gbps", "1.5GB/s" or "800MiB/s"."""
    if isinstance(value, bool):
        raise ScenarioError(f"{field}: expected a rate, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ScenarioError(f"{field}: expected a rate, got {value!r}")
    match = _RATE.match(value)
    if not match:
        raise ScenarioError(f"{field}: {value!r} is not a rate (e.g. 25Gbit, 10GbE, 1.5GB/s, 800MiB/s)")
    number, prefix, unit = match.groups()
    scale = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[prefix]
    if unit == "iB/s":
        scale = {"": 1.0, "K": 1024.0, "M": 1024.0**2, "G": 1024.0**3, "T": 1024.0**4}[prefix]
        return float(number) * scale
    if unit == "B/s":
        return float(number) * scale
    return float(number) * scale / 8  # bits


# =========================================================================== seeded generators


@dataclass(frozen=True)
class _DirtyProfile:
    name: str
    namespace: str
    weight: float
    median: float
    sigma: float


# migration-model.md 5.1: the enterprise dirty-rate lognormal mixture.
_ENTERPRISE_DIRTY = (
    _DirtyProfile("idle", "corp-apps", 0.60, 5 * MB, 0.8),
    _DirtyProfile("web", "web", 0.30, 40 * MB, 0.7),
    _DirtyProfile("db", "databases", 0.08, 200 * MB, 0.5),
    _DirtyProfile("hot", "analytics", 0.02, 800 * MB, 0.4),
)
_ENTERPRISE_SIZES_GIB = ((2, 0.10), (4, 0.25), (8, 0.30), (16, 0.20), (32, 0.10), (64, 0.05))


def _weighted(rng: random.Random, pairs: Sequence[tuple[Any, float]]) -> Any:
    x = rng.random() * sum(w for _, w in pairs)
    for value, weight in pairs:
        x -= weight
        if x < 0:
            return value
    return pairs[-1][0]


def _cpus_for(memory_gib: float) -> int:
    # general-purpose instance shapes: about 1 vCPU per 4 GiB
    return max(1, min(32, int(memory_gib // 4)))


class _VMFactory:
    """Draws VMs from seeded distributions and hands out unique names per namespace."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._counters: dict[str, int] = {}

    def name(self, prefix: str) -> str:
        n = self._counters.get(prefix, 0) + 1
        self._counters[prefix] = n
        return f"{prefix}-{n:05d}"

    def make(
        self,
        node: str,
        *,
        memory_gib: float,
        profile: _DirtyProfile,
        resident: tuple[float, float] = (0.4, 0.9),
        wws: tuple[float, float] = (0.05, 0.3),
        dirty: float | None = None,
        dirty_sigma: float | None = None,
        namespace: str | None = None,
        multifd_share: float = 0.9,
        cpu_model_mix: Sequence[tuple[str, float]] = (("host-model", 1.0),),
    ) -> VMSpec:
        rng = self.rng
        memory = int(memory_gib * GIB)
        resident_bytes = int(memory * rng.uniform(*resident))
        wws_bytes = min(resident_bytes, int(memory * rng.uniform(*wws)))
        median = profile.median if dirty is None else dirty
        sigma = profile.sigma if dirty_sigma is None else dirty_sigma
        dirty_rate = median * math.exp(sigma * rng.gauss(0.0, 1.0))
        ns = namespace or profile.namespace
        return VMSpec(
            namespace=ns,
            name=self.name(profile.name),
            node=node,
            memory_bytes=memory,
            cpus=_cpus_for(memory_gib),
            resident_bytes=resident_bytes,
            dirty_bytes_per_s=round(dirty_rate, 1),
            wws_bytes=wws_bytes,
            cpu_model=_weighted(rng, cpu_model_mix),
            labels={"app": profile.name},
            setup_s=round(rng.uniform(5.0, 20.0), 3),
            multifd=rng.random() < multifd_share,
        )

    def enterprise(self, node: str, *, sizes: Sequence[tuple[int, float]] = _ENTERPRISE_SIZES_GIB,
                   cpu_model_mix: Sequence[tuple[str, float]] = (("host-model", 1.0),)) -> VMSpec:
        profile = _weighted(self.rng, [(p, p.weight) for p in _ENTERPRISE_DIRTY])
        return self.make(node, memory_gib=_weighted(self.rng, sizes), profile=profile,
                         cpu_model_mix=cpu_model_mix)


def _size_nodes(vms: Iterable[VMSpec], names: Iterable[str], factor: float = 1.6) -> int:
    """Node memory = factor x the busiest node's VM memory (migration-model.md 5.1), whole GiB."""
    load: dict[str, int] = dict.fromkeys(names, 0)
    for vm in vms:
        load[vm.node] = load.get(vm.node, 0) + vm.memory_bytes
    busiest = max(load.values(), default=0)
    return math.ceil(factor * busiest / GIB) * GIB


def _control_plane(count: int) -> list[NodeSpec]:
    return [
        NodeSpec(name=f"master-{i}", memory_bytes=64 * GIB, cpus=16, nic_bytes_per_s=25 * GBIT,
                 cpu_model="Skylake-Server-IBRS", labels={ZONE_LABEL: f"zone-{i % 3 + 1}"}, control_plane=True)
        for i in range(count)
    ]


_CPU_MIX_ENTERPRISE = (("host-model", 0.75), ("Skylake-Server-IBRS", 0.2), ("host-passthrough", 0.05))


def _small(seed: int) -> Scenario:
    """S1: 6 nodes on 25 GbE (pod network); worker-01 carries 15 VMs of 2/4/8 GiB to drain."""
    rng = random.Random(seed)
    f = _VMFactory(rng)
    names = [f"worker-{i:02d}" for i in range(1, 7)]
    sizes = ((2, 0.10), (4, 0.25), (8, 0.30))
    vms: list[VMSpec] = []
    for i, node in enumerate(names):
        for _ in range(15 if i == 0 else 6):
            vms.append(f.enterprise(node, sizes=sizes))
    memory = _size_nodes(vms, names)
    nodes = tuple(
        NodeSpec(name=n, memory_bytes=memory, cpus=64, nic_bytes_per_s=25 * GBIT, cpu_model="Skylake-Server-IBRS",
                 labels={ZONE_LABEL: f"zone-{i % 3 + 1}"})
        for i, n in enumerate(names)
    )
    return Scenario(name="small", seed=seed, nodes=nodes, vms=tuple(vms), migrations=default_migrations(),
                    drain_hint=("worker-01",), parallel_hint=1)


def _enterprise(seed: int) -> Scenario:
    """S2: 32 workers in 8 racks on a dedicated 25 GbE migration network, 40 VMs each; drain rack r01."""
    rng = random.Random(seed)
    f = _VMFactory(rng)
    names = [f"worker-{i:02d}" for i in range(1, 33)]
    # A minority of newer hosts: their host-model VMs can only move among these three.
    icelake = {"worker-04", "worker-12", "worker-20"}
    vms: list[VMSpec] = []
    for node in names:
        for _ in range(40):
            vm = f.enterprise(node, cpu_model_mix=_CPU_MIX_ENTERPRISE)
            if rng.random() < 0.03:
                # pinned to its zone, as some tenants do for latency
                zone = f"zone-{(names.index(node) // 4) % 3 + 1}"
                vm = _replace(vm, node_selector={ZONE_LABEL: zone})
            vms.append(vm)
    memory = _size_nodes(vms, names)
    nodes = tuple(
        NodeSpec(name=n, memory_bytes=memory, cpus=96, nic_bytes_per_s=25 * GBIT,
                 cpu_model="Icelake-Server" if n in icelake else "Cascadelake-Server",
                 labels={ZONE_LABEL: f"zone-{(i // 4) % 3 + 1}", RACK_LABEL: f"r{i // 4 + 1:02d}"})
        for i, n in enumerate(names)
    )
    migrations = default_migrations() | {"network": "migration-network"}
    return Scenario(name="enterprise", seed=seed, nodes=(*_control_plane(3), *nodes), vms=tuple(vms),
                    migrations=migrations, drain_hint=tuple(names[:4]), parallel_hint=4)


_HOSTILE_SIZES_GIB = ((8, 0.25), (16, 0.25), (32, 0.25), (64, 0.15), (128, 0.10))
_RWO_MESSAGE = ("PVC {name}-rootdisk is not shared, live migration requires that all PVCs must be shared "
                "(using ReadWriteMany access mode)")


def _hostile(seed: int) -> Scenario:
    """S3: 16 workers on 10 GbE; drain worker-01/02 carrying 40 big VMs with high dirty rates.

    Of the 40: 12 dirty at about 1.2 GB/s (the NIC rate) including 4 at 2 GB/s that cannot converge
    even alone, 12 at about 300 MB/s, the rest from the enterprise mix; two have an RWO disk
    (DisksNotLiveMigratable, so their LiveMigrate eviction blocks the drain) and one has eviction
    strategy None. worker-02 shares its host CPU model with only worker-09 and worker-15.
    """
    rng = random.Random(seed)
    f = _VMFactory(rng)
    names = [f"worker-{i:02d}" for i in range(1, 17)]
    cascade = {"worker-02", "worker-09", "worker-15"}
    vms: list[VMSpec] = []
    hot = next(p for p in _ENTERPRISE_DIRTY if p.name == "hot")
    db = next(p for p in _ENTERPRISE_DIRTY if p.name == "db")
    for node in names[:2]:
        for k in range(20):
            size = _weighted(rng, _HOSTILE_SIZES_GIB)
            if k < 2:
                profile, dirty, sigma = hot, 2.0e9, 0.05
            elif k < 6:
                profile, dirty, sigma = hot, 1.2e9, 0.1
            elif k < 12:
                profile, dirty, sigma = db, 300 * MB, 0.2
            else:
                profile = _weighted(rng, [(p, p.weight) for p in _ENTERPRISE_DIRTY])
                dirty, sigma = profile.median, profile.sigma
            vms.append(f.make(node, memory_gib=size, profile=profile, dirty=dirty, dirty_sigma=sigma,
                              resident=(0.7, 1.0), wws=(0.2, 0.6), cpu_model_mix=_CPU_MIX_ENTERPRISE))
    for node in names[2:]:
        for _ in range(12):
            profile = _weighted(rng, [(p, p.weight) for p in _ENTERPRISE_DIRTY])
            vms.append(f.make(node, memory_gib=_weighted(rng, _HOSTILE_SIZES_GIB), profile=profile,
                              resident=(0.7, 1.0), wws=(0.2, 0.6), cpu_model_mix=_CPU_MIX_ENTERPRISE))
    # The awkward ones, at fixed positions so every seed has them: RWO disks and a None strategy.
    on_drain = [i for i, vm in enumerate(vms) if vm.node in names[:2]]
    for i in (on_drain[14], on_drain[34]):
        vms[i] = _replace(vms[i], rwx_storage=False, not_migratable_reason="DisksNotLiveMigratable",
                          not_migratable_message=_RWO_MESSAGE.format(name=vms[i].name))
    vms[on_drain[15]] = _replace(vms[on_drain[15]], eviction_strategy="None")
    memory = _size_nodes(vms, names)
    nodes = tuple(
        NodeSpec(name=n, memory_bytes=memory, cpus=128, nic_bytes_per_s=10 * GBIT,
                 cpu_model="Cascadelake-Server" if n in cascade else "Skylake-Server-IBRS",
                 labels={ZONE_LABEL: f"zone-{i % 2 + 1}"})
        for i, n in enumerate(names)
    )
    migrations = default_migrations() | {"network": "migration-network"}
    return Scenario(name="hostile", seed=seed, nodes=(*_control_plane(3), *nodes), vms=tuple(vms),
                    migrations=migrations, drain_hint=tuple(names[:2]), parallel_hint=2)


def _large(seed: int) -> Scenario:
    """S4: 1,000 workers on 100 GbE, 30 VMs each (30,000 VMs); the hint drains the first wave of 100."""
    rng = random.Random(seed)
    f = _VMFactory(rng)
    names = [f"worker-{i:04d}" for i in range(1, 1001)]
    vms = [f.enterprise(node, cpu_model_mix=_CPU_MIX_ENTERPRISE) for node in names for _ in range(30)]
    memory = _size_nodes(vms, names)
    nodes = tuple(
        NodeSpec(name=n, memory_bytes=memory, cpus=128, nic_bytes_per_s=100 * GBIT,
                 cpu_model="Icelake-Server" if i % 10 == 9 else "Cascadelake-Server",
                 labels={ZONE_LABEL: f"zone-{i % 3 + 1}", RACK_LABEL: f"r{i // 40 + 1:03d}"})
        for i, n in enumerate(names)
    )
    migrations = default_migrations() | {"network": "migration-network"}
    return Scenario(name="large", seed=seed, nodes=(*_control_plane(3), *nodes), vms=tuple(vms),
                    migrations=migrations, drain_hint=tuple(names[:100]), parallel_hint=100)


def _replace(vm: VMSpec, **changes: Any) -> VMSpec:
    return replace(vm, **changes)


_BUILDERS = {"small": _small, "enterprise": _enterprise, "hostile": _hostile, "large": _large}


def builtin(name: str, *, seed: int | None = None) -> Scenario:
    """A built-in scenario ("small", "enterprise", "hostile", "large"), at its default seed if None."""
    if name not in _BUILDERS:
        raise ScenarioError(f"scenario: unknown built-in {name!r}; choose one of {', '.join(BUILTIN_NAMES)}")
    return _BUILDERS[name](DEFAULT_SEEDS[name] if seed is None else seed)


def load(name_or_path: str, *, seed: int | None = None) -> Scenario:
    """A built-in name, a YAML scenario file, or a JSON dump of `kubectl get nodes,pods,vmi -A -o json`."""
    if name_or_path in _BUILDERS:
        return builtin(name_or_path, seed=seed)
    path = Path(name_or_path)
    if not path.is_file():
        raise ScenarioError(
            f"scenario: {name_or_path!r} is neither a built-in ({', '.join(BUILTIN_NAMES)}) nor a file"
        )
    data = _read_document(path)
    if isinstance(data, dict) and data.get("kind") == "List" and "items" in data:
        return _from_dump(data, source=str(path), seed=seed)
    return _from_yaml(data, source=str(path), seed=seed)


def _read_document(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc


# =========================================================================== YAML format


def load_yaml(path: str | Path, *, seed: int | None = None) -> Scenario:
    """A custom cluster from YAML. The format (all sizes are Kubernetes quantities, rates as below):

    ```yaml
    name: lab                     # required
    seed: 7                       # draws for omitted physics; --seed overrides
    nic_efficiency: 0.9           # optional Scenario fields: pod_network_share, cleanup_s,
    single_stream: 13Gbit         #   single_stream (a rate)
    migrations:                   # KubeVirt spec.configuration.migrations, merged over the defaults
      parallelMigrationsPerCluster: 5
      network: migration-network  # set = dedicated migration network
    drain: {nodes: [worker-1], parallel: 1}
    nodes:
      - name: "worker-{i}"        # "{i}" is replaced by 1..count when count is given
        count: 3
        memory: 256Gi             # allocatable
        cpus: 64
        nic: 25Gbit               # bytes/s number, or "25Gbit", "25GbE", "10Gbps", "1.5GB/s", "800MiB/s"
        cpu_model: Skylake-Server-IBRS
        cpu_vendor: Intel         # optional
        labels: {topology.kubernetes.io/zone: zone-1}
        control_plane: false
    vms:
      - name: "web-{i}"
        count: 4
        namespace: web
        node: worker-1            # or nodes: [worker-1, worker-2] to spread round-robin
        memory: 4Gi
        cpus: 2                   # default: 1 per 4 GiB
        resident: 3Gi             # or resident_fraction: 0.7     (default: U(0.4, 0.9) x memory)
        dirty_rate: 40MB/s        # default: the enterprise lognormal mixture
        wws: 1Gi                  # or wws_fraction: 0.2          (default: U(0.05, 0.3) x memory)
        setup_s: 10               # default: U(5, 20)
        cpu_model: host-model
        eviction_strategy: LiveMigrate
        not_migratable_reason: DisksNotLiveMigratable   # with not_migratable_message
        rwx_storage: true
        multifd: true
        node_selector: {}
        labels: {app: web}
    ```
    """
    p = Path(path)
    return _from_yaml(_read_document(p), source=str(p), seed=seed)


_NODE_KEYS = {"name", "count", "memory", "cpus", "nic", "cpu_model", "cpu_vendor", "labels", "control_plane"}
_VM_KEYS = {"name", "count", "namespace", "node", "nodes", "memory", "cpus", "resident", "resident_fraction",
            "dirty_rate", "wws", "wws_fraction", "setup_s", "cpu_model", "eviction_strategy",
            "not_migratable_reason", "not_migratable_message", "rwx_storage", "multifd", "node_selector",
            "labels"}
_TOP_KEYS = {"name", "seed", "nic_efficiency", "pod_network_share", "single_stream", "cleanup_s", "migrations",
             "drain", "nodes", "vms"}


def _expand(entry: Mapping[str, Any], where: str) -> list[tuple[int, str]]:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{where}.name: required, a non-empty string")
    count = entry.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ScenarioError(f"{where}.count: must be an integer >= 1, got {count!r}")
    if count > 1 and "{i" not in name:
        raise ScenarioError(f"{where}.name: with count > 1 the name needs a '{{i}}' placeholder")
    try:
        return [(i, name.format(i=i)) for i in range(1, count + 1)]
    except (KeyError, IndexError, ValueError) as exc:
        raise ScenarioError(f"{where}.name: bad placeholder in {name!r}: {exc}") from exc


def _str_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{where}: must be a mapping of strings")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _positive(value: float, where: str) -> float:
    if not value > 0 or not math.isfinite(value):
        raise ScenarioError(f"{where}: must be > 0, got {value}")
    return value


def _from_yaml(data: Any, *, source: str, seed: int | None) -> Scenario:
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{source}: the document must be a mapping with name, nodes and vms")
    extra = set(data) - _TOP_KEYS
    if extra:
        raise ScenarioError(f"{source}: unknown top-level keys {sorted(extra)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{source}: name: required, a non-empty string")
    the_seed = seed if seed is not None else int(data.get("seed", 0))
    rng = random.Random(the_seed)
    factory = _VMFactory(rng)

    nodes: list[NodeSpec] = []
    for n, entry in enumerate(data.get("nodes") or []):
        where = f"nodes[{n}]"
        if not isinstance(entry, Mapping):
            raise ScenarioError(f"{where}: must be a mapping")
        bad = set(entry) - _NODE_KEYS
        if bad:
            raise ScenarioError(f"{where}: unknown keys {sorted(bad)}")
        for key in ("memory", "cpu_model"):
            if key not in entry:
                raise ScenarioError(f"{where}.{key}: required")
        for i, node_name in _expand(entry, where):
            labels = {k: v.format(i=i) for k, v in _str_map(entry.get("labels"), f"{where}.labels").items()}
            nodes.append(NodeSpec(
                name=node_name,
                memory_bytes=int(_positive(parse_quantity(entry["memory"], field=f"{where}.memory"),
                                           f"{where}.memory")),
                cpus=int(entry.get("cpus", 64)),
                nic_bytes_per_s=_positive(parse_rate(entry.get("nic", "25Gbit"), field=f"{where}.nic"),
                                          f"{where}.nic"),
                cpu_model=str(entry["cpu_model"]),
                cpu_vendor=str(entry.get("cpu_vendor", "Intel")),
                labels=labels,
                control_plane=bool(entry.get("control_plane", False)),
            ))
    if not nodes:
        raise ScenarioError(f"{source}: nodes: at least one node is required")
    node_names = {nd.name for nd in nodes}
    if len(node_names) != len(nodes):
        dup = [k for k, c in Counter(nd.name for nd in nodes).items() if c > 1]
        raise ScenarioError(f"{source}: nodes: duplicate names {dup}")

    vms: list[VMSpec] = []
    for v, entry in enumerate(data.get("vms") or []):
        where = f"vms[{v}]"
        if not isinstance(entry, Mapping):
            raise ScenarioError(f"{where}: must be a mapping")
        bad = set(entry) - _VM_KEYS
        if bad:
            raise ScenarioError(f"{where}: unknown keys {sorted(bad)}")
        placement = entry.get("nodes", [entry["node"]] if "node" in entry else None)
        if not placement or not isinstance(placement, list):
            raise ScenarioError(f"{where}: node (or a non-empty nodes list) is required")
        for target in placement:
            if target not in node_names:
                raise ScenarioError(f"{where}.node: unknown node {target!r}")
        if "memory" not in entry:
            raise ScenarioError(f"{where}.memory: required")
        for k, (i, vm_name) in enumerate(_expand(entry, where)):
            vms.append(_yaml_vm(entry, where, factory, name=vm_name, node=str(placement[k % len(placement)]),
                                index=i))
    keys = Counter(vm.key for vm in vms)
    dup_vms = [k for k, c in keys.items() if c > 1]
    if dup_vms:
        raise ScenarioError(f"{source}: vms: duplicate namespace/name {dup_vms[:5]}")

    drain = data.get("drain") or {}
    if not isinstance(drain, Mapping):
        raise ScenarioError(f"{source}: drain: must be a mapping with nodes and parallel")
    drain_nodes = tuple(str(x) for x in drain.get("nodes", ()))
    for dn in drain_nodes:
        if dn not in node_names:
            raise ScenarioError(f"drain.nodes: unknown node {dn!r}")
    migrations = data.get("migrations") or {}
    if not isinstance(migrations, Mapping):
        raise ScenarioError(f"{source}: migrations: must be a mapping (KubeVirt camelCase keys)")
    kwargs: dict[str, Any] = {}
    for key in ("nic_efficiency", "pod_network_share", "cleanup_s"):
        if key in data:
            kwargs[key] = float(data[key])
    if "single_stream" in data:
        kwargs["single_stream_bytes_per_s"] = parse_rate(data["single_stream"], field="single_stream")
    return Scenario(
        name=name, seed=the_seed, nodes=tuple(nodes), vms=tuple(vms),
        migrations=default_migrations() | dict(migrations),
        drain_hint=drain_nodes, parallel_hint=int(drain.get("parallel", 1)), **kwargs,
    )


def _yaml_vm(entry: Mapping[str, Any], where: str, factory: _VMFactory, *, name: str, node: str,
             index: int) -> VMSpec:
    rng = factory.rng
    memory = int(_positive(parse_quantity(entry["memory"], field=f"{where}.memory"), f"{where}.memory"))
    # Draw every default even when given, so adding one field does not reshuffle the other VMs.
    drawn_resident = rng.uniform(0.4, 0.9)
    drawn_wws = rng.uniform(0.05, 0.3)
    profile = _weighted(rng, [(p, p.weight) for p in _ENTERPRISE_DIRTY])
    drawn_dirty = profile.median * math.exp(profile.sigma * rng.gauss(0.0, 1.0))
    drawn_setup = rng.uniform(5.0, 20.0)
    if "resident" in entry:
        resident = int(parse_quantity(entry["resident"], field=f"{where}.resident"))
    else:
        resident = int(memory * float(entry.get("resident_fraction", drawn_resident)))
    if "wws" in entry:
        wws = int(parse_quantity(entry["wws"], field=f"{where}.wws"))
    else:
        wws = min(resident, int(memory * float(entry.get("wws_fraction", drawn_wws))))
    if not 0 <= resident <= memory:
        raise ScenarioError(f"{where}.resident: must be within [0, memory], got {resident}")
    if not 0 <= wws <= resident:
        raise ScenarioError(f"{where}.wws: must be within [0, resident], got {wws}")
    dirty = parse_rate(entry["dirty_rate"], field=f"{where}.dirty_rate") if "dirty_rate" in entry else drawn_dirty
    strategy = str(entry.get("eviction_strategy", "LiveMigrate"))
    if strategy not in EVICTION_STRATEGIES:
        raise ScenarioError(f"{where}.eviction_strategy: must be one of {EVICTION_STRATEGIES}, got {strategy!r}")
    reason = entry.get("not_migratable_reason")
    return VMSpec(
        namespace=str(entry.get("namespace", "default")),
        name=name,
        node=node,
        memory_bytes=memory,
        cpus=int(entry.get("cpus", _cpus_for(memory / GIB))),
        resident_bytes=resident,
        dirty_bytes_per_s=round(dirty, 1),
        wws_bytes=wws,
        cpu_model=str(entry.get("cpu_model", "host-model")),
        eviction_strategy=strategy,
        not_migratable_reason=None if reason is None else str(reason),
        not_migratable_message=None if entry.get("not_migratable_message") is None
        else str(entry["not_migratable_message"]),
        rwx_storage=bool(entry.get("rwx_storage", reason != "DisksNotLiveMigratable")),
        node_selector=_str_map(entry.get("node_selector"), f"{where}.node_selector"),
        labels={k: v.format(i=index) for k, v in _str_map(entry.get("labels"), f"{where}.labels").items()},
        setup_s=float(entry.get("setup_s", round(drawn_setup, 3))),
        multifd=bool(entry.get("multifd", True)),
    )


# =========================================================================== kubectl dumps


def load_dump(path: str | Path, *, seed: int | None = None, nic: float = 25 * GBIT,
              default_eviction_strategy: str = "LiveMigrate") -> Scenario:
    """A cluster from `kubectl get nodes,pods,vmi -A -o json` (a v1 List).

    From the API: node allocatable memory and CPUs, labels, host CPU model and vendor (KubeVirt's
    node labels), control-plane role, cordoned nodes (they become the drain hint); for each running
    VMI its node, memory request (or guest memory), CPU topology and model, eviction strategy
    (absent: `default_eviction_strategy`, OpenShift's LiveMigrate), the LiveMigratable condition,
    a CPU limit (no multifd), node selector and labels. Hidden physics (resident memory, dirty rate,
    working set, setup time) are drawn from the enterprise distributions with `seed` (default 0), in
    namespace/name order so the result does not depend on the dump's item order; every NIC runs at
    `nic` bytes/s. Pods only supply a VMI's node when its status lacks one.
    """
    p = Path(path)
    data = _read_document(p)
    if not (isinstance(data, Mapping) and data.get("kind") == "List" and isinstance(data.get("items"), list)):
        raise ScenarioError(f"{p}: not a kubectl List (expected kind: List with items)")
    return _from_dump(data, source=str(p), seed=seed, nic=nic, default_eviction_strategy=default_eviction_strategy)


def _from_dump(data: Mapping[str, Any], *, source: str, seed: int | None, nic: float = 25 * GBIT,
               default_eviction_strategy: str = "LiveMigrate") -> Scenario:
    items = [i for i in data.get("items", []) if isinstance(i, Mapping)]
    the_seed = 0 if seed is None else seed
    nodes: list[NodeSpec] = []
    cordoned: list[str] = []
    launcher_node: dict[tuple[str, str], str] = {}
    vmis: list[Mapping[str, Any]] = []
    for item in items:
        kind = item.get("kind")
        meta = item.get("metadata") or {}
        if kind == "Node":
            nodes.append(_dump_node(item, source=source, nic=nic))
            if (item.get("spec") or {}).get("unschedulable"):
                cordoned.append(str(meta.get("name")))
        elif kind == "Pod":
            labels = meta.get("labels") or {}
            annotations = meta.get("annotations") or {}
            domain = annotations.get("kubevirt.io/domain")
            node_name = (item.get("spec") or {}).get("nodeName")
            phase = (item.get("status") or {}).get("phase")
            if labels.get("kubevirt.io") == "virt-launcher" and domain and node_name and phase == "Running":
                launcher_node[(str(meta.get("namespace")), str(domain))] = str(node_name)
        elif kind == "VirtualMachineInstance":
            vmis.append(item)
    if not nodes:
        raise ScenarioError(f"{source}: the dump has no Node items")
    node_names = {n.name for n in nodes}
    vmis.sort(key=lambda v: ((v.get("metadata") or {}).get("namespace", ""), (v.get("metadata") or {}).get("name", "")))
    rng = random.Random(the_seed)
    vms: list[VMSpec] = []
    for vmi in vmis:
        vm = _dump_vmi(vmi, rng, launcher_node, node_names, default_eviction_strategy)
        if vm is not None:
            vms.append(vm)
    by_node = Counter(vm.node for vm in vms)
    workers = [n.name for n in nodes if not n.control_plane]
    # cordoned nodes are the ones someone is about to drain; else the busiest worker
    hint: tuple[str, ...] = tuple(sorted(cordoned))
    if not hint and workers:
        hint = (max(workers, key=lambda n: (by_node[n], n)),)
    name = str((data.get("metadata") or {}).get("name") or Path(source).stem)
    return Scenario(name=name, seed=the_seed, nodes=tuple(nodes), vms=tuple(vms), migrations=default_migrations(),
                    drain_hint=hint, parallel_hint=1)


def _dump_node(item: Mapping[str, Any], *, source: str, nic: float) -> NodeSpec:
    meta = item.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise ScenarioError(f"{source}: a Node item has no metadata.name")
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    status = item.get("status") or {}
    alloc = status.get("allocatable") or status.get("capacity") or {}
    memory = int(parse_quantity(alloc.get("memory", 0), field=f"node {name}: allocatable.memory"))
    cpus = math.floor(parse_quantity(alloc.get("cpu", 0), field=f"node {name}: allocatable.cpu"))
    models = sorted(k[len(HOST_MODEL_LABEL):] for k, v in labels.items() if k.startswith(HOST_MODEL_LABEL)
                    and v == "true")
    vendors = sorted(k[len(CPU_VENDOR_LABEL):] for k, v in labels.items() if k.startswith(CPU_VENDOR_LABEL)
                     and v == "true")
    control_plane = (
        "node-role.kubernetes.io/control-plane" in labels
        or "node-role.kubernetes.io/master" in labels
        or labels.get("kubevirt.io/schedulable") == "false"
    )
    if "node-role.kubernetes.io/worker" in labels and labels.get("kubevirt.io/schedulable") != "false":
        control_plane = False  # compact clusters: masters that are also workers run VMs
    extra = {k: v for k, v in labels.items() if not k.startswith((HOST_MODEL_LABEL, CPU_MODEL_LABEL,
                                                                    CPU_VENDOR_LABEL))}
    return NodeSpec(name=str(name), memory_bytes=memory, cpus=cpus, nic_bytes_per_s=nic,
                    cpu_model=models[0] if models else "unknown", cpu_vendor=vendors[0] if vendors else "Intel",
                    labels=extra, control_plane=control_plane)


def _dump_vmi(vmi: Mapping[str, Any], rng: random.Random, launcher_node: Mapping[tuple[str, str], str],
              node_names: set[str], default_strategy: str) -> VMSpec | None:
    meta = vmi.get("metadata") or {}
    spec = vmi.get("spec") or {}
    status = vmi.get("status") or {}
    ns, name = str(meta.get("namespace", "default")), str(meta.get("name", ""))
    where = f"vmi {ns}/{name}"
    # Draw first so a skipped VMI still consumes its draws: the others keep their physics.
    resident_frac = rng.uniform(0.4, 0.9)
    wws_frac = rng.uniform(0.05, 0.3)
    profile = _weighted(rng, [(p, p.weight) for p in _ENTERPRISE_DIRTY])
    dirty = profile.median * math.exp(profile.sigma * rng.gauss(0.0, 1.0))
    setup = round(rng.uniform(5.0, 20.0), 3)
    node = status.get("nodeName") or launcher_node.get((ns, name))
    if status.get("phase", "Running") != "Running" or not node or node not in node_names:
        return None
    domain = spec.get("domain") or {}
    resources = domain.get("resources") or {}
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    guest = (domain.get("memory") or {}).get("guest")
    memory_q = guest if guest is not None else requests.get("memory")
    if memory_q is None:
        raise ScenarioError(f"{where}: neither spec.domain.memory.guest nor resources.requests.memory is set")
    memory = int(parse_quantity(memory_q, field=f"{where}: memory"))
    cpu = domain.get("cpu") or {}
    cpus = int(cpu.get("cores", 1)) * int(cpu.get("sockets", 1)) * int(cpu.get("threads", 1))
    reason = message = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "LiveMigratable" and str(cond.get("status")) == "False":
            reason = str(cond.get("reason") or "NotMigratable")
            message = None if cond.get("message") is None else str(cond["message"])
    resident = int(memory * resident_frac)
    return VMSpec(
        namespace=ns,
        name=name,
        node=str(node),
        memory_bytes=memory,
        cpus=max(1, cpus),
        resident_bytes=resident,
        dirty_bytes_per_s=round(dirty, 1),
        wws_bytes=min(resident, int(memory * wws_frac)),
        cpu_model=str(cpu.get("model", "host-model")),
        eviction_strategy=str(spec.get("evictionStrategy") or default_strategy),
        not_migratable_reason=reason,
        not_migratable_message=message,
        rwx_storage=reason != "DisksNotLiveMigratable",
        node_selector={str(k): str(v) for k, v in (spec.get("nodeSelector") or {}).items()},
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        setup_s=setup,
        multifd="cpu" not in limits,
    )
