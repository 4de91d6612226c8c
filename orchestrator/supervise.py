"""Supervised long-running tasks: each has an owner, a name and a stop path, and its failure is seen.

A `Supervisor` owns named tasks that are meant to run until stopped (watches, the cancel listener, the epoch
check, the DrainRequest controller). When one ends, by an exception or by returning, it is logged
(`task.failed` / `task.ended`, with owner and name) and started again after a doubling backoff; the backoff
starts over once a run lasted `healthy_after_s`. While a task is down, or while it reports itself degraded
(`Supervisor.degraded`), `problems()` names it: readiness probes read that instead of guessing.

What it does not do: restart forever silently (every restart is logged with its error), or swallow
cancellation (stopping the supervisor cancels and reaps every task).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("orchestrator.supervise")

Runner = Callable[[], Awaitable[None]]


class Supervisor:
    def __init__(self, owner: str, *, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 healthy_after_s: float = 30.0) -> None:
        self.owner = owner
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: dict[str, str] = {}
        self._degraded: dict[str, str] = {}
        self.restarts: dict[str, int] = {}
        self._graceful: set[str] = set()

    def spawn(self, name: str, run: Runner, *, until: asyncio.Event | None = None) -> None:
        """Run `run()` as task `name` until `stop()`, restarting it whenever it ends; a task given `until`
        may also end on its own once that event is set (its graceful stop path), and is not restarted then."""
        if name in self._tasks:
            raise ValueError(f"{self.owner}: a task named {name!r} is already supervised")
        self.restarts[name] = 0
        self._tasks[name] = asyncio.create_task(self._keep(name, run, until), name=f"{self.owner}:{name}")
        if until is not None:
            self._graceful.add(name)

    async def join(self, timeout_s: float) -> None:
        """Give tasks that stop on their own (see `until`) up to `timeout_s` to end; `stop()` ends the rest."""
        pending = [task for name, task in self._tasks.items() if name in self._graceful and not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    def degraded(self, name: str, problem: str | None) -> None:
        """A task says it runs but cannot do its job (`problem`), or that it can again (None)."""
        if problem is None:
            self._degraded.pop(name, None)
        else:
            self._degraded[name] = problem

    def problems(self) -> dict[str, str]:
        """Task name -> what is wrong, for every task that is down or degraded now."""
        return {**self._degraded, **self._down}

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep(self, name: str, run: Runner, until: asyncio.Event | None) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.backoff_s
        while True:
            started = loop.time()
            try:
                await run()
                if until is not None and until.is_set():
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of a supervised task is logged and restarted
                self._down[name] = f"failed: {type(exc).__name__}: {exc}"
                log.warning("task.failed", owner=self.owner, task=name, error=f"{type(exc).__name__}: {exc}",
                            restart_in_s=backoff)
            else:
                self._down[name] = "ended unexpectedly"
                log.warning("task.ended", owner=self.owner, task=name, restart_in_s=backoff)
            if loop.time() - started >= self.healthy_after_s:
                backoff = self.backoff_s
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            self.restarts[name] += 1
            self._down.pop(name, None)
            log.info("task.restarted", owner=self.owner, task=name, restarts=self.restarts[name])
