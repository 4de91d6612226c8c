"""The drain planner: ``plan_drain(snapshot, request, settings, *, now) -> DrainPlan``.

Promises:
- Pure and deterministic: the same inputs give the same plan. No I/O, no awaits, no clock reads (``now`` is
  passed in), no randomness. Nothing is written anywhere; an infeasible request raises :class:`PlanError`
  whose message names the nodes, VMs and numbers at fault.
- Every VM on a draining node gets a verdict with a human reason from a list of small filters (the style of
  kubectl's drain filters): MIGRATE, SKIP (left by policy) or BLOCK (cannot move).
- Capacity is checked twice: the OpenShift rule (spare memory on the nodes that stay >= nodes drained in
  parallel x the largest total VM memory on one draining node) and a first-fit-decreasing placement of every
  VM to migrate onto the nodes that stay, honouring memory, nodeSelector, CPU model and vendor, taints,
  readiness and cordons. The placement proposes a target per VM; workers re-check at run time.
- Limits are the stricter of our settings and KubeVirt's configuration, and both are reported.
- The duration is an estimate from a simple model (see :func:`_estimate`), not a promise.
- Hard VMs: given the guests' last known dirty rates (``dirty_rates``, read from Prometheus by the caller), a
  VM whose rate is at or above the bandwidth a migration of it gets is expected to be hard; the plan names the
  rung of the escalation ladder expected to move it and its estimate includes the judged attempts before it
  (:func:`expect_hard`).

Scale: linear in VMs and nodes plus O(V log N) for placement, so 1,000 nodes / 30,000 VMs plan in seconds.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator.escalation import ESCALATION_ANNOTATION, LADDER, Rung, allowed_rungs, drain_rungs
from orchestrator.model import (
    CPU_MODEL_LABEL_PREFIX,
    CPU_VENDOR_LABEL_PREFIX,
    HOST_MODEL,
    HOST_MODEL_CPU_LABEL_PREFIX,
    HOST_PASSTHROUGH,
    CapacityVerdict,
    ClusterSnapshot,
    DrainId,
    DrainPlan,
    DrainRequest,
    EffectiveLimits,
    Estimate,
    EvictionStrategy,
    LimitValue,
    MigrationJob,
    Node,
    NodeName,
    NodeOrder,
    NodePlan,
    NonMigratablePolicy,
    Pod,
    PodEviction,
    Toleration,
    VmDecision,
    Vmi,
    VmiKey,
    VmVerdict,
    format_bytes,
)
from orchestrator.rules import PodAction, is_room, pod_verdict, spare_memory, vm_memory_on_target
from orchestrator.settings import Settings
from orchestrator.snapshot import parse_quantity
from orchestrator.tuning import TransferSample, TuneVm, Tuning, observed_bandwidth, tune

BANDWIDTH_ANNOTATION = "drainctl.io/migration-bandwidth"
"""On a node (annotation or label): its migration bandwidth in bytes per second, as a quantity ("2800M")."""

_LIST_LIMIT = 5


class PlanError(ValueError):
    """The request cannot be planned as asked. Not retryable: the request or the cluster must change."""

    retryable = False

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("; ".join(self.problems))


def _some(items: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    """ "a, b, c and 4 more": bounded lists for messages that may name thousands of objects."""
    shown = ", ".join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


# --- filters -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterResult:
    """A filter's verdict. MIGRATE means "no objection" and its reason is kept as a note."""

    verdict: VmVerdict
    reason: str


@dataclass(frozen=True)
class FilterContext:
    snapshot: ClusterSnapshot
    policy: NonMigratablePolicy
    drain_id: DrainId | None
    now: float


VmFilter = Callable[[Vmi, FilterContext], FilterResult | None]


def _left_by_policy(policy: NonMigratablePolicy) -> VmVerdict:
    return VmVerdict.SKIP if policy is NonMigratablePolicy.SKIP else VmVerdict.BLOCK


def _strategy_text(vmi: Vmi) -> str:
    source = {"vmi": "", "cluster": " (cluster setting)", "default": " (KubeVirt default)"}
    return f"evictionStrategy {vmi.eviction_strategy.value}{source.get(vmi.eviction_strategy_source, '')}"


def _condition_text(vmi: Vmi) -> str:
    parts = [f"LiveMigratable={vmi.live_migratable}"]
    if vmi.live_migratable_reason:
        parts.append(vmi.live_migratable_reason)
    if vmi.live_migratable_message:
        parts.append(vmi.live_migratable_message)
    return ": ".join(parts)


def filter_phase(vmi: Vmi, ctx: FilterContext) -> FilterResult | None:
    """A VMI whose node stopped reporting cannot be migrated; one still starting is migrated once Running."""
    if vmi.phase == "Unknown":
        return FilterResult(VmVerdict.BLOCK, f"VMI phase Unknown: node {vmi.node} is not reporting its state")
    if vmi.phase != "Running":
        return FilterResult(VmVerdict.MIGRATE, f"VMI is {vmi.phase or 'not yet Running'}; migrated once Running")
    return None


def filter_eviction_strategy(vmi: Vmi, ctx: FilterContext) -> FilterResult | None:
    """External belongs to another controller; None (or IfPossible without migratability) means stop, not move."""
    strategy = vmi.eviction_strategy
    if strategy is EvictionStrategy.EXTERNAL:
        return FilterResult(
            VmVerdict.BLOCK,
            f"{_strategy_text(vmi)}: an external controller owns this VM's evacuation; drainctl does not migrate it",
        )
    if strategy is EvictionStrategy.NONE:
        return FilterResult(
            _left_by_policy(ctx.policy), f"{_strategy_text(vmi)}: the VM would be stopped, not migrated"
        )
    if strategy is EvictionStrategy.LIVE_MIGRATE_IF_POSSIBLE and vmi.live_migratable == "False":
        return FilterResult(
            _left_by_policy(ctx.policy),
            f"{_strategy_text(vmi)} and {_condition_text(vmi)}: the VM would be stopped, not migrated",
        )
    return None


def filter_live_migratable(vmi: Vmi, ctx: FilterContext) -> FilterResult | None:
    """KubeVirt rejects a VMIM for a VMI whose LiveMigratable condition is False."""
    if vmi.live_migratable == "False":
        return FilterResult(VmVerdict.BLOCK, _condition_text(vmi))
    if vmi.live_migratable is None:
        return FilterResult(VmVerdict.MIGRATE, "LiveMigratable not reported yet; the worker re-checks")
    if vmi.live_migratable == "Unknown":
        return FilterResult(VmVerdict.MIGRATE, f"{_condition_text(vmi)}; the worker re-checks")
    return None


def filter_in_flight(vmi: Vmi, ctx: FilterContext) -> FilterResult | None:
    """A VMI with a non-final VMIM cannot get a second one; note whose it is so the job waits or adopts."""
    active = [m for m in ctx.snapshot.migrations_for(vmi.key) if not m.is_final]
    notes = []
    if active:
        migration = active[0]
        age = "" if migration.creation_time is None else f", {max(0.0, ctx.now - migration.creation_time):.0f} s old"
        if ctx.drain_id is not None and migration.drain_id == ctx.drain_id:
            notes.append(f"adopts in-flight VMIM {migration.key} of this drain (phase {migration.phase or 'unset'})")
        else:
            notes.append(
                f"already migrating: VMIM {migration.key} ({migration.origin}, phase "
                f"{migration.phase or 'unset'}{age}); the job waits for it"
            )
    if vmi.evacuation_node is not None:
        notes.append(f"KubeVirt evacuation already requested (evacuationNodeName={vmi.evacuation_node})")
    return FilterResult(VmVerdict.MIGRATE, "; ".join(notes)) if notes else None


DEFAULT_FILTERS: tuple[VmFilter, ...] = (
    filter_phase,
    filter_eviction_strategy,
    filter_live_migratable,
    filter_in_flight,
)


def evaluate_vm(vmi: Vmi, ctx: FilterContext, filters: Iterable[VmFilter] = DEFAULT_FILTERS) -> FilterResult:
    """Run the filters in order: the first SKIP/BLOCK wins; MIGRATE notes accumulate."""
    notes = []
    for vm_filter in filters:
        result = vm_filter(vmi, ctx)
        if result is None:
            continue
        if result.verdict is not VmVerdict.MIGRATE:
            return result
        notes.append(result.reason)
    base = f"{_strategy_text(vmi)}, LiveMigratable={vmi.live_migratable or 'unreported'}"
    return FilterResult(VmVerdict.MIGRATE, "; ".join([base, *notes]))


# --- placement -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Requirement:
    """What a target node must offer a VM, besides memory. Hashable: VMs with equal needs share a heap."""

    selector: tuple[tuple[str, str], ...]
    cpu_labels: tuple[str, ...]
    vendor_label: str | None
    tolerations: tuple[Toleration, ...]
    # Message texts only: kept out of equality so that VMs from many source nodes share one heap.
    cpu_text: str = field(default="", compare=False)
    """E.g. "host-model CPU 'Skylake'"."""
    cpu_detail: str = field(default="", compare=False)
    """cpu_text plus the source node, for per-VM reasons."""


def _requirement(vmi: Vmi, source: Node | None) -> _Requirement:
    cpu_labels: tuple[str, ...] = ()
    cpu_text = cpu_detail = ""
    if vmi.cpu_model in (HOST_MODEL, HOST_PASSTHROUGH):
        # KubeVirt pins host-model targets to the source's host CPU model; for host-passthrough the same label
        # is the closest signal of an identical CPU that the API offers.
        models = sorted(source.host_model_cpus) if source is not None else []
        cpu_labels = tuple(HOST_MODEL_CPU_LABEL_PREFIX + m for m in models)
        if models:
            cpu_text = f"{vmi.cpu_model} CPU '{', '.join(models)}'"
            cpu_detail = f"{cpu_text} of source node {vmi.node}"
    else:
        cpu_labels = (CPU_MODEL_LABEL_PREFIX + vmi.cpu_model,)
        cpu_text = cpu_detail = f"CPU model '{vmi.cpu_model}'"
    vendor = source.cpu_vendor if source is not None else None
    return _Requirement(
        selector=tuple(sorted(vmi.node_selector.items())),
        cpu_labels=cpu_labels,
        vendor_label=CPU_VENDOR_LABEL_PREFIX + vendor if vendor else None,
        tolerations=vmi.tolerations,
        cpu_text=cpu_text,
        cpu_detail=cpu_detail,
    )


def _selector_ok(req: _Requirement, node: Node) -> bool:
    return all(node.labels.get(k) == v for k, v in req.selector)


def _cpu_ok(req: _Requirement, node: Node) -> bool:
    return all(node.labels.get(label) == "true" for label in req.cpu_labels)


def _vendor_ok(req: _Requirement, node: Node) -> bool:
    return req.vendor_label is None or node.labels.get(req.vendor_label) == "true"


def _taints_ok(req: _Requirement, node: Node) -> bool:
    return all(any(t.tolerates(taint) for t in req.tolerations) for taint in node.taints if taint.repels)


def _fits(req: _Requirement, node: Node) -> bool:
    return _selector_ok(req, node) and _cpu_ok(req, node) and _vendor_ok(req, node) and _taints_ok(req, node)


class _Placer:
    """First-fit-decreasing onto the most free node among those that fit (spreads inbound load).

    Free memory only ever shrinks, so each requirement keeps a max-heap with lazy refresh: a popped entry
    whose value is stale is pushed back with the current value; a fresh top is the true maximum.
    """

    def __init__(self, targets: Sequence[Node], free: dict[str, int]) -> None:
        self.targets = targets
        self.free = free
        self._heaps: dict[_Requirement, list[tuple[int, str]]] = {}
        self._placements = 0
        # Explaining is O(nodes); in a badly overcommitted drain thousands of VMs fail in a row with the
        # same requirement and size, and nothing changed in between.
        self._explained: dict[tuple[_Requirement, str, int, int], str] = {}

    def _heap(self, req: _Requirement) -> list[tuple[int, str]]:
        heap = self._heaps.get(req)
        if heap is None:
            heap = [(-self.free[n.name], n.name) for n in self.targets if _fits(req, n)]
            heapq.heapify(heap)
            self._heaps[req] = heap
        return heap

    def place(self, req: _Requirement, need: int) -> str | None:
        heap = self._heap(req)
        while heap:
            neg_free, name = heap[0]
            current = self.free[name]
            if -neg_free != current:
                heapq.heapreplace(heap, (-current, name))
                continue
            if current < need:
                return None
            self.free[name] = current - need
            heapq.heapreplace(heap, (-(current - need), name))
            self._placements += 1
            return name
        return None

    def explain(self, req: _Requirement, need: int) -> str:
        """Why no target fits, by eliminating constraints one at a time."""
        key = (req, req.cpu_detail, need, self._placements)
        text = self._explained.get(key)
        if text is None:
            text = self._explained[key] = self._explain(req, need)
        return text

    def _explain(self, req: _Requirement, need: int) -> str:
        nodes = list(self.targets)
        stages: list[tuple[Callable[[_Requirement, Node], bool], str]] = [
            (_selector_ok, f"matches nodeSelector {dict(req.selector)}"),
            (_cpu_ok, f"supports {req.cpu_detail} (label {', '.join(key + '=true' for key in req.cpu_labels)})"),
            (_vendor_ok, f"has CPU vendor label {req.vendor_label}=true"),
            (_taints_ok, "has no taint the VM does not tolerate"),
        ]
        for check, text in stages:
            nodes = [n for n in nodes if check(req, n)]
            if not nodes:
                return f"no fitting target: no schedulable node outside the drain {text}"
        best = max(nodes, key=lambda n: (self.free[n.name], n.name))
        return (
            f"no fitting target: needs {format_bytes(need)} of memory; the most free among the "
            f"{len(nodes)} matching node(s) is {format_bytes(max(0, self.free[best.name]))} ({best.name}) "
            "after placing larger VMs"
        )

    def compatible_count(self, req: _Requirement) -> int:
        return len(self._heap(req))


# --- limits and estimate -------------------------------------------------------------------------------


def _limits(snapshot: ClusterSnapshot, request: DrainRequest, settings: Settings) -> EffectiveLimits:
    config = snapshot.migration_config
    ours_completion = request.completion_timeout_per_gib or settings.timeouts.completion_timeout_per_gib
    ours_progress = request.progress_timeout_s or settings.timeouts.progress_timeout_s

    def pair(ours: float, kubevirt: float | None) -> LimitValue:
        return LimitValue(ours=ours, kubevirt=kubevirt, effective=ours if kubevirt is None else min(ours, kubevirt))

    return EffectiveLimits(
        in_flight_cluster=pair(settings.limits.max_in_flight_cluster, config.parallel_migrations_per_cluster),
        outbound_per_node=pair(settings.limits.max_in_flight_per_node, config.parallel_outbound_migrations_per_node),
        inbound_per_node=pair(settings.limits.max_inbound_per_node, None),
        completion_timeout_per_gib=pair(ours_completion, config.completion_timeout_per_gib),
        progress_timeout_s=pair(ours_progress, config.progress_timeout_s),
        pending_timeout_s=request.pending_timeout_s or settings.timeouts.pending_timeout_s,
        max_attempts=request.max_attempts or settings.retry.max_attempts,
    )


def _per_migration_bandwidth(snapshot: ClusterSnapshot, node_bandwidth: float, outbound: int) -> float:
    bandwidth = node_bandwidth / max(1, outbound)
    cap = snapshot.migration_config.bandwidth_per_migration_bytes
    return min(bandwidth, float(cap)) if cap > 0 else bandwidth


def _wave_makespan(jobs_by_node: Sequence[Sequence[float]], cluster_slots: int, node_slots: int) -> float:
    """List-schedule job durations under a cluster cap and a per-node cap; nodes with most work go first."""
    queues = [list(durations) for durations in jobs_by_node]
    remaining = [sum(q) for q in queues]
    positions = [0] * len(queues)
    running_on = [0] * len(queues)
    ready = [(-remaining[i], i) for i in range(len(queues)) if queues[i]]
    heapq.heapify(ready)
    in_ready = {i for _, i in ready}
    running: list[tuple[float, int]] = []
    now = 0.0
    while ready or running:
        while ready and len(running) < cluster_slots:
            _, node = heapq.heappop(ready)
            in_ready.discard(node)
            duration = queues[node][positions[node]]
            positions[node] += 1
            remaining[node] -= duration
            running_on[node] += 1
            heapq.heappush(running, (now + duration, node))
            if positions[node] < len(queues[node]) and running_on[node] < node_slots:
                heapq.heappush(ready, (-remaining[node], node))
                in_ready.add(node)
        if not running:
            break
        now, node = heapq.heappop(running)
        running_on[node] -= 1
        if positions[node] < len(queues[node]) and node not in in_ready:
            heapq.heappush(ready, (-remaining[node], node))
            in_ready.add(node)
    return now


def _estimate(
    waves: Sequence[Sequence[NodePlan]],
    *,
    limits: EffectiveLimits,
    bandwidth: float,
    setup_s: float,
    max_parallel_nodes: int,
) -> Estimate:
    cluster = int(limits.in_flight_cluster.effective)
    per_node = int(limits.outbound_per_node.effective)
    wave_s = tuple(
        _wave_makespan([[job.estimated_s for job in plan.jobs] for plan in wave], cluster, per_node) for wave in waves
    )
    return Estimate(
        total_s=sum(wave_s),
        wave_s=wave_s,
        slots=min(cluster, per_node * max_parallel_nodes),
        per_migration_bytes_per_s=bandwidth,
        setup_s=setup_s,
        model=(
            "estimate only: each migration takes setup_s + guest memory / per-migration bandwidth (a source "
            "node's bandwidth, observed or assumed, split over its parallel migrations, capped by "
            "bandwidthPerMigration); "
            "jobs are list-scheduled largest first under the cluster and per-node limits; waves run one "
            "after another. Dirty-rate rounds, retries and queueing behind KubeVirt's own migrations are "
            "not modelled."
        ),
    )


# --- pods ----------------------------------------------------------------------------------------------


# --- hard VMs ------------------------------------------------------------------------------------------

JUDGE_S = 40.0
"""Cluster seconds a pre-copy that cannot converge runs past its first pass before drainctl's verdict aborts it:
30 s of evidence (orchestrator.convergence) plus one look (workers.jobs.verdict, every 10 s)."""


@dataclass(frozen=True)
class HardVm:
    """What the plan expects of a VM whose dirty rate is at or above its migration's bandwidth."""

    rung: Rung | None
    """The rung expected to move it; None: no allowed rung is expected to (it will be reported, not moved)."""
    estimated_s: float
    """Its slot time: each judged attempt before that rung (setup, first pass, verdict) and its backoff, then
    the rung's attempt (solo: the whole NIC; auto-converge: twice the first pass, for the throttled rounds;
    post-copy: the first pass, then one second per GB before the switch)."""
    reason: str


def expect_hard(*, dirty_rate: float, memory_bytes: int, bandwidth: float, nic_bytes_per_s: float,
                cap_bytes_per_s: float, allowed: frozenset[Rung], setup_s: float,
                backoff: Callable[[int], float], start_on_rung: bool = False) -> HardVm | None:
    """None unless `dirty_rate` >= `bandwidth` (the bandwidth a migration of the VM gets beside the others of
    its node). Then the ladder as the workers climb it: plain, then each allowed rung in order; solo helps when
    the guest dirties less than its whole NIC carries (`nic_bytes_per_s`, capped by bandwidthPerMigration
    `cap_bytes_per_s` when > 0), auto-converge and post-copy are expected to. With `start_on_rung` (the
    workers' `start_on_expected_rung`), the first attempt starts on the expected rung: its time alone."""
    if dirty_rate < bandwidth:
        return None
    solo_bw = min(nic_bytes_per_s, cap_bytes_per_s) if cap_bytes_per_s > 0 else nic_bytes_per_s
    total = setup_s + memory_bytes / bandwidth + JUDGE_S
    attempt = 1
    rung: Rung | None = None
    rung_s = 0.0
    for step in LADDER:
        if step not in allowed:
            continue
        attempt += 1
        total += backoff(attempt)
        if step is Rung.SOLO:
            rung_s = setup_s + memory_bytes / solo_bw
            total += rung_s
            if dirty_rate < solo_bw:
                rung = step
                break
            total += JUDGE_S  # judged again, alone on its NICs
            continue
        if step is Rung.AUTO_CONVERGE:
            rung_s = setup_s + 2 * memory_bytes / bandwidth
        else:
            rung_s = setup_s + memory_bytes / bandwidth + math.ceil(memory_bytes / 1e9)
        total += rung_s
        rung = step
        break
    numbers = (f"dirties {format_bytes(int(dirty_rate))}/s, at or above the {format_bytes(int(bandwidth))}/s a "
               f"migration of it gets")
    if rung is None:
        allowed_text = ", ".join(r.option for r in LADDER if r in allowed) or "none"
        return HardVm(None, total, f"{numbers}; no allowed rung is expected to move it (allowed: {allowed_text}): "
                                   "it would be reported, not moved")
    if start_on_rung:
        # The first attempt starts on the quickest allowed rung expected to move it (with post-copy allowed,
        # a guest that dirties far beyond the NIC moves in one post-copy pass instead of a long throttling).
        quickest = min(((s_, r) for r, s_ in _rung_times(dirty_rate=dirty_rate, memory_bytes=memory_bytes,
                                                         bandwidth=bandwidth, solo_bw=solo_bw, setup_s=setup_s)
                        if r in allowed), key=lambda item: (item[0], LADDER.index(item[1])))
        rung_s, rung = quickest
        return HardVm(rung, rung_s, f"{numbers}; expected to move on the {rung.option} rung, where its first "
                                    f"attempt starts, about {rung_s:.0f} s")
    return HardVm(rung, total, f"{numbers}; expected to move on the {rung.option} rung after {attempt - 1} judged "
                               f"attempt(s), about {total:.0f} s")


def _rung_times(*, dirty_rate: float, memory_bytes: int, bandwidth: float, solo_bw: float,
                setup_s: float) -> list[tuple[Rung, float]]:
    """Each rung expected to move a VM that dirties `dirty_rate`, with the time of an attempt on it (the same
    rough model as `expect_hard`)."""
    times = []
    if dirty_rate < solo_bw:
        times.append((Rung.SOLO, setup_s + memory_bytes / solo_bw))
    times.append((Rung.AUTO_CONVERGE, setup_s + 2 * memory_bytes / bandwidth))
    times.append((Rung.POST_COPY, setup_s + memory_bytes / bandwidth + math.ceil(memory_bytes / 1e9)))
    return times


def _pod_evictions(snapshot: ClusterSnapshot, node: NodeName) -> tuple[tuple[PodEviction, ...], tuple[str, ...]]:
    evict: list[PodEviction] = []
    ignored: list[str] = []
    for pod in snapshot.pods_on(node):
        if pod.is_final:
            continue
        # A launcher whose VMI exists leaves with its migration (or stays with the VM); one whose VMI runs
        # elsewhere is a migration target/source pod that the eviction webhook refuses anyway.
        verdict = pod_verdict(pod, vm_stays=lambda key: snapshot.vmi(key) is not None)
        if verdict.action is PodAction.LEAVE:
            ignored.append(pod.key)
        elif pod.is_virt_launcher:
            evict.append(PodEviction(pod.key, pod.memory_request_bytes, (verdict.reason,)))
        else:
            evict.append(PodEviction(pod.key, pod.memory_request_bytes, _pod_notes(pod)))
    return tuple(evict), tuple(ignored)


def _pod_notes(pod: Pod) -> tuple[str, ...]:
    notes = []
    if pod.owner_kind is None:
        notes.append("no controller: the pod is deleted and not recreated")
    if pod.has_empty_dir:
        notes.append("emptyDir data is lost")
    return tuple(notes)


# --- the planner ---------------------------------------------------------------------------------------


def _validate(snapshot: ClusterSnapshot, request: DrainRequest) -> None:
    problems: list[str] = []
    if not request.nodes:
        raise PlanError(["no nodes to drain"])
    duplicates = sorted(name for name, count in Counter(request.nodes).items() if count > 1)
    if duplicates:
        problems.append(f"duplicate node(s) in the request: {', '.join(duplicates)}")
    unknown = [n for n in dict.fromkeys(request.nodes) if snapshot.node(n) is None]
    if unknown:
        problems.append(f"unknown node(s): {_some(unknown)}")
    distinct = len(set(request.nodes))
    if request.max_parallel_nodes < 1 or request.max_parallel_nodes > distinct:
        problems.append(
            f"max_parallel_nodes {request.max_parallel_nodes} must be between 1 and the number of nodes "
            f"to drain ({distinct})"
        )
    if problems:
        raise PlanError(problems)


@dataclass
class _NodeWork:
    name: NodeName
    index: int
    migrate: list[tuple[Vmi, str, int]]
    skipped: list[VmDecision]
    blocked: list[VmDecision]


def plan_drain(
    snapshot: ClusterSnapshot,
    request: DrainRequest,
    settings: Settings,
    *,
    now: float,
    drain_id: DrainId | None = None,
    filters: Sequence[VmFilter] = DEFAULT_FILTERS,
    transfers: Mapping[str, Sequence[TransferSample]] | None = None,
    dirty_rates: Mapping[str, float] | None = None,
) -> DrainPlan:
    """Plan draining ``request.nodes``; raise PlanError when the request cannot be carried out as asked.

    ``drain_id`` identifies VMIMs this drain already created (re-planning after a crash adopts them).
    ``transfers``: the migrations seen leaving each node (its observed bandwidth beats the configured one in
    the estimate and the tuning: `node_bandwidth_source`).
    ``dirty_rates``: the guests' last known dirty rates in bytes/s by "namespace/name" (none: no VM is
    expected to be hard).
    """
    dirty_rates = dirty_rates or {}
    _validate(snapshot, request)
    drain_set = set(request.nodes)
    targets = [n for n in snapshot.nodes if is_room(n, drain_set)]
    if not targets:
        schedulable = [n.name for n in snapshot.nodes if n.schedulable]
        raise PlanError(
            [
                "the request drains every schedulable node "
                f"({_some(schedulable) if schedulable else 'none is schedulable'}); no node would remain "
                "to receive VMs"
            ]
        )
    limits = _limits(snapshot, request, settings)
    config = snapshot.migration_config
    if limits.in_flight_cluster.effective < 1 or limits.outbound_per_node.effective < 1:
        raise PlanError(
            [
                f"KubeVirt allows no migrations (parallelMigrationsPerCluster="
                f"{config.parallel_migrations_per_cluster}, parallelOutboundMigrationsPerNode="
                f"{config.parallel_outbound_migrations_per_node})"
            ]
        )
    ctx = FilterContext(snapshot=snapshot, policy=request.non_migratable, drain_id=drain_id, now=now)

    # 1. Verdicts per VM, node by node in request order.
    launcher_memory: dict[VmiKey, int] = {}  # the largest live launcher pod of each VMI
    works: list[_NodeWork] = []
    for index, name in enumerate(request.nodes):
        for pod in snapshot.pods_on(name):
            if pod.is_virt_launcher and pod.vmi_name and not pod.is_final:
                key = VmiKey(f"{pod.namespace}/{pod.vmi_name}")
                launcher_memory[key] = max(launcher_memory.get(key, 0), pod.memory_request_bytes)
        work = _NodeWork(name=name, index=index, migrate=[], skipped=[], blocked=[])
        for vmi in snapshot.vmis_on(name):
            if vmi.is_final:
                continue
            result = evaluate_vm(vmi, ctx, filters)
            if result.verdict is VmVerdict.MIGRATE:
                need = vm_memory_on_target(vmi, launcher_pod_bytes=launcher_memory.get(vmi.key))
                work.migrate.append((vmi, result.reason, need))
            elif result.verdict is VmVerdict.SKIP:
                work.skipped.append(VmDecision(vmi.key, VmVerdict.SKIP, result.reason))
            else:
                work.blocked.append(VmDecision(vmi.key, VmVerdict.BLOCK, result.reason))
        works.append(work)

    # 2. Capacity: the OpenShift rule on the nodes that stay...
    used: dict[str, int] = {}
    for node in targets:
        used[node.name] = snapshot.pod_memory_on(node.name)
    free: dict[str, int] = {n.name: n.allocatable_memory_bytes - used[n.name] for n in targets}
    spare = spare_memory(targets, free=free, draining=drain_set)
    loads = {w.name: sum(need for _, _, need in w.migrate) for w in works}
    largest_node = max(loads, key=lambda n: (loads[n], n)) if loads else None
    largest = loads[largest_node] if largest_node is not None else 0
    required = request.max_parallel_nodes * largest
    rule_ok = spare >= required

    # ... and a real first-fit-decreasing placement of every VM that should move.
    placer = _Placer(targets, dict(free))
    requirements: dict[VmiKey, _Requirement] = {}
    candidates = sorted(
        ((vmi, reason, need, work) for work in works for vmi, reason, need in work.migrate),
        key=lambda item: (-item[2], item[0].key),
    )
    placed: dict[VmiKey, str] = {}
    warnings: list[str] = []
    no_cpu_label_sources: set[str] = set()
    for vmi, _reason, need, work in candidates:
        source = snapshot.node(work.name)
        if vmi.cpu_model in (HOST_MODEL, HOST_PASSTHROUGH) and source is not None and not source.host_model_cpus:
            no_cpu_label_sources.add(work.name)
        req = _requirement(vmi, source)
        requirements[vmi.key] = req
        target = placer.place(req, need)
        if target is None:
            work.blocked.append(VmDecision(vmi.key, VmVerdict.BLOCK, placer.explain(req, need)))
        else:
            placed[vmi.key] = target
    unplaced = len(candidates) - len(placed)

    capacity_message = (
        f"spare {format_bytes(spare)} >= {request.max_parallel_nodes} x {format_bytes(largest)} needed"
        if rule_ok
        else f"not enough capacity: spare {format_bytes(spare)} < {request.max_parallel_nodes} x "
        f"{format_bytes(largest)} needed (largest load: {largest_node}; spare is allocatable minus pod "
        f"requests on {len(targets)} node(s) that stay)"
    )
    if rule_ok and unplaced:
        capacity_message += f"; but {unplaced} VM(s) found no fitting target"
    capacity = CapacityVerdict(
        spare_bytes=spare,
        required_bytes=required,
        largest_node_load_bytes=largest,
        largest_node=largest_node,
        max_parallel_nodes=request.max_parallel_nodes,
        target_nodes=len(targets),
        placed_vms=len(placed),
        unplaced_vms=unplaced,
        ok=rule_ok and unplaced == 0,
        message=capacity_message,
    )

    problems: list[str] = []
    if not rule_ok:
        problems.append(capacity_message)
    blocked_all = [d for w in works for d in w.blocked]
    if blocked_all and request.non_migratable is NonMigratablePolicy.BLOCK:
        listed = [f"{d.vmi} ({d.reason})" for d in blocked_all]
        problems.append(
            f"{len(blocked_all)} VM(s) cannot be migrated: {_some(listed, 3)}; drain with non_migratable=skip "
            "to leave them in place"
        )
    if problems:
        raise PlanError(problems)

    # 3. Jobs (largest first per node), node order and waves.
    node_bw = {str(w.name): node_bandwidth_source(snapshot.node(w.name), settings, (transfers or {}).get(str(w.name)))
               for w in works}
    outbound = int(limits.outbound_per_node.effective)
    per_migration = {name: _per_migration_bandwidth(snapshot, bw, outbound) for name, (bw, _) in node_bw.items()}
    bandwidth = min(per_migration.values(), default=_per_migration_bandwidth(
        snapshot, settings.estimate.node_bandwidth_bytes_per_s, outbound))
    setup_s = settings.estimate.setup_s
    per_gib = limits.completion_timeout_per_gib.effective
    outbound = int(limits.outbound_per_node.effective)
    cap = float(snapshot.migration_config.bandwidth_per_migration_bytes)
    node_plans: list[NodePlan] = []
    for work in works:
        jobs = []
        observed = node_bw.get(str(work.name))
        nic = observed[0] if observed else node_bandwidth(snapshot.node(work.name), settings)
        node_share = min(nic / max(1, outbound), cap) if cap > 0 else nic / max(1, outbound)
        for vmi, reason, need in sorted(work.migrate, key=lambda item: (-item[2], item[0].key)):
            target = placed.get(vmi.key)
            if target is None:
                continue
            active = [m for m in snapshot.migrations_for(vmi.key) if not m.is_final]
            dirty = dirty_rates.get(vmi.key)
            hard: HardVm | None = None
            if dirty is not None:
                try:
                    allowed = allowed_rungs(request.escalation, allow_post_copy=request.allow_post_copy,
                                            namespace_annotation=None,
                                            vmi_annotation=vmi.annotations.get(ESCALATION_ANNOTATION),
                                            namespace=vmi.namespace, vmi=vmi.key)
                except ValueError as exc:
                    warnings.append(str(exc))
                    allowed = frozenset()
                hard = expect_hard(dirty_rate=dirty, memory_bytes=vmi.guest_memory_bytes, bandwidth=node_share,
                                   nic_bytes_per_s=nic, cap_bytes_per_s=cap, allowed=allowed, setup_s=setup_s,
                                   backoff=settings.timeouts.backoff,
                                   start_on_rung=settings.retry.start_on_expected_rung)
            jobs.append(
                MigrationJob(
                    vmi=vmi.key,
                    source_node=work.name,
                    memory_bytes=need,
                    proposed_target=NodeName(target),
                    reason=f"{reason}; proposed target {target}",
                    estimated_s=(hard.estimated_s if hard
                                 else setup_s + vmi.guest_memory_bytes / per_migration[str(work.name)]),
                    # KubeVirt sizes the budget in whole decimal GB, rounded up (kubevirt.md 3.5).
                    completion_timeout_s=float(per_gib * max(1, math.ceil(vmi.guest_memory_bytes / 1e9))),
                    in_flight_migration=active[0].key if active else None,
                    dirty_rate_bytes_per_s=dirty,
                    expected_hard=hard is not None,
                    expected_rung=hard.rung.value if hard is not None and hard.rung is not None else None,
                    hard_reason=hard.reason if hard is not None else None,
                )
            )
        evict, ignored = _pod_evictions(snapshot, work.name)
        node_plans.append(
            NodePlan(
                node=work.name,
                wave=0,
                jobs=tuple(jobs),
                skipped=tuple(work.skipped),
                blocked=tuple(work.blocked),
                evict_pods=evict,
                ignored_pods=ignored,
                migrate_bytes=sum(j.memory_bytes for j in jobs),
                work_s=sum(j.estimated_s for j in jobs),
            )
        )
    hard_jobs = [job for plan in node_plans for job in plan.jobs if job.expected_hard]
    if hard_jobs:
        listed = [f"{job.vmi} ({Rung(job.expected_rung).option if job.expected_rung else 'no rung moves it'})"
                  for job in hard_jobs]
        warnings.append(f"{len(hard_jobs)} VM(s) expected to be hard (their dirty rate is at or above their "
                        f"migration's bandwidth), with the rung expected to move them: {_some(listed)}")
    if request.order is NodeOrder.PLANNER:
        # Least work first frees whole nodes soonest (sum of node release times; migration-model.md 2).
        given: dict[str, int] = {name: index for index, name in enumerate(request.nodes)}
        node_plans.sort(key=lambda p: (p.work_s, given[p.node]))
    step = request.max_parallel_nodes
    node_plans = [dataclasses.replace(plan, wave=i // step) for i, plan in enumerate(node_plans)]
    waves = [node_plans[i : i + step] for i in range(0, len(node_plans), step)]

    estimate = _estimate(waves, limits=limits, bandwidth=bandwidth, setup_s=setup_s, max_parallel_nodes=step)
    # A VM that would not converge on its share at the tuned parallelism gets the solo rung (its NICs to itself)
    # where the drain allows it, after one judged attempt at most: cheaper than holding its whole node to the
    # few migrations at once it could afford (one 16 GiB VM at 730 MB/s kept a 40-VM node to 1). So the tuner
    # caps a node's parallelism by dirty rates only where solo is not allowed.
    solo = Rung.SOLO in drain_rungs(request.escalation, allow_post_copy=request.allow_post_copy)
    tuning = _tuning(snapshot, settings, node_plans, waves, node_bw, {} if solo else dirty_rates)
    if request.tune:
        limits, estimate = _tuned(limits, estimate, tuning)
    warnings.extend(
        _warnings(
            snapshot,
            settings,
            limits=limits,
            node_plans=node_plans,
            placer=placer,
            requirements=requirements,
            no_cpu_label_sources=no_cpu_label_sources,
        )
    )
    return DrainPlan(
        drain_nodes=tuple(p.node for p in node_plans),
        waves=tuple(tuple(p.node for p in wave) for wave in waves),
        nodes=tuple(node_plans),
        capacity=capacity,
        limits=limits,
        warnings=tuple(warnings),
        estimate=estimate,
        policy=request.non_migratable,
        order=request.order,
        max_parallel_nodes=request.max_parallel_nodes,
        created_at=float(now),
        drain_id=drain_id,
        tuning=tuning.to_json(),
        tuned=request.tune,
    )


def node_bandwidth(node: Node | None, settings: Settings) -> float:
    """A node's configured migration bandwidth: its annotation or label BANDWIDTH_ANNOTATION, else the setting."""
    return node_bandwidth_source(node, settings)[0]


def node_bandwidth_source(node: Node | None, settings: Settings,
                          transfers: Sequence[TransferSample] | None = None) -> tuple[float, str]:
    """A node's migration bandwidth and where it came from: what its last migrations achieved
    (`tuning.observed_bandwidth`), else its annotation or label BANDWIDTH_ANNOTATION, else the setting."""
    seen = observed_bandwidth(transfers or ())
    if seen is not None:
        return seen.bytes_per_s, f"observed ({seen.migrations} migrations)"
    if node is not None:
        for where, values in (("annotation", node.annotations), ("label", node.labels)):
            raw = values.get(BANDWIDTH_ANNOTATION)
            if not raw:
                continue
            try:
                value = float(parse_quantity(raw))
            except ValueError:
                value = 0.0
            if value > 0:
                return value, where
    return settings.estimate.node_bandwidth_bytes_per_s, "setting"


def _tuning(snapshot: ClusterSnapshot, settings: Settings, node_plans: Sequence[NodePlan],
            waves: Sequence[Sequence[NodePlan]], node_bw: Mapping[str, tuple[float, str]],
            dirty_rates: Mapping[str, float]) -> Tuning:
    vms = [TuneVm(vmi=job.vmi, node=plan.node, memory_bytes=job.memory_bytes,
                  dirty_bytes_per_s=dirty_rates.get(job.vmi)) for plan in node_plans for job in plan.jobs]
    draining = {p.node for p in node_plans}
    targets = sum(1 for n in snapshot.nodes if n.name not in draining and not n.unschedulable and n.ready
                  and not n.control_plane)
    return tune(vms, bandwidth={p.node: node_bw[str(p.node)][0] for p in node_plans},
                bandwidth_source={p.node: node_bw[str(p.node)][1] for p in node_plans},
                waves=[[p.node for p in wave] for wave in waves], setup_s=settings.estimate.setup_s,
                current_bandwidth_per_migration=snapshot.migration_config.bandwidth_per_migration_bytes,
                max_cluster=targets * settings.limits.max_inbound_per_node)


def _tuned(limits: EffectiveLimits, estimate: Estimate, tuning: Tuning) -> tuple[EffectiveLimits, Estimate]:
    """The limits and estimate of a tuned drain: KubeVirt's settings will be the tuned ones."""
    cluster, per_node = float(tuning.parallel_per_cluster), float(tuning.parallel_outbound_per_node)
    limits = dataclasses.replace(
        limits, in_flight_cluster=LimitValue(ours=cluster, kubevirt=cluster, effective=cluster),
        outbound_per_node=LimitValue(ours=per_node, kubevirt=per_node, effective=per_node))
    estimate = dataclasses.replace(
        estimate, total_s=tuning.predicted_makespan_s, slots=tuning.parallel_per_cluster,
        model="tuned limits (orchestrator.tuning): per node max(volume / NIC, sum(setup + cleanup + "
              "volume / NIC) / parallel, longest job); waves one after another")
    return limits, estimate


def _warnings(
    snapshot: ClusterSnapshot,
    settings: Settings,
    *,
    limits: EffectiveLimits,
    node_plans: Sequence[NodePlan],
    placer: _Placer,
    requirements: Mapping[VmiKey, _Requirement],
    no_cpu_label_sources: set[str],
) -> list[str]:
    config = snapshot.migration_config
    warnings: list[str] = []
    for label, pair, ours_name, kv_name in (
        ("cluster", limits.in_flight_cluster, "max_in_flight_cluster", "parallelMigrationsPerCluster"),
        ("per node", limits.outbound_per_node, "max_in_flight_per_node", "parallelOutboundMigrationsPerNode"),
        ("completion", limits.completion_timeout_per_gib, "completion_timeout_per_gib", "completionTimeoutPerGiB"),
        ("progress", limits.progress_timeout_s, "progress_timeout_s", "progressTimeout"),
    ):
        if pair.kubevirt is not None and pair.kubevirt < pair.ours:
            warnings.append(
                f"KubeVirt {kv_name}={pair.kubevirt:g} is below our {ours_name}={pair.ours:g}: using "
                f"{pair.effective:g} ({label})"
            )
    if config.network is None:
        warnings.append(
            "no dedicated migration network (KubeVirt migrations.network unset): migrations share the pod "
            "network with workload traffic"
        )
    jobs = [job for plan in node_plans for job in plan.jobs]
    vmis = {job.vmi: snapshot.vmi(job.vmi) for job in jobs}
    not_rwx = sorted(
        f"{key} ({', '.join(v.claim_name for v in vmi.volumes if v.rwx is False)})"
        for key, vmi in vmis.items()
        if vmi is not None and any(v.rwx is False for v in vmi.volumes)
    )
    if not_rwx:
        warnings.append(
            f"{len(not_rwx)} VM(s) to migrate have volumes that are not ReadWriteMany: {_some(not_rwx)}; "
            "KubeVirt needs shared (RWX) storage to live-migrate them"
        )
    unknown_rwx = sum(1 for vmi in vmis.values() if vmi is not None and any(v.rwx is None for v in vmi.volumes))
    if unknown_rwx:
        warnings.append(f"access modes of {unknown_rwx} VM(s)' volumes are unknown (their PVCs were not read)")
    # Host-model CPUs with few compatible targets: a single failure there leaves nowhere to retry.
    scarce: dict[str, list[str]] = {}
    for key, req in requirements.items():
        if not req.cpu_labels or key not in vmis:
            continue
        cpu_only = _Requirement((), req.cpu_labels, req.vendor_label, (), cpu_text=req.cpu_text)
        count = placer.compatible_count(cpu_only)
        if count < 2:
            scarce.setdefault(f"{req.cpu_text} has {count} compatible target node(s)", []).append(key)
    for text, keys in sorted(scarce.items()):
        warnings.append(f"{text}: a failed migration of {_some(sorted(keys))} has nowhere else to go")
    if no_cpu_label_sources:
        warnings.append(
            f"source node(s) {_some(sorted(no_cpu_label_sources))} carry no {HOST_MODEL_CPU_LABEL_PREFIX}* label: "
            "host-model CPU compatibility of targets was not checked"
        )
    in_flight = [job.vmi for job in jobs if job.in_flight_migration is not None]
    if in_flight:
        warnings.append(f"{len(in_flight)} VM(s) already have a migration in flight: {_some(in_flight)}")
    with_affinity = sorted(key for key, vmi in vmis.items() if vmi is not None and vmi.has_affinity)
    if with_affinity:
        warnings.append(
            f"{len(with_affinity)} VM(s) have affinity rules the planner does not evaluate: "
            f"{_some(with_affinity)}; proposed targets may be refused and retried elsewhere"
        )
    for plan in node_plans:
        if not plan.can_finish_drained:
            warnings.append(
                f"node {plan.node} will not finish drained: {len(plan.skipped)} VM(s) skipped, "
                f"{len(plan.blocked)} blocked"
            )
        unmanaged = [p.pod for p in plan.evict_pods if any(n.startswith("no controller") for n in p.notes)]
        if unmanaged:
            warnings.append(f"node {plan.node}: pods without a controller are deleted for good: {_some(unmanaged)}")
    if settings.limits.max_inbound_per_node < limits.outbound_per_node.effective:
        warnings.append(
            f"max_inbound_per_node={settings.limits.max_inbound_per_node} is below the per-node outbound limit "
            f"{limits.outbound_per_node.effective:g}: inbound slots may throttle drains"
        )
    return warnings


# Public names for run-time target choice: workers re-check a target with exactly the planner's rules.
Requirement = _Requirement
requirement_for = _requirement
node_fits = _fits
