"""Pure data for drainctl: ids, enums, the cluster snapshot, the drain request and the drain plan.

Promises:
- Every type here is immutable (frozen dataclasses, tuples, frozensets, read-only mappings) and typed.
- Nothing here performs I/O, reads a clock or imports async code, clients or Redis.
- Plan and request types turn into plain JSON (``to_json()``: dicts, lists, str, int, float, bool, None)
  and back (``from_json``) without loss, so a plan can be stored and reloaded by another process.

Kubernetes / KubeVirt label and annotation keys that the snapshot parser and the planner share live here too,
so there is one spelling of each.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NewType

from orchestrator.escalation import NONE, parse_escalation

NodeName = NewType("NodeName", str)
DrainId = NewType("DrainId", str)
VmiKey = NewType("VmiKey", str)
"""A VMI's identity as ``"namespace/name"`` (VMIs are namespaced; names repeat across namespaces)."""

# --- label and annotation keys -------------------------------------------------------------------------

HOSTNAME_LABEL = "kubernetes.io/hostname"
HOST_MODEL_CPU_LABEL_PREFIX = "host-model-cpu.node.kubevirt.io/"
CPU_MODEL_LABEL_PREFIX = "cpu-model.node.kubevirt.io/"
CPU_VENDOR_LABEL_PREFIX = "cpu-vendor.node.kubevirt.io/"
CONTROL_PLANE_LABELS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
VIRT_LAUNCHER_LABEL = "kubevirt.io"
VIRT_LAUNCHER_LABEL_VALUE = "virt-launcher"
HOTPLUG_DISK_LABEL_VALUE = "hotplug-disk"
VMI_DOMAIN_ANNOTATION = "kubevirt.io/domain"
VMI_NAME_LABEL = "kubevirt.io/vmi-name"
MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"
EVACUATION_MIGRATION_ANNOTATION = "kubevirt.io/evacuationMigration"
WORKLOAD_UPDATE_MIGRATION_ANNOTATION = "kubevirt.io/workloadUpdateMigration"
DRAIN_ID_LABEL = "drainctl.io/drain-id"
"""Label on every VMIM drainctl creates; its value is the drain id (rule: writes carry their origin)."""
ATTEMPT_LABEL = "drainctl.io/attempt"
VMI_LABEL = "drainctl.io/vmi"
"""Label on our VMIMs: the VMI's name (selectable, unlike spec.vmiName)."""
NODE_DRAIN_ANNOTATION = "drainctl.io/drain-id"
"""Annotation on a node cordoned by a drain: the drain id (an uncordon on cancel only touches its own)."""
NODE_DRAINED_ANNOTATION = "drainctl.io/drained-at"
"""Annotation on a node: when its drain finished it."""
FENCING_TOKEN_ANNOTATION = "drainctl.io/fencing-token"
"""Annotation on our VMIMs: the semaphore lease token that created it."""
SOURCE_NODE_ANNOTATION = "drainctl.io/source-node"
UNSCHEDULABLE_TIMEOUT_ANNOTATION = "kubevirt.io/migrationUnschedulablePodTimeoutSeconds"
"""KubeVirt's per-VMIM limit on an unschedulable target pod; we set it to our pending timeout."""

HOST_MODEL = "host-model"
HOST_PASSTHROUGH = "host-passthrough"

FINAL_MIGRATION_PHASES = frozenset({"Succeeded", "Failed"})
FINAL_VMI_PHASES = frozenset({"Succeeded", "Failed"})
FINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})

GIB = 1024**3


def vmi_key(namespace: str, name: str) -> VmiKey:
    """The ``namespace/name`` key of a VMI."""
    return VmiKey(f"{namespace}/{name}")


def split_vmi_key(key: VmiKey | str) -> tuple[str, str]:
    """Inverse of :func:`vmi_key`; raises ValueError on a key without exactly one ``/``."""
    namespace, sep, name = key.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ValueError(f"VMI key {key!r} is not of the form 'namespace/name'")
    return namespace, name


def format_bytes(value: float) -> str:
    """Human form used in reasons and errors: GiB with at most one decimal, MiB below 1 GiB (0 is "0 GiB")."""
    if abs(value) >= GIB or value == 0:
        text = f"{value / GIB:.1f}".removesuffix(".0")
        return f"{text} GiB"
    text = f"{value / 1024**2:.1f}".removesuffix(".0")
    return f"{text} MiB"


# --- enums ---------------------------------------------------------------------------------------------


class VmVerdict(enum.StrEnum):
    """The planner's decision for one VM on a draining node."""

    MIGRATE = "Migrate"
    SKIP = "Skip"
    """Left on the node by policy (e.g. evictionStrategy None under the skip policy); node cannot finish."""
    BLOCK = "Block"
    """Cannot be moved at all (not migratable, External, no fitting target); refuses a plan under "block"."""


class DrainPhase(enum.StrEnum):
    PENDING = "Pending"
    PLANNING = "Planning"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLING = "Cancelling"
    CANCELLED = "Cancelled"

    @property
    def is_final(self) -> bool:
        return self in (DrainPhase.SUCCEEDED, DrainPhase.FAILED, DrainPhase.CANCELLED)


class NodePhase(enum.StrEnum):
    PENDING = "Pending"
    CORDONED = "Cordoned"
    MIGRATING = "Migrating"
    EVICTING = "Evicting"
    DRAINED = "Drained"
    INCOMPLETE = "Incomplete"
    """Everything that could move moved, but VMs were left on the node by policy (skip) or were blocked."""
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def is_final(self) -> bool:
        return self in (NodePhase.DRAINED, NodePhase.INCOMPLETE, NodePhase.FAILED, NodePhase.CANCELLED)


class VmPhase(enum.StrEnum):
    QUEUED = "Queued"
    WAITING = "Waiting"
    """Waiting for a semaphore slot, a backoff, or a migration someone else started."""
    MIGRATING = "Migrating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    BLOCKED = "Blocked"
    CANCELLED = "Cancelled"

    @property
    def is_final(self) -> bool:
        return self not in (VmPhase.QUEUED, VmPhase.WAITING, VmPhase.MIGRATING)


class FailureClass(enum.StrEnum):
    """Why one migration attempt failed; decides whether and where to retry."""

    UNSCHEDULABLE = "Unschedulable"
    """The target pod could not be scheduled (capacity, selectors, CPU model)."""
    TARGET_FAILED = "TargetFailed"
    """The target pod or node failed (pod down, handler error)."""
    NOT_CONVERGING = "NotConverging"
    """Dirty rate beat the bandwidth: progress or completion timeout fired."""
    TIMEOUT = "Timeout"
    """One of our own timeouts (pending, overall) fired and we aborted."""
    ABORTED = "Aborted"
    """Cancelled on purpose (user cancel, drain cancel)."""
    REJECTED = "Rejected"
    """The API refused the VMIM (admission: not live-migratable, invalid)."""
    CONFLICT = "Conflict"
    """Another migration of the same VMI was in flight."""
    VM_GONE = "VmGone"
    """The VMI stopped or was deleted; nothing left to migrate."""
    UNKNOWN = "Unknown"

    @property
    def retryable(self) -> bool:
        """Whether another attempt may succeed. Not when the API refused the VMIM, the VM is gone or another
        migration of it runs; an abort by someone else (not a cancel of the drain) is retried."""
        return self not in (FailureClass.REJECTED, FailureClass.VM_GONE, FailureClass.CONFLICT)

    @property
    def avoid_target(self) -> bool:
        """Whether a retry of this VM excludes the target that just failed (a cancel is not the node's fault)."""
        return self is not FailureClass.ABORTED

    @property
    def blames_target(self) -> bool:
        """Whether the failure says something about the target node rather than the VM (counted per node per
        drain: a node that fails several VMs gets no more VMs of that drain)."""
        return self in (FailureClass.UNSCHEDULABLE, FailureClass.TARGET_FAILED)


class EvictionStrategy(enum.StrEnum):
    NONE = "None"
    LIVE_MIGRATE = "LiveMigrate"
    LIVE_MIGRATE_IF_POSSIBLE = "LiveMigrateIfPossible"
    EXTERNAL = "External"


class NodeOrder(enum.StrEnum):
    GIVEN = "given"
    PLANNER = "planner"
    """Least work first: frees whole nodes soonest (migration-model.md 2, vertex completion time)."""


class NonMigratablePolicy(enum.StrEnum):
    BLOCK = "block"
    """Refuse the drain if any VM could not be moved."""
    SKIP = "skip"
    """Leave such VMs where they are; their nodes are reported as not drained."""


# --- snapshot ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str
    """NoSchedule, PreferNoSchedule or NoExecute."""

    @property
    def repels(self) -> bool:
        """Whether the taint keeps new pods off the node unless tolerated."""
        return self.effect in ("NoSchedule", "NoExecute")


@dataclass(frozen=True)
class Toleration:
    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    def tolerates(self, taint: Taint) -> bool:
        """Kubernetes' matching rule (an empty key with Exists tolerates everything)."""
        if self.effect and self.effect != taint.effect:
            return False
        if not self.key:
            return self.operator == "Exists"
        if self.key != taint.key:
            return False
        if self.operator == "Exists":
            return True
        return self.value == taint.value


@dataclass(frozen=True)
class Node:
    name: NodeName
    allocatable_memory_bytes: int
    allocatable_cpu_millis: int
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False
    """spec.unschedulable (cordoned)."""
    ready: bool = True
    control_plane: bool = False
    host_model_cpus: frozenset[str] = frozenset()
    """Models from labels host-model-cpu.node.kubevirt.io/<model>=true (normally exactly one)."""
    cpu_models: frozenset[str] = frozenset()
    """Named models the node can run, from labels cpu-model.node.kubevirt.io/<model>=true."""
    cpu_vendor: str | None = None
    """From the label cpu-vendor.node.kubevirt.io/<vendor>=true."""

    @property
    def cpus(self) -> float:
        return self.allocatable_cpu_millis / 1000

    @property
    def schedulable(self) -> bool:
        """Ready, not cordoned and not a control-plane node: a node that may receive VMs."""
        return self.ready and not self.unschedulable and not self.control_plane


@dataclass(frozen=True)
class VolumeRef:
    """A VMI volume backed by a claim (persistentVolumeClaim or dataVolume, whose PVC has the same name)."""

    name: str
    claim_name: str
    source: str
    """"persistentVolumeClaim" or "dataVolume"."""
    rwx: bool | None = None
    """Whether the claim is ReadWriteMany; None when the PVC was not in the snapshot."""


@dataclass(frozen=True)
class MigrationStateSummary:
    """The parts of vmi.status.migrationState the orchestrator reads (it reflects the latest migration)."""

    migration_uid: str = ""
    source_node: str | None = None
    target_node: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    completed: bool = False
    failed: bool = False
    failure_reason: str = ""
    abort_requested: bool = False
    abort_status: str = ""
    mode: str = ""


@dataclass(frozen=True)
class Vmi:
    namespace: str
    name: str
    uid: str
    node: NodeName | None
    """status.nodeName; None while not scheduled."""
    phase: str
    memory_request_bytes: int
    """What the VM reserves on a node: requests.memory, else memory.guest, else limits.memory."""
    guest_memory_bytes: int
    """Migration data size (KubeVirt: memory.guest if set, else requests.memory)."""
    cpu_model: str = HOST_MODEL
    """spec.domain.cpu.model; unset means host-model, KubeVirt's default."""
    node_selector: Mapping[str, str] = field(default_factory=dict, hash=False)
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    tolerations: tuple[Toleration, ...] = ()
    has_affinity: bool = False
    """spec.affinity is set; the planner does not evaluate affinity terms (workers re-check)."""
    eviction_strategy: EvictionStrategy = EvictionStrategy.NONE
    eviction_strategy_source: str = "default"
    """"vmi", "cluster" (KubeVirt.spec.configuration) or "default" (KubeVirt's None)."""
    live_migratable: str | None = None
    """LiveMigratable condition status ("True", "False", "Unknown"); None when not reported."""
    live_migratable_reason: str = ""
    live_migratable_message: str = ""
    volumes: tuple[VolumeRef, ...] = ()
    migration_state: MigrationStateSummary | None = None
    evacuation_node: NodeName | None = None
    """status.evacuationNodeName: KubeVirt was asked (by an eviction) to move the VM off this node."""

    @property
    def key(self) -> VmiKey:
        return vmi_key(self.namespace, self.name)

    @property
    def is_final(self) -> bool:
        return self.phase in FINAL_VMI_PHASES


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    node: NodeName | None
    phase: str
    memory_request_bytes: int
    """Effective request as the scheduler counts it: max(sum of containers, largest init) + overhead."""
    owner_kind: str | None = None
    owner_name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    is_virt_launcher: bool = False
    vmi_name: str | None = None
    """For virt-launcher pods, the VMI (annotation kubevirt.io/domain); same namespace as the pod."""
    has_empty_dir: bool = False
    is_mirror: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def daemonset_owned(self) -> bool:
        return self.owner_kind == "DaemonSet"

    @property
    def is_final(self) -> bool:
        return self.phase in FINAL_POD_PHASES

    @property
    def is_hotplug_disk(self) -> bool:
        return self.labels.get(VIRT_LAUNCHER_LABEL) == HOTPLUG_DISK_LABEL_VALUE


@dataclass(frozen=True)
class Migration:
    """A VirtualMachineInstanceMigration (VMIM)."""

    namespace: str
    name: str
    uid: str
    vmi_name: str
    phase: str
    """status.phase; "" while unset."""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    creation_time: float | None = None
    target_node: NodeName | None = None
    """From spec.addedNodeSelector["kubernetes.io/hostname"], when pinned."""
    source_node: NodeName | None = None
    failure_reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def vmi_key(self) -> VmiKey:
        return vmi_key(self.namespace, self.vmi_name)

    @property
    def is_final(self) -> bool:
        return self.phase in FINAL_MIGRATION_PHASES

    @property
    def drain_id(self) -> DrainId | None:
        value = self.labels.get(DRAIN_ID_LABEL)
        return DrainId(value) if value else None

    @property
    def origin(self) -> str:
        """Who created it: "drainctl", "evacuation", "workload-update" or "user"."""
        if self.drain_id is not None:
            return "drainctl"
        if EVACUATION_MIGRATION_ANNOTATION in self.annotations:
            return "evacuation"
        if WORKLOAD_UPDATE_MIGRATION_ANNOTATION in self.annotations:
            return "workload-update"
        return "user"


@dataclass(frozen=True)
class MigrationConfig:
    """KubeVirt.spec.configuration.migrations with KubeVirt's defaults filled in (kubevirt.md 2.1)."""

    parallel_migrations_per_cluster: int = 5
    parallel_outbound_migrations_per_node: int = 2
    bandwidth_per_migration_bytes: int = 0
    """Bytes per second; 0 means unlimited."""
    completion_timeout_per_gib: int = 150
    progress_timeout_s: int = 150
    allow_auto_converge: bool = False
    allow_post_copy: bool = False
    allow_workload_disruption: bool | None = None
    """None inherits allow_post_copy (KubeVirt's GetMigrationConfiguration)."""
    network: str | None = None
    """Dedicated migration network (NetworkAttachmentDefinition name); None means the pod network."""
    max_downtime_ms: int = 300
    """300 when unset: the fixed value of versions before maxDowntimeMs existed."""

    @property
    def effective_allow_workload_disruption(self) -> bool:
        if self.allow_workload_disruption is None:
            return self.allow_post_copy
        return self.allow_workload_disruption


@dataclass(frozen=True)
class ClusterSnapshot:
    """What the planner sees of the cluster at one moment. Indexes are built once on construction."""

    nodes: tuple[Node, ...]
    vmis: tuple[Vmi, ...]
    pods: tuple[Pod, ...]
    migrations: tuple[Migration, ...]
    migration_config: MigrationConfig = MigrationConfig()
    cluster_eviction_strategy: EvictionStrategy | None = None
    """KubeVirt.spec.configuration.evictionStrategy; None when unset (KubeVirt then defaults to None)."""
    pod_memory: Mapping[str, int] | None = field(default=None, hash=False, compare=False)
    """Memory requested by the live pods of each node, when the snapshot carries the sums instead of every pod
    (a snapshot for a drain holds only the pods of the nodes it drains); None: summed from ``pods``."""

    _nodes_by_name: Mapping[str, Node] = field(init=False, repr=False, compare=False, hash=False)
    _vmis_by_node: Mapping[str, tuple[Vmi, ...]] = field(init=False, repr=False, compare=False, hash=False)
    _vmis_by_key: Mapping[str, Vmi] = field(init=False, repr=False, compare=False, hash=False)
    _pods_by_node: Mapping[str, tuple[Pod, ...]] = field(init=False, repr=False, compare=False, hash=False)
    _migrations_by_vmi: Mapping[str, tuple[Migration, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        nodes_by_name: dict[str, Node] = {}
        for node in self.nodes:
            if node.name in nodes_by_name:
                raise ValueError(f"Node {node.name}: appears twice in the snapshot")
            nodes_by_name[node.name] = node
        vmis_by_node: dict[str, list[Vmi]] = {}
        vmis_by_key: dict[str, Vmi] = {}
        for vmi in self.vmis:
            if vmi.key in vmis_by_key:
                raise ValueError(f"VirtualMachineInstance {vmi.key}: appears twice in the snapshot")
            vmis_by_key[vmi.key] = vmi
            if vmi.node is not None:
                vmis_by_node.setdefault(vmi.node, []).append(vmi)
        pods_by_node: dict[str, list[Pod]] = {}
        for pod in self.pods:
            if pod.node is not None:
                pods_by_node.setdefault(pod.node, []).append(pod)
        migrations_by_vmi: dict[str, list[Migration]] = {}
        for migration in self.migrations:
            migrations_by_vmi.setdefault(migration.vmi_key, []).append(migration)
        # Frozen dataclass: the indexes are derived state, set once here.
        object.__setattr__(self, "_nodes_by_name", MappingProxyType(nodes_by_name))
        object.__setattr__(self, "_vmis_by_node", {k: tuple(v) for k, v in vmis_by_node.items()})
        object.__setattr__(self, "_vmis_by_key", MappingProxyType(vmis_by_key))
        object.__setattr__(self, "_pods_by_node", {k: tuple(v) for k, v in pods_by_node.items()})
        object.__setattr__(self, "_migrations_by_vmi", {k: tuple(v) for k, v in migrations_by_vmi.items()})

    def node(self, name: str) -> Node | None:
        """The node called ``name``, or None if the cluster has no such node."""
        return self._nodes_by_name.get(name)

    def vmis_on(self, node: str) -> tuple[Vmi, ...]:
        """VMIs whose status.nodeName is ``node``, in snapshot order."""
        return self._vmis_by_node.get(node, ())

    def pods_on(self, node: str) -> tuple[Pod, ...]:
        """Pods bound to ``node`` (any phase), in snapshot order."""
        return self._pods_by_node.get(node, ())

    def vmi(self, key: str) -> Vmi | None:
        return self._vmis_by_key.get(key)

    def pod_memory_on(self, node: str) -> int:
        """Memory requested by the pods on ``node`` that are not final (what the node has given away)."""
        if self.pod_memory is not None:
            return self.pod_memory.get(node, 0)
        return sum(p.memory_request_bytes for p in self.pods_on(node) if not p.is_final)

    def migrations_for(self, key: str) -> tuple[Migration, ...]:
        """Every VMIM naming the VMI ``key`` (namespace/name), final or not."""
        return self._migrations_by_vmi.get(key, ())

    def active_migrations(self) -> tuple[Migration, ...]:
        return tuple(m for m in self.migrations if not m.is_final)


# --- request -------------------------------------------------------------------------------------------


def _req_int(data: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"drain request: {name}: expected an integer, got {value!r}")
    return value


def _req_float(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"drain request: {name}: expected a number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Bound:
    """The closed range ``low..high`` a number in a drain request must lie in. The API's schema and checks, the
    CLI's options and :class:`DrainRequest` all read :data:`REQUEST_BOUNDS`, so a value one entry point accepts,
    every entry point accepts."""

    low: int
    high: int

    def admits(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


MAX_REQUEST_NODES = 10_000
"""Nodes one drain request may name."""
MAX_REQUEST_SECONDS = 86_400
"""A per-drain timeout longer than a day is a mistake: the migrate job itself is stopped after 24 h."""
REQUEST_BOUNDS: Mapping[str, Bound] = MappingProxyType({
    "max_parallel_nodes": Bound(1, MAX_REQUEST_NODES),
    "completion_timeout_per_gib": Bound(1, 3600),
    "progress_timeout_s": Bound(1, MAX_REQUEST_SECONDS),
    "pending_timeout_s": Bound(1, MAX_REQUEST_SECONDS),
    "max_attempts": Bound(1, 100),
})
"""Every numeric field of :class:`DrainRequest` and its range (seconds for ``*_s``, seconds per GiB for
``completion_timeout_per_gib``)."""


@dataclass(frozen=True)
class DrainRequest:
    """What an operator asks for. Semantic checks (unknown nodes, limits) are the planner's job."""

    nodes: tuple[NodeName, ...]
    max_parallel_nodes: int = 1
    order: NodeOrder = NodeOrder.GIVEN
    non_migratable: NonMigratablePolicy = NonMigratablePolicy.BLOCK
    completion_timeout_per_gib: int | None = None
    """Overrides the setting for this drain (seconds per GiB of migration data)."""
    progress_timeout_s: float | None = None
    pending_timeout_s: float | None = None
    max_attempts: int | None = None
    uncordon_on_cancel: bool = True
    tune: bool = False
    """Apply limits computed for this drain to KubeVirt while it runs (orchestrator.tuning), then restore."""
    last_resort_targets: tuple[NodeName, ...] = ()
    """Nodes a VM goes to only when no other node has room (a rollout's nodes still waiting for maintenance)."""
    allow_post_copy: bool = False
    """A VM judged unable to converge may try again in post-copy (through a drain-owned MigrationPolicy).
    Never by default: a post-copy that loses its network loses the VM. Adds post-copy to `escalation`."""
    escalation: tuple[str, ...] | None = None
    """The rungs of the escalation ladder this drain allows, as users write them (solo, auto-converge,
    post-copy; () is `none`); None: the default, solo and auto-converge (orchestrator.escalation)."""

    def __post_init__(self) -> None:
        # Accept plain strings and lists from callers; store the canonical enum and tuple forms so that
        # identity checks (``is NodeOrder.PLANNER``) and hashing work. Bad values raise ValueError here.
        object.__setattr__(self, "nodes", tuple(NodeName(n) for n in self.nodes))
        object.__setattr__(self, "last_resort_targets", tuple(NodeName(n) for n in self.last_resort_targets))
        object.__setattr__(self, "order", NodeOrder(self.order))
        object.__setattr__(self, "non_migratable", NonMigratablePolicy(self.non_migratable))
        if self.escalation is not None:
            object.__setattr__(self, "escalation", parse_escalation(
                self.escalation if isinstance(self.escalation, str) else tuple(self.escalation) or (NONE,),
                where="drain request: escalation"))
        for name, bound in REQUEST_BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not bound.admits(value):
                raise ValueError(f"drain request: {name}: {value!r} is out of range ({bound})")

    def to_json(self) -> dict[str, Any]:
        result = _plain(self)
        assert isinstance(result, dict)
        return result

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DrainRequest:
        """Parse an API/CLI body; raises ValueError naming the field and the problem."""
        if not isinstance(data, Mapping):
            raise ValueError(f"drain request: expected an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"drain request: unknown field(s) {', '.join(unknown)}")
        nodes = data.get("nodes")
        if not isinstance(nodes, Sequence) or isinstance(nodes, str | bytes):
            raise ValueError(f"drain request: nodes: expected a list of node names, got {nodes!r}")
        for node in nodes:
            if not isinstance(node, str) or not node:
                raise ValueError(f"drain request: nodes: {node!r} is not a node name")
        try:
            order = NodeOrder(data.get("order", NodeOrder.GIVEN))
        except ValueError:
            raise ValueError(
                f"drain request: order: {data.get('order')!r} is not one of {', '.join(o.value for o in NodeOrder)}"
            ) from None
        try:
            policy = NonMigratablePolicy(data.get("non_migratable", NonMigratablePolicy.BLOCK))
        except ValueError:
            raise ValueError(
                f"drain request: non_migratable: {data.get('non_migratable')!r} is not one of "
                f"{', '.join(p.value for p in NonMigratablePolicy)}"
            ) from None
        uncordon = data.get("uncordon_on_cancel", True)
        if not isinstance(uncordon, bool):
            raise ValueError(f"drain request: uncordon_on_cancel: expected true or false, got {uncordon!r}")
        tune = data.get("tune", False)
        if not isinstance(tune, bool):
            raise ValueError(f"drain request: tune: expected true or false, got {tune!r}")
        last_resort = data.get("last_resort_targets", ())
        if not isinstance(last_resort, Sequence) or isinstance(last_resort, str | bytes) \
                or not all(isinstance(n, str) and n for n in last_resort):
            raise ValueError(f"drain request: last_resort_targets: expected a list of node names, got {last_resort!r}")
        allow_post_copy = data.get("allow_post_copy", False)
        if not isinstance(allow_post_copy, bool):
            raise ValueError(f"drain request: allow_post_copy: expected true or false, got {allow_post_copy!r}")
        escalation = data.get("escalation")
        if escalation is not None:
            if isinstance(escalation, Sequence) and not isinstance(escalation, str) and not escalation:
                escalation = NONE
            escalation = parse_escalation(escalation, where="drain request: escalation")
        max_parallel = _req_int(data, "max_parallel_nodes", 1)
        assert max_parallel is not None
        return cls(
            nodes=tuple(NodeName(n) for n in nodes),
            max_parallel_nodes=max_parallel,
            order=order,
            non_migratable=policy,
            completion_timeout_per_gib=_req_int(data, "completion_timeout_per_gib", None),
            progress_timeout_s=_req_float(data, "progress_timeout_s"),
            pending_timeout_s=_req_float(data, "pending_timeout_s"),
            max_attempts=_req_int(data, "max_attempts", None),
            uncordon_on_cancel=uncordon,
            tune=tune,
            last_resort_targets=tuple(NodeName(n) for n in last_resort),
            allow_post_copy=allow_post_copy,
            escalation=escalation,
        )


# --- plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationJob:
    """One VM to move, in the order the node should move them."""

    vmi: VmiKey
    source_node: NodeName
    memory_bytes: int
    """The VM's memory request (what the target must have free)."""
    proposed_target: NodeName
    """Where the placement put it; a hint, the worker re-checks at run time."""
    reason: str
    estimated_s: float
    completion_timeout_s: float
    """KubeVirt-style budget: effective completionTimeoutPerGiB x migration data size in whole decimal GB."""
    in_flight_migration: str | None = None
    """namespace/name of a non-final VMIM that already exists for this VMI (adopt or wait for it)."""
    dirty_rate_bytes_per_s: float | None = None
    """The guest's last known dirty rate (kubevirt_vmi_dirty_rate_bytes_per_second); None without metrics."""
    expected_hard: bool = False
    """The dirty rate is at or above the bandwidth a migration of the VM gets: a plain pre-copy is expected not
    to converge."""
    expected_rung: str | None = None
    """For an expected-hard VM, the rung of the escalation ladder expected to move it (orchestrator.escalation
    Rung's value); None: no allowed rung is expected to, see `hard_reason`."""
    hard_reason: str | None = None
    """Why the VM is expected to be hard, with the numbers, and what the estimate counts for it."""


@dataclass(frozen=True)
class VmDecision:
    """A VM that will not be migrated, and why."""

    vmi: VmiKey
    verdict: VmVerdict
    reason: str


@dataclass(frozen=True)
class PodEviction:
    """A non-VM pod to evict once the node's VMs are gone."""

    pod: str
    memory_bytes: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodePlan:
    node: NodeName
    wave: int
    """0-based wave index; nodes in one wave drain in parallel."""
    jobs: tuple[MigrationJob, ...]
    skipped: tuple[VmDecision, ...] = ()
    blocked: tuple[VmDecision, ...] = ()
    evict_pods: tuple[PodEviction, ...] = ()
    ignored_pods: tuple[str, ...] = ()
    """DaemonSet-owned and mirror pods, left alone as kubectl drain does."""
    migrate_bytes: int = 0
    work_s: float = 0.0
    """Sum of the jobs' estimated seconds (the planner's "least work first" key)."""

    @property
    def can_finish_drained(self) -> bool:
        return not self.skipped and not self.blocked


@dataclass(frozen=True)
class CapacityVerdict:
    """The capacity check with its numbers (the OpenShift rule plus a real placement)."""

    spare_bytes: int
    """Sum over target nodes of allocatable memory minus pod memory requests there."""
    required_bytes: int
    """max_parallel_nodes x largest_node_load_bytes."""
    largest_node_load_bytes: int
    """The largest total memory of the VMs to migrate on one draining node (skipped/blocked VMs stay)."""
    largest_node: NodeName | None
    max_parallel_nodes: int
    target_nodes: int
    placed_vms: int
    unplaced_vms: int
    ok: bool
    message: str


@dataclass(frozen=True)
class LimitValue:
    ours: float
    kubevirt: float | None
    """KubeVirt's value, or None where KubeVirt has no such limit."""
    effective: float


@dataclass(frozen=True)
class EffectiveLimits:
    """Our settings against KubeVirt's configuration; effective = the stricter of the two."""

    in_flight_cluster: LimitValue
    outbound_per_node: LimitValue
    inbound_per_node: LimitValue
    completion_timeout_per_gib: LimitValue
    progress_timeout_s: LimitValue
    pending_timeout_s: float
    max_attempts: int


@dataclass(frozen=True)
class Estimate:
    """An estimate, not a promise: see ``model`` for how it was computed."""

    total_s: float
    wave_s: tuple[float, ...]
    slots: int
    per_migration_bytes_per_s: float
    setup_s: float
    model: str


@dataclass(frozen=True)
class DrainPlan:
    drain_nodes: tuple[NodeName, ...]
    """Nodes in drain order."""
    waves: tuple[tuple[NodeName, ...], ...]
    nodes: tuple[NodePlan, ...]
    capacity: CapacityVerdict
    limits: EffectiveLimits
    warnings: tuple[str, ...]
    estimate: Estimate
    policy: NonMigratablePolicy
    order: NodeOrder
    max_parallel_nodes: int
    created_at: float
    drain_id: DrainId | None = None
    tuning: Mapping[str, Any] | None = None
    """Limits computed for this drain's window (orchestrator.tuning.Tuning.to_json); in force only when the
    request asked to tune."""
    tuned: bool = False
    """Whether `limits` and `estimate` are the tuned ones (the request asked for --tune)."""

    def node_plan(self, node: str) -> NodePlan:
        for plan in self.nodes:
            if plan.node == node:
                return plan
        raise KeyError(f"node {node!r} is not part of this plan")

    def jobs(self) -> Iterator[MigrationJob]:
        """Every migration job, in wave, node and per-node order."""
        for plan in self.nodes:
            yield from plan.jobs

    @property
    def blocked(self) -> tuple[VmDecision, ...]:
        return tuple(d for plan in self.nodes for d in plan.blocked)

    @property
    def skipped(self) -> tuple[VmDecision, ...]:
        return tuple(d for plan in self.nodes for d in plan.skipped)

    def to_json(self) -> dict[str, Any]:
        result = _plain(self)
        assert isinstance(result, dict)
        return result

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DrainPlan:
        """Inverse of :meth:`to_json`. Raises ValueError (KeyError/TypeError wrapped) on a malformed dump."""
        try:
            return _plan_from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"drain plan: malformed JSON: {exc!r}") from exc


def _plain(value: Any) -> Any:
    """Recursively turn dataclasses, enums, tuples and mappings into JSON-ready values."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        items = sorted(value) if isinstance(value, frozenset | set) else value
        return [_plain(v) for v in items]
    return value


def _limit(data: Mapping[str, Any]) -> LimitValue:
    return LimitValue(ours=data["ours"], kubevirt=data["kubevirt"], effective=data["effective"])


def _decision(data: Mapping[str, Any]) -> VmDecision:
    return VmDecision(vmi=VmiKey(data["vmi"]), verdict=VmVerdict(data["verdict"]), reason=data["reason"])


def _plan_from_json(data: Mapping[str, Any]) -> DrainPlan:
    nodes = []
    for node in data["nodes"]:
        jobs = tuple(
            MigrationJob(
                vmi=VmiKey(job["vmi"]),
                source_node=NodeName(job["source_node"]),
                memory_bytes=int(job["memory_bytes"]),
                proposed_target=NodeName(job["proposed_target"]),
                reason=job["reason"],
                estimated_s=float(job["estimated_s"]),
                completion_timeout_s=float(job["completion_timeout_s"]),
                in_flight_migration=job.get("in_flight_migration"),
                dirty_rate_bytes_per_s=job.get("dirty_rate_bytes_per_s"),
                expected_hard=bool(job.get("expected_hard", False)),
                expected_rung=job.get("expected_rung"),
                hard_reason=job.get("hard_reason"),
            )
            for job in node["jobs"]
        )
        nodes.append(
            NodePlan(
                node=NodeName(node["node"]),
                wave=int(node["wave"]),
                jobs=jobs,
                skipped=tuple(_decision(d) for d in node["skipped"]),
                blocked=tuple(_decision(d) for d in node["blocked"]),
                evict_pods=tuple(
                    PodEviction(pod=p["pod"], memory_bytes=int(p["memory_bytes"]), notes=tuple(p["notes"]))
                    for p in node["evict_pods"]
                ),
                ignored_pods=tuple(node["ignored_pods"]),
                migrate_bytes=int(node["migrate_bytes"]),
                work_s=float(node["work_s"]),
            )
        )
    cap = data["capacity"]
    lim = data["limits"]
    est = data["estimate"]
    drain_id = data.get("drain_id")
    return DrainPlan(
        drain_nodes=tuple(NodeName(n) for n in data["drain_nodes"]),
        waves=tuple(tuple(NodeName(n) for n in wave) for wave in data["waves"]),
        nodes=tuple(nodes),
        capacity=CapacityVerdict(
            spare_bytes=int(cap["spare_bytes"]),
            required_bytes=int(cap["required_bytes"]),
            largest_node_load_bytes=int(cap["largest_node_load_bytes"]),
            largest_node=None if cap["largest_node"] is None else NodeName(cap["largest_node"]),
            max_parallel_nodes=int(cap["max_parallel_nodes"]),
            target_nodes=int(cap["target_nodes"]),
            placed_vms=int(cap["placed_vms"]),
            unplaced_vms=int(cap["unplaced_vms"]),
            ok=bool(cap["ok"]),
            message=cap["message"],
        ),
        limits=EffectiveLimits(
            in_flight_cluster=_limit(lim["in_flight_cluster"]),
            outbound_per_node=_limit(lim["outbound_per_node"]),
            inbound_per_node=_limit(lim["inbound_per_node"]),
            completion_timeout_per_gib=_limit(lim["completion_timeout_per_gib"]),
            progress_timeout_s=_limit(lim["progress_timeout_s"]),
            pending_timeout_s=float(lim["pending_timeout_s"]),
            max_attempts=int(lim["max_attempts"]),
        ),
        warnings=tuple(data["warnings"]),
        estimate=Estimate(
            total_s=float(est["total_s"]),
            wave_s=tuple(float(w) for w in est["wave_s"]),
            slots=int(est["slots"]),
            per_migration_bytes_per_s=float(est["per_migration_bytes_per_s"]),
            setup_s=float(est["setup_s"]),
            model=est["model"],
        ),
        policy=NonMigratablePolicy(data["policy"]),
        order=NodeOrder(data["order"]),
        max_parallel_nodes=int(data["max_parallel_nodes"]),
        created_at=float(data["created_at"]),
        drain_id=None if drain_id is None else DrainId(drain_id),
        tuning=data.get("tuning"),
        tuned=bool(data.get("tuned", False)),
    )
