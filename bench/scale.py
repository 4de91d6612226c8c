"""Cost against cluster size: the same drain of 2 nodes on `small` and on `large`, side by side (figures, not checks).

For each scenario: a simulated cluster, a Redis server of the bench's own (a temporary `redis-server` on a free
port, so INFO commandstats counts drainctl alone), `drainctl worker` processes started and given time to warm
their views, then:
- plan: wall seconds of `drainctl plan NODES -o json` (a process, start-up included; the median of
  `--plan-runs`);
- first migration: wall seconds from starting `drainctl drain NODES --wait` to the first VMIM of the drain in
  the simulator's ground truth;
- API requests and Redis commands per migration over the whole drain (Redis: the sum of INFO commandstats
  calls, commands run by Lua scripts included);
- idle Redis commands per second and worker, measured before the drain;
- worker RSS after start and at its peak during the drain (VmRSS / VmHWM from /proc);
and the ratios large / small.

    python -m bench.scale [--scenarios small,large] [--time-scale 20] [--workers 3] [--idle-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from simulator import scenarios
from simulator.cluster import running_cluster

REDIS_SERVER = os.environ.get("REDIS_SERVER", shutil.which("redis-server") or "/usr/bin/redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def own_redis(tmp: Path) -> AsyncIterator[str]:
    """A redis-server of the bench's own, in `tmp`, stopped afterwards (never the shared one)."""
    port = _free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = aioredis.Redis.from_url(url)
        for _ in range(100):
            with contextlib.suppress(Exception):
                if await client.ping():
                    break
            await asyncio.sleep(0.05)
        await client.aclose()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def command_counts(redis: aioredis.Redis) -> dict[str, int]:
    """Calls per command from INFO commandstats (script-internal calls included)."""
    stats = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
            if k.startswith("cmdstat_") and isinstance(v, dict)}


async def commands(redis: aioredis.Redis) -> int:
    """Commands the server ran: the sum of INFO commandstats calls."""
    return sum((await command_counts(redis)).values())


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB; (0, 0) once it is gone."""
    rss = hwm = 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def worker_pids(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """The python processes of the workers (the `drainctl` script is the process itself)."""
    return [p.pid for p in procs]


async def run(name: str, *, nodes: int, time_scale: float, workers: int, idle_s: float, plan_runs: int,
              tmp: Path) -> dict[str, Any]:
    sc = scenarios.builtin(name)
    drain = [str(n) for n in sc.drain_hint[:nodes]]
    # A scenario with fewer drain-hint nodes (small has one): the next worker nodes by name.
    drain += [n.name for n in sorted(sc.nodes, key=lambda n: n.name)
              if not n.control_plane and n.name not in drain][:nodes - len(drain)]
    kubeconfig, admin_kubeconfig = tmp / f"{name}.kubeconfig", tmp / f"{name}-admin.kubeconfig"
    out: dict[str, Any] = {"scenario": name, "nodes": len(sc.nodes), "vms": len(sc.vms), "drain": drain}
    async with own_redis(tmp) as redis_url, running_cluster(
            sc, time_scale=time_scale, token=secrets.token_hex(8), kubeconfig_out=kubeconfig,
            admin_kubeconfig_out=admin_kubeconfig) as rc, rc.admin() as admin:
        redis = aioredis.Redis.from_url(redis_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRAIN_")}
        env.update(KUBECONFIG=str(kubeconfig), DRAIN_REDIS_URL=redis_url, DRAIN_TIME_SCALE=str(time_scale),
                   DRAIN_QUEUE_NAME="bench-scale")
        drainctl = str(Path(sys.executable).with_name("drainctl"))
        t_start = time.monotonic()
        procs = [subprocess.Popen([drainctl, "worker"], env=env, stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                                  stderr=subprocess.DEVNULL, start_new_session=True) for _ in range(workers)]
        try:
            # A worker is ready once arq writes its health check (after on_startup: the view is warm).
            while not await redis.exists("bench-scale:health-check"):
                if time.monotonic() - t_start > 600:
                    raise SystemExit(f"{name}: no worker started within 600 s")
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)
            out["worker_start_s"] = time.monotonic() - t_start
            out["rss_start_mib"] = max(rss_mib(pid)[0] for pid in worker_pids(procs))
            c0 = await commands(redis)
            await asyncio.sleep(idle_s)
            out["idle_per_worker_s"] = (await commands(redis) - c0 - 1) / idle_s / workers

            walls = []
            for _ in range(plan_runs):
                w0 = time.monotonic()
                plan = await asyncio.create_subprocess_exec(drainctl, "plan", *drain, "--max-parallel-nodes", "2",
                                                            "-o", "json", env=env, stdout=asyncio.subprocess.PIPE,
                                                            stderr=asyncio.subprocess.PIPE)
                plan_out, plan_err = await plan.communicate()
                walls.append(time.monotonic() - w0)
                if plan.returncode != 0:
                    raise SystemExit(f"{name}: drainctl plan failed ({plan.returncode}): {plan_err.decode()[-500:]}")
            out["plan_s"] = statistics.median(walls)
            to_move = sum(len(n["jobs"]) for n in json.loads(plan_out)["nodes"])

            before = await admin.stats()
            api0, counts1 = before["api_requests_total"], await command_counts(redis)
            c1 = sum(counts1.values())
            known = len(before["migrations"])
            w1 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                drainctl, "drain", *drain, "--max-parallel-nodes", "2", "--wait", "-o", "json", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            waiter = asyncio.create_task(proc.communicate())
            first = None
            peak = 0.0
            while not waiter.done():
                if first is None:
                    stats = await admin.stats()
                    if len(stats["migrations"]) > known:
                        first = time.monotonic() - w1
                peak = max([peak, *(rss_mib(pid)[1] for pid in worker_pids(procs))])
                await asyncio.sleep(0.05 if first is None else 0.5)
            drain_out, drain_err = await waiter
            out["drain_s"] = time.monotonic() - w1
            out["first_migration_s"] = first
            stats = await admin.stats()
            mine = [m for m in stats["migrations"][known:] if m["source"] in drain]
            migrations = max(1, len(mine))
            out["migrations"] = len(mine)
            out["to_move"] = to_move
            out["exit"] = proc.returncode
            out["api_per_migration"] = (stats["api_requests_total"] - api0) / migrations
            counts2 = await command_counts(redis)
            out["redis_per_migration"] = (sum(counts2.values()) - c1) / migrations
            delta = {k: (n - counts1.get(k, 0)) / migrations for k, n in counts2.items()}
            top = sorted(((k, round(v, 1)) for k, v in delta.items() if v), key=lambda kv: -kv[1])
            out["redis_top"] = dict(top[:10])
            out["rss_peak_mib"] = max([peak, *(rss_mib(pid)[1] for pid in worker_pids(procs))])
            if proc.returncode != 0:
                out["error"] = (drain_out.decode()[-300:] + drain_err.decode()[-300:]).strip()
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
            await redis.aclose()
    return out


ROWS: list[tuple[str, Callable[[dict[str, Any]], str], str | None]] = [
    ("cluster (nodes / VMs)", lambda r: f"{r['nodes']} / {r['vms']}", None),
    ("worker start + warm view, s", lambda r: f"{r['worker_start_s']:.1f}", "worker_start_s"),
    ("drainctl plan, wall s (median)", lambda r: f"{r['plan_s']:.2f}", "plan_s"),
    ("first migration after drain, wall s",
     lambda r: "-" if r["first_migration_s"] is None else f"{r['first_migration_s']:.2f}", "first_migration_s"),
    ("migrations (exit code)", lambda r: f"{r['migrations']} ({r['exit']})", None),
    ("API requests / migration", lambda r: f"{r['api_per_migration']:.1f}", "api_per_migration"),
    ("Redis commands / migration", lambda r: f"{r['redis_per_migration']:.1f}", "redis_per_migration"),
    ("idle Redis commands / s / worker", lambda r: f"{r['idle_per_worker_s']:.2f}", "idle_per_worker_s"),
    ("worker RSS after start, MiB", lambda r: f"{r['rss_start_mib']:.0f}", "rss_start_mib"),
    ("worker RSS peak, MiB", lambda r: f"{r['rss_peak_mib']:.0f}", "rss_peak_mib"),
]


def report(results: list[dict[str, Any]]) -> None:
    names = [r["scenario"] for r in results]
    ratio = len(results) == 2
    print(f"{'':<38}" + "".join(f"{n:>14}" for n in names) + (f"{'ratio':>10}" if ratio else ""))
    for label, fmt, key in ROWS:
        line = f"{label:<38}" + "".join(f"{fmt(r):>14}" for r in results)
        if ratio and key is not None and results[0].get(key) and results[1].get(key) is not None:
            line += f"{results[1][key] / results[0][key]:>9.2f}x"
        print(line)
    for r in results:
        top = ", ".join(f"{k} {v}" for k, v in r.get("redis_top", {}).items())
        print(f"{r['scenario']}: Redis commands per migration by command: {top}")
    for r in results:
        if "error" in r:
            print(f"{r['scenario']}: drain exited {r['exit']}: {r['error']}")


async def amain(args: argparse.Namespace) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="drainctl-bench-scale-") as tmp:
        for name in args.scenarios.split(","):
            results.append(await run(name, nodes=args.nodes, time_scale=args.time_scale, workers=args.workers,
                                     idle_s=args.idle_s, plan_runs=args.plan_runs, tmp=Path(tmp)))
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"drain of {args.nodes} nodes (2 in parallel), {args.workers} workers, time scale {args.time_scale}")
    report(results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="small,large")
    parser.add_argument("--nodes", type=int, default=2, help="drain-hint nodes to drain")
    parser.add_argument("--time-scale", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds of idle workers measured")
    parser.add_argument("--plan-runs", type=int, default=3, help="drainctl plan runs (the median is printed)")
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
