"""The migrate job's own backstops (jobs.migrate._follow), on a VMIM that KubeVirt leaves standing: each fires at its
time, deletes the VMIM (the abort) and reports the class that decides the retry."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import fakeredis.aioredis
import pytest
import structlog

from orchestrator.model import DrainPhase, FailureClass, VmPhase
from orchestrator.records import AttemptRecord, DrainLimits, DrainRecord, VmRecord
from orchestrator.store import DrainStore
from orchestrator.view import ClusterView
from workers.jobs import migrate

NS, NAME = "ns", "drain-x-vm-1"
KEY = f"{NS}/{NAME}"


class SteppingClock:
    """Time (at time scale 1) that moves `step` seconds every time someone looks at it."""

    def __init__(self, step: float) -> None:
        self.t = 1_000_000.0
        self.step = step

    def now(self) -> float:
        self.t += self.step
        return self.t

    def time(self) -> float:
        return self.now()

    def since(self, wall_stamp: float) -> float:
        return max(0.0, self.now() - wall_stamp)

    async def sleep(self, cluster_seconds: float) -> None:
        await asyncio.sleep(0)


class FakeKube:
    """Deleting the VMIM is KubeVirt's abort: it goes Failed in the watch-fed view."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self.deleted: list[str] = []

    async def find(self, kind: Any, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self.view.vmims.get(f"{namespace}/{name}")

    async def delete(self, kind: Any, name: str, namespace: str | None = None, *, uid: str | None = None) -> None:
        self.deleted.append(name)
        obj = self.view.vmims[f"{namespace}/{name}"]
        failed = {**obj, "metadata": {**obj["metadata"], "resourceVersion": "99"},
                  "status": {"phase": "Failed", "migrationState": {"failureReason": "Live migration aborted "}}}
        await self.view._vmim_event("MODIFIED", failed)


class Slot:
    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.lease = type("L", (), {"holder": "h", "token": 1})()


def vmim(phase: str) -> dict[str, Any]:
    return {"metadata": {"namespace": NS, "name": NAME, "uid": "u1", "resourceVersion": "1"},
            "spec": {"vmiName": "vm"}, "status": {"phase": phase}}


@pytest.fixture
def parts() -> Iterator[tuple[Any, ...]]:
    view = ClusterView(kube=None)  # type: ignore[arg-type]
    redis = fakeredis.aioredis.FakeRedis()
    yield view, FakeKube(view), DrainStore(redis), redis


async def follow(parts: tuple[Any, ...], phase: str, *, step: float, memory: int = 4 * 1024**3,
                 attempt: AttemptRecord | None = None, clock: SteppingClock | None = None) -> Any:
    view, kube, store, _ = parts
    await store.create(DrainRecord(id="d1", phase=DrainPhase.RUNNING, request={"nodes": ["n1"]}), nodes={},
                       vms={"ns/vm": VmRecord(vmi="ns/vm", node="n1", phase=VmPhase.MIGRATING, attempt=1)})
    view.observe(vmim(phase))
    ctx = {"kube": kube, "view": view, "clock": clock or SteppingClock(step), "store": store}
    limits = DrainLimits(cluster=5, per_node=2, inbound=2, max_attempts=3, pending_timeout_s=300,
                         progress_timeout_s=150, completion_timeout_per_gib=150)
    return await migrate._follow(ctx, Slot(), drain_id="d1", vmi="ns/vm", key=KEY, target="n2",  # type: ignore[arg-type]
                              rec=VmRecord(vmi="ns/vm", node="n1", memory_bytes=memory, attempt=1,
                                           attempts=[attempt] if attempt else []), limits=limits,
                              bound=structlog.get_logger("test"))


async def test_a_migration_standing_still_before_its_transfer_is_aborted(parts: tuple[Any, ...]) -> None:
    outcome = await follow(parts, "Scheduling", step=40.0)
    assert parts[1].deleted == [NAME]
    assert outcome.phase is VmPhase.FAILED
    assert outcome.failure is FailureClass.TIMEOUT
    assert "no progress for 150 s in phase Scheduling" in outcome.reason


async def test_pending_in_kubevirts_queue_is_not_progress_but_has_its_own_limit(parts: tuple[Any, ...]) -> None:
    outcome = await follow(parts, "Pending", step=40.0)
    assert outcome.failure is FailureClass.UNSCHEDULABLE
    assert "not running after 300 s" in outcome.reason


async def test_a_transfer_past_the_completion_budget_is_aborted(parts: tuple[Any, ...]) -> None:
    # 4 GiB = 4.29 GB -> 5 x 150 s + 60 s margin = 810 s.
    outcome = await follow(parts, "Running", step=100.0)
    assert outcome.failure is FailureClass.NOT_CONVERGING
    assert "not completed within 810 s" in outcome.reason
    assert parts[1].deleted == [NAME]


async def test_a_succeeded_migration_is_reported_without_an_abort(parts: tuple[Any, ...]) -> None:
    outcome = await follow(parts, "Succeeded", step=1.0)
    assert outcome.phase is VmPhase.SUCCEEDED and outcome.target == "n2"
    assert parts[1].deleted == []


async def test_a_rerun_continues_the_pending_budget_from_the_attempts_creation(parts: tuple[Any, ...]) -> None:
    # The job ran before (a worker died): the VMIM was created 299 s ago. One more second and it is over,
    # not another 300 s from this run's start.
    clock = SteppingClock(1.0)
    created = AttemptRecord(attempt=1, vmim=NAME, target="n2", started_at=clock.t - 299.0)
    outcome = await follow(parts, "Pending", step=1.0, attempt=created, clock=clock)
    assert outcome.failure is FailureClass.UNSCHEDULABLE
    assert "not running after 300 s" in outcome.reason
    assert clock.t - created.started_at < 320


async def test_a_rerun_continues_the_completion_budget_from_the_transfers_start(parts: tuple[Any, ...]) -> None:
    clock = SteppingClock(1.0)
    started = AttemptRecord(attempt=1, vmim=NAME, target="n2", started_at=clock.t - 900.0,
                            running_at=clock.t - 805.0)
    outcome = await follow(parts, "Running", step=1.0, attempt=started, clock=clock)
    assert outcome.failure is FailureClass.NOT_CONVERGING
    assert "not completed within 810 s" in outcome.reason
    assert clock.t - (started.running_at or 0) < 830
