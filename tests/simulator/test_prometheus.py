"""The simulated cluster's Prometheus HTTP API: KubeVirt's migration metrics over HTTP, live from the physics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from simulator import scenarios
from simulator.cluster import RunningCluster, running_cluster
from simulator.prometheus import (
    METRIC_NAMES,
    PromQLError,
    Selector,
    SeriesStore,
    format_value,
    parse_selector,
)
from simulator.resources import VMIMS

TOKEN = "prom-test-token"
HOT = ("analytics", "hot-00001")  # dirties memory faster than its share of the NIC: never converges
DB = ("databases", "db-00001")  # converges


# ------------------------------------------------------------------------------------------ selectors
@pytest.mark.parametrize(("query", "labels", "expected"), [
    ("up", {"__name__": "up"}, True),
    ("up", {"__name__": "down"}, False),
    ('up{job="a"}', {"__name__": "up", "job": "a"}, True),
    ('up{job!="a"}', {"__name__": "up", "job": "a"}, False),
    ('up{job!="a"}', {"__name__": "up"}, True),  # a missing label is the empty string
    ('{__name__=~"kubevirt_vmi_.*", name=~"hot-.+"}', {"__name__": "kubevirt_vmi_x", "name": "hot-1"}, True),
    ('{__name__=~"kubevirt_vmi_.*"}', {"__name__": "xkubevirt_vmi_x"}, False),  # regexes are anchored
    ('up{name!~"db-.*",}', {"__name__": "up", "name": "db-2"}, False),  # trailing comma is allowed
    ("up{name='it\\'s'}", {"__name__": "up", "name": "it's"}, True),
    ("up{name=`a\\b`}", {"__name__": "up", "name": "a\\b"}, True),  # raw strings keep backslashes
    ('  up { job = "a" }  ', {"__name__": "up", "job": "a"}, True),
])
def test_selector_matching(query: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(query).matches(labels) is expected


@pytest.mark.parametrize(("query", "message"), [
    ("", "1:1: parse error: no expression found in input"),
    ('{job=~".*"}', "at least one non-empty matcher"),
    ("rate(up[5m])", "functions and aggregations such as rate(...) are not served"),
    ("up[5m]", "instant vector selectors only"),
    ("up offset 5m", "instant vector selectors only"),
    ("sum by (a) (up)", "instant vector selectors only"),
    ('up{job="a"', "unexpected end of input inside braces"),
    ("up{job=a}", "expected string"),
    ('up{job=="a"}', "expected string"),
    ('up{job<"a"}', "in label matching"),
    ('up{job="a}', "unterminated quoted string"),
    ('up{job=~"("}', "error parsing regexp"),
    ("1 + 1", "unexpected character"),
])
def test_selector_errors(query: str, message: str) -> None:
    with pytest.raises(PromQLError) as info:
        parse_selector(query)
    assert message in str(info.value)


@pytest.mark.parametrize(("value", "text"), [
    (0.0, "0"), (1.5e9, "1500000000"), (0.25, "0.25"), (1e-7, "0.0000001"), (float("nan"), "NaN"),
    (float("inf"), "+Inf"), (-float("inf"), "-Inf"), (123456789.5, "123456789.5"), (1e22, "10000000000000000000000"),
])
def test_values_are_formatted_like_prometheus(value: float, text: str) -> None:
    assert format_value(value) == text


def test_series_go_stale_when_they_vanish_and_age_out_of_the_lookback() -> None:
    store = SeriesStore()
    labels = {"__name__": "m", "name": "a"}
    sel = Selector(parse_selector("m").matchers)
    store.append(labels, 100.0, 1.0)
    store.mark_stale({SeriesStore.key(labels)}, 100.0)
    assert store.instant(sel, 100.0) == [(labels, 1.0)]
    assert store.instant(sel, 399.0) == [(labels, 1.0)]  # within the 5-minute lookback
    assert store.instant(sel, 400.0) == []  # older than the lookback
    assert store.instant(sel, 99.0) == []  # nothing before the first sample
    store.mark_stale(set(), 105.0)  # the next scrape no longer has it
    assert store.instant(sel, 104.0) == [(labels, 1.0)]
    assert store.instant(sel, 105.0) == []
    store.append(labels, 110.0, 2.0)  # it comes back
    assert store.instant(sel, 110.0) == [(labels, 2.0)]


# ------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture
async def hostile() -> AsyncIterator[RunningCluster]:
    # slow enough that a busy machine still samples a converging migration several times over HTTP
    async with running_cluster(scenarios.builtin("hostile"), time_scale=25.0, token=TOKEN, tls=False,
                               prometheus_port=0) as rc:
        yield rc


async def _get(rc: RunningCluster, path: str, *, token: str | None = TOKEN,
               **params: str) -> tuple[int, str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as session, \
            session.get(f"{rc.prometheus_url}{path}", params=params) as resp:
        text = await resp.text()
        body = await resp.json(content_type=None) if resp.content_type == "application/json" else None
        return resp.status, text, body


async def _series(rc: RunningCluster, query: str) -> list[dict[str, Any]]:
    status, text, body = await _get(rc, "/api/v1/query", query=query)
    assert status == 200, text
    assert body["status"] == "success" and body["data"]["resultType"] == "vector"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _migrate(rc: RunningCluster, namespace: str, name: str) -> None:
    rc.cluster.store.create(VMIMS, {"metadata": {"namespace": namespace, "name": f"mig-{name}"},
                                    "spec": {"vmiName": name}})


async def _until(predicate: Any, *, wall_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + wall_s
    while not await predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_migration_metrics_follow_the_physics(hostile: RunningCluster) -> None:
    rc = hostile
    _migrate(rc, *HOT)
    _migrate(rc, *DB)
    physics = {vm["vmi"]: vm for vm in rc.cluster.scenario_json()["vms"]}

    async def both_reporting() -> bool:
        return len(await _series(rc, "kubevirt_vmi_migration_data_remaining_bytes")) == 2

    await _until(both_reporting)
    every = await _series(rc, '{__name__=~"kubevirt_vmi_migration_.*"}')
    assert {s["metric"]["__name__"] for s in every} == set(METRIC_NAMES)
    sources = {m["vmi"]: m["source"] for m in (await rc.stats())["migrations"]}
    for s in every:
        metric = s["metric"]
        vmi = f"{metric['namespace']}/{metric['name']}"
        assert metric["node"] == sources[vmi]  # the virt-handler of the source node reports it
        assert metric["job"] == "kubevirt-prometheus-metrics" and metric["pod"] == f"virt-handler-{metric['node']}"
        assert list(metric) == sorted(metric)  # Prometheus returns label sets sorted by name
        assert isinstance(s["value"][0], float | int) and isinstance(s["value"][1], str)
    total = await _series(rc, f'kubevirt_vmi_migration_data_bytes_total{{name="{HOT[1]}"}}')
    assert float(total[0]["value"][1]) == physics["/".join(HOT)]["memory_bytes"]

    # Sample both VMs over cluster time: the converging one's remaining shrinks until its series goes away
    # (the migration succeeded); the other one's never falls below its writable working set.
    hot_remaining: list[float] = []
    hot_rates: list[tuple[float, float]] = []
    db_remaining: list[float] = []
    processed: list[float] = []

    async def db_done() -> bool:
        rows = {(s["metric"]["name"], s["metric"]["__name__"]): float(s["value"][1])
                for s in await _series(rc, '{__name__=~"kubevirt_vmi_migration_.*",name=~"hot-00001|db-00001"}')}
        hot = rows[(HOT[1], "kubevirt_vmi_migration_data_remaining_bytes")]
        hot_remaining.append(hot)
        processed.append(rows[(HOT[1], "kubevirt_vmi_migration_data_processed_bytes")])
        dirty = rows[(HOT[1], "kubevirt_vmi_migration_dirty_memory_rate_bytes")]
        if (DB[1], "kubevirt_vmi_migration_data_remaining_bytes") in rows:
            if dirty > 0:  # shares are steady while both migrate; the dirty rate is the last round's
                hot_rates.append((dirty, rows[(HOT[1], "kubevirt_vmi_migration_memory_transfer_rate_bytes")]))
            db_remaining.append(rows[(DB[1], "kubevirt_vmi_migration_data_remaining_bytes")])
            return False
        return True

    await _until(db_done, wall_s=90)

    async def db_succeeded() -> bool:  # the series ends with the transfer; the VMIM succeeds after cleanup
        return any(m["vmi"] == "/".join(DB) and m["phase"] == "Succeeded" for m in (await rc.stats())["migrations"])

    await _until(db_succeeded)
    assert len(db_remaining) >= 3 and db_remaining[-1] < db_remaining[0] / 2
    wws = physics["/".join(HOT)]["wws_bytes"]
    assert min(hot_remaining) >= 0.99 * wws
    assert processed == sorted(processed) and processed[-1] > processed[0]  # the bytes keep moving
    # the first pass is long, so the first measured dirty rate reads low; later rounds at the transfer rate
    assert hot_rates and hot_rates[-1][0] >= 0.99 * hot_rates[-1][1] > 0

    # query_range returns the history as a matrix
    now = rc.cluster.clock.now()
    status, text, body = await _get(rc, "/api/v1/query_range", query=f'kubevirt_vmi_migration_data_remaining_bytes'
                                    f'{{name="{DB[1]}"}}', start=str(now - 300), end=str(now), step="5s")
    assert status == 200, text
    assert body["data"]["resultType"] == "matrix"
    values = body["data"]["result"][0]["values"]
    assert len(values) >= 3 and float(values[-1][1]) < float(values[0][1])


async def test_bad_queries_get_prometheus_error_json(hostile: RunningCluster) -> None:
    status, _, body = await _get(hostile, "/api/v1/query", query="rate(x[5m])")
    assert status == 400
    assert body["status"] == "error" and body["errorType"] == "bad_data"
    assert body["error"].startswith('invalid parameter "query": 1:1: parse error:')
    status, _, body = await _get(hostile, "/api/v1/query", query="up", time="yesterday")
    assert (status, body["error"]) == (400, 'invalid parameter "time": cannot parse "yesterday" to a valid '
                                            "timestamp")
    status, _, body = await _get(hostile, "/api/v1/query_range", query="up", start="10", end="5", step="1")
    assert (status, body["error"]) == (400, 'invalid parameter "end": end timestamp must not be before start time')
    status, _, body = await _get(hostile, "/api/v1/query_range", query="up", start="0", end="100000", step="1")
    assert status == 400 and "exceeded maximum resolution" in body["error"]
    status, _, body = await _get(hostile, "/api/v1/query", query="up")
    assert (status, body) == (200, {"status": "success", "data": {"resultType": "vector", "result": []}})
    status, _, _ = await _get(hostile, "/api/v1/nothing")
    assert status == 404


async def test_the_cluster_token_is_required(hostile: RunningCluster) -> None:
    status, text, _ = await _get(hostile, "/api/v1/query", token=None, query="up")
    assert (status, text) == (401, "Unauthorized\n")
    status, _, _ = await _get(hostile, "/api/v1/query", token="wrong", query="up")
    assert status == 401
    status, _, _ = await _get(hostile, "/api/v1/query", token=hostile.cluster.admin_token, query="up")
    assert status == 200  # the admin token reads what the cluster shows too
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session, \
            session.post(f"{hostile.prometheus_url}/api/v1/query", data={"query": "up"}) as resp:
        assert resp.status == 200  # form POST, as Prometheus clients send long queries


async def test_guest_dirty_rate_of_running_vmis(hostile: RunningCluster) -> None:
    physics = {vm["vmi"]: vm for vm in hostile.cluster.scenario_json()["vms"]}
    rows = await _series(hostile, 'kubevirt_vmi_dirty_rate_bytes_per_second{namespace="databases"}')
    assert {f"{r['metric']['namespace']}/{r['metric']['name']}" for r in rows} == \
        {k for k, vm in physics.items() if k.startswith("databases/")}
    for row in rows:
        vm = physics[f"{row['metric']['namespace']}/{row['metric']['name']}"]
        expected = min(vm["dirty_bytes_per_s"], vm["wws_bytes"]) // 2**20 * 2**20
        assert float(row["value"][1]) == expected
        assert row["metric"]["node"] == vm["node"]
    # not among the migration metrics a regex on kubevirt_vmi_migration_ selects
    assert await _series(hostile, '{__name__=~"kubevirt_vmi_migration_.*"}') == []
