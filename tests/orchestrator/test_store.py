"""The store owns the typed records: what goes in comes back typed, JSON keeps its field names, updates are
read-modify-write and never lose a concurrent change."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import fakeredis.aioredis
import pytest

from orchestrator import keys
from orchestrator.model import DrainPhase, FailureClass, NodePhase, VmPhase
from orchestrator.records import AttemptRecord, DrainRecord, NodeRecord, VmRecord
from orchestrator.store import DrainStore


@pytest.fixture
def store() -> DrainStore:
    return DrainStore(fakeredis.aioredis.FakeRedis())


def drain(drain_id: str = "d1") -> DrainRecord:
    return DrainRecord(id=drain_id, phase=DrainPhase.RUNNING, created_at=1.0, request={"nodes": ["n1"]})


@pytest.mark.parametrize(("phase", "final"), [
    (DrainPhase.PENDING, False), (DrainPhase.PLANNING, False), (DrainPhase.RUNNING, False),
    (DrainPhase.CANCELLING, False), (DrainPhase.SUCCEEDED, True), (DrainPhase.FAILED, True),
    (DrainPhase.CANCELLED, True),
    (NodePhase.PENDING, False), (NodePhase.CORDONED, False), (NodePhase.MIGRATING, False),
    (NodePhase.EVICTING, False), (NodePhase.DRAINED, True), (NodePhase.INCOMPLETE, True),
    (NodePhase.FAILED, True), (NodePhase.CANCELLED, True),
    (VmPhase.QUEUED, False), (VmPhase.WAITING, False), (VmPhase.MIGRATING, False), (VmPhase.SUCCEEDED, True),
    (VmPhase.FAILED, True), (VmPhase.SKIPPED, True), (VmPhase.BLOCKED, True), (VmPhase.CANCELLED, True),
])
def test_one_is_final_per_phase(phase: DrainPhase | NodePhase | VmPhase, final: bool) -> None:
    assert phase.is_final is final


async def test_records_come_back_typed_and_json_keeps_its_field_names(store: DrainStore) -> None:
    vm = VmRecord(vmi="ns/a", node="n1", phase=VmPhase.MIGRATING, attempt=1, memory_bytes=4,
                  attempts=[AttemptRecord(attempt=1, vmim="m-1", target="n2", started_at=2.0)])
    await store.create(drain(), nodes={"n1": NodeRecord(node="n1", phase=NodePhase.MIGRATING)}, vms={"ns/a": vm})
    view = await store.view("d1")
    assert view.drain.phase is DrainPhase.RUNNING
    assert view.nodes["n1"].phase is NodePhase.MIGRATING
    assert view.vms["ns/a"].attempts[0].target == "n2"
    body: dict[str, Any] = json.loads(json.dumps(view.to_json()))
    assert body["phase"] == "Running" and body["request"] == {"nodes": ["n1"]}
    assert body["vms"]["ns/a"]["phase"] == "Migrating"
    assert body["vms"]["ns/a"]["attempts"][0] == {
        "attempt": 1, "vmim": "m-1", "target": "n2", "started_at": 2.0, "running_at": None, "finished_at": None,
        "outcome": None, "reason": None, "failure_class": None, "convergence": None, "convergence_reason": None,
        "dirty_rate": None, "transfer_rate": None, "rung": None, "judged_at": None}
    assert body["nodes"]["n1"]["node"] == "n1"


async def test_a_record_written_with_unknown_fields_still_loads(store: DrainStore) -> None:
    raw = {"vmi": "ns/a", "node": "n1", "phase": "Failed", "failure_class": "Rejected", "from_the_future": 1}
    await store.redis.hset(keys.drain_vms_key("d1"), "ns/a", json.dumps(raw))
    vm = await store.vm("d1", "ns/a")
    assert vm is not None and vm.failure_class is FailureClass.REJECTED


async def test_concurrent_updates_are_all_kept(store: DrainStore) -> None:
    await store.create(drain(), nodes={}, vms={"ns/a": VmRecord(vmi="ns/a", node="n1")})

    async def add(target: str) -> None:
        def apply(vm: VmRecord) -> None:
            vm.failed_targets = sorted({*vm.failed_targets, target})
        await store.update_vm("d1", "ns/a", apply)

    await asyncio.gather(*(add(f"t{i}") for i in range(20)))
    vm = await store.vm("d1", "ns/a")
    assert vm is not None and len(vm.failed_targets) == 20 and vm.updated_at is not None


async def test_an_update_that_changes_nothing_writes_nothing(store: DrainStore) -> None:
    await store.create(drain(), nodes={}, vms={})
    before = await store.redis.get(keys.drain_key("d1"))
    await store.update("d1", lambda d: False)
    await store.update("d1", lambda d: None)
    assert await store.redis.get(keys.drain_key("d1")) == before
