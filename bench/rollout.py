"""Rolling maintenance of every worker node: the `kubectl drain; pause; kubectl uncordon` loop, in figures.

The baseline `drainctl rollout` is to beat (issue 8): one node after the other, the real `kubectl drain
--ignore-daemonsets --delete-emptydir-data` (KubeVirt evacuates each VM; kube-scheduler picks the target,
often a node the loop drains next), a fixed maintenance pause in cluster seconds, then `kubectl uncordon`.
Figures from the simulator's ground truth (admin kubeconfig): total cluster seconds, migrations per VM moved
(1.00 means every VM moved once), VMs moved more than once, bytes sent.

`--modes drainctl,kubectl` runs `drainctl rollout --max-unavailable 1 --step-command "sleep PAUSE" --wait` too
(emptiest node first: its VMs can only go to nodes the rollout maintains later unless a node is spare), on
`drainctl worker` processes and a Redis database of its own (`--redis-db`, flushed first).

    python -m bench.rollout [--scenario small] [--time-scale 5] [--pause 60] [--modes drainctl,kubectl]
                            [--workers 2] [--redis-db 13] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.drain import KUBECTL, _workers_ready
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


async def drainctl_rollout(sc: scenarios.Scenario, *, time_scale: float, pause_s: float, tmp: Path, workers: int,
                           redis_db: int) -> dict[str, Any]:
    """`drainctl rollout` of every worker, emptiest first, one under maintenance at a time."""
    import redis.asyncio as aioredis

    workers_vms = {n.name: sum(1 for v in sc.vms if v.node == n.name) for n in sc.nodes if not n.control_plane}
    nodes = sorted(workers_vms, key=lambda n: (workers_vms[n], n))
    redis_url = f"redis://127.0.0.1:6379/{redis_db}"
    plain = aioredis.Redis.from_url(redis_url)
    await plain.flushdb()
    kubeconfig = tmp / "drainctl.kubeconfig"
    async with running_cluster(sc, time_scale=time_scale, token=secrets.token_hex(8),
                               kubeconfig_out=kubeconfig) as rc, rc.admin() as admin:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRAIN_")}
        env.update(KUBECONFIG=str(kubeconfig), DRAIN_REDIS_URL=redis_url, DRAIN_TIME_SCALE=str(time_scale),
                   DRAIN_QUEUE_NAME=f"bench-{secrets.token_hex(3)}")
        drainctl = str(Path(sys.executable).with_name("drainctl"))
        procs = [subprocess.Popen([drainctl, "worker"], env=env, stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                                  stderr=subprocess.DEVNULL, start_new_session=True) for _ in range(workers)]
        try:
            await _workers_ready(plain, env["DRAIN_QUEUE_NAME"])
            t0 = (await admin.stats())["sim_time_s"]
            proc = await asyncio.create_subprocess_exec(
                drainctl, "rollout", *nodes, "--max-unavailable", "1", "--step-command",
                f"sleep {pause_s / time_scale:.3f}", "--wait", "-o", "json", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _out, errout = await proc.communicate()
            stats = await admin.stats()
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait(15)
    await plain.aclose()
    if proc.returncode != 0:
        raise RuntimeError(f"drainctl rollout exited {proc.returncode}: {errout.decode()[-1000:]}")
    return {"tool": "drainctl rollout", "nodes": nodes, "pause_s": pause_s,
            **rollout_figures(stats, t0, stats["sim_time_s"])}


async def amain(args: argparse.Namespace) -> int:
    sc = scenarios.builtin(args.scenario, seed=args.seed)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"drainctl", "kubectl"})
    if unknown or not modes:
        print(f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; use drainctl, kubectl",
              file=sys.stderr)
        return 2
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="drainctl-rollout-") as tmp:
            if mode == "kubectl":
                result = await kubectl_loop(sc, time_scale=args.time_scale, pause_s=args.pause, tmp=Path(tmp))
            else:
                result = await drainctl_rollout(sc, time_scale=args.time_scale, pause_s=args.pause, tmp=Path(tmp),
                                                workers=args.workers, redis_db=args.redis_db)
        result["load_before"] = load
        results.append(result)
    print(f"scenario {sc.name} (seed {sc.seed}): rolling maintenance of {len(results[0]['nodes'])} workers, "
          f"pause {args.pause:.0f} s, time scale {args.time_scale}, load {load}")
    print(f"{'tool':<32} {'total s':>8} {'VMs':>4} {'migr':>5} {'migr/VM':>7} {'moved 2x+':>9} {'failed':>6} "
          f"{'GB sent':>8}")
    for result in results:
        print(f"{result['tool']:<32} {result['total_s']:>8.1f} {result['vms_moved']:>4} {result['migrations']:>5} "
              f"{result['migrations_per_vm']:>7.2f} {result['moved_more_than_once']:>9} {result['failed']:>6} "
              f"{result['bytes_sent'] / 1e9:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))  # noqa: ASYNC240 - once, at the end
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="small")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-scale", type=float, default=5.0)
    parser.add_argument("--pause", type=float, default=60.0, help="maintenance pause per node, cluster seconds")
    parser.add_argument("--modes", default="kubectl", help="comma-separated: drainctl, kubectl")
    parser.add_argument("--workers", type=int, default=2, help="drainctl worker processes (drainctl mode)")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database, flushed first (drainctl mode)")
    parser.add_argument("--json", default=None, metavar="PATH")
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
