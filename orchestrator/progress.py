"""Live progress of one drain on a terminal, and the summary printed when it ends.

Promises:
- `follow` polls the drain store (it never talks to the cluster) and returns the final view, or the last one
  when `timeout_s` passes first. It rides out a Redis outage (retrying with backoff, saying so once) and
  reports a drain record that vanished (a Redis that came back empty) instead of failing obscurely; it says
  when no worker has picked the drain up (no worker heartbeat in Redis);
- on a terminal it draws rich progress bars: the whole drain, one bar per node, one line per VM in flight with
  its phase, target, attempt and elapsed time; anywhere else (a pipe, CI logs) it prints one plain line per
  change, so logs stay readable and diffable;
- `print_summary` renders a final view as tables: per node phase and counts, per VM outcome, attempts,
  targets and duration, and every failed attempt with its reason.

Times shown are cluster seconds (wall seconds x the drain's time scale), the unit of the planner's estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn
from rich.table import Table

from orchestrator.model import DrainPhase, NodePhase, VmPhase, VmVerdict
from orchestrator.records import VmRecord
from orchestrator.report import (
    attempt_rows,
    drain_origin,
    drain_summary,
    format_seconds,
    node_counts,
    time_scale_of,
)
from orchestrator.store import DrainNotFound, DrainView

if TYPE_CHECKING:
    from orchestrator.service import DrainService

IN_FLIGHT = (VmPhase.WAITING, VmPhase.MIGRATING)
FINAL_VM_PHASES = {p.value for p in VmPhase if p.is_final}
"""node_counts() counts by phase name."""
NO_WORKER_AFTER_S = 5.0
"""Wall seconds a drain may wait for its plan job before `follow` looks for workers and says what it finds."""
OUTAGE_LIMIT_S = 600.0
"""Wall seconds of Redis outage `follow` rides out before it gives up (the drain itself goes on)."""


def _elapsed(vm: VmRecord, scale: float, now: float) -> float | None:
    """Cluster seconds since the VM's current attempt started (or since it started waiting)."""
    entry = vm.attempt_entry(vm.attempt)
    if entry is not None and entry.started_at and not entry.finished_at:
        return max(0.0, (now - entry.started_at) * scale)
    since = vm.updated_at if vm.phase is VmPhase.WAITING else vm.started_at
    return None if since is None else max(0.0, (now - since) * scale)


def _vm_line(vmi: str, vm: VmRecord, scale: float, now: float) -> str:
    phase = vm.phase.value
    target = vm.target if vm.phase is VmPhase.MIGRATING else None
    where = f" -> {target}" if target else ""
    return (f"{vmi}{where}  {phase}, attempt {vm.attempt}, {format_seconds(_elapsed(vm, scale, now))}"
            f"  {vm.message or ''}")


class _Bars:
    """The rich rendering: tasks are created and removed as nodes and VMs appear and finish."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.overall: TaskID = progress.add_task("drain", total=None, info="submitted")
        self.nodes: dict[str, TaskID] = {}
        self.vms: dict[str, TaskID] = {}

    def update(self, view: DrainView) -> None:
        now, scale = time.time(), time_scale_of(view)
        summary = drain_summary(view, now=now)
        to_move = [vm for vm in view.vms.values() if vm.verdict is VmVerdict.MIGRATE]
        done = sum(1 for vm in to_move if vm.phase.is_final)
        self.progress.update(
            self.overall, total=len(to_move) or None, completed=done,
            description=f"drain {summary.drain_id} [{summary.phase}]",
            info=f"{format_seconds(summary.duration_s)} (estimate {format_seconds(summary.estimate_s)})")
        for node in view.nodes_in_order():
            name = node.node
            counts = node_counts(view, name)
            final = sum(n for phase, n in counts.items() if phase in FINAL_VM_PHASES)
            if name not in self.nodes:
                self.nodes[name] = self.progress.add_task(name, total=counts["total"] or None, info="")
            self.progress.update(self.nodes[name], total=counts["total"] or 1, completed=final if counts["total"]
                                 else (1 if node.phase is NodePhase.DRAINED else 0),
                                 description=f"  {name} [{node.phase.value}]", info=node.message or "")
        flying = {vmi: vm for vmi, vm in view.vms.items() if vm.phase in IN_FLIGHT}
        for vmi in [v for v in self.vms if v not in flying]:
            self.progress.remove_task(self.vms.pop(vmi))
        for vmi, vm in sorted(flying.items()):
            if vmi not in self.vms:
                self.vms[vmi] = self.progress.add_task("", total=None, info="")
            phase = vm.phase.value
            target = f" -> {vm.target}" if vm.phase is VmPhase.MIGRATING and vm.target else ""
            self.progress.update(self.vms[vmi], description=f"    {vmi}{target}",
                                 info=f"{phase}, attempt {vm.attempt}, "
                                      f"{format_seconds(_elapsed(vm, scale, now))}")


class _Lines:
    """The plain rendering: one line per change of the drain, a node or a VM."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.seen: dict[str, str] = {}

    def _say(self, key: str, state: str, text: str, stamp: str) -> None:
        if self.seen.get(key) != state:
            self.seen[key] = state
            self.console.print(f"[{stamp}] {text}", markup=False, highlight=False, soft_wrap=True)

    def update(self, view: DrainView) -> None:
        now, scale = time.time(), time_scale_of(view)
        # Since submission, not since the workers started it: the stamps must never go backwards.
        created = view.drain.created_at
        origin = created if created is not None else drain_origin(view)
        stamp = f"{format_seconds(max(0.0, (now - origin) * scale)):>9}"
        drain = view.drain
        self._say("drain", drain.phase.value, f"drain {drain.id}: {drain.phase.value} "
                  f"{drain.message or ''}".rstrip(), stamp)
        for node in view.nodes_in_order():
            name = node.node
            counts = node_counts(view, name)
            done = counts.get("Succeeded", 0)
            self._say(f"node:{name}", f"{node.phase.value}|{node.message}",
                      f"node {name}: {node.phase.value} ({done}/{counts['total']} VMs moved) "
                      f"{node.message or ''}".rstrip(), stamp)
        for vmi, vm in view.vms.items():
            phase = vm.phase.value
            state = f"{phase}|{vm.attempt}|{vm.target if vm.phase is VmPhase.MIGRATING else ''}"
            if vm.phase in IN_FLIGHT:
                text = _vm_line(vmi, vm, scale, now)
            else:
                text = f"{vmi}: {phase}  {vm.message or ''}".rstrip()
            self._say(f"vm:{vmi}", state, text, stamp)


class Notice(Protocol):
    def __call__(self, message: str) -> None: ...


class FollowError(Exception):
    """Following had to stop: Redis stayed unreachable, or the drain record vanished. The drain may go on."""


@dataclass(frozen=True)
class FollowResult:
    view: DrainView
    final: bool
    """False when `timeout_s` passed first: the drain goes on in the workers."""


@contextlib.contextmanager
def _renderer(console: Console | None) -> Iterator[Callable[[DrainView], None]]:
    if console is None:
        yield lambda _view: None
    elif console.is_terminal:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                      MofNCompleteColumn(), TextColumn("{task.fields[info]}"), console=console,
                      transient=False, refresh_per_second=8) as progress:
            yield _Bars(progress).update
    else:
        yield _Lines(console).update


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError)


async def workers_alive(service: DrainService) -> bool:
    """Whether any worker on the service's queue wrote its heartbeat recently."""
    from orchestrator import keys

    return bool(await service.redis.exists(keys.worker_health_key(service.settings.connection.queue_name)))


async def follow(service: DrainService, drain_id: str, *, console: Console | None, timeout_s: float | None = None,
                 notice: Notice, poll_s: float = 0.5, outage_limit_s: float = OUTAGE_LIMIT_S) -> FollowResult:
    """Show the drain's progress (nothing when `console` is None) until it is final or `timeout_s` wall seconds
    pass. `notice` gets the one-line remarks for the operator: Redis outages, no worker, a worker at last."""
    url = service.settings.connection.redis_url
    queue = service.settings.connection.queue_name
    begun = time.monotonic()
    deadline = None if timeout_s is None else begun + timeout_s
    last: DrainView | None = None
    outage_since: float | None = None
    delay = poll_s
    worry = "none"  # none -> told (no worker / not picked up) -> picked
    with _renderer(console) as render:
        while True:
            now = time.monotonic()
            try:
                view = await service.get(drain_id)
            except DrainNotFound:
                if last is None:
                    raise
                nodes = ", ".join(last.drain.nodes) or "-"
                raise FollowError(
                    f"drain {drain_id} is gone from Redis at {url}: Redis came back empty (it keeps no data "
                    f"across a restart without persistence). Nodes it may have cordoned: {nodes}; check them "
                    f"with `kubectl get nodes` and uncordon them, then drain again") from None
            except _redis_errors() as exc:
                if outage_since is None:
                    outage_since = now
                    notice(f"Redis at {url} is unreachable ({exc}); retrying with backoff. The drain goes on "
                           f"in the workers.")
                if now - outage_since > outage_limit_s:
                    raise FollowError(
                        f"Redis at {url} unreachable for {now - outage_since:.0f} s; stopped following drain "
                        f"{drain_id}, which goes on in the workers: `drainctl status {drain_id} --wait` follows "
                        f"it again once Redis answers") from exc
                if deadline is not None and now > deadline and last is not None:
                    return FollowResult(last, final=False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if outage_since is not None:
                notice(f"Redis at {url} answers again after {now - outage_since:.0f} s; following drain "
                       f"{drain_id}")
                outage_since, delay = None, poll_s
            last = view
            render(view)
            phase = view.drain.phase
            if phase.is_final:
                return FollowResult(view, final=True)
            if phase is DrainPhase.PENDING and worry == "none" and now - begun > NO_WORKER_AFTER_S:
                worry = "told"
                if await workers_alive(service):
                    notice(f"no worker has picked drain {drain_id} up yet (workers on queue {queue} are alive but "
                           f"busy, or the queue is long); it starts when one is free")
                else:
                    notice(f"no worker is running on queue {queue} (no worker heartbeat in Redis at {url}): "
                           f"drain {drain_id} waits in the queue until one starts; start one with "
                           f"`drainctl worker`")
            elif phase is not DrainPhase.PENDING and worry == "told":
                worry = "picked"
                notice(f"a worker picked drain {drain_id} up")
            if deadline is not None and now > deadline:
                return FollowResult(view, final=False)
            await asyncio.sleep(poll_s)


_STYLE = {"Succeeded": "green", "Drained": "green", "Failed": "red", "Cancelled": "yellow",
          "Incomplete": "yellow", "Skipped": "yellow", "Blocked": "red"}


def _styled(phase: str) -> str:
    style = _STYLE.get(phase)
    return f"[{style}]{phase}[/]" if style else phase


def print_summary(view: DrainView, console: Console) -> None:
    """Tables of a (normally final) drain: nodes, VMs, failed attempts; durations in cluster seconds."""
    s = drain_summary(view)
    final = view.drain.phase.is_final
    state = "" if final else " (not finished: it goes on in the workers)"
    console.print(f"[bold]drain {s.drain_id}[/]: {_styled(s.phase)}{state}  {s.message}", highlight=False)
    requested = len(view.drain.nodes) or s.nodes
    if view.drain.started_at is None and not final:
        console.print(f"nodes drained: 0/{requested}; not started: no worker has picked the drain up; "
                      f"estimate {format_seconds(s.estimate_s)}", highlight=False)
        return
    # A ratio to the estimate means something only for a drain that ran to its end (not a cancelled one).
    ratio = f", {s.duration_s / s.estimate_s:.2f}x the estimate" if (
        s.phase in ("Succeeded", "Failed") and s.estimate_s and s.duration_s) else ""
    took_word = "took" if final else "running for"
    console.print(
        f"nodes drained: {s.nodes_drained}/{requested}; VMs: {s.vms} ({s.succeeded} migrated, {s.failed} failed, "
        f"{s.skipped} skipped, {s.blocked} blocked, {s.cancelled} cancelled); attempts: {s.attempts} "
        f"({s.retries} retries); {took_word} {format_seconds(s.duration_s)} cluster time, estimate "
        f"{format_seconds(s.estimate_s)}{ratio}", highlight=False)
    scale = time_scale_of(view)
    nodes = Table("node", "phase", "VMs", "migrated", "failed", "left", "attempts", "took", "message",
                  title="Nodes", title_justify="left")
    for node in view.nodes_in_order():
        name = node.node
        c = node_counts(view, name)
        start, end = node.started_at, node.finished_at
        took = None if start is None or end is None else (end - start) * scale
        nodes.add_row(name, _styled(node.phase.value), str(c["total"]), str(c.get("Succeeded", 0)),
                      str(c.get("Failed", 0)), str(c.get("Skipped", 0) + c.get("Blocked", 0)), str(c["attempts"]),
                      format_seconds(took), node.message or "")
    console.print(nodes)
    rows = attempt_rows(view)
    by_vm: dict[str, list[str]] = {}
    for r in rows:
        mark = {"Succeeded": "ok", "Failed": "failed", "Running": "running"}.get(r.outcome, r.outcome.lower())
        by_vm.setdefault(r.vmi, []).append(f"{r.target or '-'} ({mark})")
    vms = Table("VM", "node", "outcome", "attempts", "targets", "took", "reason", title="VMs", title_justify="left")
    for vmi, vm in view.vms.items():
        attempts = [r for r in rows if r.vmi == vmi]
        starts = [r.start_s for r in attempts if r.start_s is not None]
        ends = [r.end_s for r in attempts if r.end_s is not None]
        took = max(ends) - min(starts) if starts and ends and vm.phase.is_final else None
        vms.add_row(vmi, vm.node, _styled(vm.phase.value), str(len(attempts)),
                    " -> ".join(by_vm.get(vmi, [])) or "-", format_seconds(took), vm.message or "")
    console.print(vms)
    failures = [r for r in rows if r.outcome not in ("Succeeded", "Running")]
    if failures:
        table = Table("VM", "attempt", "target", "class", "reason", title="Failed attempts", title_justify="left")
        for r in failures:
            table.add_row(r.vmi, str(r.attempt), r.target or "-", r.failure_class or "-", r.reason)
        console.print(table)
