"""The HTTP API on the real path: the simulated cluster over HTTP, real Redis, in-process arq workers.

Each test gets its own empty Redis database (claimed with a marker key, flushed afterwards) and its own queue
name, so node locks, drains and the semaphore of one test never meet another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis, RedisSettings, create_pool
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.api import build_app, openapi_document, read_token
from orchestrator.model import REQUEST_BOUNDS, DrainPhase, DrainRequest, NodeName
from orchestrator.records import DrainRecord
from orchestrator.service import DrainService
from orchestrator.settings import Settings
from simulator import scenarios
from simulator.cluster import RunningCluster, running_cluster
from tests.redis_db import claimed_db
from workers.worker import build_worker

pytestmark = pytest.mark.integration

REDIS = "redis://127.0.0.1:6379"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DRAIN_NODE = "worker-01"
PATIENCE_S = 90.0


# ================================================================================================= fixtures
@dataclass
class Env:
    """One API over one simulated cluster and one Redis database."""

    sim: RunningCluster
    settings: Settings
    service: DrainService
    client: TestClient[web.Request, web.Application]
    start_worker: Callable[[], Awaitable[None]]

    async def stats(self) -> dict[str, Any]:
        # The ground truth answers the simulator's admin token only.
        async with self.sim.admin() as admin:
            return await admin.stats()

    async def faults(self, body: dict[str, Any]) -> None:
        async with self.sim.admin() as admin:
            await admin.faults(body)


async def _stop_worker(worker: Any, task: asyncio.Task[None], pool: ArqRedis) -> None:
    # The worker's own close(): it stops taking jobs, lets the running ones end and leaves its alive key.
    worker.allow_pick_jobs = False
    running = [job for job in worker.tasks.values() if not job.done()]
    if running:
        await asyncio.wait(running, timeout=10)
    with warnings.catch_warnings():
        # arq's Worker.close still calls redis-py's deprecated close(); not ours to fix here.
        warnings.filterwarnings("ignore", "Call to deprecated close", DeprecationWarning)
        await worker.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 20)
    await pool.aclose()


@contextlib.asynccontextmanager
async def api_env(tmp_path: Path, *, time_scale: float) -> AsyncIterator[Env]:
    scenario = scenarios.builtin("small")
    kubeconfig = tmp_path / "kubeconfig"
    async with claimed_db() as url, running_cluster(scenario, time_scale=time_scale, token=TOKEN,
                                                    kubeconfig_out=kubeconfig) as sim:
        settings = Settings.from_env({}, redis_url=url, kubeconfig=str(kubeconfig),
                                     queue_name=f"test-api-{uuid.uuid4().hex[:8]}", time_scale=time_scale)
        redis: ArqRedis = await create_pool(RedisSettings.from_dsn(url))
        kube = await k.Kube.connect(kubeconfig=kubeconfig)
        service = DrainService(redis=redis, settings=settings, kube=kube)

        @contextlib.asynccontextmanager
        async def factory() -> AsyncIterator[DrainService]:
            yield service

        workers: list[tuple[Any, asyncio.Task[None], ArqRedis]] = []

        async def start_worker() -> None:
            pool = await create_pool(RedisSettings.from_dsn(url))
            worker = build_worker(settings, redis=pool, handle_signals=False, poll_delay=0.05)
            task = asyncio.create_task(worker.async_run(), name=f"worker-{len(workers)}")
            workers.append((worker, task, pool))

        client: TestClient[web.Request, web.Application] = TestClient(
            TestServer(build_app(factory, token=TOKEN, sse_block_ms=300)))
        await client.start_server()
        try:
            yield Env(sim, settings, service, client, start_worker)
        finally:
            await client.close()
            for worker, task, pool in workers:
                await _stop_worker(worker, task, pool)
            await kube.close()
            await redis.aclose()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """No workers: drains stay Pending, which is all the request-handling tests need."""
    async with api_env(tmp_path, time_scale=50.0) as e:
        yield e


async def _error(resp: ClientResponse) -> dict[str, Any]:
    body = await resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, Any] = body["error"]
    return error


async def _drain_ids(env: Env) -> list[str]:
    return await env.service.store.ids()


async def _node_events(env: Env, node: str) -> list[tuple[str, str]]:
    """(reason, message) of the Kubernetes Events about `node`, as `kubectl describe node` shows them."""
    items, _ = await env.service.kube.list(k.EVENTS)
    return [(e["reason"], e["message"]) for e in items
            if e["involvedObject"].get("kind") == "Node" and e["involvedObject"].get("name") == node]


# ===================================================================================================== auth
async def test_v1_without_a_token_is_401_with_a_bearer_challenge(env: Env) -> None:
    for method, path in (("GET", "/v1/drains"), ("POST", "/v1/drains"), ("POST", "/v1/plans"),
                         ("GET", "/v1/drains/abc"), ("DELETE", "/v1/drains/abc"), ("GET", "/v1/drains/abc/events")):
        resp = await env.client.request(method, path)
        assert resp.status == 401, (method, path)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await _error(resp))["code"] == "unauthorized"
    resp = await env.client.get("/v1/drains", headers={"Authorization": f"Basic {TOKEN}"})
    assert resp.status == 401


async def test_v1_with_a_wrong_token_is_403(env: Env) -> None:
    resp = await env.client.get("/v1/drains", headers={"Authorization": "Bearer not-the-token"})
    assert resp.status == 403
    assert (await _error(resp))["code"] == "forbidden"
    resp = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]},
                                 headers={"Authorization": f"Bearer {TOKEN}x"})
    assert resp.status == 403
    assert await _drain_ids(env) == []


async def test_probes_and_documents_need_no_token(env: Env) -> None:
    health = await env.client.get("/healthz")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    ready = await env.client.get("/readyz")
    body = await ready.json()
    assert ready.status == 200, body
    assert body["checks"] == {"redis": "ok", "cluster": "ok"}
    metrics = await env.client.get("/metrics")
    assert metrics.status == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")


async def test_readyz_is_503_while_the_redis_epoch_check_fails(env: Env) -> None:
    """Redis answers PING, but the epoch check cannot read the epoch (a key of the wrong type): not ready, with
    the check's reason; ready again once the check passes."""
    async with env.service.redis.pipeline(transaction=True) as replace:  # the fixture's API checks it too
        await replace.delete(keys.EPOCH_KEY).hset(keys.EPOCH_KEY, "not", "a string").execute()

    @contextlib.asynccontextmanager
    async def factory() -> AsyncIterator[DrainService]:
        yield env.service

    client: TestClient[web.Request, web.Application] = TestClient(TestServer(build_app(factory, token=TOKEN)))
    await client.start_server()  # its supervisor's first epoch check runs now, and fails
    try:
        async def answer() -> tuple[int, dict[str, Any]]:
            resp = await client.get("/readyz")
            return resp.status, await resp.json()

        status, body = await answer()
        for _ in range(100):
            if "redis-epoch" in body["checks"]:
                break
            await asyncio.sleep(0.05)
            status, body = await answer()
        assert status == 503, body
        assert body["status"] == "unavailable"
        assert body["checks"]["redis"] == "ok" and body["checks"]["cluster"] == "ok", body
        assert body["checks"]["redis-epoch"].startswith("epoch check failed: WRONGTYPE"), body
        await env.service.redis.delete(keys.EPOCH_KEY)
        for _ in range(300):  # the next check, within its 5 s period
            status, body = await answer()
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200 and body["checks"] == {"redis": "ok", "cluster": "ok"}, body
    finally:
        await client.close()


def test_read_token_prefers_the_file_and_refuses_empty(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n")
    assert read_token(token_file, {"DRAIN_API_TOKEN": "from-env"}) == "from-file"
    assert read_token(None, {"DRAIN_API_TOKEN": "from-env"}) == "from-env"
    with pytest.raises(ValueError, match="DRAIN_API_TOKEN"):
        read_token(None, {})
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(token_file, {})


# =============================================================================================== validation
async def test_malformed_json_is_400(env: Env) -> None:
    for raw in (b"{nodes: [", b"", b"\xff"):
        resp = await env.client.post("/v1/drains", data=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert resp.status == 400, raw
        error = await _error(resp)
        assert error["code"] == "bad_json"
        assert "JSON" in error["message"]
    assert await _drain_ids(env) == []


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"nodes": []}, "nodes", "at least 1"),
    ({"nodes": "worker-01"}, "nodes", "array"),
    ({"nodes": [""]}, "nodes.0", "at least 1 character"),
    ({"nodes": ["worker-01", "worker-01"]}, "nodes", "more than once: worker-01"),
    ({"nodes": ["worker-01"], "max_parallel_nodes": "2"}, "max_parallel_nodes", "integer"),
    ({"nodes": ["worker-01"], "max_parallel_nodes": 0}, "max_parallel_nodes", "greater than or equal to 1"),
    ({"nodes": ["worker-01"], "order": "random"}, "order", "'given' or 'planner'"),
    ({"nodes": ["worker-01"], "non_migratable": "ignore"}, "non_migratable", "'block' or 'skip'"),
    ({"nodes": ["worker-01"], "max_attempts": 1000}, "max_attempts", "less than or equal to 100"),
    ({"nodes": ["worker-01"], "uncordon_on_cancel": "yes"}, "uncordon_on_cancel", "boolean"),
    ({"nodes": ["worker-01"], "colour": "blue"}, "colour", "Extra inputs"),
    ({}, "nodes", "Field required"),
    ([1, 2], "(body)", "object"),
])
async def test_schema_errors_are_422_naming_the_field(env: Env, body: Any, field: str, words: str) -> None:
    for path in ("/v1/drains", "/v1/plans"):
        resp = await env.client.post(path, json=body, headers=AUTH)
        assert resp.status == 422, (path, body)
        error = await _error(resp)
        assert error["code"] == "invalid"
        assert error["message"].startswith(f"{field}: "), error
        assert words in error["message"], error
        assert any(p["field"] == field for p in error["details"]["problems"]), error
    assert await _drain_ids(env) == []


async def test_unknown_nodes_are_404_naming_them(env: Env) -> None:
    for path in ("/v1/drains", "/v1/plans"):
        resp = await env.client.post(path, json={"nodes": [DRAIN_NODE, "no-such-node", "ghost"]}, headers=AUTH)
        assert resp.status == 404, path
        error = await _error(resp)
        assert error["code"] == "unknown_nodes"
        assert error["details"] == {"nodes": ["no-such-node", "ghost"]}
        assert "no-such-node" in error["message"] and "ghost" in error["message"]
    assert await _drain_ids(env) == []


async def test_unknown_route_and_drain_are_json_404(env: Env) -> None:
    resp = await env.client.get("/v1/drains/nope", headers=AUTH)
    assert resp.status == 404
    assert "nope" in (await _error(resp))["message"]
    resp = await env.client.delete("/v1/drains/nope", headers=AUTH)
    assert resp.status == 404
    resp = await env.client.get("/v1/drains/nope/events", headers=AUTH)
    assert resp.status == 404
    resp = await env.client.get("/v1/nothing-here", headers=AUTH)
    assert resp.status == 404
    assert (await _error(resp))["code"] == "not_found"


# ============================================================================================ bad input
@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("drain_id", ["a%0Ab", "a%0A", "-starts-with-dash", "x" * 65, "a%20b", "%C3%A9t%C3%A9"])
async def test_a_malformed_drain_id_is_a_json_400(env: Env, method: str, drain_id: str) -> None:
    for path in (f"/v1/drains/{drain_id}", f"/v1/drains/{drain_id}/events"):
        if method == "DELETE" and path.endswith("/events"):
            continue
        resp = await env.client.request(method, path, headers=AUTH)
        assert resp.status == 400, (method, path)
        error = await _error(resp)
        assert error["code"] == "bad_drain_id" and "is not a drain id" in error["message"], error


@pytest.mark.parametrize(("content_type", "data"), [
    ("text/plain", json.dumps({"nodes": [DRAIN_NODE]})),
    ("application/x-www-form-urlencoded", "nodes=worker-01"),
    ("multipart/form-data; boundary=x", "--x\r\nContent-Disposition: form-data; name=nodes\r\n\r\nworker-01\r\n--x--"),
    (None, json.dumps({"nodes": [DRAIN_NODE]})),
])
async def test_a_body_that_is_not_sent_as_json_is_415(env: Env, content_type: str | None, data: str) -> None:
    headers = dict(AUTH) if content_type is None else {**AUTH, "Content-Type": content_type}
    for path in ("/v1/drains", "/v1/plans"):
        resp = await env.client.post(path, data=data.encode(), headers=headers,
                                     skip_auto_headers=["Content-Type"] if content_type is None else ())
        assert resp.status == 415, (path, content_type)
        assert resp.headers["Accept-Post"] == "application/json"
        error = await _error(resp)
        assert error["code"] == "unsupported_media_type"
        assert "application/json" in error["message"]
    assert await _drain_ids(env) == []
    # A charset parameter is still JSON.
    ok = await env.client.post("/v1/plans", data=json.dumps({"nodes": [DRAIN_NODE]}),
                               headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status == 200


@pytest.mark.parametrize(("field", "value", "words"), [
    ("pending_timeout_s", 1e300, "less than or equal to 86400"),
    ("pending_timeout_s", 0.5, "greater than or equal to 1"),
    ("progress_timeout_s", 86_400.5, "less than or equal to 86400"),
    ("progress_timeout_s", -1, "greater than or equal to 1"),
    ("completion_timeout_per_gib", 3601, "less than or equal to 3600"),
    ("completion_timeout_per_gib", 10**30, "less than or equal to 3600"),
    ("max_parallel_nodes", 10_001, "less than or equal to 10000"),
    ("max_attempts", 101, "less than or equal to 100"),
    ("max_attempts", 2.5, "integer"),
])
async def test_numbers_outside_their_documented_range_are_422(env: Env, field: str, value: Any, words: str) -> None:
    for path in ("/v1/drains", "/v1/plans"):
        resp = await env.client.post(path, json={"nodes": [DRAIN_NODE], field: value}, headers=AUTH)
        assert resp.status == 422, (path, field, value)
        error = await _error(resp)
        assert error["message"].startswith(f"{field}: ") and words in error["message"], error
    assert await _drain_ids(env) == []
    # The limits are the ones the schema documents (and the CLI and DrainRequest enforce).
    bound = REQUEST_BOUNDS[field]
    schema = openapi_document()["components"]["schemas"]["DrainRequestBody"]["properties"][field]
    (number,) = [option for option in schema.get("anyOf", [schema]) if option["type"] != "null"]
    assert number["maximum"] == bound.high
    assert number["minimum"] == bound.low


async def test_numbers_at_their_limits_are_accepted(env: Env) -> None:
    body = {"nodes": [DRAIN_NODE], "pending_timeout_s": 86_400, "progress_timeout_s": 1,
            "completion_timeout_per_gib": 3600, "max_attempts": 100, "max_parallel_nodes": 1}
    resp = await env.client.post("/v1/drains", json=body, headers=AUTH)
    assert resp.status == 202, await resp.text()
    drain_id = (await resp.json())["id"]
    assert (await env.service.store.get(drain_id)).request["pending_timeout_s"] == 86_400


@pytest.mark.parametrize("raw", [b'{"nodes": ["worker-01"], "pending_timeout_s": NaN}',
                                 b'{"nodes": ["worker-01"], "pending_timeout_s": Infinity}',
                                 b'{"nodes": ["worker-01"], "pending_timeout_s": 1e999}'])
async def test_non_finite_numbers_are_refused(env: Env, raw: bytes) -> None:
    resp = await env.client.post("/v1/drains", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status in (400, 422), await resp.text()
    await _error(resp)
    assert await _drain_ids(env) == []


def test_drain_request_refuses_out_of_range_numbers_whoever_builds_it() -> None:
    # The CLI and the DrainRequest controller build DrainRequest directly; the bounds hold there too.
    for field, bound in REQUEST_BOUNDS.items():
        with pytest.raises(ValueError, match=f"{field}: .* is out of range"):
            DrainRequest(nodes=(NodeName(DRAIN_NODE),), **{field: bound.high + 1})
        DrainRequest(nodes=(NodeName(DRAIN_NODE),), **{field: bound.high})


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/v1/drains", {"GET", "HEAD", "POST"}),
    ("DELETE", "/v1/drains", {"GET", "HEAD", "POST"}),
    ("POST", "/v1/drains/abc", {"DELETE", "GET", "HEAD"}),
    ("PATCH", "/v1/drains/abc", {"DELETE", "GET", "HEAD"}),
    ("DELETE", "/v1/drains/abc/events", {"GET", "HEAD"}),
    ("GET", "/v1/plans", {"POST"}),
    ("POST", "/healthz", {"GET", "HEAD"}),
])
async def test_a_wrong_method_is_405_with_allow(env: Env, method: str, path: str, allowed: set[str]) -> None:
    resp = await env.client.request(method, path, headers=AUTH)
    assert resp.status == 405
    assert {m.strip() for m in resp.headers["Allow"].split(",")} == allowed
    error = await _error(resp)
    assert error["code"] == "method_not_allowed" and method in error["message"]


async def test_a_body_over_the_size_limit_is_a_json_413(env: Env) -> None:
    nodes = [f"node-{i:07d}" for i in range(120_000)]  # about 1.8 MB, over aiohttp's 1 MiB default
    raw = io.BytesIO(json.dumps({"nodes": nodes}).encode())
    resp = await env.client.post("/v1/drains", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 413
    assert (await _error(resp))["code"] == "too_large"
    assert await _drain_ids(env) == []


async def test_a_key_left_by_a_submitter_that_died_is_taken_over(env: Env) -> None:
    # A submitter of an older version claimed the key, then died before writing its drain: the key names no
    # drain. A retry with the key is a fresh submit (submitting now writes key and drain in one transaction).
    key = "hook-dead-submitter"
    await env.service.redis.set(keys.idempotency_key(key), "deadsubmit01")
    resp = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]},
                                 headers={**AUTH, "Idempotency-Key": key})
    assert resp.status == 202, await resp.text()
    drain_id = (await resp.json())["id"]
    assert drain_id != "deadsubmit01" and await _drain_ids(env) == [drain_id]
    again = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]},
                                  headers={**AUTH, "Idempotency-Key": key})
    assert again.status == 200 and (await again.json())["id"] == drain_id


async def test_every_documented_status_is_real(env: Env) -> None:
    """Each status the OpenAPI document lists for an operation is one this test makes the API answer, and it
    answers no status the document does not list (schemathesis checks the shapes: test_api_schema.py)."""
    seen: dict[tuple[str, str], set[str]] = {}

    async def call(client: TestClient[web.Request, web.Application], method: str, route: str, path: str,
                   **kwargs: Any) -> ClientResponse:
        resp = await client.request(method, path, **kwargs)
        seen.setdefault((route, method.lower()), set()).add(str(resp.status))
        if resp.status >= 400 and not (route == "/readyz" and resp.status == 503):  # /readyz: its checks
            await _error(resp)
        else:
            await resp.read()
        return resp

    c = env.client
    drains, one, events = "/v1/drains", "/v1/drains/{drain_id}", "/v1/drains/{drain_id}/events"
    json_headers = {**AUTH, "Content-Type": "application/json"}
    big = io.BytesIO(json.dumps({"nodes": [f"node-{i:07d}" for i in range(120_000)]}).encode())
    for route, method, body in ((drains, "POST", {"nodes": [DRAIN_NODE]}), ("/v1/plans", "POST", None)):
        plan_body = {"nodes": ["worker-02"]}
        await call(c, method, route, route, json=body or plan_body)
        await call(c, method, route, route, json=body or plan_body, headers={**AUTH, "Idempotency-Key": "k1"})
        await call(c, method, route, route, json=body or plan_body, headers={**AUTH, "Idempotency-Key": "k1"})
        await call(c, method, route, route, data=b"{", headers=json_headers)
        await call(c, method, route, route, json=body or plan_body, headers=AUTH)
        await call(c, method, route, route, json={"nodes": ["ghost"]}, headers=AUTH)
        await call(c, method, route, route, json={"nodes": []}, headers=AUTH)
        await call(c, method, route, route, data="x", headers={**AUTH, "Content-Type": "text/plain"})
        big.seek(0)
        await call(c, method, route, route, data=big, headers=json_headers)
        await env.faults({"errors": [{"verb": "list", "resource": "nodes", "code": 403}]})
        await call(c, method, route, route, json={"nodes": ["worker-03"]}, headers=AUTH)
        await env.faults({"errors": [{"verb": "list", "resource": "nodes", "code": 503}]})
        await call(c, method, route, route, json={"nodes": ["worker-03"]}, headers=AUTH)
        await env.faults({"clear": True})
        await call(c, method, route, route, json={"nodes": ["worker-03"]}, headers={"Authorization": "Bearer x"})
    drain_id = (await env.service.store.ids())[0]
    await env.service.store.create(DrainRecord(id="old0drain", phase=DrainPhase.SUCCEEDED,
                                               created_at=time.time() - 3660, finished_at=time.time() - 3600,
                                               request={"nodes": [DRAIN_NODE]}), nodes={}, vms={})
    for route, method, good in ((drains, "GET", drains), (one, "GET", f"{drains}/{drain_id}"),
                                (one, "DELETE", f"{drains}/{drain_id}"), (one, "DELETE", f"{drains}/old0drain"),
                                (events, "GET", f"{drains}/old0drain/events")):
        await call(c, method, route, good, headers=AUTH)
        await call(c, method, route, good)
        await call(c, method, route, good, headers={"Authorization": "Bearer x"})
        await call(c, method, route, good + "?nonsense=1", headers=AUTH)
        if route != drains:
            await call(c, method, route, good.replace(drain_id, "a%0Ab").replace("old0drain", "a%0Ab"),
                       headers=AUTH)
            await call(c, method, route, good.replace(drain_id, "nope").replace("old0drain", "nope"),
                       headers=AUTH)
    await call(c, "GET", events, f"{drains}/old0drain/events", headers={**AUTH, "Last-Event-ID": "x"})
    for route in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        await call(c, "GET", route, route)
        await call(c, "GET", route, route + "?nonsense=1")

    # Redis down (a port nothing listens on): every call that needs it is a 503.
    dead = DrainService(redis=ArqRedis(host="127.0.0.1", port=_free_port(), socket_connect_timeout=2),
                        settings=env.settings, kube=env.service.kube)

    @contextlib.asynccontextmanager
    async def dead_factory() -> AsyncIterator[DrainService]:
        yield dead

    dead_client: TestClient[web.Request, web.Application] = TestClient(TestServer(build_app(dead_factory,
                                                                                           token=TOKEN)))
    await dead_client.start_server()
    try:
        await call(dead_client, "POST", drains, drains, json={"nodes": ["worker-04"]}, headers=AUTH)
        for route, method, path in ((drains, "GET", drains), (one, "GET", f"{drains}/{drain_id}"),
                                    (one, "DELETE", f"{drains}/{drain_id}"),
                                    (events, "GET", f"{drains}/{drain_id}/events")):
            await call(dead_client, method, route, path, headers=AUTH)
        for route in ("/readyz", "/metrics"):
            await call(dead_client, "GET", route, route)
    finally:
        await dead_client.close()
        await dead.redis.aclose()

    documented = {(route, method): set(operation["responses"])
                  for route, item in openapi_document()["paths"].items() for method, operation in item.items()}
    assert set(seen) == set(documented)
    for key, statuses in documented.items():
        assert sorted(seen[key]) == sorted(statuses), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ==================================================================================================== plans
async def test_plan_is_a_dry_run(env: Env) -> None:
    resp = await env.client.post("/v1/plans", json={"nodes": [DRAIN_NODE], "max_attempts": 2}, headers=AUTH)
    plan = await resp.json()
    assert resp.status == 200, plan
    assert plan["drain_nodes"] == [DRAIN_NODE]
    (node_plan,) = plan["nodes"]
    assert len(node_plan["jobs"]) == 15
    assert all(job["proposed_target"] != DRAIN_NODE for job in node_plan["jobs"])
    assert plan["capacity"]["ok"] is True
    assert plan["limits"]["max_attempts"] == 2
    assert plan["estimate"]["total_s"] > 0
    assert await _drain_ids(env) == []
    node = await env.service.kube.get(k.NODES, DRAIN_NODE)
    assert not node["spec"].get("unschedulable")


async def test_infeasible_request_is_422_with_the_planners_problems(env: Env) -> None:
    # Five of six nodes at once: nowhere near enough spare memory for the spare-memory rule.
    body = {"nodes": [f"worker-0{i}" for i in range(1, 6)], "max_parallel_nodes": 5}
    for path in ("/v1/plans", "/v1/drains"):
        resp = await env.client.post(path, json=body, headers=AUTH)
        assert resp.status == 422, path
        error = await _error(resp)
        assert error["code"] == "infeasible"
        problems = error["details"]["problems"]
        assert problems and all(isinstance(p, str) for p in problems)
        assert problems[0] in error["message"]
    assert await _drain_ids(env) == []


# =================================================================================================== drains
async def test_submit_returns_202_with_id_and_links(env: Env) -> None:
    resp = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]}, headers=AUTH)
    body = await resp.json()
    assert resp.status == 202, body
    assert body["phase"] == "Pending" and body["created"] is True
    assert body["links"] == {"self": f"/v1/drains/{body['id']}", "events": f"/v1/drains/{body['id']}/events"}
    assert resp.headers["Location"] == body["links"]["self"]
    assert await _drain_ids(env) == [body["id"]]
    assert ("DrainRequested", f"drainctl drain {body['id']} requested through the API") in await _node_events(
        env, DRAIN_NODE)

    detail_resp = await env.client.get(body["links"]["self"], headers=AUTH)
    detail = await detail_resp.json()
    assert detail_resp.status == 200, detail
    assert detail["id"] == body["id"] and detail["source"] == "api"
    assert detail["request"]["nodes"] == [DRAIN_NODE]
    assert detail["eta"]["estimate_s"] > 0
    assert detail["eta"]["elapsed_s"] >= 0
    assert detail["eta"]["remaining_s"] <= detail["eta"]["estimate_s"]
    assert detail["eta"]["time_scale"] == 50.0
    assert detail["progress"]["vms"] == 0  # not planned yet: no worker runs in this test
    assert detail["plan"] is None


async def test_list_is_newest_first(env: Env) -> None:
    ids = []
    for node in ("worker-02", "worker-03", "worker-04"):
        resp = await env.client.post("/v1/drains", json={"nodes": [node]}, headers=AUTH)
        assert resp.status == 202
        ids.append((await resp.json())["id"])
        await asyncio.sleep(0.01)  # distinct creation times
    resp = await env.client.get("/v1/drains", headers=AUTH)
    items = (await resp.json())["items"]
    assert [item["id"] for item in items] == list(reversed(ids))
    assert [item["nodes"] for item in items] == [["worker-04"], ["worker-03"], ["worker-02"]]
    resp = await env.client.get("/v1/drains?limit=2", headers=AUTH)
    assert len((await resp.json())["items"]) == 2
    resp = await env.client.get("/v1/drains?limit=0", headers=AUTH)
    assert resp.status == 422
    assert (await _error(resp))["message"].startswith("limit: ")


async def test_idempotency_key_returns_the_same_drain(env: Env) -> None:
    headers = {**AUTH, "Idempotency-Key": "upgrade-hook-worker-01-attempt"}
    body = {"nodes": [DRAIN_NODE], "max_attempts": 2}
    first = await env.client.post("/v1/drains", json=body, headers=headers)
    assert first.status == 202
    again = await env.client.post("/v1/drains", json=body, headers=headers)
    assert again.status == 200
    first_body, again_body = await first.json(), await again.json()
    assert again_body["id"] == first_body["id"]
    assert again_body["created"] is False
    assert await _drain_ids(env) == [first_body["id"]]

    other = await env.client.post("/v1/drains", json={**body, "max_attempts": 3}, headers=headers)
    assert other.status == 422
    error = await _error(other)
    assert error["code"] == "idempotency_key_reused" and error["details"] == {"drain": first_body["id"]}

    bad = await env.client.post("/v1/drains", json=body, headers={**AUTH, "Idempotency-Key": "has space"})
    assert bad.status == 400
    assert await _drain_ids(env) == [first_body["id"]]


async def test_a_node_already_draining_is_409_naming_node_and_drain(env: Env) -> None:
    first = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]}, headers=AUTH)
    assert first.status == 202
    drain_id = (await first.json())["id"]
    resp = await env.client.post("/v1/drains", json={"nodes": ["worker-02", DRAIN_NODE]}, headers=AUTH)
    assert resp.status == 409
    error = await _error(resp)
    assert error["code"] == "conflict"
    assert error["details"] == {"nodes": {DRAIN_NODE: drain_id}}
    assert DRAIN_NODE in error["message"] and drain_id in error["message"]
    assert await _drain_ids(env) == [drain_id]
    # The refused request took nothing: worker-02 is still free.
    resp = await env.client.post("/v1/drains", json={"nodes": ["worker-02"]}, headers=AUTH)
    assert resp.status == 202


async def test_cancel_validates_its_query(env: Env) -> None:
    resp = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]}, headers=AUTH)
    drain_id = (await resp.json())["id"]
    bad_mode = await env.client.delete(f"/v1/drains/{drain_id}?mode=later", headers=AUTH)
    assert bad_mode.status == 422 and (await _error(bad_mode))["message"].startswith("mode: ")
    bad_flag = await env.client.delete(f"/v1/drains/{drain_id}?uncordon=maybe", headers=AUTH)
    assert bad_flag.status == 422 and (await _error(bad_flag))["message"].startswith("uncordon: ")
    assert (await env.service.store.get(drain_id)).phase == "Pending"
    ok = await env.client.delete(f"/v1/drains/{drain_id}?mode=finish&uncordon=false", headers=AUTH)
    assert ok.status == 202
    assert (await ok.json())["phase"] == "Cancelling"
    record = await env.service.store.get(drain_id)
    assert record.cancel is not None and record.cancel.mode == "finish" and record.cancel.uncordon is False
    reasons = [reason for reason, _ in await _node_events(env, DRAIN_NODE)]
    assert reasons.count("DrainCancelRequested") == 1


# ================================================================================================== events
async def test_events_of_an_open_drain_stay_open_with_keep_alives(env: Env) -> None:
    resp = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]}, headers=AUTH)
    drain_id = (await resp.json())["id"]
    stream = await env.client.get(f"/v1/drains/{drain_id}/events", headers=AUTH)
    (submitted,) = await read_sse(stream, until="drain.submitted")
    assert submitted.data["nodes"] == [DRAIN_NODE] and submitted.data["source"] == "api"
    async with asyncio.timeout(10):
        while (line := await stream.content.readline()) != b": keep-alive\n":
            assert line in (b"\n",), line
    # A new event reaches the open stream live.
    await env.service.store.emit(drain_id, "drain.finished", phase="Failed", message="test")
    (finished,) = await read_sse(stream)
    assert finished.data["message"] == "test"
    stream.close()


async def test_events_of_a_long_finished_drain_without_its_finish_event_end(env: Env) -> None:
    old = time.time() - 3600
    await env.service.store.create(DrainRecord(id="old0drain", phase=DrainPhase.SUCCEEDED, created_at=old - 60,
                                               finished_at=old, request={"nodes": [DRAIN_NODE]}), nodes={}, vms={})
    stream = await env.client.get("/v1/drains/old0drain/events", headers=AUTH)
    assert stream.status == 200
    async with asyncio.timeout(10):
        assert await read_sse(stream) == []
    bad = await env.client.get("/v1/drains/old0drain/events", headers={**AUTH, "Last-Event-ID": "yesterday"})
    assert bad.status == 400


# ================================================================================================= openapi
async def test_openapi_describes_every_route(env: Env) -> None:
    resp = await env.client.get("/openapi.json")
    assert resp.status == 200
    doc = json.loads(await resp.text())
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/drains", "/v1/drains/{drain_id}", "/v1/drains/{drain_id}/events",
                                 "/v1/plans", "/healthz", "/readyz", "/metrics", "/openapi.json"}
    assert set(doc["paths"]["/v1/drains"]) == {"get", "post"}
    assert set(doc["paths"]["/v1/drains/{drain_id}"]) == {"get", "delete"}
    schemas = doc["components"]["schemas"]
    request_schema = schemas["DrainRequestBody"]
    assert request_schema["required"] == ["nodes"]
    assert {"nodes", "max_parallel_nodes", "order", "non_migratable", "max_attempts"} <= set(
        request_schema["properties"])
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs, "no schema references at all"
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert doc == openapi_document()


# ================================================================================== the real path, workers
@dataclass(frozen=True)
class SseEvent:
    id: str
    event: str
    data: dict[str, Any]


async def read_sse(resp: ClientResponse, *, until: str = "drain.finished") -> list[SseEvent]:
    events: list[SseEvent] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(PATIENCE_S):
        while True:
            raw = await resp.content.readline()
            if not raw:
                return events
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if line == "":
                if "data" in fields:
                    events.append(SseEvent(fields["id"], fields["event"], json.loads(fields["data"])))
                    if events[-1].event == until:
                        return events
                fields = {}
                continue
            name, _, value = line.partition(": ")
            fields[name] = value


def _stream_order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


async def test_events_stream_until_finished_and_metrics_after(tmp_path: Path) -> None:
    async with api_env(tmp_path, time_scale=50.0) as env:
        await env.start_worker()
        resp = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]}, headers=AUTH)
        assert resp.status == 202
        drain_id = (await resp.json())["id"]

        stream = await env.client.get(f"/v1/drains/{drain_id}/events", headers=AUTH)
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(stream)
        # The server ends the stream after drain.finished.
        async with asyncio.timeout(10):
            assert await stream.content.read() == b""

        names = [e.event for e in events]
        assert names[0] == "drain.submitted"
        assert names[-1] == "drain.finished", names
        assert names.count("drain.finished") == 1
        assert {"drain.planned", "node.started", "migration.created", "vm.succeeded", "node.drained"} <= set(names)
        assert names.count("vm.succeeded") == 15
        assert events[-1].data["phase"] == "Succeeded", events[-1].data
        assert all(e.data["id"] == e.id and e.data["event"] == e.event for e in events)
        order = [_stream_order(e.id) for e in events]
        assert order == sorted(order) and len(set(order)) == len(order)

        # A client that reconnects with Last-Event-ID gets exactly what followed.
        middle = events[len(events) // 2]
        resumed = await env.client.get(f"/v1/drains/{drain_id}/events",
                                       headers={**AUTH, "Last-Event-ID": middle.id})
        rest = await read_sse(resumed)
        assert [e.id for e in rest] == [e.id for e in events[len(events) // 2 + 1:]]

        detail = await (await env.client.get(f"/v1/drains/{drain_id}", headers=AUTH)).json()
        assert detail["phase"] == "Succeeded"
        assert detail["nodes"][DRAIN_NODE]["phase"] == "Drained"
        assert detail["progress"] == {"nodes": 1, "nodes_final": 1, "vms": 15, "vms_final": 15,
                                      "vms_succeeded": 15, "vms_failed": 0}
        assert detail["eta"]["remaining_s"] is None and detail["eta"]["elapsed_s"] > 0
        for vm in detail["vms"].values():
            assert vm["attempts"] and vm["attempts"][-1]["outcome"] == "Succeeded"
            assert vm["target"] != DRAIN_NODE

        stats = await env.stats()
        succeeded = [m for m in stats["migrations"] if m["phase"] == "Succeeded"]
        assert len(succeeded) == 15
        assert stats["max_in_flight_cluster"] <= 5
        assert all(n <= 2 for n in stats["max_in_flight_per_node"].values())

        metrics = await env.client.get("/metrics")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(await metrics.text()) for s in family.samples}
        started = samples[("drainctl_migrations_started_total", ())]
        assert started == len(stats["migrations"]) >= 15
        assert samples[("drainctl_migrations_succeeded_total", ())] == 15
        assert samples[("drainctl_drains", (("phase", "Succeeded"),))] == 1
        assert samples[("drainctl_drains", (("phase", "Running"),))] == 0
        assert samples[("drainctl_migration_duration_seconds_count", (("outcome", "Succeeded"),))] == 15
        # Migrations in the simulator last at least their setup time (several cluster seconds); no upper bound:
        # cluster time runs with the wall clock, and a busy machine stretches it.
        total_s = samples[("drainctl_migration_duration_seconds_sum", (("outcome", "Succeeded"),))]
        assert total_s > 15 * 1.0
        assert samples[("drainctl_vm_migration_attempts_count", ())] == 15
        assert samples[("drainctl_semaphore_waiters", ())] == 0
        assert not any(name == "drainctl_semaphore_slots_in_use" and value > 0
                       for (name, _), value in samples.items())
        assert ("drainctl_queue_depth", ()) in samples


async def test_cancel_aborts_in_flight_migrations(tmp_path: Path) -> None:
    # Slow enough that a transfer outlives the worker's cancel check (the job re-reads the drain about once a
    # wall second), so the abort really lands on a running migration.
    async with api_env(tmp_path, time_scale=2.0) as env:
        await env.start_worker()
        resp = await env.client.post("/v1/drains", json={"nodes": [DRAIN_NODE]}, headers=AUTH)
        drain_id = (await resp.json())["id"]
        stream = await env.client.get(f"/v1/drains/{drain_id}/events", headers=AUTH)
        # Cancel while a migration is transferring: KubeVirt reports the abort of a running migration.
        await read_sse(stream, until="migration.running")

        cancel = await env.client.delete(f"/v1/drains/{drain_id}", headers=AUTH)
        assert cancel.status == 202
        assert (await cancel.json())["phase"] == "Cancelling"
        events = await read_sse(stream)
        assert events[-1].event == "drain.finished" and events[-1].data["phase"] == "Cancelled"
        assert "migration.abort" in [e.event for e in events], [e.event for e in events]

        detail = await (await env.client.get(f"/v1/drains/{drain_id}", headers=AUTH)).json()
        assert detail["phase"] == "Cancelled"
        cancelled = [vm for vm in detail["vms"].values() if vm["phase"] == "Cancelled"]
        assert cancelled, detail["vms"]
        assert any(a.get("failure_class") == "Aborted" for vm in cancelled for a in vm["attempts"])

        stats = await env.stats()
        aborted = [m for m in stats["migrations"]
                   if m["phase"] == "Failed" and "aborted" in (m["failure_reason"] or "").lower()]
        assert aborted, json.dumps(stats["migrations"], indent=1)
        assert all(m["phase"] in ("Succeeded", "Failed") for m in stats["migrations"]), stats["migrations"]
        assert stats["in_flight"] == 0
        node = await env.service.kube.get(k.NODES, DRAIN_NODE)
        assert not node["spec"].get("unschedulable"), "uncordon_on_cancel defaults to true"

        again = await env.client.delete(f"/v1/drains/{drain_id}", headers=AUTH)
        assert again.status == 200 and (await again.json())["phase"] == "Cancelled"
