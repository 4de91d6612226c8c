"""Slot-limited lower bound and idle-slot accounting of a drain, from the simulator's ground truth.

Pure functions over two JSON documents the admin token reads: `GET /sim/v1/scenario` (each VM's setup
time, the KubeVirt migration limits in force) and `GET /sim/v1/stats` (every migration with its times).

The slot-limited bound (migration-model.md 3.3, B5/B6): under a cluster limit K and a per-node outbound
limit P, a schedule needs at least

    max( sum_i tau_i / K,  max_node sum_{i on node} tau_i / P,  max_i tau_i )

where tau_i = setup_i + transfer_i + cleanup is how long migration i holds a slot. setup_i comes from the
scenario (what the target pod costs whatever the tool), transfer + cleanup from the ground truth of the run
(from `started_s`, the first byte, to `finished_s`): both are the cluster's, not the tool's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SlotBound:
    bound_s: float
    cluster_s: float
    """sum(tau) / K"""
    busiest_node_s: float
    """max over source nodes of sum(tau on it) / P"""
    longest_s: float
    busiest_node: str | None
    migrations: int


def slot_taus(stats: Mapping[str, Any], scenario: Mapping[str, Any],
              sources: Iterable[str]) -> list[tuple[str, float]]:
    """(source node, tau) of every successful migration off `sources`."""
    setup = {vm["vmi"]: float(vm["setup_s"]) for vm in scenario["vms"]}
    wanted = set(sources)
    out: list[tuple[str, float]] = []
    for m in stats["migrations"]:
        if m["source"] not in wanted or m["phase"] != "Succeeded" or m["started_s"] is None:
            continue
        out.append((m["source"], setup.get(m["vmi"], float(scenario.get("setup_s", 0.0)))
                    + float(m["finished_s"]) - float(m["started_s"])))
    return out


def slot_bound(taus: Sequence[tuple[str, float]], *, cluster_limit: int, node_limit: int) -> SlotBound:
    if not taus:
        return SlotBound(0.0, 0.0, 0.0, 0.0, None, 0)
    per_node: dict[str, float] = {}
    for node, tau in taus:
        per_node[node] = per_node.get(node, 0.0) + tau
    busiest = max(per_node, key=lambda n: (per_node[n], n))
    cluster = sum(t for _, t in taus) / cluster_limit
    node_s = per_node[busiest] / node_limit
    longest = max(t for _, t in taus)
    return SlotBound(max(cluster, node_s, longest), cluster, node_s, longest, busiest, len(taus))


def limits_in_force(scenario: Mapping[str, Any]) -> tuple[int, int]:
    """(parallelMigrationsPerCluster, parallelOutboundMigrationsPerNode) the scenario starts with."""
    cfg = scenario.get("migrations") or {}
    return int(cfg.get("parallelMigrationsPerCluster", 5)), int(cfg.get("parallelOutboundMigrationsPerNode", 2))


def idle_slot_seconds(stats: Mapping[str, Any], sources: Iterable[str], *, t0: float, end: float,
                      cluster_limit: int) -> float:
    """Cluster-slot seconds left unused between `t0` and `end` (slots held from admission to the end of a
    migration off `sources`): what an ideal scheduler at the same limits could still have filled, at most."""
    wanted = set(sources)
    events: list[tuple[float, int]] = []
    for m in stats["migrations"]:
        if m["source"] not in wanted or m["finished_s"] is None:
            continue
        start = m.get("admitted_s") if m.get("admitted_s") is not None else m["created_s"]
        events.append((max(t0, float(start)), 1))
        events.append((min(end, float(m["finished_s"])), -1))
    events.sort()
    idle, busy, last = 0.0, 0, t0
    for when, delta in events:
        if when > last:
            idle += max(0, cluster_limit - busy) * (when - last)
            last = when
        busy += delta
    if end > last:
        idle += cluster_limit * (end - last)
    return idle
