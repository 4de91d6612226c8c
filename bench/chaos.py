"""Chaos: drain 2 nodes of `enterprise` while everything that can fail does, then count what went wrong.

One drain of the scenario's first two drain-hint nodes (in parallel), on the real path: `drainctl worker`
processes, a redis-server of its own run as `k8s/redis.yaml` runs it (append-only file, fsync always), the
simulated cluster over HTTPS. While it runs:
- a worker is killed (SIGKILL) every `--kill-every` wall seconds and a fresh one started;
- Redis is killed (SIGKILL) and restarted `--redis-restarts` times, spread over the drain's progress;
- `--error-rate` of all API requests answer 500 and watches are dropped every `--drop-watches-every` seconds
  (`/sim/v1/faults`).
Then, from the simulator's ground truth (`/sim/v1/stats` with the admin kubeconfig; Redis for our own keys),
it prints: VMs drained, VMs with two migrations at once, moments over each limit (cluster, per source node,
inbound per node: the number of separate stretches of cluster time during which more migrations ran than
the limit, counted from VMIM creation to its end, the span our semaphore must cover), semaphore slots, node
locks and VMIMs left. Every figure but the first must be 0; the exit code is 1 otherwise.

    python -m bench.chaos [--runs 1] [--time-scale 20] [--workers 3] [--kill-every 4] [--redis-restarts 2]
                          [--error-rate 0.05] [--drop-watches-every 5] [--timeout 900] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from arq.connections import RedisSettings, create_pool
from redis.exceptions import RedisError

from bench.drain import movable_vms
from bench.redis_server import RedisServer
from orchestrator import keys
from orchestrator.kube import Kube, KubeError
from orchestrator.model import DrainRequest
from orchestrator.service import DrainService
from orchestrator.settings import Settings
from simulator import scenarios
from simulator.admin import SimAdmin
from simulator.cluster import running_cluster

DRAINCTL = str(Path(sys.executable).with_name("drainctl"))
FINAL_VMIM = ("Succeeded", "Failed")


@dataclass
class Figures:
    run: int
    phase: str
    vms_drained: int
    vms_to_drain: int
    vms_two_at_once: int
    over_cluster_limit: int
    over_source_limit: int
    over_inbound_limit: int
    slots_left: int
    locks_left: int
    vmims_left: int
    worker_kills: int
    redis_restarts: int
    api_faults: int
    wall_s: float
    max_in_flight: int
    max_per_source: int
    max_inbound: int
    limits: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.phase == "Succeeded" and self.vms_drained == self.vms_to_drain and not any(
            (self.vms_two_at_once, self.over_cluster_limit, self.over_source_limit, self.over_inbound_limit,
             self.slots_left, self.locks_left, self.vmims_left))


# ================================================================================================ figures
def over_limit_stretches(intervals: Iterable[tuple[float, float]], limit: int) -> tuple[int, int]:
    """(separate stretches of time with more than `limit` intervals open, highest number open at once).
    An interval ending exactly when another starts does not overlap it."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    open_now = highest = stretches = 0
    for _, delta in events:
        before = open_now
        open_now += delta
        highest = max(highest, open_now)
        if before <= limit < open_now:
            stretches += 1
    return stretches, highest


def limit_figures(migrations: list[dict[str, Any]], *, now_s: float,
                  limits: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Over-limit stretches and maxima for the cluster, every source node and every target node."""
    spans = [(m, float(m["created_s"]), float(m["finished_s"] if m["finished_s"] is not None else now_s))
             for m in migrations]
    out: dict[str, tuple[int, int]] = {"cluster": over_limit_stretches([(a, b) for _, a, b in spans],
                                                                        limits["cluster"])}
    for key, field_name, limit in (("source", "source", limits["per_node"]), ("inbound", "target", limits["inbound"])):
        by_node: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for m, a, b in spans:
            if m.get(field_name):
                by_node[m[field_name]].append((a, b))
        per = [over_limit_stretches(iv, limit) for iv in by_node.values()]
        out[key] = (sum(s for s, _ in per), max((h for _, h in per), default=0))
    return out


async def leftovers(redis: Any, admin: SimAdmin) -> tuple[int, int, int]:
    """(semaphore slots held, node locks held, our VMIMs not final) right now."""
    sem = keys.semaphore_keys("migrations")
    slots = int(await redis.zcard(sem.holders)) + len([k async for k in redis.scan_iter(match=f"{sem.tag}:lease:*")])
    locks = len([k async for k in redis.scan_iter(match=keys.node_lock_key("*"))])
    vmims = sum(1 for m in (await admin.stats())["migrations"]
                if m["labels"].get("drainctl.io/drain-id") and m["phase"] not in FINAL_VMIM)
    return slots, locks, vmims


# ==================================================================================================== run
class Workers:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0
        self.kills = 0

    def start(self) -> None:
        log = open(self.logs / f"worker-{self.started}.log", "wb")  # noqa: SIM115 - the process owns it
        self.started += 1
        self.procs.append(subprocess.Popen([DRAINCTL, "--log-level", "info", "worker"], env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def kill_one(self, rand: random.Random) -> None:
        alive = [p for p in self.procs if p.poll() is None]
        if alive:
            victim = rand.choice(alive)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
            self.kills += 1
        self.start()

    def died(self) -> int:
        """Workers that ended without being killed by us (they must ride everything out)."""
        return sum(1 for p in self.procs if p.poll() not in (None, -signal.SIGKILL))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


async def _phase(service: DrainService, drain_id: str) -> str | None:
    try:
        drain = await service.store.find(drain_id)
    except (RedisError, OSError):
        return None
    return None if drain is None else drain.phase.value


async def run_once(args: argparse.Namespace, run: int) -> Figures:
    sc = scenarios.builtin("enterprise")
    nodes = list(sc.drain_hint)[:2]
    to_drain = movable_vms(sc, nodes)
    rand = random.Random(args.seed + run)
    tmp = Path(tempfile.mkdtemp(prefix="drainctl-chaos-"))
    kubeconfig, admin_kubeconfig = tmp / "kubeconfig", tmp / "admin.kubeconfig"
    async with RedisServer(aof=True, workdir=tmp / "redis") as server, \
            running_cluster(sc, time_scale=args.time_scale, token=secrets.token_hex(8), kubeconfig_out=kubeconfig,
                            admin_kubeconfig_out=admin_kubeconfig), \
            SimAdmin.from_kubeconfig(admin_kubeconfig) as admin:
        queue = f"chaos-{secrets.token_hex(3)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRAIN_")}
        env.update(KUBECONFIG=str(kubeconfig), DRAIN_REDIS_URL=server.url, DRAIN_TIME_SCALE=str(args.time_scale),
                   DRAIN_QUEUE_NAME=queue, PYTHONUNBUFFERED="1")
        settings = Settings.from_env(env)
        workers = Workers(env, tmp)
        plain: Any = aioredis.Redis.from_url(server.url)
        pool = await create_pool(RedisSettings.from_dsn(server.url), default_queue_name=queue)
        kube = await Kube.connect(kubeconfig=kubeconfig)
        service = DrainService(redis=pool, settings=settings, kube=kube)
        try:
            for _ in range(args.workers):
                workers.start()
            await asyncio.sleep(3.0)  # workers connect and list the cluster
            record, _ = await service.submit(DrainRequest.from_json({"nodes": nodes, "max_parallel_nodes": 2}))
            started = time.monotonic()
            await admin.faults({"errors": [{"verb": "*", "resource": "*", "rate": args.error_rate, "code": 500}],
                                "drop_watches_every_s": args.drop_watches_every})
            thresholds = [to_drain * (i + 1) / (args.redis_restarts + 1) for i in range(args.redis_restarts)]
            next_kill = time.monotonic() + args.kill_every
            phase: str | None = None
            while time.monotonic() - started < args.timeout:
                phase = await _phase(service, record.id)
                if phase in ("Succeeded", "Failed", "Cancelled"):
                    break
                moved = len({m["vmi"] for m in (await admin.stats())["migrations"]
                             if m["source"] in nodes and m["phase"] == "Succeeded"})
                if thresholds and moved >= thresholds[0]:
                    thresholds.pop(0)
                    await server.restart(down_s=3.0, kill=True)
                if time.monotonic() >= next_kill:
                    workers.kill_one(rand)
                    next_kill = time.monotonic() + args.kill_every
                await asyncio.sleep(0.5)
            wall = time.monotonic() - started
            injected = int((await admin.faults()).get("injected") or 0)
            await admin.faults({"clear": True})
            # What is still held a moment after the end is what a crash left behind: give the reconciler
            # (every few seconds) one lease period to settle it, then count.
            deadline = time.monotonic() + args.settle
            while True:
                try:
                    left = await leftovers(plain, admin)
                except (RedisError, OSError):
                    left = (-1, -1, -1)
                if left == (0, 0, 0) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            drain = await service.store.find(record.id)
            limits = drain.limits if drain is not None else None
            lim = {"cluster": limits.cluster if limits else settings.limits.max_in_flight_cluster,
                   "per_node": limits.per_node if limits else settings.limits.max_in_flight_per_node,
                   "inbound": limits.inbound if limits else settings.limits.max_inbound_per_node}
            stats = await admin.stats()
            ours = [m for m in stats["migrations"] if m["labels"].get("drainctl.io/drain-id") == record.id]
            figures = limit_figures(ours, now_s=float(stats["sim_time_s"]), limits=lim)
            drained = len({m["vmi"] for m in ours if m["source"] in nodes and m["phase"] == "Succeeded"})
            if workers.died():
                print(f"run {run}: {workers.died()} worker(s) died on their own", file=sys.stderr)
            result = Figures(
                run=run, phase=phase or "unknown", vms_drained=drained, vms_to_drain=to_drain,
                vms_two_at_once=len(stats["vmis_with_concurrent_migrations"]),
                over_cluster_limit=figures["cluster"][0], over_source_limit=figures["source"][0],
                over_inbound_limit=figures["inbound"][0], slots_left=left[0], locks_left=left[1],
                vmims_left=left[2], worker_kills=workers.kills, redis_restarts=server.restarts, api_faults=injected,
                wall_s=round(wall, 1), max_in_flight=figures["cluster"][1], max_per_source=figures["source"][1],
                max_inbound=figures["inbound"][1], limits=lim)
            if result.clean and not workers.died():
                shutil.rmtree(tmp, ignore_errors=True)  # keep the worker logs and Redis files of a bad run only
            else:
                print(f"run {run}: worker logs and Redis files kept in {tmp}", file=sys.stderr)
            return result
        finally:
            workers.stop()
            await pool.aclose()
            await plain.aclose()
            with contextlib.suppress(KubeError):
                await kube.close()


COLUMNS = [("run", "run"), ("phase", "phase"), ("vms_drained", "drained"), ("vms_two_at_once", "2-at-once"),
           ("over_cluster_limit", "over-cluster"), ("over_source_limit", "over-source"),
           ("over_inbound_limit", "over-inbound"), ("slots_left", "slots-left"), ("locks_left", "locks-left"),
           ("vmims_left", "vmims-left"), ("worker_kills", "kills"), ("redis_restarts", "redis-restarts"),
           ("api_faults", "api-5xx"), ("wall_s", "wall-s")]


def table(rows: list[Figures]) -> str:
    cells = [[h for _, h in COLUMNS]]
    for r in rows:
        values = asdict(r)
        values["vms_drained"] = f"{r.vms_drained}/{r.vms_to_drain}"
        cells.append([str(values[key]) for key, _ in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


async def amain(args: argparse.Namespace) -> int:
    rows = []
    for run in range(1, args.runs + 1):
        rows.append(await run_once(args, run))
        if not args.json:
            r = rows[-1]
            print(f"run {run}: {r.phase}, limits {r.limits}, highest in flight: cluster {r.max_in_flight}, "
                  f"per source {r.max_per_source}, inbound {r.max_inbound}", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(r) | {"clean": r.clean} for r in rows], indent=2))
    else:
        print(table(rows))
        print("every figure but drained must be 0:", "yes" if all(r.clean for r in rows) else "NO")
    return 0 if all(r.clean for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--time-scale", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=4.0, help="wall seconds between worker kills")
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--error-rate", type=float, default=0.05, help="share of API requests answered 500")
    parser.add_argument("--drop-watches-every", type=float, default=5.0, help="seconds between dropped watches")
    parser.add_argument("--timeout", type=float, default=900.0, help="wall seconds one drain may take")
    parser.add_argument("--settle", type=float, default=90.0, help="wall seconds to let leases settle after")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
