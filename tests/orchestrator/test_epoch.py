"""The Redis epoch against fakeredis and a cluster stand-in: the first check creates the epoch, a Redis that
lost its data is seen by every process that knew the old epoch, exactly one process reports each lost drain,
and only drains the cluster still shows (a cordoned node under our annotation) with no record count as lost.
The real path (worker processes, a redis-server restarted empty) is tests/integration/test_redis_outage.py."""

from __future__ import annotations

from typing import Any

import fakeredis

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.epoch import EpochGuard
from orchestrator.model import DrainPhase, DrainRequest, NodePhase
from orchestrator.records import DrainRecord
from orchestrator.store import DrainStore


def node(name: str, *, drain: str | None, cordoned: bool, drained_at: str | None = None) -> dict[str, Any]:
    annotations = {}
    if drain:
        annotations["drainctl.io/drain-id"] = drain
    if drained_at:
        annotations["drainctl.io/drained-at"] = drained_at
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name, "annotations": annotations},
            "spec": {"unschedulable": True} if cordoned else {}}


class Cluster:
    """The few reads and writes the epoch guard makes, over a fixed list of nodes and VMIMs."""

    def __init__(self, nodes: list[dict[str, Any]], vmims: list[dict[str, Any]] | None = None) -> None:
        self.nodes = nodes
        self.vmims = vmims or []
        self.events: list[dict[str, Any]] = []

    async def list(self, kind: k.Kind, namespace: str | None = None, *, label_selector: str | None = None,
                   field_selector: str | None = None) -> tuple[list[dict[str, Any]], str]:
        if kind is k.NODES:
            return self.nodes, "1"
        assert kind is k.VMIMS and label_selector is not None
        key, _, value = label_selector.partition("=")
        return [o for o in self.vmims if o["metadata"]["labels"].get(key) == value], "1"

    async def find(self, kind: k.Kind, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return next((n for n in self.nodes if n["metadata"]["name"] == name), None)

    async def event(self, *, involved: dict[str, Any], reason: str, message: str, warning: bool = False,
                    now_iso: str, component: str = "drainctl") -> None:
        self.events.append({"node": involved["metadata"]["name"], "reason": reason, "message": message,
                            "warning": warning})


def guard(redis: Any, cluster: Cluster, owner: str) -> EpochGuard:
    return EpochGuard(redis, cluster, owner=owner)  # type: ignore[arg-type]  # the stand-in quacks like Kube


async def test_a_fresh_redis_gets_an_epoch_and_reports_nothing_without_our_cordons() -> None:
    redis = fakeredis.FakeAsyncRedis()
    cluster = Cluster([node("n1", drain=None, cordoned=True), node("n2", drain="old", cordoned=False)])
    a = guard(redis, cluster, "worker-a")
    assert await a.check() == []
    assert a.epoch is not None and (await redis.get(keys.EPOCH_KEY)).decode() == a.epoch
    b = guard(redis, cluster, "worker-b")
    assert await b.check() == [] and b.epoch == a.epoch
    assert await a.check() == [] and a.losses == 0 and cluster.events == []


async def test_a_redis_that_lost_its_data_reports_each_lost_drain_once() -> None:
    redis = fakeredis.FakeAsyncRedis()
    store = DrainStore(redis)
    cluster = Cluster(
        [node("n1", drain="d1", cordoned=True), node("n2", drain="d1", cordoned=True, drained_at="2026-01-01T10:00Z"),
         node("n3", drain="d2", cordoned=True), node("n4", drain="d3", cordoned=False)],
        [{"metadata": {"namespace": "ns", "name": "drain-d1-vm-1", "labels": {"drainctl.io/drain-id": "d1"}},
          "status": {"phase": "Running"}},
         {"metadata": {"namespace": "ns", "name": "drain-d1-vm0-1", "labels": {"drainctl.io/drain-id": "d1"}},
          "status": {"phase": "Succeeded"}}])
    for drain_id, nodes in (("d1", ["n1", "n2"]), ("d2", ["n3"])):
        await store.create(DrainRecord(id=drain_id, request=DrainRequest.from_json({"nodes": nodes}).to_json()),
                           nodes={}, vms={})
    a, b = guard(redis, cluster, "worker-a"), guard(redis, cluster, "worker-b")
    assert await a.check() == [] and await b.check() == []  # every cordon of ours has its drain recorded
    # d2 is still recorded when the data goes: only d1 is lost, d3's node is not cordoned any more.
    await redis.flushall()
    await store.create(DrainRecord(id="d2", request=DrainRequest.from_json({"nodes": ["n3"]}).to_json()),
                       nodes={}, vms={})
    reported = await a.check() + await b.check()
    assert [lost.drain_id for lost in reported] == ["d1"]
    assert a.losses == 1 and b.losses == 1 and a.epoch == b.epoch
    lost = reported[0]
    assert [n.name for n in lost.nodes] == ["n1", "n2"] and lost.running_vmims == ("ns/drain-d1-vm-1",)
    record = await store.view("d1")
    assert record.drain.phase is DrainPhase.FAILED and record.drain.source == "recovered"
    assert record.drain.message is not None and "left cordoned mid-drain: n1" in record.drain.message
    assert record.nodes["n1"].phase is NodePhase.FAILED and record.nodes["n2"].phase is NodePhase.DRAINED
    assert sorted((e["node"], e["reason"], e["warning"]) for e in cluster.events) == [
        ("n1", "DrainLost", True), ("n2", "DrainLost", True)]
    # Later checks find the same epoch: nothing is reported twice.
    assert await a.check() == [] and await b.check() == [] and len(cluster.events) == 2


async def test_a_scan_that_failed_is_owed_to_the_next_check() -> None:
    redis = fakeredis.FakeAsyncRedis()

    class Flaky(Cluster):
        calls = 0

        async def list(self, kind: k.Kind, namespace: str | None = None, *, label_selector: str | None = None,
                       field_selector: str | None = None) -> tuple[list[dict[str, Any]], str]:
            self.calls += 1
            if self.calls == 1:
                raise k.Unavailable(503, "ServiceUnavailable", "injected")
            return await super().list(kind, namespace, label_selector=label_selector)

    cluster = Flaky([node("n1", drain="gone", cordoned=True)])
    a = guard(redis, cluster, "api")
    try:
        await a.check()
    except k.Unavailable:
        pass
    else:
        raise AssertionError("the first scan should have failed")
    assert [lost.drain_id for lost in await a.check()] == ["gone"]


async def test_a_scan_left_undone_by_one_process_is_done_by_another() -> None:
    redis = fakeredis.FakeAsyncRedis()

    class Down(Cluster):
        async def list(self, kind: k.Kind, namespace: str | None = None, *, label_selector: str | None = None,
                       field_selector: str | None = None) -> tuple[list[dict[str, Any]], str]:
            raise k.Unavailable(503, "ServiceUnavailable", "injected")

    nodes = [node("n1", drain="gone", cordoned=True)]
    creator = guard(redis, Down(nodes), "api")  # creates the epoch, then cannot scan (and its process dies)
    try:
        await creator.check()
    except k.Unavailable:
        pass
    else:
        raise AssertionError("the scan should have failed")
    other = guard(redis, Cluster(nodes), "worker")
    assert [lost.drain_id for lost in await other.check()] == ["gone"]
    assert await other.check() == []
