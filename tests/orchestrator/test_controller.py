"""The DrainRequest controller against the simulated cluster over HTTP, with the real kubectl, a real arq worker
and a real Redis (a redis-server of this module's own, a queue name per test): the CRD and a DrainRequest go in
with `kubectl apply`, the drain runs, the status shows it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

from bench.redis_server import RedisServer
from orchestrator.api import build_app
from orchestrator.controller import FINALIZER, LEASE_NAME, LeaderElector, request_from_spec, run_controller
from orchestrator.kube import LEASES, Kube
from orchestrator.service import DrainService
from orchestrator.settings import Connection, Settings
from orchestrator.store import DrainStore
from simulator import scenarios
from simulator.cluster import RunningCluster, running_cluster
from tests.redis_db import own_redis_server
from workers.worker import build_worker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "k8s" / "crd-drainrequest.yaml"
KUBECTL = shutil.which("kubectl")
SHARED_REDIS = "redis://127.0.0.1:6379"


def drain_request(name: str, nodes: list[str], **spec: Any) -> str:
    body = {"apiVersion": "drainctl.io/v1alpha1", "kind": "DrainRequest",
            "metadata": {"name": name, "namespace": "default"}, "spec": {"nodes": nodes, **spec}}
    return json.dumps(body)


@dataclass
class Env:
    rc: RunningCluster
    kubeconfig: Path
    cache: Path
    settings: Settings
    service: DrainService
    kube: Kube
    stops: list[asyncio.Event] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    async def kubectl(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        assert KUBECTL is not None
        proc = await asyncio.create_subprocess_exec(
            KUBECTL, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache}", "--request-timeout=20s", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HOME": str(self.cache.parent)})
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def apply(self, text: str) -> None:
        rc, out, err = await self.kubectl("apply", "--validate=false", "-f", "-", stdin=text)
        assert rc == 0, out + err

    async def get(self, name: str) -> dict[str, Any] | None:
        rc, out, err = await self.kubectl("get", "drainrequest", name, "-n", "default", "-o", "json")
        if rc != 0:
            assert "NotFound" in err, err
            return None
        data: dict[str, Any] = json.loads(out)
        return data

    async def until(self, name: str, check: Callable[[dict[str, Any]], bool], *,
                    timeout_s: float = 80) -> dict[str, Any]:
        """Poll the object through kubectl (as a user would) until `check` holds."""
        async with asyncio.timeout(timeout_s):
            while True:
                last = await self.get(name)
                if last is not None and check(last):
                    return last
                await asyncio.sleep(0.3)

    def start_controller(self, identity: str) -> asyncio.Event:
        stop = asyncio.Event()
        self.stops.append(stop)
        self.tasks.append(asyncio.create_task(
            run_controller(self.service, self.kube, identity=identity, stop=stop, namespace="default",
                           lease_duration_s=3.0, renew_every_s=0.5, retry_every_s=0.3, resync_s=0.3),
            name=f"controller-{identity}"))
        return stop

    def start_worker(self) -> None:
        worker = build_worker(self.settings, handle_signals=False, poll_delay=0.05, reconcile_every_s=2)
        self.workers.append(worker)
        self.tasks.append(asyncio.create_task(worker.async_run(), name="worker"))

    async def lease_holder(self) -> str | None:
        lease = await self.kube.find(LEASES, LEASE_NAME, "default")
        return None if lease is None else (lease.get("spec") or {}).get("holderIdentity")


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.1)


async def phase_is(e: Env, drain_id: str, phase: str) -> bool:
    return bool((await e.service.get(drain_id)).drain.phase == phase)


async def holder_is(e: Env, identity: str) -> bool:
    return await e.lease_holder() == identity


async def clear_stale_node_locks(redis: ArqRedis, nodes: list[str], *, older_than_s: float = 180.0) -> None:
    """Free node locks left by runs that were killed before their teardown (their drains are minutes old;
    a live test's drains are younger than the per-test timeout)."""
    store = DrainStore(redis)
    for node in nodes:
        owner = await store.node_owner(node)
        if owner is None:
            continue
        drain = await store.find(owner)
        if drain is None or (drain.created_at or 0) < time.time() - older_than_s:
            await store.unlock_nodes(owner, [node])


@pytest.fixture(scope="module")
def redis_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of this module's own on a free port: drain records, node locks and semaphore keys
    have fixed names, so sharing 127.0.0.1:6379 with other test runs would let their drains collide with ours."""
    with own_redis_server(tmp_path_factory.mktemp("redis"), appendonly=False) as server:
        yield server.url


@pytest.fixture
async def env(tmp_path: Path, redis_base: str) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    made: list[Env] = []
    stack = contextlib.AsyncExitStack()
    pools: list[ArqRedis] = []

    async def make(*, time_scale: float = 50.0, redis_url: str | None = None) -> Env:
        kubeconfig = tmp_path / "kubeconfig"
        cache = tmp_path / "home" / "kube-cache"
        cache.mkdir(parents=True)
        # No token: kubectl sends bearer tokens only over TLS, and this server is plain HTTP on localhost.
        # A fresh seed: the simulator derives uids from it, and the controller's idempotency key is the
        # DrainRequest's uid, so a repeated seed would find an earlier run's drain in the same Redis database.
        scenario = scenarios.load("small", seed=random.randrange(1 << 30))
        rc = await stack.enter_async_context(running_cluster(scenario, time_scale=time_scale, token=None,
                                                             kubeconfig_out=kubeconfig))
        url = redis_url or redis_base
        settings = Settings(time_scale=time_scale, connection=Connection(
            redis_url=url, kubeconfig=str(kubeconfig), queue_name=f"drainctl-test-{secrets.token_hex(6)}"))
        try:
            redis = await create_pool(RedisSettings.from_dsn(url), default_queue_name=settings.connection.queue_name)
        except OSError as exc:
            pytest.skip(f"no Redis at {url}: {exc}")
        pools.append(redis)
        await clear_stale_node_locks(redis, [n.name for n in scenario.nodes])
        kube = await Kube.connect(kubeconfig=kubeconfig)
        stack.push_async_callback(kube.close)
        e = Env(rc=rc, kubeconfig=kubeconfig, cache=cache, settings=settings,
                service=DrainService(redis=redis, settings=settings, kube=kube), kube=kube)
        made.append(e)
        rc_, out, err = await e.kubectl("apply", "--validate=false", "-f", str(CRD))
        assert rc_ == 0, out + err
        return e

    started = time.time()
    yield make
    for e in made:
        for stop in e.stops:
            stop.set()
        for w in e.workers:
            with warnings.catch_warnings():
                # arq's Worker.close still calls redis-py's deprecated close(); not ours to fix here.
                warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
                await w.close()
        for task in e.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 20)
    for e in made:
        # Drains this test left open (no worker ran, or it was cancelled mid-way) must not keep their nodes
        # locked for a later run that picks the same database.
        for drain_id in await e.service.store.ids():
            drain = await e.service.store.find(drain_id)
            if drain is not None and (drain.created_at or 0) >= started:
                await e.service.store.unlock_nodes(drain_id, drain.nodes)
    for pool in pools:
        await pool.aclose()
    await stack.aclose()


async def test_drainrequest_drives_a_drain_to_succeeded(env: Callable[..., Awaitable[Env]]) -> None:
    e = await env()
    e.start_worker()
    e.start_controller("replica-a")
    await e.apply(drain_request("upgrade-worker-01", ["worker-01"], maxAttempts=3))
    obj = await e.until("upgrade-worker-01", lambda o: (o.get("status") or {}).get("phase") == "Succeeded")
    status = obj["status"]
    assert status["drainId"] and status["progress"] == "15/15 VMs"
    assert status["nodes"] == [{"name": "worker-01", "phase": "Drained", "message": "drained", "vms": 15,
                                "migrated": 15, "failed": 0}]
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert FINALIZER in obj["metadata"]["finalizers"]
    # The drain is the ordinary one, recorded with its origin and the object's uid as idempotency key.
    view = await e.service.get(status["drainId"])
    assert view.drain.source == "drainrequest" and view.drain.phase == "Succeeded"
    assert view.drain.request["max_attempts"] == 3
    async with e.rc.admin() as admin:
        truth = await admin.stats()
    ours = [m for m in truth["migrations"] if m["labels"].get("drainctl.io/drain-id") == status["drainId"]]
    assert len(ours) >= 15 and truth["max_in_flight_cluster"] <= 5
    # kubectl shows it through the CRD's printer columns.
    _, out, _ = await e.kubectl("get", "drainrequests", "-n", "default")
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "PHASE", "DRAIN", "PROGRESS"]
    assert row.split()[:4] == ["upgrade-worker-01", "Succeeded", status["drainId"], "15/15"]
    assert await e.lease_holder() == "replica-a"


async def test_a_drain_started_before_a_spec_change_stays_the_resources_drain(
        env: Callable[..., Awaitable[Env]]) -> None:
    # The resource's drain was submitted, then its status write was lost and its spec edited: submitting again
    # with its uid finds a drain of another request. That drain stays its drain (none is started twice).
    e = await env()
    await e.apply(drain_request("edited", ["worker-01"], maxAttempts=3))
    obj = await e.get("edited")
    assert obj is not None
    earlier, created = await e.service.submit(request_from_spec({"nodes": ["worker-01"], "maxAttempts": 2}),
                                              idempotency_key=obj["metadata"]["uid"], source="drainrequest")
    assert created
    drains = await e.service.store.ids()
    e.start_controller("replica-a")
    obj = await e.until("edited", lambda o: bool((o.get("status") or {}).get("drainId")))
    assert obj["status"]["drainId"] == earlier.id
    assert await e.service.store.ids() == drains


async def test_deleting_a_drainrequest_cancels_its_drain(env: Callable[..., Awaitable[Env]]) -> None:
    e = await env(time_scale=4.0)  # slow enough that the drain is still running when we delete
    e.start_worker()
    e.start_controller("replica-a")
    await e.apply(drain_request("to-cancel", ["worker-01"]))
    obj = await e.until("to-cancel", lambda o: (o.get("status") or {}).get("phase") == "Running")
    drain_id = obj["status"]["drainId"]
    rc, out, err = await e.kubectl("delete", "drainrequest", "to-cancel", "-n", "default", "--timeout=30s")
    assert rc == 0, out + err
    assert await e.get("to-cancel") is None  # the finalizer was removed after the cancel
    await eventually(lambda: phase_is(e, drain_id, "Cancelled"), timeout_s=60)
    view = await e.service.get(drain_id)
    assert view.drain.cancel is not None and view.drain.cancel.mode == "abort"
    assert any(vm.phase == "Cancelled" for vm in view.vms.values())


async def test_only_the_leader_acts_and_a_standby_takes_over(env: Callable[..., Awaitable[Env]]) -> None:
    e = await env()
    stop_a = e.start_controller("replica-a")
    await eventually(lambda: holder_is(e, "replica-a"), timeout_s=10)
    e.start_controller("replica-b")
    await asyncio.sleep(2.0)  # several renew periods of both
    assert await e.lease_holder() == "replica-a"
    # Refused requests end as Failed with the reason; nothing else happens (no worker runs here).
    await e.apply(drain_request("unknown-node", ["worker-99"]))
    await e.apply(drain_request("bad-order", ["worker-02"], order="random"))
    refused = await e.until("unknown-node", lambda o: (o.get("status") or {}).get("phase") == "Failed")
    assert refused["status"]["message"].startswith("refused by the planner") and "worker-99" in \
        refused["status"]["message"]
    invalid = await e.until("bad-order", lambda o: (o.get("status") or {}).get("phase") == "Failed")
    assert invalid["status"]["message"].startswith("invalid: spec.order:")
    stop_a.set()  # replica-a stops and releases the lease: replica-b takes over without waiting for expiry
    await eventually(lambda: holder_is(e, "replica-b"), timeout_s=5)
    await e.apply(drain_request("after-failover", ["worker-02"]))
    obj = await e.until("after-failover", lambda o: bool((o.get("status") or {}).get("drainId")))
    assert obj["status"]["phase"] in ("Pending", "Planning", "Running")


async def test_an_unrenewed_lease_is_taken_only_after_its_duration(env: Callable[..., Awaitable[Env]]) -> None:
    e = await env()
    now = [0.0]
    a = LeaderElector(e.kube, identity="a", namespace="default", name="election-test", lease_duration_s=10,
                      monotonic=lambda: now[0])
    b = LeaderElector(e.kube, identity="b", namespace="default", name="election-test", lease_duration_s=10,
                      monotonic=lambda: now[0])
    assert await a.try_acquire_or_renew() is True
    assert await b.try_acquire_or_renew() is False
    now[0] = 9.0
    assert await a.try_acquire_or_renew() is True  # renewed: b's observation starts again
    now[0] = 15.0
    assert await b.try_acquire_or_renew() is False  # 6 s since the renew b saw, not 10
    now[0] = 25.5  # a crashed: nothing renewed for more than leaseDurationSeconds
    assert await b.try_acquire_or_renew() is True
    lease = await e.kube.get(LEASES, "election-test", "default")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    assert lease["spec"]["leaseDurationSeconds"] == 10 and lease["spec"]["renewTime"].endswith("Z")
    assert await a.try_acquire_or_renew() is False and not a.is_leader


def test_spec_errors_name_the_spec_field() -> None:
    assert request_from_spec({"nodes": ["n1"], "maxParallelNodes": 2}).max_parallel_nodes == 2
    with pytest.raises(ValueError, match=r"^spec\.maxParallelNodes: expected an integer"):
        request_from_spec({"nodes": ["n1"], "maxParallelNodes": "two"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) color"):
        request_from_spec({"nodes": ["n1"], "color": "red"})


def test_the_spec_carries_the_escalation() -> None:
    spec = {"nodes": ["n1"], "escalation": "post-copy, solo", "allowPostCopy": True}
    request = request_from_spec(spec)
    assert request.escalation == ("solo", "post-copy") and request.allow_post_copy
    with pytest.raises(ValueError, match=r"^spec\.escalation: unknown rung\(s\) 'warp'"):
        request_from_spec({"nodes": ["n1"], "escalation": "warp"})


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A redis-server this test stops and starts (set up before `env`, so torn down after it)."""
    async with RedisServer(aof=True) as server:
        yield server


async def test_the_controller_rides_out_a_redis_outage_and_readyz_says_so(
        own_redis: RedisServer, env: Callable[..., Awaitable[Env]], monkeypatch: pytest.MonkeyPatch) -> None:
    """`drainctl api` with its controller, against a redis-server of the test's own that goes away: the controller
    keeps its Lease, /readyz answers 503 while Redis (and so the controller) cannot work, and a DrainRequest
    applied during the outage gets its drain once Redis is back."""
    monkeypatch.setenv("POD_NAMESPACE", "default")
    server = own_redis
    e = await env(redis_url=server.url)

    @contextlib.asynccontextmanager
    async def factory() -> AsyncIterator[DrainService]:
        yield e.service

    client: TestClient[web.Request, web.Application] = TestClient(
        TestServer(build_app(factory, token="t", controller=True, readiness_timeout_s=2.0)))
    await client.start_server()
    try:
        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready, timeout_s=30)
        holder = await e.lease_holder()
        assert holder is not None
        await e.apply(drain_request("before-outage", ["worker-99"]))
        await e.until("before-outage", lambda o: (o.get("status") or {}).get("phase") == "Failed")

        await server.stop(kill=True)
        await e.apply(drain_request("during-outage", ["worker-02"]))

        async def not_ready() -> bool:
            answer = await client.get("/readyz")
            body = await answer.json()
            return answer.status == 503 and body["checks"]["redis"] != "ok" and \
                "during-outage" in body["checks"].get("controller", "")

        await eventually(not_ready, timeout_s=30)
        assert await e.lease_holder() == holder  # the Lease is in the cluster: leadership is kept
        during = await e.get("during-outage")
        assert during is not None and not (during.get("status") or {}).get("drainId")

        await server.start()
        after = await e.until("during-outage", lambda o: bool((o.get("status") or {}).get("drainId")),
                              timeout_s=60)
        assert after["status"]["phase"] in ("Pending", "Planning", "Running")
        await eventually(ready, timeout_s=30)
        assert await e.lease_holder() == holder
    finally:
        await client.close()
