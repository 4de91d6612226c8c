"""The command line on the paths that need no cluster: status and list read Redis only; bad input exits 2."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from orchestrator.model import DrainPhase, NodePhase, VmPhase
from orchestrator.records import DrainRecord, NodeRecord, VmRecord
from orchestrator.store import DrainStore
from tests.redis_db import claimed_db

DRAINCTL = str(Path(sys.executable).with_name("drainctl"))


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DRAINCTL, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


async def test_status_and_list_read_redis_without_a_cluster(tmp_path: Path) -> None:
    async with claimed_db() as url:
        redis = Redis.from_url(url)
        store = DrainStore(redis)
        await store.create(DrainRecord(id="abc123", phase=DrainPhase.SUCCEEDED, message="nodes: 1 Drained",
                                       created_at=1.0, request={"nodes": ["worker-01"]}),
                           nodes={"worker-01": NodeRecord(node="worker-01", phase=NodePhase.DRAINED, index=0)},
                           vms={"ns/vm": VmRecord(vmi="ns/vm", node="worker-01", phase=VmPhase.SUCCEEDED,
                                                  attempt=1)})
        await redis.aclose()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRAIN_") and k != "KUBECONFIG"}
        env.update(HOME=str(tmp_path), DRAIN_REDIS_URL=url)
        listed = await asyncio.to_thread(run, "list", "-o", "json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [d["id"] for d in json.loads(listed.stdout)] == ["abc123"]
        status = await asyncio.to_thread(run, "status", "abc123", "-o", "json", env=env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["vms"]["ns/vm"]["phase"] == "Succeeded"
        missing = await asyncio.to_thread(run, "status", "nope", env=env)
        assert missing.returncode == 2 and "not found" in missing.stderr
        # Planning does need the cluster: without a kubeconfig it says so and exits 5.
        plan = await asyncio.to_thread(run, "plan", "worker-01", env=env)
        assert plan.returncode == 5 and "kubeconfig" in plan.stderr


def test_bad_settings_name_the_variable(tmp_path: Path) -> None:
    env = dict(os.environ, HOME=str(tmp_path), DRAIN_TIME_SCALE="fast")
    result = run("list", env=env)
    assert result.returncode == 2
    assert "DRAIN_TIME_SCALE" in result.stderr
