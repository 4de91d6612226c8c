"""`drainctl rollout --wait` on the real path: each node drained in turn, its maintenance step run once while
the node is cordoned and empty, then uncordoned; VMs sent to nodes already maintained or outside the rollout,
never to one still waiting; each VM moved once. Assertions read the simulator's store and ground truth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from simulator import scenarios
from simulator.resources import NODES, VMIS
from tests.integration.conftest import Env, EnvFactory, requires_redis

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(400)]

ROLLOUT = ["worker-02", "worker-03", "worker-04"]


def vmis_on(env: Env, node: str) -> list[str]:
    return sorted(f"{o['metadata']['namespace']}/{o['metadata']['name']}"
                  for o in env.cluster.store.on_node(VMIS, node))


def cordoned(env: Env, node: str) -> bool:
    obj = env.cluster.store.get(NODES, None, node)
    return bool(((obj or {}).get("spec") or {}).get("unschedulable"))


def step_command(tmp: Path, *, fail_on: str | None = None) -> str:
    """Append DRAIN_NODE to steps.log, then wait until the test releases the node (a file named after it)."""
    steps, gate = shlex.quote(str(tmp / "steps.log")), shlex.quote(str(tmp))
    fail = f'[ "$DRAIN_NODE" = {fail_on} ] && exit 7; ' if fail_on else ""
    return (f'echo "$DRAIN_NODE" >> {steps}; {fail}'
            f'while [ ! -e {gate}/go-"$DRAIN_NODE" ]; do sleep 0.05; done')


async def referee(env: Env, tmp: Path, seen: dict[str, dict[str, Any]], *, hold_s: float = 1.0) -> None:
    """Watch the steps as they start: record the node's state at that moment, hold it a little (so the next
    drain overlaps the maintenance), then release it."""
    log = tmp / "steps.log"
    while True:
        lines = log.read_text().split() if log.exists() else []
        for node in lines:
            if node in seen:
                if seen[node]["count"] != lines.count(node):
                    seen[node]["count"] = lines.count(node)
                continue
            seen[node] = {"count": 1, "cordoned": cordoned(env, node), "vmis": vmis_on(env, node),
                          "held_with": [n for n, s in seen.items() if not s.get("released")]}
            await asyncio.sleep(hold_s)
            seen[node]["released"] = True
            (tmp / f"go-{node}").touch()
        await asyncio.sleep(0.05)


async def test_rollout_moves_each_vm_once_and_maintains_each_node(cluster_env: EnvFactory, tmp_path: Path) -> None:
    async with cluster_env("small", workers=2) as env:
        before = {n: vmis_on(env, n) for n in ROLLOUT}
        assert all(before.values())
        seen: dict[str, dict[str, Any]] = {}
        watcher = asyncio.create_task(referee(env, tmp_path, seen))
        try:
            result = await env.adrainctl("rollout", *ROLLOUT, "--max-unavailable", "1", "--step-command",
                                         step_command(tmp_path), "--wait", "-o", "json", timeout_s=360)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:] + env.worker_logs()
        report = json.loads(result.stdout)
        assert [n["node"] for n in report["nodes"]] == ROLLOUT and all(n["done"] for n in report["nodes"]), report

        # Each node's step ran once, in order, with the node cordoned and empty, one node maintained at a time.
        assert list(seen) == ROLLOUT, seen
        for node in ROLLOUT:
            assert seen[node]["count"] == 1, (node, seen)
            assert seen[node]["cordoned"] and seen[node]["vmis"] == [], (node, seen[node])
            assert seen[node]["held_with"] == [], (node, seen)
        # ... and every node was uncordoned.
        assert not any(cordoned(env, n) for n in ROLLOUT)

        stats = await env.stats()
        done = [m for m in stats["migrations"] if m["phase"] == "Succeeded"]
        assert not [m for m in stats["migrations"] if m["phase"] == "Failed"]
        moved: dict[str, list[dict[str, Any]]] = {}
        for m in done:
            moved.setdefault(m["vmi"], []).append(m)
        # Every VM that started on a rollout node left it, and moved exactly once: 1.00 migrations per VM.
        started = {v for vms in before.values() for v in vms}
        assert set(moved) == started, (sorted(set(moved) ^ started))
        assert all(len(ms) == 1 for ms in moved.values()), {v: len(ms) for v, ms in moved.items() if len(ms) > 1}
        # Never to a node still waiting for maintenance (the others had room throughout).
        for m in done:
            i = ROLLOUT.index(m["source"])
            assert m["target"] not in ROLLOUT[i + 1:], m


async def test_rollout_stops_at_a_failed_step(cluster_env: EnvFactory, tmp_path: Path) -> None:
    async with cluster_env("small", workers=2) as env:
        nodes = ROLLOUT[:2]
        seen: dict[str, dict[str, Any]] = {}
        watcher = asyncio.create_task(referee(env, tmp_path, seen, hold_s=0.2))
        try:
            result = await env.adrainctl("rollout", *nodes, "--step-command",
                                         step_command(tmp_path, fail_on=nodes[0]), "--wait", "-o", "json",
                                         timeout_s=360)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
        report = {n["node"]: n for n in json.loads(result.stdout)["nodes"]}
        assert report[nodes[0]]["step_exit"] == 7 and not report[nodes[0]]["done"], report
        assert not report[nodes[1]]["done"], report
        assert list(seen) == [nodes[0]], seen  # the second node's step never ran
        # The failed node stays cordoned; the second, if drained meanwhile, too: nothing unmaintained is uncordoned.
        assert cordoned(env, nodes[0]) and vmis_on(env, nodes[0]) == []
        assert cordoned(env, nodes[1]) == bool(report[nodes[1]]["drain_id"]), report


async def test_rollout_arguments_are_checked(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=0) as env:
        for args, needle in [((*ROLLOUT[:1], "--step-command", "true"), "--wait"),
                             ((*ROLLOUT[:1], "--step-command", "true", "--max-unavailable", "0", "--wait"),
                              "--max-unavailable"),
                             ((ROLLOUT[0], ROLLOUT[0], "--step-command", "true", "--wait"), "more than once"),
                             ((*ROLLOUT[:1], "--step-command", " ", "--wait"), "--step-command")]:
            result = await env.adrainctl("rollout", *args)
            assert result.returncode == 2 and needle in result.stderr, (args, result.stderr)


EVERY_WORKER_SCENARIO = """\
name: every-worker
seed: 4
nodes:
  - name: master-0
    memory: 16Gi
    cpus: 4
    nic: 10Gbit
    cpu_model: Skylake-Server-IBRS
    control_plane: true
  - name: "worker-{i}"
    count: 3
    memory: 64Gi
    cpus: 16
    nic: 25Gbit
    cpu_model: Skylake-Server-IBRS
vms:
  - {name: a-1, namespace: apps, node: worker-1, memory: 2Gi}
  - {name: a-2, namespace: apps, node: worker-1, memory: 2Gi}
  - {name: b-1, namespace: apps, node: worker-2, memory: 2Gi}
  - {name: b-2, namespace: apps, node: worker-2, memory: 2Gi}
  - {name: c-1, namespace: apps, node: worker-3, memory: 2Gi}
"""


@pytest.mark.parametrize("overlap", [False, True], ids=["wait-for-room", "overlap"])
async def test_rollout_of_every_worker_moves_twice_only_what_must(cluster_env: EnvFactory, tmp_path: Path,
                                                                 overlap: bool) -> None:
    """Every worker is in the rollout, so the first node's VMs can only go to nodes maintained later and move
    twice. The second node is drained during the first one's maintenance only with --overlap; by default it
    waits for that step to end and its VMs go to the maintained node, moving once."""
    path = tmp_path / "every-worker.yaml"
    path.write_text(EVERY_WORKER_SCENARIO)
    nodes = ["worker-1", "worker-2", "worker-3"]
    async with cluster_env(scenarios.load_yaml(path), workers=2) as env:
        before = {n: vmis_on(env, n) for n in nodes}
        seen: dict[str, dict[str, Any]] = {}
        watcher = asyncio.create_task(referee(env, tmp_path, seen, hold_s=5.0))
        try:
            result = await env.adrainctl("rollout", *nodes, "--max-unavailable", "1", "--step-command",
                                         step_command(tmp_path), "--wait", "-o", "json",
                                         *(["--overlap"] if overlap else []), timeout_s=300)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:] + env.worker_logs()
        assert all(n["done"] for n in json.loads(result.stdout)["nodes"])
        stats = await env.stats()
        assert not [m for m in stats["migrations"] if m["phase"] == "Failed"]
        moves = Counter(m["vmi"] for m in stats["migrations"] if m["phase"] == "Succeeded")
        assert set(moves) == {v for vms in before.values() for v in vms}
        twice = {v for v, n in moves.items() if n > 1}
        if overlap:
            assert twice == set(before["worker-1"]) | set(before["worker-2"]), moves
        else:
            assert twice == set(before["worker-1"]), moves
            assert "worker-2: waiting for a maintenance step to end" in result.stderr, result.stderr[-2000:]
