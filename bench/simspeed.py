"""How long the simulator takes per simulated hour, and how much memory it holds, per built-in scenario.

For each scenario, in a fresh process: build the cluster, then play KubeVirt's own drain of the scenario's
drain-hint nodes (cordon, evict every virt-launcher pod there as `kubectl drain` does, which starts
KubeVirt's evacuation) and step the controllers on a manual clock through one cluster hour, or until every
VM has left. It prints wall seconds per simulated hour, the time scale that rate sustains (3600 / wall), the
migrations completed and the peak resident memory.

    python -m bench.simspeed [--scenarios small,enterprise,hostile,large] [--hours 1] [--step 1.0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from simulator import scenarios
from simulator.clock import ManualClock
from simulator.cluster import SimCluster
from simulator.errors import ApiError
from simulator.resources import NODES, PODS, VMIS


def run_one(name: str, *, hours: float, step_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    sc = scenarios.builtin(name)
    clock = ManualClock()
    cluster = SimCluster(sc, clock=clock)
    build_s = time.perf_counter() - t0
    drain = list(sc.drain_hint)
    for node in drain:
        cluster.store.mutate(NODES, None, node, lambda o: o["spec"].__setitem__("unschedulable", True))
    evicted = 0
    for node in drain:
        for pod in cluster.store.on_node(PODS, node):
            if (pod["metadata"].get("labels") or {}).get("kubevirt.io") != "virt-launcher":
                continue
            try:
                cluster.kubevirt.evict(pod["metadata"]["namespace"], pod["metadata"]["name"], None)
            except ApiError:
                evicted += 1  # 429: KubeVirt's webhook marked the VMI for evacuation
    start = time.perf_counter()
    simulated = 0.0
    horizon = hours * 3600.0
    left = sum(len(cluster.store.on_node(VMIS, n)) for n in drain)
    while simulated < horizon:
        clock.advance(step_s)
        simulated += step_s
        cluster.step()
        left = sum(len(cluster.store.on_node(VMIS, n)) for n in drain)
        if left == 0 and not cluster.kubevirt.active and not cluster.kubevirt.pending:
            break
    wall = time.perf_counter() - start
    stats = cluster.kubevirt.stats()
    done = [m for m in stats["migrations"] if m["phase"] == "Succeeded"]
    per_hour = wall / (simulated / 3600.0)
    return {
        "scenario": name, "nodes": len(sc.nodes), "vms": len(sc.vms), "drain_nodes": len(drain),
        "evictions_denied": evicted, "build_s": round(build_s, 2), "simulated_s": round(simulated, 1),
        "wall_s": round(wall, 2), "wall_s_per_simulated_hour": round(per_hour, 2),
        "sustainable_time_scale": round(3600.0 / per_hour, 1) if per_hour else None,
        "migrations_succeeded": len(done),
        "migrations_failed": sum(1 for m in stats["migrations"] if m["phase"] == "Failed"),
        "migrations_unfinished": sum(1 for m in stats["migrations"] if m["phase"] not in ("Succeeded", "Failed")),
        "vms_left_on_drained_nodes": left, "store_objects_writes": cluster.store.writes,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(scenarios.BUILTIN_NAMES))
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--step", type=float, default=1.0, help="cluster seconds per controller step")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, hours=args.hours, step_s=args.step)))
        return 0
    header = (f"{'scenario':<11} {'nodes':>6} {'VMs':>7} {'build s':>8} {'sim s':>7} {'wall s':>7} "
              f"{'wall s/sim h':>12} {'max scale':>9} {'migrated':>8} {'failed':>6} {'queued':>6} {'RSS MB':>8}")
    print(header)
    for name in args.scenarios.split(","):
        proc = subprocess.run([sys.executable, "-m", "bench.simspeed", "--one", name, "--hours", str(args.hours),
                               "--step", str(args.step)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{name:<11} failed: {proc.stderr.strip()[-500:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{r['scenario']:<11} {r['nodes']:>6} {r['vms']:>7} {r['build_s']:>8} {r['simulated_s']:>7} "
              f"{r['wall_s']:>7} {r['wall_s_per_simulated_hour']:>12} {r['sustainable_time_scale']:>9} "
              f"{r['migrations_succeeded']:>8} {r['migrations_failed']:>6} {r['migrations_unfinished']:>6} "
              f"{r['max_rss_mb']:>8}")
    print("max scale: the time scale the simulator sustains while KubeVirt evacuates the drain-hint nodes "
          "(3600 / wall seconds per simulated hour).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
