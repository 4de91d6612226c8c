"""No drain and no node can get stuck: crashes and cancels at the awkward moments, on the real path.

Simulator over HTTPS, real Redis, `drainctl worker` and `drainctl drain` processes killed with SIGKILL. Each test
puts the system in the state a crash or an early cancel leaves, then asserts that the drain reaches an end by
itself (the simulator's ground truth and the cluster's objects say what happened), that node locks are free
again and that a later drain of the same node is accepted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix

from orchestrator import keys
from orchestrator.model import DrainRequest
from simulator.resources import NODES, PDBS, PODS
from tests.integration.conftest import DRAINCTL, Env, EnvFactory, requires_redis
from tests.integration.test_drain import assert_limits, semaphore_empty, vmis_on

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(400)]


async def eventually(check: Callable[[], Awaitable[bool]], *, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def in_progress(env: Env, job_id: str) -> bool:
    return bool(await env.redis.exists(in_progress_key_prefix + job_id))


async def phase(env: Env, drain_id: str) -> str:
    return (await (await env.service()).get(drain_id)).drain.phase.value


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def spawn(env: Env, *args: str) -> subprocess.Popen[bytes]:
    """Start `drainctl ARGS` in its own process group (so it can be killed like a crashed hook)."""
    return subprocess.Popen([DRAINCTL, *args], env=env.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


async def ours(env: Env, drain_id: str) -> list[dict[str, Any]]:
    return [m for m in (await env.stats())["migrations"] if m["labels"].get("drainctl.io/drain-id") == drain_id]


def node_obj(env: Env, node: str) -> dict[str, Any]:
    obj = env.cluster.store.get(NODES, None, node)
    assert obj is not None
    return dict(obj)


def guarded_pod(env: Env, node: str) -> None:
    """A plain pod on `node` whose PodDisruptionBudget refuses every eviction: the finish job keeps trying."""
    ns = "default"
    env.cluster.store.create(PODS, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "guarded", "namespace": ns, "labels": {"app": "guarded"}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "registry.example/app:1",
                                                   "resources": {"requests": {"memory": "64Mi"}}}]},
        "status": {"phase": "Running", "podIP": "10.200.0.9"},
    })
    env.cluster.store.create(PDBS, {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "guarded", "namespace": ns},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
    })


# ---------------------------------------------------------------------------------- defect 1: kill -9 in a job
async def test_worker_killed_in_plan_job_does_not_stall_the_drain(cluster_env: EnvFactory) -> None:
    async with cluster_env("small") as env:
        node = env.cluster.scenario.drain_hint[0]
        service = await env.service()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node]}))
        drain_id = record.id
        # Every API call takes 1.5 s: the plan job's snapshot is slow enough to be killed in the middle of it.
        await env.faults({"latency_ms": 1500})
        victim = env.start_workers(1)[0]
        await eventually(lambda: in_progress(env, keys.plan_job_id(drain_id)), within_s=120, what="the plan job")
        await eventually(lambda: _is(phase(env, drain_id), "Planning"), within_s=30, what="planning")
        await asyncio.to_thread(kill, victim)
        assert await phase(env, drain_id) == "Planning", "the plan job ended before the kill: proves nothing"
        await env.faults({"clear": True})
        env.start_workers(1)
        view = await service.wait(drain_id, timeout_s=240)
        assert view.drain.phase.value == "Succeeded", (view.drain, env.worker_logs())
        assert vmis_on(env, node) == []
        assert_limits(await env.stats())
        assert await semaphore_empty(env) == {}


async def test_worker_killed_in_finish_job_does_not_stall_the_drain(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=1) as env:
        node = env.cluster.scenario.drain_hint[0]
        victim = env.workers[0]
        guarded_pod(env, node)
        service = await env.service()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node]}))
        drain_id = record.id
        finish = keys.finish_job_id(drain_id, node)
        await eventually(lambda: in_progress(env, finish), within_s=200, what="the finish job")

        async def evicting() -> bool:
            return (await service.get(drain_id)).nodes[node].phase.value == "Evicting"

        await eventually(evicting, within_s=30, what="the finish job evicting")
        await asyncio.to_thread(kill, victim)
        assert (await service.get(drain_id)).nodes[node].phase.value == "Evicting"
        # The budget is lifted: the eviction the killed job kept retrying can now go through.
        env.cluster.store.delete(PDBS, "default", "guarded")
        env.start_workers(1)
        view = await service.wait(drain_id, timeout_s=240)
        assert view.drain.phase.value == "Succeeded", (view.drain, view.nodes, env.worker_logs())
        assert env.cluster.store.get(PODS, "default", "guarded") is None
        assert vmis_on(env, node) == []
        assert "drainctl.io/drained-at" in node_obj(env, node)["metadata"]["annotations"]
        assert await semaphore_empty(env) == {}


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


# --------------------------------------------------------------------------- defect 2: cancel before planning
async def test_cancel_before_any_worker_runs_ends_cancelled(cluster_env: EnvFactory) -> None:
    async with cluster_env("small") as env:
        node = env.cluster.scenario.drain_hint[0]
        submitted = await env.adrainctl("drain", node, "-o", "json")
        assert submitted.returncode == 0, submitted.stderr
        drain_id = json.loads(submitted.stdout)["id"]
        cancelled = await env.adrainctl("cancel", drain_id, "-o", "json")
        assert cancelled.returncode == 0, cancelled.stderr
        # Workers come up afterwards (scaled from zero).
        env.start_workers(1)
        view = await (await env.service()).wait(drain_id, timeout_s=120)
        assert view.drain.phase.value == "Cancelled", (view.drain, env.worker_logs())
        assert await ours(env, drain_id) == []
        obj = node_obj(env, node)
        assert not obj["spec"].get("unschedulable"), "the node was cordoned although nothing was planned"
        assert "drainctl.io/drain-id" not in (obj["metadata"].get("annotations") or {})
        assert await env.redis.get(keys.node_lock_key(node)) is None
        again = await env.adrainctl("drain", node, "-o", "json")
        assert again.returncode == 0, again.stdout + again.stderr


async def test_cancel_while_planning_ends_cancelled(cluster_env: EnvFactory) -> None:
    async with cluster_env("small") as env:
        node = env.cluster.scenario.drain_hint[0]
        service = await env.service()
        record, _ = await service.submit(DrainRequest.from_json({"nodes": [node]}))
        drain_id = record.id
        await env.faults({"latency_ms": 1000})
        env.start_workers(1)
        await eventually(lambda: _is(phase(env, drain_id), "Planning"), within_s=120, what="planning")
        await service.cancel(drain_id)
        await env.faults({"clear": True})
        view = await service.wait(drain_id, timeout_s=120)
        assert view.drain.phase.value == "Cancelled", (view.drain, env.worker_logs())
        assert await ours(env, drain_id) == [], "migrations started after the cancel"
        assert len(vmis_on(env, node)) == 15
        assert not node_obj(env, node)["spec"].get("unschedulable")
        assert await env.redis.get(keys.node_lock_key(node)) is None
        assert all(n.phase.value == "Cancelled" for n in view.nodes.values()), view.nodes


# ------------------------------------------------------------------- defect 5: a submitter that dies half-way
async def test_submitter_killed_while_planning_leaks_nothing(cluster_env: EnvFactory) -> None:
    async with cluster_env("small") as env:
        node = env.cluster.scenario.drain_hint[0]
        key = "upgrade-" + node
        await env.faults({"latency_ms": 2000})
        lists_before = sum((await env.stats())["api_requests"].get("list", {}).values())
        proc = spawn(env, "drain", node, "--idempotency-key", key, "-o", "json")

        async def planning() -> bool:
            return bool(sum((await env.stats())["api_requests"].get("list", {}).values()) > lists_before)

        await eventually(planning, within_s=60, what="the CLI reading its snapshot")
        await asyncio.to_thread(kill, proc)
        await env.faults({"clear": True})
        # The hook retries at once, with the same key; then again after the drain was created.
        retried = await env.adrainctl("drain", node, "--idempotency-key", key, "-o", "json", timeout_s=60)
        assert retried.returncode == 0, retried.stdout + retried.stderr
        first = json.loads(retried.stdout)
        assert first["created"] is True
        again = await env.adrainctl("drain", node, "--idempotency-key", key, "-o", "json", timeout_s=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert json.loads(again.stdout) == {**first, "created": False}
        env.start_workers(1)
        view = await (await env.service()).wait(first["id"], timeout_s=240)
        assert view.drain.phase.value == "Succeeded", (view.drain, env.worker_logs())
        assert await env.redis.get(keys.node_lock_key(node)) is None


@pytest.mark.parametrize("owner", ["missing", "finished"])
async def test_node_lock_left_by_a_dead_submitter_is_taken_over(cluster_env: EnvFactory, owner: str) -> None:
    """A lock naming a drain that does not exist (its submitter died before writing it) or that is over (it
    died between closing the drain and freeing its nodes) does not refuse the node."""
    async with cluster_env("small", workers=1) as env:
        node = env.cluster.scenario.drain_hint[0]
        other = next(n.name for n in env.cluster.scenario.nodes if n.name != node and not n.control_plane)
        service = await env.service()
        stale = "0dead0beef00"
        if owner == "finished":
            done, _ = await service.submit(DrainRequest.from_json({"nodes": [other]}))
            stale = done.id
            await eventually(lambda: _is(phase(env, stale), "Running"), within_s=120, what="the first drain")
            await service.cancel(stale)
            assert (await service.wait(stale, timeout_s=120)).drain.phase.value == "Cancelled"
        await env.redis.set(keys.node_lock_key(node), stale)
        result = await env.adrainctl("drain", node, "--wait", "-o", "json", timeout_s=280)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert json.loads(result.stdout)["phase"] == "Succeeded"
        assert vmis_on(env, node) == []
        assert await env.redis.get(keys.node_lock_key(node)) is None


async def test_live_node_lock_still_refuses(cluster_env: EnvFactory) -> None:
    async with cluster_env("small") as env:
        node = env.cluster.scenario.drain_hint[0]
        first = await env.adrainctl("drain", node, "-o", "json")
        assert first.returncode == 0, first.stderr
        second = await env.adrainctl("drain", node, "-o", "json")
        assert second.returncode == 4, second.stdout + second.stderr
        assert json.loads(first.stdout)["id"] in second.stderr
