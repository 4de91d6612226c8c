"""Supervised tasks: a task that fails or ends is started again and named while it is down; a task with a
graceful stop path ends once its event is set; stopping the supervisor ends everything."""

from __future__ import annotations

import asyncio

from orchestrator.supervise import Supervisor


async def test_a_failing_task_is_restarted_and_named_while_down() -> None:
    sup = Supervisor("test", backoff_s=0.2, max_backoff_s=0.2)
    runs: list[int] = []
    failed, running = asyncio.Event(), asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            asyncio.get_running_loop().call_soon(failed.set)  # seen once the supervisor logged the failure
            raise ConnectionError("redis away")
        running.set()
        await asyncio.Event().wait()

    sup.spawn("listener", flaky)
    async with asyncio.timeout(5):
        await failed.wait()
    assert "ConnectionError: redis away" in sup.problems()["listener"]
    async with asyncio.timeout(5):
        await running.wait()
    assert sup.problems() == {} and sup.restarts["listener"] == 2
    await sup.stop()


async def test_a_task_that_returns_is_restarted_unless_its_stop_event_is_set() -> None:
    sup = Supervisor("test", backoff_s=0.05, max_backoff_s=0.05)
    stop, thrice = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    async def returns() -> None:
        runs.append(1)
        if len(runs) == 3:
            thrice.set()
        await asyncio.sleep(0.01)

    sup.spawn("controller", returns, until=stop)
    async with asyncio.timeout(5):
        await thrice.wait()
    stop.set()
    await sup.join(5)
    count = len(runs)
    await asyncio.sleep(0.2)
    assert len(runs) == count  # ended for good once its stop event was set
    await sup.stop()


async def test_degraded_tasks_are_reported_until_they_say_otherwise() -> None:
    sup = Supervisor("test")
    sup.degraded("epoch", "epoch check failed: timeout")
    assert sup.problems() == {"epoch": "epoch check failed: timeout"}
    sup.degraded("epoch", None)
    assert sup.problems() == {}
