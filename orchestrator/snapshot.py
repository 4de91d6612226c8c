"""Turn raw Kubernetes / KubeVirt JSON (dicts exactly as the API serves them) into a ClusterSnapshot.

Promises:
- Pure: no I/O, no clients, no clock. Input dicts are never modified.
- Field names are KubeVirt's ``kubevirt.io/v1`` and Kubernetes' ``v1`` spellings (kubevirt.md 1.2, 2.1).
- Malformed or unknown values raise ValueError naming the object (kind and namespace/name) and the field,
  e.g. ``VirtualMachineInstance prod/db-1: spec.domain.resources.requests.memory: '4Xi' is not a quantity``.
  Missing optional fields take KubeVirt's or Kubernetes' defaults.
- Quantities are parsed by :func:`parse_quantity` alone.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from orchestrator.model import (
    CONTROL_PLANE_LABELS,
    CPU_MODEL_LABEL_PREFIX,
    CPU_VENDOR_LABEL_PREFIX,
    HOST_MODEL,
    HOST_MODEL_CPU_LABEL_PREFIX,
    HOSTNAME_LABEL,
    MIRROR_POD_ANNOTATION,
    VIRT_LAUNCHER_LABEL,
    VIRT_LAUNCHER_LABEL_VALUE,
    VMI_DOMAIN_ANNOTATION,
    ClusterSnapshot,
    EvictionStrategy,
    Migration,
    MigrationConfig,
    MigrationStateSummary,
    Node,
    NodeName,
    Pod,
    Taint,
    Toleration,
    Vmi,
    VolumeRef,
)
from orchestrator.rules import pod_memory_bytes

# --- quantities ----------------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+|n|u|m|k|M|G|T|P|E)?$")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# Kubernetes caps decimal exponents near int64 range; anything beyond is a typo, not a size.
_MAX_EXPONENT = 30
_CONTEXT = decimal.Context(prec=80)


def parse_quantity(value: object) -> Decimal:
    """The exact value of a Kubernetes quantity ("4Gi", "500Mi", "1G", "1.5Gi", "100m", "1e3", 42).

    Binary suffixes (Ki..Ei) are powers of 1024, decimal suffixes (n, u, m, k, M, G, T, P, E) and
    exponents (e3, E-2) powers of ten; a bare number is in base units. JSON numbers are accepted.
    Raises ValueError for anything else (including booleans, empty strings and embedded spaces).
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a quantity")
        return Decimal(repr(value))
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a quantity")
    match = _QUANTITY.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a quantity")
    sign, number, suffix = match.group(1), match.group(2), match.group(3) or ""
    amount = Decimal(number)
    if suffix in _BINARY:
        amount = _CONTEXT.multiply(amount, Decimal(1024) ** _BINARY[suffix])
    else:
        exponent = int(suffix[1:]) if suffix[:1] in ("e", "E") and len(suffix) > 1 else _DECIMAL[suffix]
        if abs(exponent) > _MAX_EXPONENT:
            raise ValueError(f"{value!r}: exponent {exponent} is out of range")
        amount = amount.scaleb(exponent, _CONTEXT)
    return -amount if sign == "-" else amount


def quantity_to_int(value: object) -> int:
    """Integer base units, rounded up as Kubernetes' Quantity.Value() does ("1.5" -> 2, "100m" -> 1)."""
    return math.ceil(parse_quantity(value))


def quantity_to_millis(value: object) -> int:
    """Milli-units rounded up (Quantity.MilliValue()): CPU "1" -> 1000, "250m" -> 250."""
    return math.ceil(parse_quantity(value) * 1000)


# --- helpers -------------------------------------------------------------------------------------------


class _Obj:
    """One API object being parsed, so every error names it."""

    def __init__(self, kind: str, raw: object, index: int) -> None:
        if not isinstance(raw, Mapping):
            raise ValueError(f"{kind} #{index}: expected a JSON object, got {type(raw).__name__}")
        self.kind = kind
        self.raw: Mapping[str, Any] = raw
        actual_kind = raw.get("kind")
        metadata = raw.get("metadata")
        if not isinstance(metadata, Mapping):
            raise ValueError(f"{kind} #{index}: metadata: missing or not an object")
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{kind} #{index}: metadata.name: missing or not a string")
        namespace = metadata.get("namespace")
        if namespace is not None and not isinstance(namespace, str):
            raise ValueError(f"{kind} {name}: metadata.namespace: not a string")
        self.name: str = name
        self.namespace: str | None = namespace or None
        self.label = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
        if actual_kind is not None and actual_kind != kind:
            raise ValueError(f"{self.label}: kind: expected {kind}, got {actual_kind!r}")

    def error(self, path: str, problem: str) -> ValueError:
        return ValueError(f"{self.label}: {path}: {problem}")

    def get(self, path: str, default: Any = None) -> Any:
        """Value at a dotted path; default when any step is missing; error when a step is not an object."""
        current: Any = self.raw
        walked: list[str] = []
        for part in path.split("."):
            if current is None:
                return default
            if not isinstance(current, Mapping):
                raise self.error(".".join(walked), f"expected an object, got {type(current).__name__}")
            current = current.get(part)
            walked.append(part)
        return default if current is None else current

    def require_namespace(self) -> str:
        if self.namespace is None:
            raise self.error("metadata.namespace", "missing (the object is namespaced)")
        return self.namespace

    def string(self, path: str, default: str | None = None) -> str | None:
        value = self.get(path)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {value!r}")
        return value

    def boolean(self, path: str, default: bool = False) -> bool:
        value = self.get(path)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {value!r}")
        return value

    def integer(self, path: str, default: int) -> int:
        value = self.get(path)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(path, f"expected a non-negative integer, got {value!r}")
        return value

    def mapping(self, path: str) -> Mapping[str, str]:
        value = self.get(path)
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error(path, "expected a map of strings to strings")
        return MappingProxyType(dict(value))

    def items(self, path: str) -> list[Mapping[str, Any]]:
        value = self.get(path)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.error(path, "expected a list of objects")
        return value

    def quantity_bytes(self, path: str, value: object | None = None) -> int | None:
        raw = self.get(path) if value is None else value
        if raw is None:
            return None
        try:
            amount = quantity_to_int(raw)
        except ValueError as exc:
            raise self.error(path, str(exc)) from None
        if amount < 0:
            raise self.error(path, f"{raw!r} is negative")
        return amount

    def timestamp(self, path: str, value: object | None = None) -> float | None:
        raw = self.get(path) if value is None else value
        if raw is None:
            return None
        if not isinstance(raw, str):
            raise self.error(path, f"expected an RFC 3339 timestamp, got {raw!r}")
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise self.error(path, f"{raw!r} is not an RFC 3339 timestamp") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()


def migration_transfer_s(vmim: Mapping[str, Any]) -> float | None:
    """Seconds from a VMIM's Running to its Succeeded phase transition, by the cluster's stamps
    (`status.phaseTransitionTimestamps`; whole seconds, as Kubernetes writes times); None without both."""
    stamps: dict[str, float] = {}
    for entry in (vmim.get("status") or {}).get("phaseTransitionTimestamps") or []:
        phase, raw = (entry or {}).get("phase"), (entry or {}).get("phaseTransitionTimestamp")
        if not isinstance(phase, str) or not isinstance(raw, str):
            continue
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            continue
        stamps[phase] = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if "Running" not in stamps or "Succeeded" not in stamps:
        return None
    return max(0.0, stamps["Succeeded"] - stamps["Running"])


def _true_labels(labels: Mapping[str, str], prefix: str) -> frozenset[str]:
    return frozenset(key[len(prefix) :] for key, value in labels.items() if key.startswith(prefix) and value == "true")


# --- per kind ------------------------------------------------------------------------------------------


def parse_node(raw: Mapping[str, Any], index: int = 0) -> Node:
    obj = _Obj("Node", raw, index)
    labels = obj.mapping("metadata.labels")
    memory = obj.quantity_bytes("status.allocatable.memory")
    if memory is None:
        raise obj.error("status.allocatable.memory", "missing")
    cpu_raw = obj.get("status.allocatable.cpu")
    try:
        cpu_millis = 0 if cpu_raw is None else quantity_to_millis(cpu_raw)
    except ValueError as exc:
        raise obj.error("status.allocatable.cpu", str(exc)) from None
    ready = False
    for i, condition in enumerate(obj.items("status.conditions")):
        if condition.get("type") == "Ready":
            status = condition.get("status")
            if status not in ("True", "False", "Unknown"):
                raise obj.error(f"status.conditions[{i}].status", f"{status!r} is not True, False or Unknown")
            ready = status == "True"
    taints = []
    for i, taint in enumerate(obj.items("spec.taints")):
        key, effect = taint.get("key"), taint.get("effect")
        if not isinstance(key, str) or not isinstance(effect, str):
            raise obj.error(f"spec.taints[{i}]", "key and effect must be strings")
        value = taint.get("value") or ""
        if not isinstance(value, str):
            raise obj.error(f"spec.taints[{i}].value", f"expected a string, got {value!r}")
        taints.append(Taint(key=key, value=value, effect=effect))
    vendors = sorted(_true_labels(labels, CPU_VENDOR_LABEL_PREFIX))
    return Node(
        name=NodeName(obj.name),
        allocatable_memory_bytes=memory,
        allocatable_cpu_millis=cpu_millis,
        labels=labels,
        annotations=obj.mapping("metadata.annotations"),
        taints=tuple(taints),
        unschedulable=obj.boolean("spec.unschedulable"),
        ready=ready,
        control_plane=any(label in labels for label in CONTROL_PLANE_LABELS),
        host_model_cpus=_true_labels(labels, HOST_MODEL_CPU_LABEL_PREFIX),
        cpu_models=_true_labels(labels, CPU_MODEL_LABEL_PREFIX),
        cpu_vendor=vendors[0] if vendors else None,
    )


def _eviction_strategy(obj: _Obj, path: str, value: object) -> EvictionStrategy:
    if isinstance(value, str):
        for strategy in EvictionStrategy:
            if strategy.value == value:
                return strategy
    allowed = ", ".join(s.value for s in EvictionStrategy)
    raise obj.error(path, f"{value!r} is not one of {allowed}")


def _tolerations(obj: _Obj, path: str) -> tuple[Toleration, ...]:
    result = []
    for i, item in enumerate(obj.items(path)):
        fields = {}
        for name in ("key", "operator", "value", "effect"):
            value = item.get(name)
            if value is not None and not isinstance(value, str):
                raise obj.error(f"{path}[{i}].{name}", f"expected a string, got {value!r}")
            fields[name] = value or ""
        operator = fields["operator"] or "Equal"
        if operator not in ("Equal", "Exists"):
            raise obj.error(f"{path}[{i}].operator", f"{operator!r} is not Equal or Exists")
        result.append(Toleration(key=fields["key"], operator=operator, value=fields["value"], effect=fields["effect"]))
    return tuple(result)


def _migration_state(obj: _Obj, path: str) -> MigrationStateSummary | None:
    state = obj.get(path)
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise obj.error(path, "expected an object")

    def text(name: str) -> str:
        value = state.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise obj.error(f"{path}.{name}", f"expected a string, got {value!r}")
        return value

    def flag(name: str) -> bool:
        value = state.get(name, False)
        if not isinstance(value, bool):
            raise obj.error(f"{path}.{name}", f"expected true or false, got {value!r}")
        return value

    return MigrationStateSummary(
        migration_uid=text("migrationUid"),
        source_node=text("sourceNode") or None,
        target_node=text("targetNode") or None,
        start_time=obj.timestamp(f"{path}.startTimestamp", state.get("startTimestamp")),
        end_time=obj.timestamp(f"{path}.endTimestamp", state.get("endTimestamp")),
        completed=flag("completed"),
        failed=flag("failed"),
        failure_reason=text("failureReason"),
        abort_requested=flag("abortRequested"),
        abort_status=text("abortStatus"),
        mode=text("mode"),
    )


def parse_vmi(
    raw: Mapping[str, Any],
    index: int = 0,
    *,
    cluster_eviction_strategy: EvictionStrategy | None = None,
    rwx_claims: Mapping[tuple[str, str], bool] | None = None,
) -> Vmi:
    """One VirtualMachineInstance; ``rwx_claims`` maps (namespace, claim) to "is ReadWriteMany"."""
    obj = _Obj("VirtualMachineInstance", raw, index)
    namespace = obj.require_namespace()
    requests = obj.quantity_bytes("spec.domain.resources.requests.memory")
    guest = obj.quantity_bytes("spec.domain.memory.guest")
    limits = obj.quantity_bytes("spec.domain.resources.limits.memory")
    reserved = requests if requests is not None else guest if guest is not None else limits
    if reserved is None:
        raise obj.error("spec.domain.resources.requests.memory", "missing (and no spec.domain.memory.guest or limits)")
    data_size = guest if guest is not None else reserved

    strategy_raw = obj.get("spec.evictionStrategy")
    if strategy_raw is not None:
        strategy, source = _eviction_strategy(obj, "spec.evictionStrategy", strategy_raw), "vmi"
    elif cluster_eviction_strategy is not None:
        strategy, source = cluster_eviction_strategy, "cluster"
    else:
        strategy, source = EvictionStrategy.NONE, "default"

    live_status: str | None = None
    live_reason = live_message = ""
    for i, condition in enumerate(obj.items("status.conditions")):
        if condition.get("type") != "LiveMigratable":
            continue
        status = condition.get("status")
        if status not in ("True", "False", "Unknown"):
            raise obj.error(f"status.conditions[{i}].status", f"{status!r} is not True, False or Unknown")
        live_status = status
        reason, message = condition.get("reason") or "", condition.get("message") or ""
        if not isinstance(reason, str) or not isinstance(message, str):
            raise obj.error(f"status.conditions[{i}]", "reason and message must be strings")
        live_reason, live_message = reason, message

    volumes = []
    claims = rwx_claims or {}
    # KubeVirt reports each PVC's access modes in status.volumeStatus[].persistentVolumeClaimInfo: the VMI
    # itself says whether its disks are shared, no PVC read needed.
    reported: dict[str, bool] = {}
    for status in obj.items("status.volumeStatus"):
        info = status.get("persistentVolumeClaimInfo")
        modes = info.get("accessModes") if isinstance(info, Mapping) else None
        if isinstance(status.get("name"), str) and isinstance(modes, list):
            reported[status["name"]] = "ReadWriteMany" in modes
    for i, volume in enumerate(obj.items("spec.volumes")):
        name = volume.get("name")
        if not isinstance(name, str):
            raise obj.error(f"spec.volumes[{i}].name", "missing or not a string")
        if isinstance(volume.get("persistentVolumeClaim"), Mapping):
            source_kind, field = "persistentVolumeClaim", "claimName"
        elif isinstance(volume.get("dataVolume"), Mapping):
            # A DataVolume's PVC carries the DataVolume's name.
            source_kind, field = "dataVolume", "name"
        else:
            continue
        claim = volume[source_kind].get(field)
        if not isinstance(claim, str) or not claim:
            raise obj.error(f"spec.volumes[{i}].{source_kind}.{field}", "missing or not a string")
        rwx = claims.get((namespace, claim), reported.get(name))
        volumes.append(VolumeRef(name=name, claim_name=claim, source=source_kind, rwx=rwx))

    cpu_model = obj.string("spec.domain.cpu.model") or HOST_MODEL
    node = obj.string("status.nodeName")
    evacuation = obj.string("status.evacuationNodeName")
    return Vmi(
        namespace=namespace,
        name=obj.name,
        uid=obj.string("metadata.uid", "") or "",
        node=NodeName(node) if node else None,
        phase=obj.string("status.phase", "") or "",
        memory_request_bytes=reserved,
        guest_memory_bytes=data_size,
        cpu_model=cpu_model,
        node_selector=obj.mapping("spec.nodeSelector"),
        labels=obj.mapping("metadata.labels"),
        annotations=obj.mapping("metadata.annotations"),
        tolerations=_tolerations(obj, "spec.tolerations"),
        has_affinity=bool(obj.get("spec.affinity")),
        eviction_strategy=strategy,
        eviction_strategy_source=source,
        live_migratable=live_status,
        live_migratable_reason=live_reason,
        live_migratable_message=live_message,
        volumes=tuple(volumes),
        migration_state=_migration_state(obj, "status.migrationState"),
        evacuation_node=NodeName(evacuation) if evacuation else None,
    )


def _container_memory(obj: _Obj, path: str) -> list[int]:
    result = []
    for i, container in enumerate(obj.items(path)):
        resources = container.get("resources") or {}
        if not isinstance(resources, Mapping):
            raise obj.error(f"{path}[{i}].resources", "expected an object")
        requests = resources.get("requests") or {}
        limits = resources.get("limits") or {}
        if not isinstance(requests, Mapping) or not isinstance(limits, Mapping):
            raise obj.error(f"{path}[{i}].resources", "requests and limits must be objects")
        # A container with only a limit gets request = limit (Kubernetes defaulting).
        field, value = ("requests", requests.get("memory"))
        if value is None:
            field, value = ("limits", limits.get("memory"))
        amount = None if value is None else obj.quantity_bytes(f"{path}[{i}].resources.{field}.memory", value)
        result.append(amount or 0)
    return result


def parse_pod(raw: Mapping[str, Any], index: int = 0) -> Pod:
    obj = _Obj("Pod", raw, index)
    namespace = obj.require_namespace()
    containers = _container_memory(obj, "spec.containers")
    init = _container_memory(obj, "spec.initContainers")
    overhead = obj.quantity_bytes("spec.overhead.memory") or 0
    memory = pod_memory_bytes(containers=containers, init_containers=init, overhead=overhead)
    owners = obj.items("metadata.ownerReferences")
    owner = next((o for o in owners if o.get("controller") is True), owners[0] if owners else None)
    owner_kind = owner.get("kind") if owner is not None else None
    owner_name = owner.get("name") if owner is not None else None
    if owner is not None and not (isinstance(owner_kind, str) and isinstance(owner_name, str)):
        raise obj.error("metadata.ownerReferences", "kind and name must be strings")
    labels = obj.mapping("metadata.labels")
    annotations = obj.mapping("metadata.annotations")
    launcher = labels.get(VIRT_LAUNCHER_LABEL) == VIRT_LAUNCHER_LABEL_VALUE
    node = obj.string("spec.nodeName")
    return Pod(
        namespace=namespace,
        name=obj.name,
        node=NodeName(node) if node else None,
        phase=obj.string("status.phase", "Pending") or "Pending",
        memory_request_bytes=memory,
        owner_kind=owner_kind,
        owner_name=owner_name,
        labels=labels,
        is_virt_launcher=launcher,
        vmi_name=annotations.get(VMI_DOMAIN_ANNOTATION) if launcher else None,
        has_empty_dir=any("emptyDir" in v for v in obj.items("spec.volumes")),
        is_mirror=MIRROR_POD_ANNOTATION in annotations,
    )


def parse_migration(raw: Mapping[str, Any], index: int = 0) -> Migration:
    obj = _Obj("VirtualMachineInstanceMigration", raw, index)
    namespace = obj.require_namespace()
    vmi_name = obj.string("spec.vmiName")
    if not vmi_name:
        raise obj.error("spec.vmiName", "missing")
    selector = obj.mapping("spec.addedNodeSelector")
    target = selector.get(HOSTNAME_LABEL)
    source = obj.string("status.migrationState.sourceNode")
    return Migration(
        namespace=namespace,
        name=obj.name,
        uid=obj.string("metadata.uid", "") or "",
        vmi_name=vmi_name,
        phase=obj.string("status.phase", "") or "",
        labels=obj.mapping("metadata.labels"),
        annotations=obj.mapping("metadata.annotations"),
        creation_time=obj.timestamp("metadata.creationTimestamp"),
        target_node=NodeName(target) if target else None,
        source_node=NodeName(source) if source else None,
        failure_reason=obj.string("status.migrationState.failureReason", "") or "",
    )


def parse_kubevirt(raw: Mapping[str, Any] | None) -> tuple[MigrationConfig, EvictionStrategy | None]:
    """KubeVirt CR -> (migration configuration with defaults, cluster eviction strategy or None)."""
    if raw is None:
        return MigrationConfig(), None
    obj = _Obj("KubeVirt", raw, 0)
    base = "spec.configuration.migrations"
    defaults = MigrationConfig()
    workload = obj.get(f"{base}.allowWorkloadDisruption")
    if workload is not None and not isinstance(workload, bool):
        raise obj.error(f"{base}.allowWorkloadDisruption", f"expected true or false, got {workload!r}")
    config = MigrationConfig(
        parallel_migrations_per_cluster=obj.integer(
            f"{base}.parallelMigrationsPerCluster", defaults.parallel_migrations_per_cluster
        ),
        parallel_outbound_migrations_per_node=obj.integer(
            f"{base}.parallelOutboundMigrationsPerNode", defaults.parallel_outbound_migrations_per_node
        ),
        bandwidth_per_migration_bytes=obj.quantity_bytes(f"{base}.bandwidthPerMigration") or 0,
        completion_timeout_per_gib=obj.integer(f"{base}.completionTimeoutPerGiB", defaults.completion_timeout_per_gib),
        progress_timeout_s=obj.integer(f"{base}.progressTimeout", defaults.progress_timeout_s),
        allow_auto_converge=obj.boolean(f"{base}.allowAutoConverge"),
        allow_post_copy=obj.boolean(f"{base}.allowPostCopy"),
        allow_workload_disruption=workload,
        network=obj.string(f"{base}.network") or None,
        max_downtime_ms=obj.integer(f"{base}.maxDowntimeMs", defaults.max_downtime_ms),
    )
    strategy_raw = obj.get("spec.configuration.evictionStrategy")
    strategy = (
        None if strategy_raw is None else _eviction_strategy(obj, "spec.configuration.evictionStrategy", strategy_raw)
    )
    return config, strategy


def _rwx_claims(pvcs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], bool]:
    result = {}
    for index, raw in enumerate(pvcs):
        obj = _Obj("PersistentVolumeClaim", raw, index)
        namespace = obj.require_namespace()
        modes = obj.get("status.accessModes") or obj.get("spec.accessModes") or []
        if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
            raise obj.error("spec.accessModes", "expected a list of strings")
        result[(namespace, obj.name)] = "ReadWriteMany" in modes
    return result


def build_snapshot(
    *,
    nodes: Sequence[Mapping[str, Any]],
    vmis: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    migrations: Sequence[Mapping[str, Any]],
    kubevirt: Mapping[str, Any] | None,
    pvcs: Sequence[Mapping[str, Any]] | None = None,
) -> ClusterSnapshot:
    """Parse list items (``.items`` of each List) into a ClusterSnapshot.

    ``pvcs`` is optional: without it the snapshot cannot tell whether VM volumes are ReadWriteMany
    (``VolumeRef.rwx`` stays None).
    """
    config, cluster_strategy = parse_kubevirt(kubevirt)
    rwx = _rwx_claims(pvcs) if pvcs is not None else None
    return ClusterSnapshot(
        nodes=tuple(parse_node(raw, i) for i, raw in enumerate(nodes)),
        vmis=tuple(
            parse_vmi(raw, i, cluster_eviction_strategy=cluster_strategy, rwx_claims=rwx) for i, raw in enumerate(vmis)
        ),
        pods=tuple(parse_pod(raw, i) for i, raw in enumerate(pods)),
        migrations=tuple(parse_migration(raw, i) for i, raw in enumerate(migrations)),
        migration_config=config,
        cluster_eviction_strategy=cluster_strategy,
    )
