"""Migration limits tuned for one drain's window: pure arithmetic, no I/O.

KubeVirt's defaults (5 migrations per cluster, 2 outbound per node, bandwidth unlimited) are sized for a
cluster at work, not for a maintenance window: at those limits the setup of each migration (its target pod,
5-20 s) dominates a drain and the NICs sit idle most of the time. For the drain's window we pick, per
source node, how many migrations may run at once so that the node's migration NIC stays busy, but no more
than every VM on it can afford: a VM converges by pre-copy only if it gets more bandwidth than it dirties
memory, or if its writable working set fits the downtime budget (migration-model.md 1.2: D < B or
WWS <= B x d_max). A node with a VM that needs more bandwidth runs fewer migrations (fewer neighbours).

Model (migration-model.md 1.2 and 3.3, with guest memory as the volume since the resident size is unknown
to us): a migration holds a slot for a + V/b + z (setup, volume over its bandwidth, cleanup). With P at
once sharing a node's NIC of bandwidth B, the transfers together take sum V / B whatever P, while the setups
and cleanups overlap P at a time, so the node takes about

    T(P) = max( sum (a + z) / P + sum V / B,  max (a + z + V/B) )

More at once always helps, less and less: P is the smallest that brings the setup term down to
SETUP_SHARE of the transfer term, capped by convergence (each VM keeps the share it needs), by the number
of VMs and by `max_per_node`.

A node's bandwidth B is refined from the migrations drainctl has seen leave it (`observed_bandwidth`): the
memory they moved over the time the node was transferring at all (the union of their transfer intervals, so
setup time is ignored and migrations sharing the NIC are not counted as slow), over the last OBSERVED_WINDOW
migrations. That figure is in the same terms as the model above (guest memory over B), so it absorbs what
the configured NIC speed leaves out (protocol overhead, re-sent dirty pages, a slower path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONVERGENCE_MARGIN = 2.0
"""A VM's share of bandwidth must be at least this many times its dirty rate (pre-copy rounds halve)."""
SETUP_SHARE = 0.25
"""Setups may add at most this fraction of the NIC time to a node's drain (what P aims for)."""
DOWNTIME_S = 0.3
"""KubeVirt's hard-coded switch-over budget (migration-model.md 1.5)."""


OBSERVED_WINDOW = 20
"""Observed bandwidth: the last this many migrations out of a node count."""
OBSERVED_MIN_BUSY_S = 1.0
"""Observed bandwidth: fewer transfer seconds than this say too little (the timestamps' error dominates)."""


@dataclass(frozen=True)
class TransferSample:
    """One finished migration out of a node: when its transfer ran, in cluster seconds on one time line (wall
    epoch x time scale), and how much memory it moved."""

    start_s: float
    end_s: float
    memory_bytes: int


@dataclass(frozen=True)
class ObservedBandwidth:
    bytes_per_s: float
    migrations: int
    """How many migrations the figure comes from."""
    busy_s: float
    """Cluster seconds during which at least one of them was transferring."""


CLUSTER_SPAN_MIN_S = 5.0
"""A transfer measured by the cluster's whole-second stamps is trusted from this long on (error <= 20 %)."""


def transfer_sample(*, running_at: float | None, finished_at: float, time_scale: float,
                    cluster_span_s: float | None, memory_bytes: int) -> TransferSample | None:
    """One finished migration as a sample: placed on the time line of our own wall stamps (x time scale, so
    cluster seconds), and as long as the cluster's stamps say when they are long enough to be exact (ours
    include the latency of seeing each phase, theirs are whole seconds), else as long as ours say."""
    end = finished_at * time_scale
    ours = None if running_at is None else (finished_at - running_at) * time_scale
    span = cluster_span_s if cluster_span_s is not None and cluster_span_s >= CLUSTER_SPAN_MIN_S else ours
    if span is None or span <= 0 or memory_bytes <= 0:
        return None
    return TransferSample(start_s=end - span, end_s=end, memory_bytes=memory_bytes)


def observed_bandwidth(samples: Sequence[TransferSample], *, window: int = OBSERVED_WINDOW,
                       min_busy_s: float = OBSERVED_MIN_BUSY_S) -> ObservedBandwidth | None:
    """A node's migration bandwidth as its last `window` migrations saw it: their memory over the union of
    their transfer intervals; None when there is too little to go by (no sample, or under `min_busy_s`)."""
    usable = sorted((s for s in samples if s.end_s > s.start_s and s.memory_bytes > 0), key=lambda s: s.end_s)
    recent = sorted(usable[-window:], key=lambda s: s.start_s) if window > 0 else []
    busy, start, end = 0.0, None, None
    for sample in recent:
        if end is None or start is None or sample.start_s > end:
            if end is not None and start is not None:
                busy += end - start
            start, end = sample.start_s, sample.end_s
        else:
            end = max(end, sample.end_s)
    if end is not None and start is not None:
        busy += end - start
    if not recent or busy < min_busy_s:
        return None
    return ObservedBandwidth(bytes_per_s=sum(s.memory_bytes for s in recent) / busy, migrations=len(recent),
                             busy_s=busy)


@dataclass(frozen=True)
class TuneVm:
    """What the tuner knows of one VM to migrate."""

    vmi: str
    node: str
    memory_bytes: int
    dirty_bytes_per_s: float | None = None
    """None: unknown (no metrics); the VM is then assumed to converge at any share above `min_share`."""
    wws_bytes: int | None = None


@dataclass(frozen=True)
class NodeTuning:
    node: str
    bandwidth_bytes_per_s: float
    parallel: int
    """Migrations out of this node at once (drainctl's own per-node limit)."""
    convergence_cap: int
    """The most migrations the node's hungriest VM allows at once."""
    limited_by: str | None
    """The VM that set convergence_cap, when it is below what the NIC would use."""
    predicted_s: float
    bandwidth_source: str = "setting"
    """Where `bandwidth_bytes_per_s` came from: "observed (N migrations)", "annotation", "label" or "setting"."""


@dataclass(frozen=True)
class Tuning:
    """Limits for one drain's window and what they should achieve."""

    parallel_per_cluster: int
    parallel_outbound_per_node: int
    """KubeVirt's parallelOutboundMigrationsPerNode: the largest of the nodes' own limits."""
    bandwidth_per_migration_bytes: int
    """KubeVirt's bandwidthPerMigration; 0 = unlimited (a VM may use a whole NIC when it is alone)."""
    nodes: tuple[NodeTuning, ...]
    predicted_makespan_s: float
    reasons: tuple[str, ...]

    def node(self, name: str) -> NodeTuning | None:
        return next((n for n in self.nodes if n.node == name), None)

    def to_json(self) -> dict[str, object]:
        return {
            "parallel_per_cluster": self.parallel_per_cluster,
            "parallel_outbound_per_node": self.parallel_outbound_per_node,
            "bandwidth_per_migration_bytes": self.bandwidth_per_migration_bytes,
            "predicted_makespan_s": round(self.predicted_makespan_s, 1),
            "nodes": [{"node": n.node, "bandwidth_bytes_per_s": n.bandwidth_bytes_per_s,
                       "bandwidth_source": n.bandwidth_source, "parallel": n.parallel,
                       "convergence_cap": n.convergence_cap, "limited_by": n.limited_by,
                       "predicted_s": round(n.predicted_s, 1)} for n in self.nodes],
            "reasons": list(self.reasons),
        }


def needed_share(vm: TuneVm, *, min_share: float) -> float:
    """The least bandwidth with which `vm` still converges by pre-copy, with margin."""
    if vm.dirty_bytes_per_s is None:
        return min_share
    if vm.wws_bytes is not None and vm.wws_bytes <= min_share * DOWNTIME_S:
        return min_share  # its working set fits the downtime budget at any share we would give
    return max(min_share, CONVERGENCE_MARGIN * vm.dirty_bytes_per_s)


def node_time_s(vms: Sequence[TuneVm], *, parallel: int, bandwidth: float, setup_s: float,
                cleanup_s: float) -> float:
    """T(P) of the module docstring for one node's VMs."""
    if not vms:
        return 0.0
    volume_s = sum(vm.memory_bytes for vm in vms) / bandwidth
    longest = max(setup_s + cleanup_s + vm.memory_bytes / bandwidth for vm in vms)
    return max(len(vms) * (setup_s + cleanup_s) / parallel + volume_s, longest)


def tune(vms: Sequence[TuneVm], *, bandwidth: Mapping[str, float], waves: Sequence[Sequence[str]],
         setup_s: float, cleanup_s: float = 2.0, max_per_node: int = 8, min_share: float = 125e6,
         current_bandwidth_per_migration: int = 0, max_cluster: int | None = None,
         bandwidth_source: Mapping[str, str] | None = None) -> Tuning:
    """Limits for draining `waves` (nodes drained at once, one wave after the other) of `vms`.

    `bandwidth` is each source node's migration bandwidth in bytes/s (`bandwidth_source` says where each came
    from, for the plan's output); `min_share` the least bandwidth any
    migration gets (1 Gbit/s by default); `max_per_node` caps the outbound limit whatever the model says. A
    bandwidthPerMigration in force (`current_bandwidth_per_migration`, 0 = none) is kept but raised to what
    the hungriest VM needs: a cap only ever lowers a migration's fair share of its NIC, so unlimited stays
    unlimited. `max_cluster` caps the cluster-wide limit (the targets' inbound room: more would only wait)."""
    if max_per_node < 1:
        raise ValueError(f"max_per_node: {max_per_node} must be >= 1")
    by_node: dict[str, list[TuneVm]] = {}
    for vm in vms:
        by_node.setdefault(vm.node, []).append(vm)
    reasons: list[str] = []
    tuned: list[NodeTuning] = []
    for wave in waves:
        for node in wave:
            node_vms = by_node.get(node, [])
            b = float(bandwidth[node])
            if b <= 0:
                raise ValueError(f"bandwidth of {node}: {b} must be > 0")
            # Convergence: P <= B / need for every VM on the node.
            cap, limited_by = max_per_node, None
            for vm in node_vms:
                allowed = max(1, math.floor(b / needed_share(vm, min_share=min_share)))
                if allowed < cap:
                    cap, limited_by = allowed, vm.vmi
            if node_vms:
                volume_s = sum(vm.memory_bytes for vm in node_vms) / b
                overhead_s = len(node_vms) * (setup_s + cleanup_s)
                enough = max(1, math.ceil(overhead_s / max(SETUP_SHARE * volume_s, 1e-9)))
            else:
                enough = 1
            parallel = max(1, min(cap, enough, max(1, len(node_vms))))
            if limited_by is not None and cap < enough:
                reasons.append(f"{node}: {parallel} at once, not {min(enough, max_per_node)}: {limited_by} needs "
                               f"{b / cap / 1e6:.0f} MB/s or more to converge")
            tuned.append(NodeTuning(node=node, bandwidth_bytes_per_s=b, parallel=parallel, convergence_cap=cap,
                                    limited_by=limited_by if cap < enough else None,
                                    predicted_s=node_time_s(node_vms, parallel=parallel, bandwidth=b,
                                                            setup_s=setup_s, cleanup_s=cleanup_s),
                                    bandwidth_source=(bandwidth_source or {}).get(node, "setting")))
    per = {n.node: n for n in tuned}
    cluster = max((sum(per[n].parallel for n in wave) for wave in waves if wave), default=1)
    outbound = max((n.parallel for n in tuned), default=1)
    makespan = sum(max((per[n].predicted_s for n in wave), default=0.0) for wave in waves)
    if max_cluster is not None and cluster > max(1, max_cluster):
        reasons.append(f"{max(1, max_cluster)} migrations cluster-wide, not {cluster}: the targets' inbound room")
        makespan *= cluster / max(1, max_cluster)
        cluster = max(1, max_cluster)
    else:
        reasons.append(f"{cluster} migrations cluster-wide: the sum of the per-node limits of the largest wave")
    per_migration = 0
    if current_bandwidth_per_migration > 0:
        need = max((needed_share(vm, min_share=min_share) for vm in vms), default=0.0)
        per_migration = max(current_bandwidth_per_migration, math.ceil(need))
        if per_migration > current_bandwidth_per_migration:
            reasons.append(f"bandwidthPerMigration raised to {per_migration / 1e6:.0f} MB/s so every VM converges")
    return Tuning(parallel_per_cluster=cluster, parallel_outbound_per_node=outbound,
                  bandwidth_per_migration_bytes=per_migration, nodes=tuple(tuned), predicted_makespan_s=makespan,
                  reasons=tuple(reasons))
