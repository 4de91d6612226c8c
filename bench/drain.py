"""Drain makespan: drainctl against `kubectl drain` + KubeVirt's evacuation, and against the lower bound.

Both run on the same simulated cluster (same scenario, same seed, same time scale), one after the other:
- drainctl: real Redis (a database of its own, flushed), `drainctl worker` processes, one drain of the
  scenario's drain-hint nodes with the scenario's parallelism;
- kubectl: the real `kubectl drain --ignore-daemonsets --delete-emptydir-data`, one process per node, all
  started together (kubectl drains the nodes it is given one after the other).
The makespan that compares fairly is "VMs off the nodes": from the start to the end of the last successful
migration off a drained node, in cluster seconds, read from the simulator's ground truth (the commands' exit
times add their polling intervals in wall seconds: kubectl retries evictions every 5 wall seconds). It also
prints the lower bounds of migration-model.md section 3 (physical and pre-copy), API requests and Redis
commands per migration, and the cluster-slot seconds spent on attempts that failed. drainctl's workers read the
cluster's Prometheus API (convergence verdicts); mode `post-copy` adds `--allow-post-copy`.

    python -m bench.drain [--scenario small] [--time-scale 10] [--workers 3] [--redis-db 14]
                          [--fail-node auto] [--kubectl-timeout 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench import bounds
from simulator import scenarios
from simulator.admin import SimAdmin
from simulator.cluster import RunningCluster, running_cluster

KUBECTL = os.environ.get("KUBECTL", "kubectl")


def _off_node_makespan(stats: dict[str, Any], drain: list[str], t0: float,
                       movable: int) -> tuple[float | None, int, int]:
    """(time until the last movable VM left, VMs moved, failed attempts); None while movable VMs remain."""
    moved = [m for m in stats["migrations"] if m["source"] in drain and m["phase"] == "Succeeded"]
    failed = [m for m in stats["migrations"] if m["source"] in drain and m["phase"] == "Failed"]
    end = max((m["finished_s"] for m in moved), default=None)
    done = len({m["vmi"] for m in moved}) >= movable
    return (None if end is None or not done else end - t0), len(moved), len(failed)


def failed_slot_seconds(stats: dict[str, Any], drain: list[str]) -> float:
    """Cluster seconds that attempts which failed held a migration slot (VMIM created to final), out of `drain`."""
    return sum(float(m["finished_s"]) - float(m["created_s"]) for m in stats["migrations"]
               if m["source"] in drain and m["phase"] == "Failed" and m["finished_s"] is not None)


def remigrated(stats: dict[str, Any]) -> int:
    """VMs that moved more than once (a rolling drain that parks VMs on nodes it drains next)."""
    moves: dict[str, int] = {}
    for m in stats["migrations"]:
        if m["phase"] == "Succeeded":
            moves[m["vmi"]] = moves.get(m["vmi"], 0) + 1
    return sum(1 for n in moves.values() if n > 1)


def movable_vms(sc: scenarios.Scenario, nodes: Sequence[str] | None = None) -> int:
    """VMs on `nodes` (default: the drain hint) that a drain moves: live-migratable, evicted by migrating."""
    on = sc.drain_hint if nodes is None else nodes
    return sum(1 for vm in sc.vms if vm.node in on and vm.live_migratable
               and vm.eviction_strategy in ("LiveMigrate", "LiveMigrateIfPossible"))


async def _faults(admin: SimAdmin, fail_nodes: list[str]) -> None:
    if fail_nodes:
        await admin.faults({"fail_migrations_to": fail_nodes})


def pick_fail_node(sc: scenarios.Scenario) -> str:
    """The node kube-scheduler prefers (most allocatable memory outside the drain): the worst one to break."""
    candidates = [n for n in sc.nodes if not n.control_plane and n.name not in sc.drain_hint]
    used = {n.name: sum(vm.memory_bytes for vm in sc.vms if vm.node == n.name) for n in candidates}
    return max(candidates, key=lambda n: (n.memory_bytes - used[n.name], n.name)).name


async def _workers_ready(redis: aioredis.Redis, queue_name: str, timeout_s: float = 120.0) -> None:
    """Until a worker runs its main loop (arq's health-check key; on_startup has listed the cluster), plus a
    moment for the others: a long-running daemon's start-up is not part of a drain (on a loaded machine it
    takes several wall seconds)."""
    deadline = time.monotonic() + timeout_s
    while not await redis.exists(f"{queue_name}:health-check"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no drainctl worker became ready within {timeout_s} s")
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)


async def run_drainctl(sc: scenarios.Scenario, *, time_scale: float, workers: int, redis_db: int,
                       tmp: Path, fail_nodes: list[str], non_migratable: str = "block",
                       extra_env: dict[str, str] | None = None, parallel: int | None = None,
                       extra_args: tuple[str, ...] = (), label: str = "drainctl") -> dict[str, Any]:
    redis_url = f"redis://127.0.0.1:6379/{redis_db}"
    plain = aioredis.Redis.from_url(redis_url)
    await plain.flushdb()
    drain = list(sc.drain_hint)
    kubeconfig = tmp / "drainctl.kubeconfig"
    token = secrets.token_hex(8)
    async with running_cluster(sc, time_scale=time_scale, token=token, kubeconfig_out=kubeconfig,
                               prometheus_port=0) as rc, rc.admin() as admin:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRAIN_")}
        env.update(KUBECONFIG=str(kubeconfig), DRAIN_REDIS_URL=redis_url, DRAIN_TIME_SCALE=str(time_scale),
                   DRAIN_QUEUE_NAME=f"bench-{secrets.token_hex(3)}", DRAIN_PROMETHEUS_URL=str(rc.prometheus_url),
                   DRAIN_PROMETHEUS_TOKEN=token, **(extra_env or {}))
        drainctl = str(Path(sys.executable).with_name("drainctl"))
        await _faults(admin, fail_nodes)
        procs = [subprocess.Popen([drainctl, "worker"], env=env, stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                                  stderr=subprocess.DEVNULL, start_new_session=True) for _ in range(workers)]
        try:
            await _workers_ready(plain, env["DRAIN_QUEUE_NAME"])
            before = await admin.stats()
            api_before, t0 = before["api_requests_total"], before["sim_time_s"]
            redis_before = int((await plain.info("stats"))["total_commands_processed"])
            wall0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                drainctl, "drain", *drain, "--max-parallel-nodes", str(parallel or sc.parallel_hint), "--wait",
                "-o", "json", "--non-migratable", non_migratable, *extra_args,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, errout = await proc.communicate()
            wall = time.monotonic() - wall0
            stats = await admin.stats()
            scenario_json = await admin.scenario()
            exit_s = stats["sim_time_s"] - t0
            redis_after = int((await plain.info("stats"))["total_commands_processed"])
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                p.wait(15)
    await plain.aclose()
    makespan, moved, failed = _off_node_makespan(stats, drain, t0, movable_vms(sc))
    view = json.loads(out) if out.strip().startswith(b"{") else {}
    tuned = view.get("limits") if "--tune" in extra_args else None
    limits = (int(tuned["cluster"]), int(tuned["per_node"])) if tuned else None
    migrations = max(1, moved + failed)
    return {"tool": label, "exit_code": proc.returncode,
            **_bounds(stats, scenario_json, drain, t0, makespan, limits),
            "phase": view.get("phase"),
            "makespan_s": makespan, "command_s": exit_s, "wall_s": wall, "moved": moved, "failed": failed,
            "max_in_flight": stats["max_in_flight_cluster"], "max_per_node": max(
                stats["max_in_flight_per_node"].values(), default=0),
            "api_per_migration": (stats["api_requests_total"] - api_before) / migrations,
            "redis_per_migration": (redis_after - redis_before) / migrations,
            "restarts": len(stats["vm_restarts"]), "remigrated": remigrated(stats),
            "failed_slot_s": failed_slot_seconds(stats, drain), "stderr": errout.decode()[-300:]}


async def run_kubectl(sc: scenarios.Scenario, *, time_scale: float, tmp: Path, fail_nodes: list[str],
                      timeout_s: float, parallel: bool | None = None, label: str = "kubectl drain") -> dict[str, Any]:
    drain = list(sc.drain_hint)
    kubeconfig = tmp / "kubectl.kubeconfig"
    rc: RunningCluster
    async with running_cluster(sc, time_scale=time_scale, token=secrets.token_hex(8),
                               kubeconfig_out=kubeconfig) as rc, rc.admin() as admin:
        await _faults(admin, fail_nodes)
        before = await admin.stats()
        api_before, t0 = before["api_requests_total"], before["sim_time_s"]
        wall0 = time.monotonic()
        wall_timeout = max(30, int(timeout_s / time_scale))
        # kubectl drains the nodes it is given one after the other: one process per node when the drain is
        # parallel, one process for all of them when it is not (a rolling drain).
        in_parallel = sc.parallel_hint > 1 if parallel is None else parallel
        groups = [[node] for node in drain] if in_parallel else [drain]
        procs = [await asyncio.create_subprocess_exec(
            KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp / f"cache-{group[0]}"), "drain",
            *group, "--ignore-daemonsets", "--delete-emptydir-data", f"--timeout={wall_timeout}s",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL) for group in groups]
        codes = [await p.wait() for p in procs]
        wall = time.monotonic() - wall0
        stats = await admin.stats()
        scenario_json = await admin.scenario()
        exit_s = stats["sim_time_s"] - t0
    makespan, moved, failed = _off_node_makespan(stats, drain, t0, movable_vms(sc))
    migrations = max(1, moved + failed)
    return {"tool": label, "exit_code": max(codes), **_bounds(stats, scenario_json, drain, t0, makespan),
            "phase": "Succeeded" if not any(codes) else "Failed",
            "makespan_s": makespan, "command_s": exit_s, "wall_s": wall, "moved": moved, "failed": failed,
            "max_in_flight": stats["max_in_flight_cluster"],
            "max_per_node": max(stats["max_in_flight_per_node"].values(), default=0),
            "api_per_migration": (stats["api_requests_total"] - api_before) / migrations,
            "redis_per_migration": 0.0, "restarts": len(stats["vm_restarts"]), "remigrated": remigrated(stats),
            "failed_slot_s": failed_slot_seconds(stats, drain), "stderr": ""}


def _bounds(stats: dict[str, Any], scenario_json: dict[str, Any], drain: list[str], t0: float,
            makespan: float | None, limits: tuple[int, int] | None = None) -> dict[str, Any]:
    """The slot-limited bounds of this run (bench.bounds: all nodes at once, and one node after the other) and
    the cluster-slot seconds it left idle, at `limits` (cluster, per node: a tuned drain's) or the scenario's."""
    cluster_limit, node_limit = limits or bounds.limits_in_force(scenario_json)
    taus = bounds.slot_taus(stats, scenario_json, drain)
    seq = sum(bounds.slot_bound([t for t in taus if t[0] == node], cluster_limit=cluster_limit,
                                node_limit=node_limit).bound_s for node in drain)
    slot = bounds.slot_bound(taus, cluster_limit=cluster_limit, node_limit=node_limit).bound_s
    idle = None if makespan is None else bounds.idle_slot_seconds(
        stats, drain, t0=t0, end=t0 + makespan, cluster_limit=cluster_limit)
    first = min((float(m["created_s"]) for m in stats["migrations"] if m["source"] in drain), default=None)
    return {"slot_bound_s": slot, "slot_bound_seq_s": seq, "idle_slot_s": idle, "stats": stats,
            "first_vmim_s": None if first is None else first - t0}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    tool: str
    """drainctl or kubectl"""
    parallel: bool
    args: tuple[str, ...] = ()


MODES = {
    "drainctl": Mode("drainctl", "drainctl", True),
    "tuned": Mode("drainctl --tune", "drainctl", True, ("--tune",)),
    "post-copy": Mode("drainctl postcopy", "drainctl", True, ("--allow-post-copy",)),
    "kubectl": Mode("kubectl drain", "kubectl", True),
    "drainctl-seq": Mode("drainctl 1 node", "drainctl", False),
    "kubectl-seq": Mode("kubectl seq", "kubectl", False),
}


async def run_mode(mode: Mode, sc: scenarios.Scenario, args: argparse.Namespace, tmp: Path,
                   fail_nodes: list[str]) -> dict[str, Any]:
    if mode.tool == "drainctl":
        result = await run_drainctl(sc, time_scale=args.time_scale, workers=args.workers, redis_db=args.redis_db,
                                    tmp=tmp, fail_nodes=fail_nodes, non_migratable=args.non_migratable,
                                    extra_env=dict(kv.split("=", 1) for kv in args.drain_env),
                                    parallel=None if mode.parallel else 1, extra_args=mode.args, label=mode.name)
    else:
        result = await run_kubectl(sc, time_scale=args.time_scale, tmp=tmp, fail_nodes=fail_nodes,
                                   timeout_s=args.kubectl_timeout, parallel=mode.parallel, label=mode.name)
    if not mode.parallel:
        result["slot_bound_s"] = result["slot_bound_seq_s"]
    return result


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


async def amain(args: argparse.Namespace) -> int:
    sc = scenarios.builtin(args.scenario, seed=args.seed)
    if args.nodes:
        sc = dataclasses.replace(sc, drain_hint=tuple(args.nodes.split(",")), parallel_hint=args.parallel)
    lb = sc.lower_bound()
    fail_nodes = [] if not args.fail_node else [pick_fail_node(sc) if args.fail_node == "auto" else args.fail_node]
    modes = [MODES[m] for m in args.modes.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="drainctl-bench-") as tmp:
        for run in range(1, args.runs + 1):
            for mode in modes:  # side by side: every mode once per run, in turn
                load = _load()
                r = await run_mode(mode, sc, args, Path(tmp), fail_nodes)
                r.update(run=run, load_before=load, load_after=_load())
                results.append(r)
                print(f"# {r['tool']} run {run}: VMs off {r['makespan_s']} s (load {load})", file=sys.stderr)
    print(f"scenario {sc.name} (seed {sc.seed}): drain {', '.join(sc.drain_hint)} "
          f"({sc.parallel_hint} in parallel), time scale {args.time_scale}"
          + (f", node {fail_nodes[0]} fails every migration it receives" if fail_nodes else ""))
    print(f"lower bound (migration-model.md 3.3): physical {lb.phys:.1f} s, pre-copy {lb.precopy:.1f} s "
          f"(busiest source {lb.busiest_source}, {lb.non_converging} VM(s) cannot converge by pre-copy)")
    print(f"{'tool':<16} {'run':>3} {'exit':>4} {'moved':>5} {'failed':>6} {'VMs off s':>9} {'/LB phys':>8} "
          f"{'slot LB':>7} {'/slot LB':>8} {'idle slot s':>11} {'max infl':>8} {'API/mig':>7} {'Redis/mig':>9} "
          f"{'moved 2x':>8} {'1st VMIM':>8} {'failed slot s':>13} {'load':>16}")
    for r in results:
        ms = r["makespan_s"]
        ratio = (ms / lb.phys) if ms and lb.phys else float("nan")
        slot_ratio = (ms / r["slot_bound_s"]) if ms and r["slot_bound_s"] else float("nan")
        idle = f"{r['idle_slot_s']:.0f}" if r["idle_slot_s"] is not None else "-"
        print(f"{r['tool']:<16} {r['run']:>3} {r['exit_code']:>4} {r['moved']:>5} {r['failed']:>6} "
              f"{(f'{ms:.1f}' if ms is not None else '-'):>9} {ratio:>8.2f} {r['slot_bound_s']:>7.1f} "
              f"{slot_ratio:>8.3f} {idle:>11} {r['max_in_flight']:>8} {r['api_per_migration']:>7.1f} "
              f"{r['redis_per_migration']:>9.1f} {r['remigrated']:>8} {r['first_vmim_s'] or 0:>8.1f} "
              f"{r['failed_slot_s']:>13.0f} {r['load_before']:>16}")
    by_tool: dict[str, list[float]] = {}
    for r in results:
        if r["makespan_s"] is not None:
            by_tool.setdefault(r["tool"], []).append(r["makespan_s"])
    kubectl = by_tool.get("kubectl drain")
    if kubectl:
        for tool, values in by_tool.items():
            print(f"{tool}: mean {statistics.mean(values):.1f} s, "
                  f"{statistics.mean(values) / statistics.mean(kubectl):.3f}x kubectl drain, "
                  f"{statistics.mean(values) / lb.phys:.2f}x physical LB")
    for r in results:
        if r["exit_code"] != 0 and r["stderr"]:
            print(f"{r['tool']} run {r['run']} stderr: {r['stderr']}")
    if args.json:
        Path(args.json).write_text(json.dumps({  # noqa: ASYNC240 - once, after every run
            "scenario": sc.name, "seed": sc.seed, "time_scale": args.time_scale, "drain": list(sc.drain_hint),
            "parallel": sc.parallel_hint, "lower_bound_phys_s": lb.phys, "lower_bound_precopy_s": lb.precopy,
            "results": results}, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="small")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-scale", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--fail-node", default=None,
                        help="a node that fails every migration it receives: a name, or 'auto' for the node "
                             "kube-scheduler prefers")
    parser.add_argument("--drain-env", action="append", default=[], metavar="DRAIN_X=VALUE",
                        help="a setting for drainctl's workers and CLI, e.g. DRAIN_COMPLETION_TIMEOUT_PER_GIB=20")
    parser.add_argument("--nodes", default=None, help="comma-separated nodes to drain instead of the scenario's")
    parser.add_argument("--parallel", type=int, default=1, help="with --nodes: nodes drained at once")
    parser.add_argument("--non-migratable", default="block", choices=("block", "skip"),
                        help="drainctl's policy for VMs that cannot move (kubectl drain has none)")
    parser.add_argument("--modes", default="drainctl,kubectl",
                        help=f"comma-separated, run side by side in each run: {', '.join(MODES)}")
    parser.add_argument("--runs", type=int, default=1, help="runs of every mode")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--kubectl-timeout", type=float, default=3600.0,
                        help="cluster seconds after which kubectl drain gives up")
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
