"""KubeVirt's behaviour in the simulated cluster (reference: docs/kubevirt.md).

Where it imitates KubeVirt it follows KubeVirt's code (kubevirt/kubevirt main after v1.9):
- Admission (virt-api admitters migration-create-admitter.go, migration-update-admitter.go,
  pod-eviction-admitter.go): the VMIM webhooks (vmiName required and priority reserved to virt-controller:
  422 Invalid; VMI missing or final, LiveMigratable False, another VMIM in flight: 400 with KubeVirt's texts;
  spec immutable) and the virt-launcher eviction webhook (429 + evacuation, or 429 forever for a LiveMigrate
  VMI that is not LiveMigratable=True).
- The migration controller (virt-controller watch/migration/migration.go) on its priority queue
  (`workqueue.PriorityQueue`): a Pending VMIM held back by `parallelMigrationsPerCluster` or
  `parallelOutboundMigrationsPerNode` is looked at again after 1/3/5 s by priority; when a migration ends the
  Pending VMIMs of highest priority are re-enqueued at once in an arbitrary (seeded) order among equals;
  one target pod is created at a time (1 s requeue while the last one is unobserved); evacuation VMIMs wait
  out the 20-320 s backoff in Pending; a target virt-launcher pod is scheduled
  like kube-scheduler would (not the source, schedulable, Ready, memory fits, node selector incl.
  addedNodeSelector, host-model CPU and vendor labels) and fails after the unschedulable timeout; phases
  Pending -> Scheduling -> Scheduled -> PreparingTarget -> TargetReady -> Running -> Succeeded/Failed with
  `phaseTransitionTimestamps`; `vmi.status.migrationState` filled live; bytes move by `physics`; the
  launcher's progress/completion timeouts abort (or switch to post-copy); deleting a VMIM aborts it; only the
  5 newest finished VMIMs per VMI are kept.
- virt-launcher's monitor (live-migration-source.go), legacy path: QEMU's 300 ms max downtime whatever
  `maxDowntimeMs` says; since v1.9 every successful abort, timeouts included, reads "Live migration has been
  aborted".
- The evacuation controller (drain/evacuation/evacuation.go): every LiveMigratable=True VMI with
  `evacuationNodeName` (or on a drain-tainted node) and no VMIM in flight gets a `kubevirt-evacuation-` VMIM
  at once, again right after each failure (no memory of failed targets).
- A kubelet stand-in that finishes graceful pod deletion, and the VM controller restarting a VM whose
  launcher pod was evicted (strategy None).
It also keeps the ground truth (`stats`) that tests and benchmarks read.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from simulator import objects
from simulator.clock import SimClock
from simulator.errors import ApiError
from simulator.faults import Faults
from simulator.physics import QEMU_DEFAULT_DOWNTIME_S, Flow, MonitorConfig, Transfer, VMPhysics, fair_share
from simulator.policies import resolve_migration_config, vmim_options
from simulator.quantity import to_bytes
from simulator.resources import EVENTS, KUBEVIRTS, NODES, PDBS, PODS, VMIMS, VMIS, VMS, ResourceType
from simulator.scenarios import default_migrations
from simulator.store import Obj, Store, iso
from simulator.workqueue import PriorityQueue

IN_FLIGHT = ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
FINAL = ("Succeeded", "Failed")
HANDED_OFF = ("PreparingTarget", "TargetReady", "Running")
PRIORITIES = {"system-critical": 100, "user-triggered": 50, "system-maintenance": 20}
MIGRATION_FINALIZER = "kubevirt.io/migrationJobFinalize"
VMI_NAME_LABEL = "kubevirt.io/vmi-name"
EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"
WORKLOAD_UPDATE_ANNOTATION = "kubevirt.io/workloadUpdateMigration"
EVICTION_SOURCE_ANNOTATION = "kubevirt.io/eviction-source"
UNSCHEDULABLE_TIMEOUT_ANNOTATION = "kubevirt.io/migrationUnschedulablePodTimeoutSeconds"
PENDING_TIMEOUT_ANNOTATION = "kubevirt.io/migrationPendingPodTimeoutSeconds"
GC_BUFFER = 5
# pkg/util/migrations/migrations.go: the queue priority of a migration past Pending (and of a backoff requeue).
QUEUE_PRIORITY_RUNNING = 1000
# How long after a target pod is created the controller's pod informer has seen it: until then
# podExpectations.AllPendingCreations() > 0 holds every other target pod creation back (1 s requeue).
POD_EXPECTATION_LAG_S = 0.05
EVACUATION_BACKOFF_S = 20.0
MIGRATION_WEBHOOK = "migration-create-validator.kubevirt.io"
MIGRATION_UPDATE_WEBHOOK = "migration-update-validator.kubevirt.io"
EVICTION_WEBHOOK = "virt-launcher-eviction-interceptor.kubevirt.io"
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
MIGRATABLE_ON_EVICTION = ("LiveMigrate", "LiveMigrateIfPossible")
INJECTED_FAILURE = ("Live migration failed error encountered during MigrateToURI3 libvirt op: operation "
                    "failed: Lost connection to destination host")
# setMigrationResult (virt-launcher live-migration-source.go, v1.9+): the reason of every successful abort.
ABORTED = "Live migration has been aborted"

DEFAULT_MIGRATIONS: dict[str, Any] = default_migrations()


def vmi_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _condition(obj: Obj, ctype: str) -> Obj | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            found: Obj = c
            return found
    return None


def is_migratable(vmi: Obj) -> bool:
    """VirtualMachineInstance.IsMigratable (api/core/v1/types.go): LiveMigratable is True. A VMI without the
    condition is not migratable (the eviction webhook and the evacuation controller use this)."""
    cond = _condition(vmi, "LiveMigratable")
    return cond is not None and cond.get("status") == "True"


def _pod_memory(pod: Obj) -> int:
    """What the pod takes from its node's memory: requests while it is not terminated."""
    if not (pod.get("spec") or {}).get("nodeName"):
        return 0
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return 0
    total = 0
    for c in pod["spec"].get("containers") or []:
        total += to_bytes(((c.get("resources") or {}).get("requests") or {}).get("memory"))
    return total


@dataclass(frozen=True)
class VMInfo:
    """The hidden physics of one VM, which the simulator knows and the orchestrator never reads."""

    physics: VMPhysics
    setup_s: float
    multifd: bool
    not_migratable_reason: str | None = None
    not_migratable_message: str | None = None
    rwx: bool = True


@dataclass(frozen=True)
class NetworkModel:
    nic_bytes_per_s: Mapping[str, float]
    efficiency: float
    pod_network_share: float
    single_stream_bytes_per_s: float
    cleanup_s: float


@dataclass
class Migration:
    """The controller's view of one VMIM."""

    namespace: str
    name: str
    uid: str
    vmi: str
    created: float
    priority: int
    evacuation: bool
    phase: str = "Pending"
    source: str | None = None
    source_pod: str | None = None
    target: str | None = None
    target_pod: str | None = None
    next_at: float = math.inf
    unschedulable_since: float | None = None
    scheduling_since: float | None = None
    transfer: Transfer | None = None
    setup_s: float = 10.0
    abort_requested: bool = False
    abort_at: float | None = None
    complete_at: float | None = None
    failed_at: float | None = None
    backoff_reported: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    rate: float = 0.0
    """Bytes/s the transfer got in the last step (libvirt's memory transfer rate)."""
    options: dict[str, Any] | None = None
    """The effective migration configuration fixed at hand-off (cluster config + matched MigrationPolicy)."""

    @property
    def key(self) -> str:
        return vmi_key(self.namespace, self.name)


class Probe(Protocol):
    """Something that samples the controllers' state at times of its choosing (metrics scrapes): `advance`
    stops at `next_at` and calls `observe`, which must move `next_at` past `now`."""

    next_at: float

    def observe(self, now: float) -> None: ...


class KubeVirtSim:
    """All of KubeVirt's controllers, stepped by `advance` on cluster time."""

    def __init__(self, store: Store, clock: SimClock, faults: Faults, *, vms: Mapping[str, VMInfo],
                 network: NetworkModel, seed: int = 0, ips: objects.IpAllocator | None = None) -> None:
        self.store = store
        self.clock = clock
        self.faults = faults
        self.network = network
        self._vms: dict[str, VMInfo] = dict(vms)
        self._rand = random.Random(seed)
        self._queue_rand = random.Random(f"migration-queue-{seed}")
        self._queue = PriorityQueue()  # the migration controller's work queue (Pending VMIMs only here)
        self._pod_expectation_until = -math.inf
        # Pending VMIMs held back by a limit, out of the queue while no slot can free (see _park).
        self._parked: dict[str, _Parked] = {}
        self._unparked: dict[str, _Parked] = {}  # back in the queue after a slot freed
        self._park_order = itertools.count()
        self._config_cache: tuple[str, dict[str, Any]] | None = None
        self._inbox: list[tuple[str, ResourceType, Obj, Obj | None]] = []
        self.pending: dict[str, Migration] = {}
        self.active: dict[str, Migration] = {}
        self._by_name: dict[str, Migration] = {}
        self._vmi_open: dict[str, set[str]] = defaultdict(set)  # vmi key -> non-final VMIM keys
        self._evac: dict[str, float] = {}  # VMIs that need an evacuation VMIM -> not before (backoff)
        self._finished: dict[str, list[str]] = defaultdict(list)  # vmi key -> finished VMIM names, oldest first
        self._facts: dict[str, tuple[str, tuple[str, Mapping[str, str], str | None, int]]] = {}
        self._evac_migrations: dict[str, list[Migration]] = defaultdict(list)  # vmi key -> backoff-eligible, by age
        self._kubelet: list[tuple[float, str, str, str]] = []
        self._restarts: list[tuple[float, str, str]] = []
        self._node_used: dict[str, int] = defaultdict(int)
        self._pod_seq = 0
        self._ips = ips or objects.IpAllocator()
        self.records: list[dict[str, Any]] = []
        self.max_in_flight_cluster = 0
        self.max_in_flight_per_node: dict[str, int] = {}
        self.max_inbound_per_node: dict[str, int] = {}
        self.max_in_flight_per_vmi = 0
        self.concurrent_vmis: set[str] = set()
        self.vm_restarts: list[dict[str, Any]] = []
        self.evictions = {"allowed": 0, "denied": 0}
        self.on_change: Callable[[], None] = lambda: None
        self.probes: list[Probe] = []
        store.index_by_node(PODS, lambda o: (o.get("spec") or {}).get("nodeName"))
        store.index_by_node(VMIS, lambda o: (o.get("status") or {}).get("nodeName"))
        for pod in store.iter(PODS):
            self._node_used[pod["spec"].get("nodeName", "")] += _pod_memory(pod)
        store.add_admission(self._admit)
        store.add_listener(self._listen)

    # ================================================================================== configuration
    def config(self) -> dict[str, Any]:
        """The migration configuration in force (cached per KubeVirt CR version; callers must not change it)."""
        kv = self.store.get(KUBEVIRTS, "kubevirt", "kubevirt")
        version = (kv or {}).get("metadata", {}).get("resourceVersion", "")
        if self._config_cache is not None and self._config_cache[0] == version:
            return self._config_cache[1]
        migrations = ((kv or {}).get("spec") or {}).get("configuration", {}).get("migrations") or {}
        merged = {**DEFAULT_MIGRATIONS, **migrations}
        self._config_cache = (version, merged)
        return merged

    def cluster_eviction_strategy(self) -> str | None:
        kv = self.store.get(KUBEVIRTS, "kubevirt", "kubevirt")
        strategy: str | None = ((kv or {}).get("spec") or {}).get("configuration", {}).get("evictionStrategy")
        return strategy

    def eviction_strategy(self, vmi: Obj) -> str:
        return vmi.get("spec", {}).get("evictionStrategy") or self.cluster_eviction_strategy() or "None"

    def vm_info(self, key: str, vmi: Obj | None = None) -> VMInfo:
        info = self._vms.get(key)
        if info is None:
            memory = to_bytes((vmi or {}).get("spec", {}).get("domain", {}).get("resources", {})
                               .get("requests", {}).get("memory")) or objects.GiB
            info = VMInfo(VMPhysics(memory_bytes=memory, resident_bytes=memory // 2,
                                    dirty_bytes_per_s=5e6, wws_bytes=memory // 10),
                          setup_s=10.0, multifd=True)
            self._vms[key] = info
        return info

    # ====================================================================================== admission
    # The VMIM webhooks, after pkg/virt-api/webhooks/validating-webhook/admitters/migration-create-admitter.go
    # and migration-update-admitter.go: spec problems are 422 Invalid (webhookutils.ToAdmissionResponse), every
    # other refusal 400 with no reason (ToAdmissionResponseError).
    def _admit(self, op: str, rt: ResourceType, new: Obj | None, old: Obj | None) -> None:
        if rt is VMIMS and op == "CREATE" and new is not None:
            self._admit_migration(new)
        elif rt is VMIMS and op == "UPDATE" and new is not None and old is not None:
            if new.get("spec") != old.get("spec"):
                raise ApiError.webhook_invalid(MIGRATION_UPDATE_WEBHOOK, [{
                    "reason": "FieldValueNotSupported", "message": "update of Migration object's spec is restricted"}])
            old_labels = old["metadata"].get("labels")
            if (new.get("status") or {}).get("phase") not in FINAL and old_labels is not None \
                    and VMI_NAME_LABEL in old_labels:
                new_labels = new["metadata"].get("labels")
                if not new_labels:
                    raise ApiError.webhook_invalid(MIGRATION_UPDATE_WEBHOOK, [{
                        "reason": "FieldValueNotSupported",
                        "message": "selector label can't be removed from an in-flight migration"}])
                if new_labels.get(VMI_NAME_LABEL) != old_labels[VMI_NAME_LABEL]:
                    raise ApiError.webhook_invalid(MIGRATION_UPDATE_WEBHOOK, [{
                        "reason": "FieldValueNotSupported",
                        "message": "selector label can't be modified on an in-flight migration"}])

    def _admit_migration(self, new: Obj) -> None:
        spec = new.get("spec") or {}
        ns = new["metadata"]["namespace"]
        name = spec.get("vmiName")
        if not name:
            raise ApiError.webhook_invalid(MIGRATION_WEBHOOK, [{
                "reason": "FieldValueRequired", "message": "vmiName is missing", "field": "spec.vmiName"}])
        if spec.get("priority") is not None:
            raise ApiError.webhook_invalid(MIGRATION_WEBHOOK, [{
                "reason": "FieldValueForbidden", "field": "spec.migrationPriority",
                "message": "Migration priority queue, only virt-controller is allowed to set priority field"}])
        vmi = self.store.get(VMIS, ns, name)
        if vmi is None:
            raise ApiError.webhook_denied(MIGRATION_WEBHOOK, f'the VMI "{ns}/{name}" does not exist')
        if (vmi.get("status") or {}).get("phase") in FINAL:
            raise ApiError.webhook_denied(MIGRATION_WEBHOOK, "Cannot migrate VMI in finalized state.")
        # isMigratable: only LiveMigratable=False refuses here (no condition at all passes the webhook).
        cond = _condition(vmi, "LiveMigratable")
        if cond is not None and cond.get("status") == "False":
            raise ApiError.webhook_denied(
                MIGRATION_WEBHOOK,
                f"Cannot migrate VMI, Reason: {cond.get('reason', '')}, Message: {cond.get('message', '')}")
        for key in self._vmi_open.get(vmi_key(ns, name), ()):
            mig = self._by_name.get(key)
            if mig is not None:
                raise ApiError.webhook_denied(
                    MIGRATION_WEBHOOK,
                    f"in-flight migration detected. Active migration job ({mig.uid}) is currently already in "
                    f"progress for VMI {name}.")
        meta = new["metadata"]
        meta.setdefault("labels", {})[VMI_NAME_LABEL] = name
        finalizers = meta.setdefault("finalizers", [])
        if MIGRATION_FINALIZER not in finalizers:
            finalizers.append(MIGRATION_FINALIZER)

    # ======================================================================================= eviction
    def evict(self, namespace: str, name: str, body: Obj | None) -> tuple[int, Obj]:
        """POST pods/{name}/eviction: KubeVirt's webhook, then the PodDisruptionBudget check."""
        pod = self.store.require(PODS, namespace, name)
        body = body or {}
        opts = body.get("deleteOptions") or {}
        dry_run = bool(opts.get("dryRun")) or bool(body.get("dryRun"))
        labels = pod["metadata"].get("labels") or {}
        phase = (pod.get("status") or {}).get("phase")
        if labels.get("kubevirt.io") == "virt-launcher" and phase not in ("Succeeded", "Failed"):
            self._launcher_eviction(pod, dry_run=dry_run)
        if phase not in ("Succeeded", "Failed"):
            self._check_pdbs(pod)
        if not dry_run:
            grace = opts.get("gracePeriodSeconds")
            if not pod["metadata"].get("deletionTimestamp"):
                self.store.delete(PODS, namespace, name, grace_seconds=grace, admit=False)
            self.evictions["allowed"] += 1
        return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def _deny_eviction(self, message: str) -> ApiError:
        self.evictions["denied"] += 1
        return ApiError.webhook_denied(EVICTION_WEBHOOK, message, 429)

    def _launcher_eviction(self, pod: Obj, *, dry_run: bool) -> None:
        ns = pod["metadata"]["namespace"]
        vmi_name = (pod["metadata"].get("annotations") or {}).get("kubevirt.io/domain")
        vmi = self.store.get(VMIS, ns, vmi_name) if vmi_name else None
        if vmi is None or (vmi.get("status") or {}).get("phase") in FINAL:
            return
        # admitLauncherPod (pod-eviction-admitter.go): vmi.IsMigratable() wants LiveMigratable=True.
        strategy = self.eviction_strategy(vmi)
        migratable = is_migratable(vmi)
        full = f'"{ns}/{vmi_name}"'
        if strategy == "None" or (strategy == "LiveMigrateIfPossible" and not migratable):
            return
        if strategy == "LiveMigrate" and not migratable:
            raise self._deny_eviction(f"VMI {vmi_name} is configured with an eviction strategy but is not "
                                      "live-migratable")
        status = vmi.get("status") or {}
        if status.get("evacuationNodeName"):
            raise self._deny_eviction(f"Evacuation in progress: Eviction triggered evacuation of VMI {full}")
        node = pod["spec"].get("nodeName")
        if node != status.get("nodeName"):
            raise self._deny_eviction("Eviction request for target Pod")
        if not dry_run:
            now = self.clock.now()

            def mark(o: Obj) -> None:
                st = o.setdefault("status", {})
                st["evacuationNodeName"] = node
                conds = [c for c in st.get("conditions") or [] if c.get("type") != "EvictionRequested"]
                conds.append({"type": "EvictionRequested", "status": "True", "reason": "EvictionRequested",
                              "lastProbeTime": None, "lastTransitionTime": iso(now)})
                st["conditions"] = conds

            self.store.mutate(VMIS, ns, vmi_name, mark)  # type: ignore[arg-type]
        raise self._deny_eviction(f"Eviction triggered evacuation of VMI {full}")

    def _check_pdbs(self, pod: Obj) -> None:
        ns = pod["metadata"]["namespace"]
        labels = pod["metadata"].get("labels") or {}
        for pdb in self.store.list(PDBS, ns):
            selector = (pdb.get("spec") or {}).get("selector") or {}
            match = selector.get("matchLabels") or {}
            if not match or any(labels.get(k) != v for k, v in match.items()):
                continue
            members = [p for p in self.store.list(PODS, ns)
                       if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in match.items())]
            healthy = sum(1 for p in members if (p.get("status") or {}).get("phase") == "Running"
                          and not p["metadata"].get("deletionTimestamp"))
            spec = pdb["spec"]
            if "minAvailable" in spec:
                need = _int_or_percent(spec["minAvailable"], len(members))
                allowed = healthy - need
            else:
                max_unavailable = _int_or_percent(spec.get("maxUnavailable", 0), len(members))
                need = len(members) - max_unavailable
                allowed = max_unavailable - (len(members) - healthy)
            if allowed < 1:
                self.evictions["denied"] += 1
                raise ApiError(429, "Cannot evict pod as it would violate the pod's disruption budget.",
                               details={"causes": [{"reason": "DisruptionBudget",
                                                    "message": f"The disruption budget {pdb['metadata']['name']}"
                                                               f" needs {need} healthy pods and has {healthy} "
                                                               "currently"}]})

    def evacuate_cancel(self, namespace: str, name: str, body: Obj | None) -> tuple[int, Obj]:
        """PUT virtualmachineinstances/{name}/evacuate/cancel (KubeVirt v1.8+)."""
        vmi = self.store.require(VMIS, namespace, name)
        wanted = (body or {}).get("evacuationNodeName")
        current = (vmi.get("status") or {}).get("evacuationNodeName")
        if wanted and current and wanted != current:
            raise ApiError.bad_request(f"evacuationNodeName {wanted} does not match {current}")

        def clear(o: Obj) -> None:
            st = o.setdefault("status", {})
            st.pop("evacuationNodeName", None)
            st["conditions"] = [c for c in st.get("conditions") or [] if c.get("type") != "EvictionRequested"]

        self.store.mutate(VMIS, namespace, name, clear)
        self._evac.pop(vmi_key(namespace, name), None)
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}

    # ====================================================================================== listeners
    def _listen(self, etype: str, rt: ResourceType, obj: Obj, old: Obj | None) -> None:
        if rt is PODS:
            node = (obj.get("spec") or {}).get("nodeName")
            before = _pod_memory(old) if old is not None else 0
            after = 0 if etype == "DELETED" else _pod_memory(obj)
            if old is not None and (old.get("spec") or {}).get("nodeName") != node:
                self._node_used[(old.get("spec") or {}).get("nodeName") or ""] -= before
                before = 0
            if node:
                self._node_used[node] += after - before
            if etype == "DELETED" or (obj["metadata"].get("deletionTimestamp") and
                                      not (old or {}).get("metadata", {}).get("deletionTimestamp")):
                self._inbox.append((etype, rt, obj, old))
        elif rt is VMIMS or rt is NODES or rt is KUBEVIRTS:
            self._inbox.append((etype, rt, obj, old))
        elif rt is VMIS:
            if etype == "DELETED" or (obj.get("status") or {}).get("evacuationNodeName"):
                self._inbox.append((etype, rt, obj, old))
        else:
            return
        self.on_change()

    def _drain_inbox(self, now: float) -> None:
        while self._inbox:
            batch, self._inbox = self._inbox, []
            for etype, rt, obj, old in batch:
                if rt is VMIMS:
                    self._on_vmim(etype, obj, now)
                elif rt is PODS:
                    self._on_pod(etype, obj, now)
                elif rt is VMIS:
                    key = vmi_key(obj["metadata"]["namespace"], obj["metadata"]["name"])
                    if etype == "DELETED":
                        self._evac.pop(key, None)
                        for mkey in list(self._vmi_open.get(key, ())):
                            mig = self._by_name.get(mkey)
                            if mig is not None:
                                self._finish(mig, now, "Failed", "Migration failed because vmi does not exist.")
                    elif not self._vmi_open.get(key):
                        self._evac.setdefault(key, 0.0)
                elif rt is NODES:
                    self._on_node(obj, old)
                elif rt is KUBEVIRTS:
                    self._release_capacity(now)  # the limits may have changed

    def _on_vmim(self, etype: str, obj: Obj, now: float) -> None:
        meta = obj["metadata"]
        key = vmi_key(meta["namespace"], meta["name"])
        mig = self._by_name.get(key)
        if etype == "ADDED" and mig is None and not (obj.get("status") or {}).get("phase"):
            self._track(obj, now)
        elif etype == "MODIFIED" and mig is not None and meta.get("deletionTimestamp"):
            self._request_abort(mig, now)
        elif etype == "DELETED" and mig is not None:
            self._forget(mig)

    def _on_pod(self, etype: str, pod: Obj, now: float) -> None:
        meta = pod["metadata"]
        if etype != "DELETED":
            grace = meta.get("deletionGracePeriodSeconds") or 0
            heapq.heappush(self._kubelet, (now + min(float(grace), 2.0), meta["namespace"], meta["name"],
                                           meta["uid"]))
            return
        labels = meta.get("labels") or {}
        if labels.get("kubevirt.io") != "virt-launcher":
            return
        ns = meta["namespace"]
        vmi_name = (meta.get("annotations") or {}).get("kubevirt.io/domain", "")
        for mig in list(self.active.values()):
            if mig.target_pod == meta["name"] and mig.namespace == ns:
                self._finish(mig, now, "Failed", "Migration failed because target pod shutdown during migration")
        vmi = self.store.get(VMIS, ns, vmi_name)
        if vmi is None or (vmi.get("status") or {}).get("phase") != "Running":
            return
        if meta["uid"] not in ((vmi.get("status") or {}).get("activePods") or {}):
            return
        if (pod.get("status") or {}).get("phase") == "Succeeded" and \
                (vmi.get("status") or {}).get("nodeName") != pod["spec"].get("nodeName"):
            return
        # The VM's only running launcher went away: the guest is gone. A VM with runStrategy Always is
        # started again elsewhere by the VM controller; a bare VMI stays Failed.
        node = (vmi.get("status") or {}).get("nodeName")
        for mkey in list(self._vmi_open.get(vmi_key(ns, vmi_name), ())):
            open_mig = self._by_name.get(mkey)
            if open_mig is not None:
                self._finish(open_mig, now, "Failed", "Migration failed vmi shutdown during migration.")
        self.vm_restarts.append({"vmi": vmi_key(ns, vmi_name), "node": node, "at_s": now - self.clock.epoch})
        owner = next((o for o in vmi["metadata"].get("ownerReferences") or []
                      if o.get("kind") == "VirtualMachine"), None)
        self.store.delete(VMIS, ns, vmi_name, admit=False)
        if owner is not None:
            self._restarts.append((now + 5.0, ns, vmi_name))

    def _on_node(self, node: Obj, old: Obj | None) -> None:
        spec = node.get("spec") or {}
        taints = spec.get("taints") or []
        has = any(t.get("key") == UNSCHEDULABLE_TAINT for t in taints)
        name = node["metadata"]["name"]
        if bool(spec.get("unschedulable")) != has:
            def fix(o: Obj) -> None:
                s = o.setdefault("spec", {})
                ts = [t for t in s.get("taints") or [] if t.get("key") != UNSCHEDULABLE_TAINT]
                if s.get("unschedulable"):
                    ts.append({"key": UNSCHEDULABLE_TAINT, "effect": "NoSchedule",
                               "timeAdded": iso(self.clock.now())})
                if ts:
                    s["taints"] = ts
                else:
                    s.pop("taints", None)
            self.store.mutate(NODES, None, name, fix)
        drain_key = self.config().get("nodeDrainTaintKey", "kubevirt.io/drain")
        if any(t.get("key") == drain_key and t.get("effect") == "NoSchedule" for t in taints):
            for vmi in self.store.on_node(VMIS, name):
                key = vmi_key(vmi["metadata"]["namespace"], vmi["metadata"]["name"])
                self._evac.setdefault(key, 0.0)

    # ======================================================================================== tracking
    def _track(self, obj: Obj, now: float) -> None:
        meta = obj["metadata"]
        spec = obj.get("spec") or {}
        mig = Migration(
            namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], vmi=spec["vmiName"],
            created=now, priority=PRIORITIES.get(spec.get("priority") or "", 0),
            evacuation=EVACUATION_ANNOTATION in (meta.get("annotations") or {}),
        )
        vkey = vmi_key(mig.namespace, mig.vmi)
        info = self.vm_info(vkey, self.store.get(VMIS, mig.namespace, mig.vmi))
        mig.setup_s = info.setup_s
        mig.record = {
            "name": mig.name, "namespace": mig.namespace, "vmi": vkey, "uid": mig.uid,
            "origin": "evacuation" if mig.evacuation else "api",
            "labels": dict(meta.get("labels") or {}),
            "source": None, "target": None, "created_s": self._rel(now), "admitted_s": None,
            "started_s": None, "finished_s": None, "phase": "Pending", "failure_reason": None, "bytes_sent": 0,
            "downtime_s": None, "mode": None, "migration_policy": None, "abort_cause": None,
        }
        self.records.append(mig.record)
        self._by_name[mig.key] = mig
        open_set = self._vmi_open[vkey]
        open_set.add(mig.key)
        if len(open_set) > 1:
            self.concurrent_vmis.add(vkey)
        self.max_in_flight_per_vmi = max(self.max_in_flight_per_vmi, len(open_set))
        annotations = meta.get("annotations") or {}
        if EVACUATION_ANNOTATION in annotations or WORKLOAD_UPDATE_ANNOTATION in annotations:
            self._evac_migrations[vkey].append(mig)
        if meta.get("deletionTimestamp"):
            self._finish(mig, now, "Failed", "Migration failed due to being canceled")
            return
        self.pending[mig.key] = mig
        self._set_phase(mig, "Pending", now)
        self._queue.add(mig.key, priority=mig.priority, ready_at=now)

    def _forget(self, mig: Migration) -> None:
        self.pending.pop(mig.key, None)
        self._queue.discard(mig.key)
        self._parked.pop(mig.key, None)
        self._unparked.pop(mig.key, None)
        if self.active.pop(mig.key, None) is not None:
            self._release_capacity(self.clock.now())
        self._by_name.pop(mig.key, None)
        self._vmi_open.get(vmi_key(mig.namespace, mig.vmi), set()).discard(mig.key)

    def _rel(self, t: float) -> float:
        return round(t - self.clock.epoch, 3)

    def _set_phase(self, mig: Migration, phase: str, at: float, extra: Callable[[Obj], None] | None = None) -> None:
        mig.phase = phase
        mig.record["phase"] = phase

        def apply(o: Obj) -> None:
            st = o.setdefault("status", {})
            st["phase"] = phase
            st.setdefault("phaseTransitionTimestamps", []).append(
                {"phase": phase, "phaseTransitionTimestamp": iso(at)})
            if extra is not None:
                extra(o)

        self.store.mutate(VMIMS, mig.namespace, mig.name, apply)

    def _event(self, involved: Obj | None, reason: str, message: str, *, warning: bool = False) -> None:
        if involved is None:
            return
        self._pod_seq += 1
        ev = objects.event(involved=involved, reason=reason, message=message,
                           etype="Warning" if warning else "Normal", component="virt-controller",
                           now=self.clock.now(), name_suffix=f"{self._pod_seq:x}")
        with contextlib.suppress(ApiError):  # a name clash only loses an event, never state
            self.store.create(EVENTS, ev, admit=False)

    # ======================================================================================== stepping
    def advance(self, t0: float, t1: float) -> None:
        """Run every controller from cluster time t0 to t1, event by event."""
        now = t0
        for _ in range(10_000):
            self._drain_inbox(now)
            self._instant(now)
            self._drain_inbox(now)
            running = [m for m in self.active.values() if m.transfer is not None and m.complete_at is None
                       and m.transfer.phase in ("precopy", "postcopy", "paused")]
            shares = self._bandwidth(running)
            horizon = min(t1, self._next_deadline(now))
            if running:  # probes sample transfers: stop at their instants only while one runs
                horizon = min([horizon, *(p.next_at for p in self.probes)])
            for mig, bw in zip(running, shares, strict=True):
                assert mig.transfer is not None
                horizon = min(horizon, now + max(mig.transfer.next_event_in(bw), 1e-6))
            dt = max(0.0, horizon - now)
            for mig, bw in zip(running, shares, strict=True):
                assert mig.transfer is not None
                mig.transfer.advance(bw, dt)
                mig.record["bytes_sent"] = mig.transfer.bytes_sent
                mig.rate = bw if math.isfinite(bw) else 0.0
            now = horizon
            for probe in self.probes:
                if probe.next_at <= now:
                    probe.observe(now)
            for mig in running:
                self._after_transfer_step(mig, now)
            if now >= t1:
                self._drain_inbox(now)
                self._instant(now)
                return

    def _next_deadline(self, now: float) -> float:
        best = math.inf
        for mig in self.active.values():
            for t in (mig.next_at, mig.abort_at, mig.complete_at):
                if t is not None and now < t < best:
                    best = t
        if self._kubelet and self._kubelet[0][0] > now:
            best = min(best, self._kubelet[0][0])
        for t, _, _ in self._restarts:
            if t > now:
                best = min(best, t)
        queued = self._queue.next_ready()
        if now < queued < best:
            best = queued
        return best

    def _bandwidth(self, running: list[Migration]) -> list[float]:
        if not running:
            return []
        cfg = self.config()
        share = 1.0 if cfg.get("network") else self.network.pod_network_share
        cap_cfg = to_bytes(cfg.get("bandwidthPerMigration") or 0)
        flows = []
        nodes: set[str] = set()
        for mig in running:
            assert mig.source is not None and mig.target is not None
            info = self.vm_info(vmi_key(mig.namespace, mig.vmi))
            cap = math.inf
            own = cap_cfg if mig.options is None else to_bytes(mig.options.get("bandwidthPerMigration") or 0)
            if own > 0:
                cap = float(own)
            if not info.multifd:
                cap = min(cap, self.network.single_stream_bytes_per_s)
            flows.append(Flow(source=mig.source, target=mig.target, cap=cap))
            nodes.update((mig.source, mig.target))
        caps = {n: self.network.nic_bytes_per_s.get(n, 25e9 / 8) * self.network.efficiency * share for n in nodes}
        return fair_share(flows, egress=caps, ingress=caps)

    def _instant(self, now: float) -> None:
        """Everything that happens at one instant: kubelet, restarts, aborts, phase steps, admission,
        evacuation."""
        while self._kubelet and self._kubelet[0][0] <= now:
            _, ns, name, uid = heapq.heappop(self._kubelet)
            pod = self.store.get(PODS, ns, name)
            if pod is not None and pod["metadata"]["uid"] == uid:
                self.store.delete(PODS, ns, name, grace_seconds=0, admit=False)
        if self._restarts:
            due = [r for r in self._restarts if r[0] <= now]
            self._restarts = [r for r in self._restarts if r[0] > now]
            for _, ns, name in due:
                self._restart_vm(ns, name, now)
        for mig in list(self.active.values()):
            if mig.abort_at is not None and mig.abort_at <= now:
                self._complete_abort(mig, now)
            elif mig.complete_at is not None and mig.complete_at <= now:
                self._succeed(mig, now)
            elif mig.next_at <= now:
                self._step(mig, now)
        self._admit_pending(now)
        if self._evac:
            self._evacuate(now)

    # ---------------------------------------------------------------------------------------- admission
    # The migration controller's handling of Pending VMIMs, after pkg/virt-controller/watch/migration/
    # migration.go: sync() -> handleMigrationBackoff() -> handleTargetPodCreation(), driven by its priority
    # queue (`simulator.workqueue`), and reEnqueueHighestPriorityPendingMigrations() when a migration ends.
    def _admit_pending(self, now: float) -> None:
        """Process every Pending VMIM whose queue entry is ready (requeues at `now` are processed too)."""
        for _ in range(100):
            keys = self._queue.take_ready(now)
            if not keys:
                return
            for key in keys:
                mig = self.pending.get(key)
                if mig is not None:
                    self._sync_pending(mig, now)

    def _requeue(self, mig: Migration, at: float, *, priority: int | None = None) -> None:
        self._unparked.pop(mig.key, None)
        self._parked.pop(mig.key, None)
        self._queue.add(mig.key, priority=mig.priority if priority is None else priority, ready_at=at)

    # A VMIM held back by parallelMigrationsPerCluster or parallelOutboundMigrationsPerNode is looked at again
    # every 1/3/5 s by KubeVirt, and every such look changes nothing until a slot frees. So instead of waking
    # for each look, it is parked with the time of its last look; when a slot frees (a migration ends, the
    # configuration changes) it goes back into the queue at its next look (last + k x delay), and when the slots
    # are taken again before that look, it is parked again. Same looks at the same times, far fewer wake-ups.
    def _park(self, mig: Migration, now: float, source: str | None) -> None:
        self._unparked.pop(mig.key, None)
        self._parked[mig.key] = _Parked(now, requeue_delay(mig.priority), mig.priority, next(self._park_order),
                                        source or "")

    def _release_capacity(self, now: float) -> None:
        if not self._parked:
            return
        parked = sorted(self._parked.items(), key=lambda kv: (kv[1].next_look(now), -kv[1].priority, kv[1].order))
        self._parked.clear()
        for key, p in parked:
            self._queue.add(key, priority=p.priority, ready_at=p.next_look(now))
            self._unparked[key] = p

    def _repark_if_full(self, now: float, source: str) -> None:
        """A slot was just taken: what came back into the queue for it and can no longer get one waits parked."""
        if not self._unparked:
            return
        cfg = self.config()
        cluster_full = len(self.active) >= int(cfg["parallelMigrationsPerCluster"])
        node_full = sum(1 for m in self.active.values() if m.source == source) >= \
            int(cfg["parallelOutboundMigrationsPerNode"])
        if not cluster_full and not node_full:
            return
        for key, p in list(self._unparked.items()):
            if not cluster_full and p.source != source:
                continue
            del self._unparked[key]
            ready_at = self._queue.ready_at(key)
            if ready_at is None:
                continue
            self._queue.discard(key)
            self._parked[key] = _Parked(ready_at - p.delay, p.delay, p.priority, p.order, p.source)

    def _sync_pending(self, mig: Migration, now: float) -> None:
        vmi = self.store.get(VMIS, mig.namespace, mig.vmi)
        if vmi is None:
            self._finish(mig, now, "Failed", "Migration failed because vmi does not exist.")
            return
        backoff_until = self._backoff_until(mig)
        if backoff_until > now:
            if not mig.backoff_reported:
                mig.backoff_reported = True
                self._event(vmi, "MigrationBackoff", f"backoff migrating vmi {mig.namespace}/{mig.vmi}",
                            warning=True)
            self._requeue(mig, backoff_until, priority=QUEUE_PRIORITY_RUNNING)
            return
        status = vmi.get("status") or {}
        # handleTargetPodCreation: one target pod at a time (the informer must have seen the last one), and
        # never while the VMI has more than one active pod; both requeue after 1 s.
        if self._pod_expectation_until > now or len(status.get("activePods") or {}) > 1:
            self._requeue(mig, now + 1.0)
            return
        cfg = self.config()
        source = status.get("nodeName")
        if not source or status.get("phase") != "Running":
            self._requeue(mig, now + requeue_delay(mig.priority))
            return
        if len(self.active) >= int(cfg["parallelMigrationsPerCluster"]) or \
                sum(1 for m in self.active.values() if m.source == source) >= \
                int(cfg["parallelOutboundMigrationsPerNode"]):
            self._park(mig, now, source)
            return
        self._unparked.pop(mig.key, None)
        self._parked.pop(mig.key, None)
        del self.pending[mig.key]
        self.active[mig.key] = mig
        mig.source = source
        mig.record["source"] = source
        mig.record["admitted_s"] = self._rel(now)
        pods = status.get("activePods") or {}
        mig.source_pod = self._pod_name_by_uid(mig.namespace, next(iter(pods), None), source)
        self._create_target_pod(mig, vmi, now)
        self._pod_expectation_until = now + POD_EXPECTATION_LAG_S
        self._set_phase(mig, "Scheduling", now, _source_state(mig.source_pod))
        mig.scheduling_since = now
        self._try_schedule(mig, now)
        self._measure()
        self._repark_if_full(now, source)

    def _reenqueue_pending(self, now: float) -> None:
        """reEnqueueHighestPriorityPendingMigrations: a slot is free, so the Pending VMIMs of highest priority
        (at most parallelMigrationsPerCluster of them) are looked at now. KubeVirt sorts them with sort.Slice,
        which is not stable: between equal priorities the order is arbitrary (here: seeded random)."""
        if not self.pending:
            return
        limit = int(self.config()["parallelMigrationsPerCluster"])
        rand = self._queue_rand.random
        for mig in heapq.nsmallest(limit, self.pending.values(), key=lambda m: (-m.priority, rand())):
            self._requeue(mig, now)

    def _measure(self) -> None:
        n = len(self.active)
        self.max_in_flight_cluster = max(self.max_in_flight_cluster, n)
        outbound: dict[str, int] = defaultdict(int)
        inbound: dict[str, int] = defaultdict(int)
        for mig in self.active.values():
            if mig.source:
                outbound[mig.source] += 1
            if mig.target:
                inbound[mig.target] += 1
        for node, count in outbound.items():
            self.max_in_flight_per_node[node] = max(self.max_in_flight_per_node.get(node, 0), count)
        for node, count in inbound.items():
            self.max_inbound_per_node[node] = max(self.max_inbound_per_node.get(node, 0), count)

    def _pod_name_by_uid(self, namespace: str, uid: str | None, node: str) -> str | None:
        if uid is None:
            return None
        for pod in self.store.on_node(PODS, node):
            if pod["metadata"]["uid"] == uid and pod["metadata"].get("namespace") == namespace:
                name: str = pod["metadata"]["name"]
                return name
        return None

    def _suffix(self) -> str:
        return "".join(self._rand.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))

    def _create_target_pod(self, mig: Migration, vmi: Obj, now: float) -> None:
        vmim = self.store.get(VMIMS, mig.namespace, mig.name) or {}
        selector = dict((vmim.get("spec") or {}).get("addedNodeSelector") or {})
        selector.update(vmi.get("spec", {}).get("nodeSelector") or {})
        selector.update(self._cpu_selector(vmi, mig.source))
        info = self.vm_info(vmi_key(mig.namespace, mig.vmi), vmi)
        cpus = int(vmi["spec"]["domain"].get("cpu", {}).get("cores", 1))
        memory = info.physics.memory_bytes + objects.launcher_overhead(info.physics.memory_bytes, cpus)
        pod = objects.launcher_pod(vmi, node_name=None, memory_request=memory, cpus=cpus,
                                   node_selector=selector, target_of=mig.name, pod_ip="", now=now,
                                   name_suffix=self._suffix())
        pod["metadata"]["labels"]["kubevirt.io/migrationJobUID"] = mig.uid
        created = self.store.create(PODS, pod, admit=False)
        mig.target_pod = created["metadata"]["name"]
        self._event(vmim, "SuccessfulCreate", f"Created migration target pod {mig.target_pod}")

    def _cpu_selector(self, vmi: Obj, source: str | None) -> dict[str, str]:
        model = (vmi["spec"]["domain"].get("cpu") or {}).get("model") or "host-model"
        node = self.store.get(NODES, None, source) if source else None
        labels = (node or {}).get("metadata", {}).get("labels") or {}
        out: dict[str, str] = {}
        if model in ("host-model", "host-passthrough"):
            out.update({k: v for k, v in labels.items() if k.startswith(objects.HOST_MODEL_LABEL)})
        else:
            out[f"{objects.CPU_MODEL_LABEL}{model}"] = "true"
        out.update({k: v for k, v in labels.items() if k.startswith(objects.CPU_VENDOR_LABEL)})
        return out

    # ---------------------------------------------------------------------------------------- scheduling
    def _try_schedule(self, mig: Migration, now: float) -> None:
        pod = self.store.get(PODS, mig.namespace, mig.target_pod or "")
        if pod is None:
            self._finish(mig, now, "Failed", "Migration target pod was removed during active migration.")
            return
        node, why = self._pick_node(pod, exclude={mig.source or ""})
        if node is None:
            first = mig.unschedulable_since is None
            if first:
                mig.unschedulable_since = now

                def unsched(o: Obj) -> None:
                    o.setdefault("status", {})["conditions"] = [{
                        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why,
                        "lastProbeTime": None, "lastTransitionTime": iso(now)}]

                self.store.mutate(PODS, mig.namespace, pod["metadata"]["name"], unsched)
                self._event(self.store.get(VMIMS, mig.namespace, mig.name), "migrationTargetPodUnschedulable",
                            f"Migration target pod for VMI [{mig.namespace}/{mig.vmi}] is currently "
                            "unschedulable.", warning=True)
            mig.next_at = now + 1.0  # the scheduler retries
            return
        mig.unschedulable_since = None
        mig.target = node
        mig.record["target"] = node

        def bind(o: Obj) -> None:
            o["spec"]["nodeName"] = node
            o["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                                          "lastTransitionTime": iso(now)}]

        self.store.mutate(PODS, mig.namespace, pod["metadata"]["name"], bind)
        mig.next_at = now + 0.5 * mig.setup_s
        self._measure()

    def _node_facts(self, node: Obj) -> tuple[str, Mapping[str, str], str | None, int]:
        """(name, labels, why it cannot take pods or None, allocatable memory), cached per resourceVersion."""
        name, rv = node["metadata"]["name"], node["metadata"].get("resourceVersion", "")
        cached = self._facts.get(name)
        if cached is not None and cached[0] == rv:
            return cached[1]
        spec = node.get("spec") or {}
        why: str | None = None
        if spec.get("unschedulable"):
            why = "node(s) were unschedulable"
        elif any(t.get("effect") in ("NoSchedule", "NoExecute") for t in spec.get("taints") or []):
            why = "node(s) had untolerated taint"
        else:
            ready = _condition(node, "Ready")
            if ready is None or ready.get("status") != "True":
                why = "node(s) were not ready"
        facts = (name, node["metadata"].get("labels") or {}, why,
                 to_bytes((node.get("status") or {}).get("allocatable", {}).get("memory")))
        self._facts[name] = (rv, facts)
        return facts

    def _pick_node(self, pod: Obj, *, exclude: set[str]) -> tuple[str | None, str]:
        """kube-scheduler's decision for a pod: filters, then the node with the most free memory."""
        selector = list((pod["spec"].get("nodeSelector") or {}).items())
        need = _pod_memory({**pod, "spec": {**pod["spec"], "nodeName": "x"}})
        reasons: dict[str, int] = defaultdict(int)
        best: tuple[int, str] | None = None
        count = 0
        for node in self.store.iter(NODES):
            count += 1
            name, labels, why, allocatable = self._node_facts(node)
            if name in exclude:
                reasons["1 node(s) didn't match pod anti-affinity rules"] += 1
            elif why is not None:
                reasons[why] += 1
            elif any(labels.get(k) != v for k, v in selector):
                reasons["node(s) didn't match Pod's node affinity/selector"] += 1
            else:
                free = allocatable - self._node_used.get(name, 0)
                if free < need:
                    reasons["Insufficient memory"] += 1
                elif best is None or free > best[0] or (free == best[0] and name < best[1]):
                    best = (free, name)
        if best is not None:
            return best[1], ""
        detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        return None, f"0/{count} nodes are available: {detail}. preemption: 0/{count} nodes are " \
                     "available: no preemption victims found for incoming pod."

    # ------------------------------------------------------------------------------------------ phases
    def _step(self, mig: Migration, now: float) -> None:
        if mig.phase == "Scheduling" and mig.target is None:
            timeout = self._annotation_timeout(mig, UNSCHEDULABLE_TIMEOUT_ANNOTATION, 300.0)
            pending_timeout = self._annotation_timeout(mig, PENDING_TIMEOUT_ANNOTATION, 900.0)
            if (mig.unschedulable_since is not None and now - mig.unschedulable_since >= timeout) or \
                    (mig.scheduling_since is not None and now - mig.scheduling_since >= pending_timeout):
                vmim = self.store.get(VMIMS, mig.namespace, mig.name)
                self._event(vmim, "SuccessfulDelete",
                            f"Deleted migration target pod {mig.target_pod}: unschedulable pod timeout period "
                            "exceeded")
                self._delete_pod(mig.namespace, mig.target_pod)
                self._finish(mig, now, "Failed", "Migration target pod was removed during active migration.")
                return
            self._try_schedule(mig, now)
            return
        if mig.phase == "Scheduling":
            self._pod_ready(mig, now)
            self._set_phase(mig, "Scheduled", now)
            mig.next_at = now + 0.1 * mig.setup_s
        elif mig.phase == "Scheduled":
            self._hand_off(mig, now)
            mig.next_at = now + 0.2 * mig.setup_s
        elif mig.phase == "PreparingTarget":
            def ready(o: Obj) -> None:
                o["status"]["migrationState"]["targetNodeAddress"] = self._node_ip(mig.target)
            self.store.mutate(VMIS, mig.namespace, mig.vmi, lambda o: ready(o) if o["status"].get(
                "migrationState") else None)
            self._set_phase(mig, "TargetReady", now)
            mig.next_at = now + 0.2 * mig.setup_s
        elif mig.phase == "TargetReady":
            mig.next_at = math.inf
            if mig.target in self.faults.fail_migrations_to:
                self._finish(mig, now, "Failed", INJECTED_FAILURE)
                return
            self._start_transfer(mig, now)

    def _annotation_timeout(self, mig: Migration, annotation: str, default: float) -> float:
        vmim = self.store.get(VMIMS, mig.namespace, mig.name) or {"metadata": {}}
        raw = (vmim["metadata"].get("annotations") or {}).get(annotation)
        try:
            return float(raw) if raw is not None else default
        except ValueError:
            return default

    def _node_ip(self, node: str | None) -> str:
        obj = self.store.get(NODES, None, node or "")
        for addr in ((obj or {}).get("status") or {}).get("addresses") or []:
            if addr.get("type") == "InternalIP":
                return str(addr["address"])
        return ""

    def _pod_ready(self, mig: Migration, now: float) -> None:
        ip = self._ips.next()
        self.store.mutate(PODS, mig.namespace, mig.target_pod or "",
                          lambda o: objects.set_pod_running(o, pod_ip=ip, now=now))

    def _hand_off(self, mig: Migration, now: float) -> None:
        cfg = self.config()
        target_pod = self.store.get(PODS, mig.namespace, mig.target_pod or "")
        if target_pod is None:
            self._finish(mig, now, "Failed", "Migration target pod was removed during active migration.")
            return
        vmi = self.store.get(VMIS, mig.namespace, mig.vmi)
        policy: str | None = None
        mig.options = vmim_options(cfg)
        if vmi is not None:
            mig.options, policy = resolve_migration_config(self.store, vmi, cfg, target_node=mig.target)
        mig.record["migration_policy"] = policy
        state = {
            "migrationUid": mig.uid,
            "sourceNode": mig.source,
            "sourcePod": mig.source_pod,
            "targetNode": mig.target,
            "targetPod": mig.target_pod,
            "targetNodeDomainDetected": False,
            "migrationConfiguration": dict(mig.options),
            "migrationNetworkType": "Migration" if cfg.get("network") else "Pod",
        }
        if policy is not None:
            state["migrationPolicyName"] = policy
        uid = target_pod["metadata"]["uid"]

        def apply(o: Obj) -> None:
            st = o.setdefault("status", {})
            st["migrationState"] = dict(state)
            st.setdefault("activePods", {})[uid] = mig.target
            o["metadata"].setdefault("labels", {})["kubevirt.io/migrationTargetNodeName"] = mig.target

        self.store.mutate(VMIS, mig.namespace, mig.vmi, apply)
        self._set_phase(mig, "PreparingTarget", now)
        self._event(self.store.get(VMIMS, mig.namespace, mig.name), "SuccessfulHandOver",
                    "Migration target pod is ready for preparation by virt-handler.")

    def _monitor_config(self, mig: Migration) -> MonitorConfig:
        cfg = mig.options if mig.options is not None else self.config()
        workload = cfg.get("allowWorkloadDisruption")
        return MonitorConfig(
            downtime_s=QEMU_DEFAULT_DOWNTIME_S,  # virt-launcher never applies maxDowntimeMs on this path
            completion_timeout_per_gib=int(cfg["completionTimeoutPerGiB"]),
            progress_timeout_s=int(cfg["progressTimeout"]),
            allow_auto_converge=bool(cfg.get("allowAutoConverge")),
            allow_post_copy=bool(cfg.get("allowPostCopy")),
            allow_workload_disruption=None if workload is None else bool(workload),
            # virt-launcher compares each sample with the previous one, not with the lowest seen
            # (live-migration-source.go: progressWatermark = remainingData on every sample).
            progress_watermark="previous",
        )

    def _start_transfer(self, mig: Migration, now: float) -> None:
        info = self.vm_info(vmi_key(mig.namespace, mig.vmi))
        mig.transfer = Transfer(info.physics, self._monitor_config(mig), started_at=now)
        mig.record["started_s"] = self._rel(now)
        mig.record["mode"] = "PreCopy"

        def start(o: Obj) -> None:
            ms = (o.get("status") or {}).get("migrationState")
            if ms is not None:
                ms["startTimestamp"] = iso(now)
                ms["mode"] = "PreCopy"
                ms["targetNodeDomainDetected"] = True

        self.store.mutate(VMIS, mig.namespace, mig.vmi, start)
        self._set_phase(mig, "Running", now)
        self._event(self.store.get(VMIS, mig.namespace, mig.vmi), "Migrating",
                    "VirtualMachineInstance is migrating.")

    def _after_transfer_step(self, mig: Migration, now: float) -> None:
        tr = mig.transfer
        assert tr is not None
        if tr.mode != mig.record.get("mode"):
            mig.record["mode"] = tr.mode
            mode = tr.mode
            self.store.mutate(VMIS, mig.namespace, mig.vmi,
                              lambda o: o["status"]["migrationState"].__setitem__("mode", mode)
                              if o["status"].get("migrationState") else None)
        if tr.phase == "completed" and mig.complete_at is None:
            mig.complete_at = now + self.network.cleanup_s
            mig.record["downtime_s"] = tr.downtime_s
        elif tr.phase == "aborted" and mig.abort_at is None:
            # The launcher's own timeouts cancel through asyncMigrationAbort like a user's abort, and since
            # v1.9 setMigrationResult reports every successful abort as "Live migration has been aborted"
            # (live-migration-source.go); the cause stays in the launcher's log (here: the ground truth).
            mig.record["abort_cause"] = tr.abort_reason
            self._finish(mig, now, "Failed", ABORTED, abort_status="Succeeded")

    # ------------------------------------------------------------------------------------------- abort
    def _request_abort(self, mig: Migration, now: float) -> None:
        if mig.abort_requested or mig.phase in FINAL:
            return
        mig.abort_requested = True

        def cond(o: Obj) -> None:
            st = o.setdefault("status", {})
            conds = [c for c in st.get("conditions") or [] if c.get("type") != "migrationAbortRequested"]
            conds.append({"type": "migrationAbortRequested", "status": "True", "lastProbeTime": None,
                          "lastTransitionTime": iso(now)})
            st["conditions"] = conds

        self.store.mutate(VMIMS, mig.namespace, mig.name, cond)
        if mig.phase not in HANDED_OFF:
            self._delete_pod(mig.namespace, mig.target_pod)
            self._event(self.store.get(VMIMS, mig.namespace, mig.name), "FailedMigration",
                        "Migration failed due to being canceled", warning=True)
            self._finish(mig, now, "Failed", "Migration failed due to being canceled")
            return

        def aborting(o: Obj) -> None:
            ms = (o.get("status") or {}).get("migrationState")
            if ms is not None:
                ms["abortRequested"] = True
                ms["abortStatus"] = "Aborting"

        self.store.mutate(VMIS, mig.namespace, mig.vmi, aborting)
        self._event(self.store.get(VMIMS, mig.namespace, mig.name), "SuccessfulAbortMigration",
                    "Migration is ready to be canceled by virt-handler.")
        mig.abort_at = now + 1.0  # virt-handler -> virt-launcher AbortJob

    def _complete_abort(self, mig: Migration, now: float) -> None:
        mig.abort_at = None
        tr = mig.transfer
        if mig.complete_at is not None or (tr is not None and tr.phase in ("postcopy", "completed")):
            # Too late: post-copy cannot be aborted and a finished transfer stands.
            self.store.mutate(VMIS, mig.namespace, mig.vmi,
                              lambda o: o["status"]["migrationState"].__setitem__("abortStatus", "Failed")
                              if o["status"].get("migrationState") else None)
            return
        if tr is not None:
            tr.abort(now, ABORTED)
        self._finish(mig, now, "Failed", ABORTED, abort_status="Succeeded")

    # ------------------------------------------------------------------------------------------ ending
    def _succeed(self, mig: Migration, now: float) -> None:
        mig.complete_at = None
        target_pod = self.store.get(PODS, mig.namespace, mig.target_pod or "")
        if target_pod is None:
            self._finish(mig, now, "Failed", "Migration target pod was removed during active migration.")
            return
        self._finish(mig, now, "Succeeded", None)

    def _finish(self, mig: Migration, now: float, phase: str, reason: str | None, *,
                abort_status: str | None = None) -> None:
        if mig.phase in FINAL:
            return
        handed_off = mig.phase in HANDED_OFF
        self.pending.pop(mig.key, None)
        self._queue.discard(mig.key)
        self._parked.pop(mig.key, None)
        self._unparked.pop(mig.key, None)
        freed = self.active.pop(mig.key, None) is not None
        if phase == "Failed":
            mig.failed_at = now
        self._vmi_open.get(vmi_key(mig.namespace, mig.vmi), set()).discard(mig.key)
        mig.record.update(finished_s=self._rel(now), failure_reason=reason)
        if mig.transfer is not None:
            mig.record["bytes_sent"] = mig.transfer.bytes_sent
        vmi = self.store.get(VMIS, mig.namespace, mig.vmi)
        final_state: Obj | None = None
        if vmi is not None and handed_off and \
                ((vmi.get("status") or {}).get("migrationState") or {}).get("migrationUid") == mig.uid:
            final_state = self._finish_vmi(mig, now, phase, reason, abort_status)
        if phase == "Succeeded":
            self.store.mutate(PODS, mig.namespace, mig.source_pod or "",
                              lambda o: objects.set_pod_finished(o, phase="Succeeded", now=now))
        else:
            self._delete_pod(mig.namespace, mig.target_pod)

        def final(o: Obj) -> None:
            st = o["status"]
            st["migrationState"] = final_state if final_state is not None else \
                {"sourcePod": mig.source_pod, "completed": True, "failed": phase == "Failed",
                 "failureReason": reason} if phase == "Failed" else {"sourcePod": mig.source_pod}
            fins = [f for f in o["metadata"].get("finalizers") or [] if f != MIGRATION_FINALIZER]
            if fins:
                o["metadata"]["finalizers"] = fins
            else:
                o["metadata"].pop("finalizers", None)

        self._set_phase(mig, phase, now, final)
        vmim = self.store.get(VMIMS, mig.namespace, mig.name)
        if phase == "Succeeded":
            self._event(vmim, "SuccessfulMigration", "Source node reported migration succeeded")
        else:
            self._event(vmim, "FailedMigration", reason or "source node reported migration failed", warning=True)
            if vmi is not None and handed_off:
                self._event(vmi, "Migrated", f"VirtualMachineInstance migration uid {mig.uid} failed. "
                                             f"reason:{reason}", warning=True)
        vkey = vmi_key(mig.namespace, mig.vmi)
        self._finished[vkey].append(mig.name)
        if phase == "Failed" and vmi is not None and (vmi.get("status") or {}).get("evacuationNodeName"):
            # The evacuation controller creates the next VMIM at once; the migration controller holds it
            # Pending through the backoff (handleMigrationBackoff), so the VMI always has one in flight.
            self._evac[vkey] = now
        if vmim is None:
            self._by_name.pop(mig.key, None)
        self._garbage_collect(mig.namespace, mig.vmi)
        if freed:
            self._release_capacity(now)
        self._reenqueue_pending(now)

    def _finish_vmi(self, mig: Migration, now: float, phase: str, reason: str | None,
                    abort_status: str | None) -> Obj:
        result: Obj = {}
        target_pod = self.store.get(PODS, mig.namespace, mig.target_pod or "")
        target_uid = (target_pod or {}).get("metadata", {}).get("uid")
        target_ip = ((target_pod or {}).get("status") or {}).get("podIP")

        def apply(o: Obj) -> None:
            st = o.setdefault("status", {})
            ms = st.setdefault("migrationState", {})
            ms["completed"] = True
            ms["endTimestamp"] = iso(now)
            if mig.transfer is not None and ms.get("startTimestamp") is None:
                ms["startTimestamp"] = iso(mig.transfer.started_at)
            if phase == "Failed":
                ms["failed"] = True
                ms["failureReason"] = reason
                if abort_status:
                    ms["abortStatus"] = abort_status
                st["activePods"] = {k: v for k, v in (st.get("activePods") or {}).items() if k != target_uid}
            else:
                ms.pop("failed", None)
                st["nodeName"] = mig.target
                o["metadata"].setdefault("labels", {})[objects.VMI_NODE_LABEL] = mig.target
                st["activePods"] = {target_uid: mig.target} if target_uid else {}
                if target_ip:
                    st["interfaces"] = [{"name": "default", "ipAddress": target_ip, "ipAddresses": [target_ip]}]
                st.pop("evacuationNodeName", None)
                st["conditions"] = [c for c in st.get("conditions") or [] if c.get("type") != "EvictionRequested"]
            o["metadata"].get("labels", {}).pop("kubevirt.io/migrationTargetNodeName", None)
            result.update(clone_state(ms))

        self.store.mutate(VMIS, mig.namespace, mig.vmi, apply)
        return result

    def _delete_pod(self, namespace: str, name: str | None) -> None:
        if name and self.store.get(PODS, namespace, name) is not None:
            self.store.delete(PODS, namespace, name, grace_seconds=0, admit=False)

    def _garbage_collect(self, namespace: str, vmi_name: str) -> None:
        names = self._finished.get(vmi_key(namespace, vmi_name)) or []
        names[:] = [n for n in names if self.store.get(VMIMS, namespace, n) is not None]
        while len(names) > GC_BUFFER:
            old = self.store.get(VMIMS, namespace, names.pop(0))
            if old is None:
                continue
            meta = old["metadata"]
            ms = (old.get("status") or {}).get("migrationState") or {}
            defunct = ms.get("sourcePod") if old["status"]["phase"] == "Succeeded" else ms.get("targetPod")
            pod = self.store.get(PODS, namespace, defunct) if defunct else None
            if pod is not None and (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                self.store.delete(PODS, namespace, pod["metadata"]["name"], grace_seconds=0, admit=False)
            self.store.delete(VMIMS, namespace, meta["name"], admit=False)
            self._by_name.pop(vmi_key(namespace, meta["name"]), None)

    # ------------------------------------------------------------------------------------- evacuation
    def _evacuate(self, now: float) -> None:
        due = sorted(k for k, t in self._evac.items() if t <= now)
        if not due:
            return
        drain_key = self.config().get("nodeDrainTaintKey", "kubevirt.io/drain")
        cluster_strategy = self.cluster_eviction_strategy()
        for key in due:
            ns, _, name = key.partition("/")
            vmi = self.store.get(VMIS, ns, name)
            if vmi is None or (vmi.get("status") or {}).get("phase") in FINAL or self._vmi_open.get(key):
                self._evac.pop(key, None)  # gone, or migrating: its end puts it back if still needed
                continue
            status = vmi.get("status") or {}
            node = status.get("nodeName")
            node_obj = self.store.get(NODES, None, node or "")
            tainted = any(t.get("key") == drain_key and t.get("effect") == "NoSchedule"
                          for t in ((node_obj or {}).get("spec") or {}).get("taints") or [])
            if status.get("evacuationNodeName") != node and not tainted:
                self._evac.pop(key, None)
                continue
            strategy = vmi.get("spec", {}).get("evictionStrategy") or cluster_strategy or "None"
            # filterRunningNonMigratingVMIs (evacuation.go): only LiveMigratable=True VMIs migrate; a VMI
            # without the condition is not migratable.
            if strategy not in MIGRATABLE_ON_EVICTION or not is_migratable(vmi):
                self._evac[key] = now + 5.0  # the evacuation controller re-checks such VMIs on resync
                continue
            if len(status.get("activePods") or {}) > 1:
                self._evac[key] = now + 1.0
                continue
            # GenerateNewMigration: system-critical, system-maintenance when the descheduler evicted it.
            descheduled = (vmi["metadata"].get("annotations") or {}).get(EVICTION_SOURCE_ANNOTATION) == "descheduler"
            body = {
                "metadata": {"namespace": ns, "generateName": "kubevirt-evacuation-",
                             "annotations": {EVACUATION_ANNOTATION: node},
                             "labels": {VMI_NAME_LABEL: name},
                             "finalizers": [MIGRATION_FINALIZER]},
                "spec": {"vmiName": name,
                         "priority": "system-maintenance" if descheduled else "system-critical"},
            }
            self._evac.pop(key, None)
            created = self.store.create(VMIMS, body, admit=False)
            self._event(vmi, "SuccessfulCreate", f"Created Migration {created['metadata']['name']}")

    def _backoff_until(self, mig: Migration) -> float:
        """handleMigrationBackoff (migration.go): the newest evacuation / workload-update VMIM of a VMI waits
        20 s x 2^(k-1) after the previous one failed, k the failed ones (of those still stored, not being
        deleted) since the last success. User VMIMs never wait. -inf when there is no backoff."""
        vkey = vmi_key(mig.namespace, mig.vmi)
        eligible = self._evac_migrations.get(vkey)
        if not eligible or eligible[-1] is not mig:
            return -math.inf
        kept = [m for m in eligible if self.store.get(VMIMS, m.namespace, m.name) is not None]
        eligible[:] = kept
        if len(kept) < 2:
            return -math.inf
        backoff = 0.0
        for m in reversed(kept[:-1]):
            if m.phase == "Succeeded":
                break
            vmim = self.store.get(VMIMS, m.namespace, m.name) or {"metadata": {}}
            if vmim["metadata"].get("deletionTimestamp"):
                continue
            if m.phase == "Failed":
                backoff = EVACUATION_BACKOFF_S if backoff == 0 else backoff * 2
        previous_failed = kept[-2].failed_at
        if backoff == 0 or previous_failed is None:
            return -math.inf
        return previous_failed + backoff

    # ---------------------------------------------------------------------------------------- restarts
    def _restart_vm(self, namespace: str, name: str, now: float) -> None:
        vm_obj = self.store.get(VMS, namespace, name)
        if vm_obj is None or self.store.get(VMIS, namespace, name) is not None:
            return
        template = vm_obj["spec"]["template"]["spec"]
        info = self.vm_info(vmi_key(namespace, name))
        cpus = int(template["domain"].get("cpu", {}).get("cores", 1))
        new_vmi = {"metadata": {"namespace": namespace, "name": name,
                                "labels": dict(vm_obj["spec"]["template"].get("metadata", {}).get("labels") or {}),
                                "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                     "name": name, "uid": vm_obj["metadata"]["uid"],
                                                     "controller": True, "blockOwnerDeletion": True}]},
                   "spec": template,
                   "status": {"phase": "Scheduling", "conditions": []}}
        created = self.store.create(VMIS, new_vmi, admit=False)
        memory = info.physics.memory_bytes + objects.launcher_overhead(info.physics.memory_bytes, cpus)
        pod = objects.launcher_pod(created, node_name=None, memory_request=memory, cpus=cpus,
                                   node_selector=dict(template.get("nodeSelector") or {}), target_of=None,
                                   pod_ip="", now=now, name_suffix=self._suffix())
        node, _ = self._pick_node(pod, exclude=set())
        if node is None:
            self.store.create(PODS, pod, admit=False)
            return
        ip = self._ips.next()
        pod["spec"]["nodeName"] = node
        objects.set_pod_running(pod, pod_ip=ip, now=now)
        pod_obj = self.store.create(PODS, pod, admit=False)

        def running(o: Obj) -> None:
            st = o["status"]
            st.update({"phase": "Running", "nodeName": node, "activePods": {pod_obj["metadata"]["uid"]: node},
                       "interfaces": [{"name": "default", "ipAddress": ip, "ipAddresses": [ip]}]})
            o["metadata"].setdefault("labels", {})[objects.VMI_NODE_LABEL] = node
            # virt-handler computes LiveMigratable for the new VMI as for the old one: same VM, same reasons.
            migratable, storage = objects.migratable_conditions(
                name, not_migratable_reason=info.not_migratable_reason,
                not_migratable_message=info.not_migratable_message, rwx=info.rwx, now=now)
            st["conditions"] = [{"type": "Ready", "status": "True", "lastProbeTime": None,
                                 "lastTransitionTime": iso(now)}, migratable, storage]

        self.store.mutate(VMIS, namespace, name, running)

    # =========================================================================================== stats
    def stats(self) -> dict[str, Any]:
        return {
            "migrations": [dict(r) for r in self.records],
            "in_flight": len(self.active),
            "pending": len(self.pending),
            "max_in_flight_cluster": self.max_in_flight_cluster,
            "max_in_flight_per_node": dict(sorted(self.max_in_flight_per_node.items())),
            "max_inbound_per_node": dict(sorted(self.max_inbound_per_node.items())),
            "max_in_flight_per_vmi": self.max_in_flight_per_vmi,
            "vmis_with_concurrent_migrations": sorted(self.concurrent_vmis),
            "vm_restarts": list(self.vm_restarts),
            "evictions": dict(self.evictions),
        }


@dataclass(frozen=True)
class _Parked:
    last_look: float
    delay: float
    priority: int
    order: int
    source: str

    def next_look(self, now: float) -> float:
        """The first of KubeVirt's periodic looks (last_look + k x delay) at or after `now`."""
        k = max(1, math.ceil((now - self.last_look) / self.delay - 1e-9))
        return self.last_look + k * self.delay


def requeue_delay(priority: int) -> float:
    """getRequeueDelayForPriority (migration.go): how soon a Pending VMIM held back by a limit is looked at
    again: 1 s for system-critical (evacuation), 3 s for user-triggered, 5 s for the rest (a user's VMIM)."""
    if priority >= PRIORITIES["system-critical"]:
        return 1.0
    if priority >= PRIORITIES["user-triggered"]:
        return 3.0
    return 5.0


def _source_state(source_pod: str | None) -> Callable[[Obj], None]:
    def apply(o: Obj) -> None:
        o["status"]["migrationState"] = {"sourcePod": source_pod}
    return apply


def clone_state(state: Obj) -> Obj:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}


def _int_or_percent(value: Any, total: int) -> int:
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(total * int(value[:-1]) / 100)
    return int(value)

