"""Live progress of one drain on a terminal, and the summary printed when it ends.

Promises:
- `live_progress` polls the drain store through `DrainService.wait` (it never talks to the cluster) and
  returns the final view, or the last one when `timeout_s` passes first;
- on a terminal it draws rich progress bars: the whole drain, one bar per node, one line per VM in flight with
  its phase, target, attempt and elapsed time; anywhere else (a pipe, CI logs) it prints one plain line per
  change, so logs stay readable and diffable;
- `print_summary` renders a final view as tables: per node phase and counts, per VM outcome, attempts,
  targets and duration, and every failed attempt with its reason.

Times shown are cluster seconds (wall seconds x the drain's time scale), the unit of the planner's estimate.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn
from rich.table import Table

from orchestrator.model import NodePhase, VmPhase, VmVerdict
from orchestrator.records import VmRecord
from orchestrator.report import (
    attempt_rows,
    drain_origin,
    drain_summary,
    format_seconds,
    node_counts,
    time_scale_of,
)
from orchestrator.service import DrainService
from orchestrator.store import DrainView

IN_FLIGHT = (VmPhase.WAITING, VmPhase.MIGRATING)
FINAL_VM_PHASES = {p.value for p in VmPhase if p.is_final}
"""node_counts() counts by phase name."""


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
        stamp = f"{format_seconds(max(0.0, (now - drain_origin(view)) * scale)):>9}"
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


async def live_progress(service: DrainService, drain_id: str, *, console: Console, timeout_s: float | None = None,
                        poll_s: float = 0.5) -> DrainView:
    """Show the drain's progress until it is final (or `timeout_s` wall seconds pass); return the last view."""
    if console.is_terminal:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
                      MofNCompleteColumn(), TextColumn("{task.fields[info]}"), console=console,
                      transient=False, refresh_per_second=8) as progress:
            bars = _Bars(progress)
            return await service.wait(drain_id, timeout_s=timeout_s, poll_s=poll_s, on_update=_as_async(bars.update))
    lines = _Lines(console)
    return await service.wait(drain_id, timeout_s=timeout_s, poll_s=poll_s, on_update=_as_async(lines.update))


def _as_async(fn: Callable[[DrainView], None]) -> Callable[[DrainView], Awaitable[None]]:
    async def call(view: DrainView) -> None:
        fn(view)
    return call


_STYLE = {"Succeeded": "green", "Drained": "green", "Failed": "red", "Cancelled": "yellow",
          "Incomplete": "yellow", "Skipped": "yellow", "Blocked": "red"}


def _styled(phase: str) -> str:
    style = _STYLE.get(phase)
    return f"[{style}]{phase}[/]" if style else phase


def print_summary(view: DrainView, console: Console) -> None:
    """Tables of a (normally final) drain: nodes, VMs, failed attempts; durations in cluster seconds."""
    s = drain_summary(view)
    console.print(f"[bold]drain {s.drain_id}[/]: {_styled(s.phase)}  {s.message}", highlight=False)
    ratio = f", {s.duration_s / s.estimate_s:.2f}x the estimate" if s.estimate_s and s.duration_s else ""
    console.print(
        f"nodes drained: {s.nodes_drained}/{s.nodes}; VMs: {s.vms} ({s.succeeded} migrated, {s.failed} failed, "
        f"{s.skipped} skipped, {s.blocked} blocked, {s.cancelled} cancelled); attempts: {s.attempts} "
        f"({s.retries} retries); took {format_seconds(s.duration_s)} cluster time, estimate "
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
