"""Rolling maintenance of every worker node: the `kubectl drain; pause; kubectl uncordon` loop, in figures.

The baseline `drainctl rollout` is to beat (issue 8): one node after the other, the real `kubectl drain
--ignore-daemonsets --delete-emptydir-data` (KubeVirt evacuates each VM; kube-scheduler picks the target,
often a node the loop drains next), a fixed maintenance pause in cluster seconds, then `kubectl uncordon`.
Figures from the simulator's ground truth (admin kubeconfig): total cluster seconds, migrations per VM moved
(1.00 means every VM moved once), VMs moved more than once, bytes sent.

    python -m bench.rollout [--scenario small] [--time-scale 5] [--pause 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.drain import KUBECTL
from simulator import scenarios
from simulator.cluster import running_cluster


def rollout_figures(stats: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """Total time, migrations per VM moved, VMs moved more than once and bytes sent, from the ground truth."""
    moves: dict[str, int] = {}
    for m in stats["migrations"]:
        if m["phase"] == "Succeeded":
            moves[m["vmi"]] = moves.get(m["vmi"], 0) + 1
    total = sum(moves.values())
    return {"total_s": t1 - t0, "vms_moved": len(moves), "migrations": total,
            "migrations_per_vm": total / len(moves) if moves else 0.0,
            "moved_more_than_once": sum(1 for n in moves.values() if n > 1),
            "failed": sum(1 for m in stats["migrations"] if m["phase"] == "Failed"),
            "bytes_sent": sum(int(m["bytes_sent"] or 0) for m in stats["migrations"])}


async def kubectl_loop(sc: scenarios.Scenario, *, time_scale: float, pause_s: float, tmp: Path) -> dict[str, Any]:
    kubeconfig = tmp / "kubectl.kubeconfig"
    nodes = [n.name for n in sc.nodes if not n.control_plane]
    async with running_cluster(sc, time_scale=time_scale, token=secrets.token_hex(8),
                               kubeconfig_out=kubeconfig) as rc, rc.admin() as admin:
        t0 = (await admin.stats())["sim_time_s"]
        base = [KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp / "cache")]
        for node in nodes:
            drain = await asyncio.create_subprocess_exec(
                *base, "drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=600s",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            if await drain.wait() != 0:
                raise RuntimeError(f"kubectl drain {node} failed")
            await asyncio.sleep(pause_s / time_scale)  # the maintenance
            uncordon = await asyncio.create_subprocess_exec(*base, "uncordon", node,
                                                            stdout=asyncio.subprocess.DEVNULL)
            await uncordon.wait()
        stats = await admin.stats()
    return {"tool": "kubectl drain; pause; uncordon", "nodes": nodes, "pause_s": pause_s,
            **rollout_figures(stats, t0, stats["sim_time_s"])}


async def amain(args: argparse.Namespace) -> int:
    sc = scenarios.builtin(args.scenario, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="drainctl-rollout-") as tmp:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        result = await kubectl_loop(sc, time_scale=args.time_scale, pause_s=args.pause, tmp=Path(tmp))
    result["load_before"] = load
    print(f"scenario {sc.name} (seed {sc.seed}): rolling maintenance of {len(result['nodes'])} workers, "
          f"pause {args.pause:.0f} s, time scale {args.time_scale}, load {load}")
    print(f"{'tool':<32} {'total s':>8} {'VMs':>4} {'migr':>5} {'migr/VM':>7} {'moved 2x+':>9} {'failed':>6} "
          f"{'GB sent':>8}")
    print(f"{result['tool']:<32} {result['total_s']:>8.1f} {result['vms_moved']:>4} {result['migrations']:>5} "
          f"{result['migrations_per_vm']:>7.2f} {result['moved_more_than_once']:>9} {result['failed']:>6} "
          f"{result['bytes_sent'] / 1e9:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))  # noqa: ASYNC240 - once, at the end
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="small")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-scale", type=float, default=5.0)
    parser.add_argument("--pause", type=float, default=60.0, help="maintenance pause per node, cluster seconds")
    parser.add_argument("--json", default=None, metavar="PATH")
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
