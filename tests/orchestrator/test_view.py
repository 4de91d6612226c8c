"""The cluster view and plan snapshots: cost follows the drain, not the cluster.

- A plan from the warm, watch-fed view (and from the targeted reads without one) equals the plan from a
  snapshot of the whole cluster.
- Lists page with limit/continue as client-go's reflectors do, still work when a server ignores `limit`, and
  start over when a continue token expires.
- The view keeps no pod object: per-pod (node, memory) only, and node objects cut to what the parser reads.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from orchestrator import kube as k
from orchestrator.kube import Kube
from orchestrator.model import DrainRequest
from orchestrator.planner import PlanError, plan_drain
from orchestrator.settings import Settings
from orchestrator.view import ClusterView, drain_snapshot, slim_node
from simulator import scenarios
from simulator.cluster import running_cluster
from simulator.server import write_kubeconfig

NOW = 1_700_000_000.0


@pytest.fixture
async def enterprise(tmp_path: Path) -> AsyncIterator[Kube]:
    kubeconfig = tmp_path / "kubeconfig"
    async with running_cluster(scenarios.builtin("enterprise"), time_scale=1.0, token=secrets.token_hex(8),
                               kubeconfig_out=kubeconfig):
        kube = await Kube.connect(kubeconfig=kubeconfig)
        try:
            yield kube
        finally:
            await kube.close()


def _plans(kube_snapshot: Any, other: Any, request: DrainRequest) -> tuple[Any, Any]:
    settings = Settings()
    return (plan_drain(kube_snapshot, request, settings, now=NOW).to_json(),
            plan_drain(other, request, settings, now=NOW).to_json())


async def test_plan_from_the_warm_view_equals_the_plan_from_a_full_list(enterprise: Kube) -> None:
    sc = scenarios.builtin("enterprise")
    request = DrainRequest.from_json({"nodes": list(sc.drain_hint), "max_parallel_nodes": sc.parallel_hint})
    view = ClusterView(enterprise)
    await view.start()
    try:
        assert view.warm
        before = enterprise.requests
        warm = await drain_snapshot(enterprise, [str(n) for n in request.nodes], view)
        warm_requests = enterprise.requests - before
        full = await enterprise.snapshot()
        full_plan, warm_plan = _plans(full, warm, request)
        assert warm_plan == full_plan
        assert full_plan["nodes"] and any(node["jobs"] for node in full_plan["nodes"])
        # The warm snapshot read the drained nodes' pods and VMIs, the VMIMs and the KubeVirt CR: no list of
        # every node or every pod (one request per drained node and kind, plus two).
        assert warm_requests <= 2 * len(request.nodes) + 2 + len(warm.vmis)
        # Without a view: the same plan from targeted reads and a reduced pod list.
        cold = await drain_snapshot(enterprise, [str(n) for n in request.nodes])
        assert _plans(full, cold, request)[1] == full_plan
        assert len(cold.pods) < len(full.pods) and len(cold.vmis) < len(full.vmis)
    finally:
        await view.stop()


async def test_plan_from_the_view_refuses_what_the_full_plan_refuses(enterprise: Kube) -> None:
    view = ClusterView(enterprise)
    await view.start()
    try:
        nodes = [o["metadata"]["name"] for o in view.nodes.values()]
        request = DrainRequest.from_json({"nodes": [*nodes, "no-such-node"]})
        with pytest.raises(PlanError) as full_error:
            plan_drain(await enterprise.snapshot(), request, Settings(), now=NOW)
        with pytest.raises(PlanError) as warm_error:
            plan_drain(await drain_snapshot(enterprise, [str(n) for n in request.nodes], view), request,
                       Settings(), now=NOW)
        assert warm_error.value.problems == full_error.value.problems
    finally:
        await view.stop()


def _walk(value: Any, seen: set[int]) -> Iterator[Any]:
    if id(value) in seen:
        return
    seen.add(id(value))
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _walk(item, seen)


async def test_the_view_holds_no_pod_objects(enterprise: Kube) -> None:
    view = ClusterView(enterprise)
    await view.start()
    try:
        pods, _ = await enterprise.list(k.PODS)
        assert pods and sum(view.node_used.values()) > 0
        held = [v for v in _walk(dict(vars(view)), set())
                if isinstance(v, dict) and isinstance(v.get("spec"), dict) and "containers" in v["spec"]]
        assert held == []
        assert len(view._pods) == sum(1 for p in pods if (p.get("spec") or {}).get("nodeName"))
        node = next(iter(view.nodes.values()))
        assert set(node) <= {"kind", "apiVersion", "metadata", "spec", "status"}
        assert set(node["status"]) <= {"allocatable", "capacity", "conditions"}
    finally:
        await view.stop()


def test_slim_node_keeps_what_the_parser_reads() -> None:
    raw = {"kind": "Node", "apiVersion": "v1",
           "metadata": {"name": "n1", "labels": {"a": "b"}, "managedFields": [{"x": 1}], "resourceVersion": "7"},
           "spec": {"unschedulable": True, "taints": [{"key": "k", "effect": "NoSchedule"}], "podCIDR": "x"},
           "status": {"allocatable": {"memory": "1Gi"}, "images": [{"names": ["a"] * 50}],
                      "conditions": [{"type": "Ready", "status": "True"}], "nodeInfo": {"kernel": "6"}}}
    slim = slim_node(raw)
    assert "managedFields" not in slim["metadata"] and "images" not in slim["status"]
    assert "podCIDR" not in slim["spec"] and slim["metadata"]["labels"] == {"a": "b"}
    from orchestrator.snapshot import parse_node
    assert parse_node(slim) == parse_node(raw)


# --------------------------------------------------------------------------------------------- paging
class _Pager:
    """A minimal API server for /api/v1/pods: pages by limit/continue, or ignores limit, or expires a token."""

    def __init__(self, count: int, *, honour_limit: bool = True, expire_once: bool = False) -> None:
        self.items = [{"metadata": {"name": f"p{i}", "namespace": "ns"}, "spec": {"nodeName": "n1"}}
                      for i in range(count)]
        self.honour_limit = honour_limit
        self.expire_once = expire_once
        self.queries: list[dict[str, str]] = []

    async def pods(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.queries.append(query)
        token = query.get("continue")
        if token and self.expire_once:
            self.expire_once = False
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired",
                                      "message": "continue token expired"}, status=410)
        start = int(token) if token else 0
        limit = int(query.get("limit", "0")) if self.honour_limit else 0
        end = len(self.items) if not limit else min(len(self.items), start + limit)
        meta: dict[str, Any] = {"resourceVersion": "42"}
        if end < len(self.items):
            meta["continue"] = str(end)
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": meta,
                                  "items": self.items[start:end]})


@pytest.fixture
def pager_server(tmp_path: Path) -> Any:
    async def make(pager: _Pager) -> tuple[web.AppRunner, Kube]:
        app = web.Application()
        app.router.add_get("/api/v1/pods", pager.pods)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        kubeconfig = tmp_path / f"kubeconfig-{port}"
        write_kubeconfig(kubeconfig, server_url=f"http://127.0.0.1:{port}", token=None, ca_data=None)
        return runner, await Kube.connect(kubeconfig=kubeconfig)

    return make


async def test_list_follows_continue_tokens(pager_server: Any) -> None:
    pager = _Pager(1234)
    runner, kube = await pager_server(pager)
    try:
        items, rv = await kube.list(k.PODS, page_size=500)
    finally:
        await kube.close()
        await runner.cleanup()
    assert [i["metadata"]["name"] for i in items] == [f"p{i}" for i in range(1234)]
    assert rv == "42"
    assert [q.get("continue") for q in pager.queries] == [None, "500", "1000"]
    assert all(q["limit"] == "500" for q in pager.queries)


async def test_list_works_when_the_server_ignores_limit(pager_server: Any) -> None:
    pager = _Pager(1234, honour_limit=False)
    runner, kube = await pager_server(pager)
    try:
        items, _ = await kube.list(k.PODS, page_size=10)
    finally:
        await kube.close()
        await runner.cleanup()
    assert len(items) == 1234 and len(pager.queries) == 1


async def test_an_expired_continue_token_lists_again_from_the_start(pager_server: Any) -> None:
    pager = _Pager(25, expire_once=True)
    runner, kube = await pager_server(pager)
    restarts: list[int] = []
    try:
        pages = kube.pages(k.PODS, page_size=10)
        seen: list[str] = []
        pages.on_restart = lambda: (restarts.append(1), seen.clear())  # type: ignore[func-returns-value]
        async for page in pages:
            seen.extend(i["metadata"]["name"] for i in page)
    finally:
        await kube.close()
        await runner.cleanup()
    assert seen == [f"p{i}" for i in range(25)]
    assert restarts == [1] and pages.restarted == 1
    assert [q.get("continue") for q in pager.queries] == [None, "10", None, "10", "20"]


def test_pages_refuse_a_negative_size() -> None:
    with pytest.raises(ValueError, match="page_size"):
        k.Pages(None, k.PODS, None, label_selector=None, field_selector=None, page_size=-1)  # type: ignore[arg-type]
