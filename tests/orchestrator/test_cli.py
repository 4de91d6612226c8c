"""The command line as an operator meets it: the installed `drainctl` (and `kubectl drainctl`) run as a
subprocess against the simulated cluster over HTTPS and a real Redis. Every test checks the exit code, the
one-line error on stderr and that no traceback leaks out; drains are checked in the cluster, not in our logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from orchestrator import keys
from orchestrator.model import DrainPhase, NodePhase, VmPhase
from orchestrator.records import DrainRecord, NodeRecord, VmRecord
from orchestrator.store import DrainStore
from simulator import scenarios
from simulator.cluster import RunningCluster, running_cluster
from simulator.faults import ErrorRule, FaultsBody
from simulator.resources import EVENTS, VMIS
from tests.integration.conftest import EnvFactory, cluster_env
from tests.redis_db import claimed_db, own_redis_server, requires_redis

__all__ = ["cluster_env"]  # the fixture, imported for these tests

BIN = Path(sys.executable).parent
DRAINCTL = str(BIN / "drainctl")
KUBECTL = shutil.which("kubectl")

pytestmark = [requires_redis, pytest.mark.timeout(240)]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAIN_") and k != "KUBECONFIG"}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1", **extra)
    return env


def run(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DRAINCTL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


async def arun(*args: str, env: dict[str, str], wall_s: float = 90) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, *args, env=env, timeout=wall_s)


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command failed with `code` and one plain line (no traceback) holding every needle."""
    assert done.returncode == code, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


async def drain_ids(url: str) -> list[str]:
    redis = Redis.from_url(url)
    try:
        return await DrainStore(redis).ids(limit=100)
    finally:
        await redis.aclose()


def vmis_on(cluster: Any, node: str) -> list[str]:
    """The VMIs the cluster runs on `node` now (the simulator's own objects)."""
    return [f"{v['metadata']['namespace']}/{v['metadata']['name']}" for v in cluster.store.on_node(VMIS, node)]


# ============================================================================================ no cluster
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
        env = clean_env(tmp_path, DRAIN_REDIS_URL=url)
        listed = await arun("list", "-o", "json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [d["id"] for d in json.loads(listed.stdout)] == ["abc123"]
        status = await arun("status", "abc123", "-o", "json", env=env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["vms"]["ns/vm"]["phase"] == "Succeeded"
        one_line_error(await arun("status", "nope", env=env), 2, "not found")
        # Planning does need the cluster: without a kubeconfig it says so and exits 5.
        one_line_error(await arun("plan", "worker-01", env=env), 5, "kubeconfig")


def test_bad_settings_name_the_variable(tmp_path: Path) -> None:
    one_line_error(run("list", env=clean_env(tmp_path, DRAIN_TIME_SCALE="fast")), 2, "DRAIN_TIME_SCALE")


async def test_global_flags_work_after_the_subcommand(tmp_path: Path) -> None:
    """kubectl habits: --redis-url, -o, --log-level and --time-scale after the subcommand (and before)."""
    async with claimed_db() as url:
        redis = Redis.from_url(url)
        await DrainStore(redis).create(DrainRecord(id="flags1", phase=DrainPhase.SUCCEEDED, created_at=1.0,
                                                   request={"nodes": ["worker-01"]}), nodes={}, vms={})
        await redis.aclose()
        env = clean_env(tmp_path)
        for args in (("list", "--redis-url", url, "-o", "json"), ("--redis-url", url, "list", "--output=json"),
                     ("list", f"--redis-url={url}", "--log-level", "info", "--time-scale", "20", "-o", "json"),
                     ("status", "flags1", "-o", "json", "--redis-url", url)):
            done = await arun(*args, env=env)
            assert done.returncode == 0, (args, done.stderr)
            body = json.loads(done.stdout)
            assert (body[0]["id"] if isinstance(body, list) else body["id"]) == "flags1"
        one_line_error(await arun("list", "--log-level", "loud", "--redis-url", url, env=env), 2, "--log-level")


def test_set_up_mistakes_are_one_line_with_the_documented_code(tmp_path: Path) -> None:
    env = clean_env(tmp_path, DRAIN_REDIS_URL="redis://127.0.0.1:1/0")
    missing = str(tmp_path / "no-such-kubeconfig")
    one_line_error(run("plan", "worker-01", "--kubeconfig", missing, env=env), 2, missing, "no such file")
    one_line_error(run("worker", "--kubeconfig", missing, env=env), 2, "no such file")
    one_line_error(run("worker", env=env), 5, "kubeconfig")  # none at all: nothing to reach
    (tmp_path / "broken").write_text("not: a kubeconfig\n")
    one_line_error(run("plan", "worker-01", "--kubeconfig", str(tmp_path / "broken"), env=env), 2, "broken")
    # A wrong Redis: one line, no arq retry warnings before it (arq logs "..., 5 retries remaining..." per try).
    wrong = run("list", env=env)
    one_line_error(wrong, 5, "cannot reach Redis at redis://127.0.0.1:1/0")
    assert "retries remaining" not in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    # Values the HTTP API refuses are refused here too, before anything is read or written (exit 2, not 3).
    for args, needle in ((("--max-attempts", "1000"), "--max-attempts"), (("--max-parallel-nodes", "0"),
                                                                          "--max-parallel-nodes"),
                         (("--wait", "--timeout", "-1"), "--timeout"), (("--timeout", "5"), "--wait"),
                         (("--order", "sideways"), "--order"),
                         (("--escalation", "solo,warp"), "--escalation: unknown rung(s) 'warp'"),
                         (("--escalation", "none,solo"), "--escalation: 'none' cannot be combined")):
        one_line_error(run("drain", "worker-01", *args, env=env), 2, needle)
    one_line_error(run("plan", "worker-01", "--escalation", "", env=env), 2, "--escalation: empty")
    one_line_error(run("drain", "worker-01", "worker-02", "worker-01", env=env), 2, "more than once: worker-01")


async def test_plan_against_an_api_server_that_is_down_names_it_and_the_fix(tmp_path: Path) -> None:
    """The kubeconfig's server refuses connections (a port bound, nothing listening): exit 5 at once, one line
    with the server, the cause and what to check; no retry notes, no traceback."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # held, never listened on: connections are refused
        server = f"https://127.0.0.1:{bound.getsockname()[1]}"
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "down",
            "clusters": [{"name": "down", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "u", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "down", "context": {"cluster": "down", "user": "u"}}]}))
        async with claimed_db() as url:
            done = await arun("plan", "worker-01", "--kubeconfig", str(kubeconfig),
                              env=clean_env(tmp_path, DRAIN_REDIS_URL=url))
    one_line_error(done, 5, f"cannot reach the cluster at {server}", "Cannot connect", "is the API server up?",
                   "--kubeconfig")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_busy_port_for_sim_serve_and_api(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = clean_env(tmp_path, DRAIN_API_TOKEN="t0ken")
        one_line_error(run("sim", "serve", "--port", port, env=env), 2, f"{port}", "in use", "--port")
        one_line_error(run("api", "--port", port, env=env), 2, "in use", "--port")


def test_kubectl_drainctl_plugin_is_installed() -> None:
    assert (BIN / "kubectl-drainctl").exists()


# ======================================================================================== with a cluster
@contextlib.contextmanager
def popen(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([DRAINCTL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def read_until(stream: Any, pattern: str, *, timeout_s: float = 60) -> re.Match[str]:
    """Read lines from a pipe (in a thread) until one matches."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(asyncio.to_thread(stream.readline), deadline - time.monotonic())
        if not line:
            break
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"{pattern!r} not seen in {''.join(seen)[-2000:]}")


async def test_plan_and_drain_with_flags_after_and_an_api_error_on_the_way(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=0) as e:
        env = {k: v for k, v in e.env.items() if k != "KUBECONFIG"}
        kubeconfig = str(e.kubeconfig)
        # One 500 on the node list: plan retries instead of failing.
        e.cluster.apply_faults(FaultsBody(errors=[ErrorRule(verb="list", resource="nodes", code=500, count=1)]))
        planned = await arun("plan", "worker-01", "--kubeconfig", kubeconfig, "-o", "json", env=env)
        assert planned.returncode == 0, planned.stderr
        assert "retrying" in planned.stderr and e.cluster.faults.injected == 1
        assert json.loads(planned.stdout)["drain_nodes"] == ["worker-01"]
        on_node = vmis_on(e.cluster, "worker-01")
        assert on_node
        e.start_workers(2)
        submitted_cluster_s = e.cluster.clock.now()
        drained = await arun("drain", "worker-01", "--wait", "--timeout", "180", "--kubeconfig", kubeconfig, env=env,
                             wall_s=200)
        assert drained.returncode == 0, drained.stdout[-3000:] + drained.stderr[-3000:]
        assert "Traceback" not in drained.stderr
        assert vmis_on(e.cluster, "worker-01") == []
        # Off a terminal the summary prints whole names: every VM of the node, unabridged.
        for vmi in on_node:
            assert vmi in drained.stdout
        assert "…" not in drained.stdout
        assert re.search(r"drain [0-9a-f]{12}: Running draining worker-01", drained.stdout)  # not "queued"
        # Events drainctl wrote carry the cluster's clock (40x ahead here), as KubeVirt's own do.
        ours = [ev for ev in e.cluster.store.iter(EVENTS) if (ev.get("source") or {}).get("component") == "drainctl"]
        assert {ev["reason"] for ev in ours} >= {"DrainStarted", "NodeDrained", "DrainMigrationSucceeded"}
        for ev in ours:
            stamp = datetime.fromisoformat(ev["lastTimestamp"].replace("Z", "+00:00")).timestamp()
            assert submitted_cluster_s - 5 <= stamp <= e.cluster.clock.now() + 5, (ev["reason"], stamp)


async def test_wait_without_a_worker_says_so_and_keeps_the_summary_true(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=0) as e:
        done = await arun("drain", "worker-01", "--wait", "--timeout", "8", env=e.env)
        assert done.returncode == 6, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        drain_id = re.search(r"drain ([0-9a-f]{12})", done.stdout).group(1)  # type: ignore[union-attr]
        assert f"no worker is running on queue {e.env['DRAIN_QUEUE_NAME']}" in done.stderr
        assert "drainctl worker" in done.stderr
        assert f"timed out after 8 s: drain {drain_id} is still Pending and goes on in the workers" in done.stderr
        assert f"drainctl status {drain_id} --wait" in done.stderr and f"drainctl cancel {drain_id}" in done.stderr
        assert "x the estimate" not in done.stdout and "took" not in done.stdout
        assert "nodes drained: 0/1; not started" in done.stdout
        # A worker that comes later picks it up, and `status --wait` follows it to the end.
        e.start_workers(1)
        followed = await arun("status", drain_id, "--wait", "--timeout", "180", env=e.env, wall_s=200)
        assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
        assert vmis_on(e.cluster, "worker-01") == []
        # The worker said where it works, whatever the log level.
        log = (e.tmp / "worker-0.log").read_text(errors="replace")
        assert f"drainctl worker: cluster {e.rc.url}" in log
        assert f"queue {e.env['DRAIN_QUEUE_NAME']}, time scale 40" in log


async def test_worker_at_the_default_log_level_prints_its_start_up_line(cluster_env: EnvFactory) -> None:
    """No --log-level (warning): the worker still says which cluster, Redis, queue and time scale it serves."""
    async with cluster_env("small", workers=0) as e:
        with popen("worker", env=e.env) as proc:
            await read_until(proc.stderr, re.escape(f"drainctl worker: cluster {e.rc.url}, Redis "
                                                    f"{e.env['DRAIN_REDIS_URL']}, queue {e.env['DRAIN_QUEUE_NAME']}, "
                                                    "time scale 40"))
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        # A SIGTERM before arq's handlers are installed ends the process by the signal: stopped either way.
        assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, (proc.returncode, err)


async def test_ctrl_c_says_the_drain_goes_on(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=0) as e:
        with popen("drain", "worker-01", "--wait", env=e.env) as proc:
            drain_id = (await read_until(proc.stdout, r"drain ([0-9a-f]{12})")).group(1)
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert f"interrupted: drain {drain_id} goes on in the workers" in err
        assert f"drainctl cancel {drain_id}" in err
        status = await e.adrainctl("status", drain_id, "-o", "json")
        assert json.loads(status.stdout)["phase"] == "Pending"  # not cancelled by the interrupt


async def test_time_scale_mismatch_is_refused_with_the_fix(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", time_scale=40, workers=0) as e:
        env = dict(e.env, DRAIN_TIME_SCALE="1")
        refused = await arun("drain", "worker-01", env=env)
        line = one_line_error(refused, 2, "time scale mismatch", "DRAIN_TIME_SCALE=")
        measured = float(re.search(r"--time-scale (\d+)", line).group(1))  # type: ignore[union-attr]
        assert 30 <= measured <= 50
        assert await drain_ids(e.env["DRAIN_REDIS_URL"]) == []  # nothing was written
        one_line_error(await arun("worker", env=env), 2, "time scale mismatch", "the worker")
        # The right scale passes the check.
        ok = await arun("drain", "worker-01", "--time-scale", "40", "-o", "json", env=env)
        assert ok.returncode == 0, ok.stderr
        # That sample is on record for this API server, so the next command compares with it instead of
        # sampling the clock again, and still refuses a wrong scale, naming the recorded one.
        redis = Redis.from_url(e.env["DRAIN_REDIS_URL"])
        try:
            raw = await redis.get(keys.time_scale_key(e.env["DRAIN_QUEUE_NAME"]))
        finally:
            await redis.aclose()
        assert raw is not None and json.loads(raw)["time_scale"] == 40
        again = await arun("drain", "worker-02", env=env)
        one_line_error(again, 2, "time scale mismatch", "DRAIN_TIME_SCALE=40")
        assert len(await drain_ids(e.env["DRAIN_REDIS_URL"])) == 1


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
async def test_kubectl_plugin_honours_kubectl_flags(cluster_env: EnvFactory) -> None:
    async with cluster_env("small", workers=0) as e:
        env = {k: v for k, v in e.env.items() if k != "KUBECONFIG"}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        kubectl = str(KUBECTL)

        def kubectl_run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([kubectl, *args], env=env, capture_output=True, text=True, timeout=90, check=False)

        planned = await asyncio.to_thread(kubectl_run, "drainctl", "plan", "worker-01", "--kubeconfig",
                                          str(e.kubeconfig), "-o", "json")
        assert planned.returncode == 0, planned.stderr
        assert json.loads(planned.stdout)["drain_nodes"] == ["worker-01"]
        wrong = await asyncio.to_thread(kubectl_run, "drainctl", "--context", "no-such-context", "plan",
                                        "worker-01", "--kubeconfig", str(e.kubeconfig))
        one_line_error(wrong, 2, "no-such-context")
        helped = await asyncio.to_thread(kubectl_run, "drainctl", "--help")
        assert helped.returncode == 0 and "kubectl drainctl" in helped.stdout


# ============================================================================ Redis restarts under --wait
@contextlib.asynccontextmanager
async def own_env(tmp_path: Path, redis_url: str, *, time_scale: float) -> AsyncIterator[tuple[RunningCluster,
                                                                                               dict[str, str]]]:
    kubeconfig = tmp_path / "kubeconfig"
    async with running_cluster(scenarios.builtin("small"), time_scale=time_scale, token=secrets.token_hex(8),
                               kubeconfig_out=kubeconfig) as rc:
        yield rc, clean_env(tmp_path, KUBECONFIG=str(kubeconfig), DRAIN_REDIS_URL=redis_url,
                            DRAIN_TIME_SCALE=str(time_scale), DRAIN_QUEUE_NAME=f"cli-{secrets.token_hex(4)}")


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([DRAINCTL, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


async def test_drain_wait_rides_out_a_redis_restart(tmp_path: Path) -> None:
    """A 3 s Redis restart (our own redis-server, AOF) while `drain --wait` follows: it says so, carries on,
    and exits 0 once the workers (started after the restart) drained the node."""
    with own_redis_server(tmp_path / "redis", appendonly=True) as server:
        async with own_env(tmp_path, server.url, time_scale=40) as (rc, env):
            with popen("drain", "worker-01", "--wait", "--timeout", "200", env=env) as proc:
                drain_id = (await read_until(proc.stdout, r"drain ([0-9a-f]{12})")).group(1)
                server.stop()
                await asyncio.sleep(3)
                server.start()
                workers = [start_worker(env) for _ in range(2)]
                try:
                    out, err = await asyncio.to_thread(proc.communicate, timeout=220)
                finally:
                    for w in workers:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(w.pid, signal.SIGTERM)
                    for w in workers:
                        await asyncio.to_thread(w.wait, 20)
            assert proc.returncode == 0, out[-3000:] + err[-3000:]
            assert "Traceback" not in err
            assert f"Redis at {server.url} is unreachable" in err and "answers again" in err
            assert f"drain {drain_id}: Succeeded" in out
            assert vmis_on(rc.cluster, "worker-01") == []


async def test_drain_wait_reports_a_redis_that_came_back_empty(tmp_path: Path) -> None:
    """Without persistence the drain record is gone after a restart: say so and name the nodes (exit 5)."""
    with own_redis_server(tmp_path / "redis", appendonly=False) as server:
        async with own_env(tmp_path, server.url, time_scale=40) as (_rc, env):
            with popen("drain", "worker-01", "--wait", env=env) as proc:
                await read_until(proc.stdout, r"drain ([0-9a-f]{12})")
                server.stop()
                await asyncio.sleep(1)
                server.start()
                out, err = await asyncio.to_thread(proc.communicate, timeout=60)
            assert proc.returncode == 5, out[-2000:] + err[-2000:]
            assert "Traceback" not in err
            assert "Redis came back empty" in err and "worker-01" in err and "uncordon" in err


def test_demo_hostile_says_how_to_skip_what_cannot_move(tmp_path: Path) -> None:
    """The hostile scenario has VMs that cannot migrate: refused (3) with the flag that helps; with that flag
    the drain starts (here cut short by --timeout: exit 6, its VMs that cannot move recorded as skipped)."""
    env = clean_env(tmp_path)
    refused = subprocess.run([DRAINCTL, "demo", "--scenario", "hostile"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert refused.returncode == 3, refused.stderr
    assert "Traceback" not in refused.stderr and "pass --non-migratable skip" in refused.stderr
    started = subprocess.run([DRAINCTL, "demo", "--scenario", "hostile", "--non-migratable", "skip", "--timeout", "5",
                              "-o", "json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
                             check=False)
    assert started.returncode == 6, started.stderr[-3000:]
    vms = json.loads(started.stdout)["drain"]["vms"]
    assert any(vm["phase"] == "Skipped" for vm in vms.values())
