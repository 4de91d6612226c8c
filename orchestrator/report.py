"""The drain report: one self-contained HTML page per drain, and the `drainctl report` command.

Promises:
- `render_html(view)` is pure: it reads a `DrainView` (as stored in Redis) and returns a complete HTML
  document with inline CSS and an inline SVG timeline; no scripts, fonts, images or other external assets,
  so the file can be mailed, archived or attached to a change ticket and opens offline.
- Every migration attempt recorded in the drain appears twice: as a bar in the timeline (``<rect
  class="attempt" data-vmi=... data-attempt=...>``) and as a row of the attempts table (``<tr
  class="attempt" ...>``), so a browser-free check can parse the page and find each one.
- Times are cluster seconds since the drain started (wall seconds x the drain's time scale), the unit of the
  planner's estimate, so "estimate vs actual" compares like with like.

`attempt_rows`, `drain_summary` and the formatting helpers are shared with the terminal summary
(`orchestrator.progress`). Nothing here talks to the cluster or Redis (`drainctl report` loads the drain).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator.model import FailureClass, NodePhase, VmPhase
from orchestrator.records import AttemptRecord, VmRecord
from orchestrator.store import DrainView

RUNNING = "Running"
"""Outcome shown for an attempt that has started and not finished yet."""

OUTCOME_COLORS = {
    "Succeeded": "#2f9e5b",
    "Failed": "#d64545",
    "Cancelled": "#8a8f98",
    RUNNING: "#3b7dd8",
}
ABORTED_COLOR = "#e0962b"


# ------------------------------------------------------------------------------------------------ facts
@dataclass(frozen=True)
class AttemptRow:
    """One migration attempt of one VM, with times in cluster seconds since the drain started."""

    vmi: str
    node: str
    attempt: int
    target: str | None
    outcome: str
    """Succeeded, Failed, Cancelled or Running."""
    reason: str
    failure_class: str | None
    vmim: str | None
    start_s: float | None
    """None when the attempt ended before a migration was created (no target fitted, VM gone)."""
    end_s: float | None
    """None while the attempt runs."""

    @property
    def duration_s(self) -> float | None:
        if self.start_s is None or self.end_s is None:
            return None
        return max(0.0, self.end_s - self.start_s)


@dataclass(frozen=True)
class DrainSummary:
    """The numbers at the top of the report and of the terminal summary."""

    drain_id: str
    phase: str
    message: str
    nodes: int
    nodes_drained: int
    vms: int
    succeeded: int
    failed: int
    skipped: int
    blocked: int
    cancelled: int
    open_vms: int
    attempts: int
    retries: int
    duration_s: float | None
    """Cluster seconds from start (or submission) to the end (or now, while open)."""
    estimate_s: float | None
    time_scale: float


def time_scale_of(view: DrainView) -> float:
    scale = view.drain.time_scale
    return scale if scale is not None and scale > 0 else 1.0


def drain_origin(view: DrainView) -> float:
    """Wall time the drain's clock starts at: when the workers started it, else when it was submitted."""
    started = view.drain.started_at or view.drain.created_at
    return started if started is not None else time.time()


def _cluster_s(wall: Any, origin: float, scale: float) -> float | None:
    if wall is None:
        return None
    return max(0.0, (float(wall) - origin) * scale)


def _outcome(entry: AttemptRecord, vm: VmRecord) -> str:
    outcome = entry.outcome
    if outcome:
        if outcome is VmPhase.FAILED and entry.failure_class is FailureClass.ABORTED and \
                vm.phase is VmPhase.CANCELLED:
            return "Cancelled"
        return outcome.value
    return RUNNING


def _reason(entry: AttemptRecord) -> str:
    """The attempt's reason, else its convergence verdict (with the rates) while it runs; its rung first."""
    reason = entry.reason or entry.convergence_reason or ""
    return f"[{entry.rung} rung] {reason}" if entry.rung else reason


def attempt_rows(view: DrainView) -> list[AttemptRow]:
    """Every attempt recorded in the drain, ordered by node order, VM and attempt number."""
    origin, scale = drain_origin(view), time_scale_of(view)
    node_index = {name: rec.index for name, rec in view.nodes.items()}
    rows = []
    for vmi, vm in view.vms.items():
        for entry in vm.attempts:
            start = _cluster_s(entry.started_at, origin, scale)
            end = _cluster_s(entry.finished_at, origin, scale)
            rows.append(AttemptRow(
                vmi=vmi, node=vm.node, attempt=entry.attempt,
                target=entry.target, outcome=_outcome(entry, vm), reason=_reason(entry),
                failure_class=entry.failure_class.value if entry.failure_class else None, vmim=entry.vmim,
                start_s=start, end_s=end))
    rows.sort(key=lambda r: (node_index.get(r.node, 1 << 30), r.node, r.vmi, r.attempt))
    return rows


def drain_summary(view: DrainView, *, now: float | None = None) -> DrainSummary:
    drain = view.drain
    scale = time_scale_of(view)
    counts: dict[str, int] = {}
    for vm in view.vms.values():
        counts[vm.phase.value] = counts.get(vm.phase.value, 0) + 1
    attempts = sum(len(vm.attempts) for vm in view.vms.values())
    migrated_vms = sum(1 for vm in view.vms.values() if vm.attempts)
    start = drain.started_at or drain.created_at
    end = drain.finished_at if drain.phase.is_final else None
    end = end if end is not None else (time.time() if now is None else now)
    duration = None if start is None else max(0.0, (end - start) * scale)
    final_vm = {p.value for p in VmPhase if p.is_final}
    estimate = drain.estimate_s
    return DrainSummary(
        drain_id=drain.id, phase=drain.phase.value, message=drain.message or "",
        nodes=len(view.nodes), nodes_drained=sum(1 for n in view.nodes.values() if n.phase is NodePhase.DRAINED),
        vms=len(view.vms), succeeded=counts.get("Succeeded", 0), failed=counts.get("Failed", 0),
        skipped=counts.get("Skipped", 0), blocked=counts.get("Blocked", 0), cancelled=counts.get("Cancelled", 0),
        open_vms=sum(n for phase, n in counts.items() if phase not in final_vm),
        attempts=attempts, retries=attempts - migrated_vms, duration_s=duration,
        estimate_s=estimate, time_scale=scale)


def format_seconds(seconds: float | None) -> str:
    """"-" for unknown, "42 s", "3 m 05 s", "1 h 02 m"."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} m {total % 60:02d} s"
    return f"{total // 3600} h {total % 3600 // 60:02d} m"


def node_counts(view: DrainView, node: str) -> dict[str, int]:
    """VM phases of one node's VMs, plus "total" and "attempts"."""
    out: dict[str, int] = {"total": 0, "attempts": 0}
    for vm in view.vms.values():
        if vm.node != node:
            continue
        out["total"] += 1
        out["attempts"] += len(vm.attempts)
        phase = vm.phase.value
        out[phase] = out.get(phase, 0) + 1
    return out


# ------------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d232b;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#5b6470;margin-bottom:16px}
.phase{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #dde1e6;border-radius:8px;padding:8px 14px;min-width:110px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#5b6470;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e6e9ed;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f6f8;font-weight:600}
td.num{font-variant-numeric:tabular-nums}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px}
svg text{font:11px system-ui,sans-serif;fill:#1d232b}
svg .grid{stroke:#e6e9ed}svg .node{font-weight:600}
.msg{color:#5b6470}
"""

_PHASE_COLORS = {"Succeeded": "#2f9e5b", "Failed": "#d64545", "Cancelled": "#8a8f98", "Cancelling": "#e0962b",
                 "Running": "#3b7dd8", "Planning": "#3b7dd8", "Pending": "#8a8f98", "Drained": "#2f9e5b",
                 "Incomplete": "#e0962b"}


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _bar_color(row: AttemptRow) -> str:
    if row.outcome == "Failed" and row.failure_class == "Aborted":
        return ABORTED_COLOR
    return OUTCOME_COLORS.get(row.outcome, "#8a8f98")


def _nice_step(span: float, ticks: int = 8) -> float:
    raw = max(span, 1.0) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return float(factor * magnitude)
    return float(10 * magnitude)


def _gantt(view: DrainView, rows: list[AttemptRow], summary: DrainSummary) -> str:
    """One row per VM that had attempts, grouped under its node; one bar per attempt, colored by outcome."""
    label_w, width, row_h, top = 300, 1100, 20, 28
    plot_w = width - label_w - 20
    by_vm: dict[str, list[AttemptRow]] = {}
    order: list[tuple[str, str]] = []
    for row in rows:
        if row.vmi not in by_vm:
            by_vm[row.vmi] = []
            order.append((row.node, row.vmi))
        by_vm[row.vmi].append(row)
    ends = [t for r in rows for t in (r.start_s, r.end_s) if t is not None]
    span = max([*ends, summary.duration_s or 0.0, 1.0])
    scale = plot_w / span
    lines: list[str] = []
    y = top
    current_node = None
    for node, vmi in order:
        if node != current_node:
            current_node = node
            y += 6
            lines.append(f'<text class="node" x="4" y="{y + 13}">{_e(node)}</text>')
            y += row_h
        lines.append(f'<text x="16" y="{y + 14}">{_e(vmi)}</text>')
        for row in by_vm[vmi]:
            start = row.start_s if row.start_s is not None else (row.end_s or 0.0)
            end = row.end_s if row.end_s is not None else span
            x = label_w + start * scale
            w = max(3.0, (end - start) * scale)
            tip = (f"{row.vmi} attempt {row.attempt} -> {row.target or 'no target'}: {row.outcome}; "
                   f"{format_seconds(row.start_s)} to {format_seconds(row.end_s)}; {row.reason}")
            lines.append(
                f'<rect class="attempt" data-vmi="{_e(row.vmi)}" data-attempt="{row.attempt}" '
                f'data-outcome="{_e(row.outcome)}" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" '
                f'rx="2" fill="{_bar_color(row)}"><title>{_e(tip)}</title></rect>')
            if w > 28:
                lines.append(f'<text x="{x + 3:.1f}" y="{y + 14}" style="fill:#fff">#{row.attempt}</text>')
        y += row_h
    height = y + 10
    step = _nice_step(span)
    axis = []
    tick = 0.0
    while tick <= span + 1e-9:
        x = label_w + tick * scale
        axis.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height}"/>'
                    f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle">{_e(format_seconds(tick))}</text>')
        tick += step
    if summary.estimate_s is not None and summary.estimate_s <= span * 1.5:
        x = label_w + min(summary.estimate_s, span) * scale
        axis.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height}" stroke="#6b4fbb" '
                    f'stroke-dasharray="4 3"><title>estimate {format_seconds(summary.estimate_s)}</title></line>')
    if not order:
        lines.append(f'<text x="{label_w}" y="{top + 14}">no migration attempts were recorded</text>')
        height = top + 30
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline of migration attempts">'
            + "".join(axis) + "".join(lines) + "</svg>")


def _card(key: str, value: str) -> str:
    return f'<div class="card"><div class="v">{_e(value)}</div><div class="k">{_e(key)}</div></div>'


def _table(headers: Iterable[str], body: Iterable[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(view: DrainView) -> str:
    """The report page for one drain (see the module docstring for what it contains)."""
    summary = drain_summary(view)
    rows = attempt_rows(view)
    drain = view.drain
    request = drain.request
    color = _PHASE_COLORS.get(summary.phase, "#8a8f98")
    ratio = ""
    # Only a drain that ran to its end compares with the estimate (a cancelled one stopped early).
    if summary.phase in ("Succeeded", "Failed") and summary.estimate_s and summary.duration_s is not None:
        ratio = f"{summary.duration_s / summary.estimate_s:.2f}x"
    cards = [
        _card("nodes drained", f"{summary.nodes_drained} / {summary.nodes}"),
        _card("VMs", str(summary.vms)),
        _card("succeeded", str(summary.succeeded)),
        _card("failed", str(summary.failed)),
        _card("skipped / blocked", f"{summary.skipped} / {summary.blocked}"),
        _card("attempts (retries)", f"{summary.attempts} ({summary.retries})"),
        _card("duration", format_seconds(summary.duration_s)),
        _card("estimate", format_seconds(summary.estimate_s)),
        _card("actual / estimate", ratio or "-"),
    ]
    node_rows = []
    for node in view.nodes_in_order():
        name = node.node
        counts = node_counts(view, name)
        origin, scale = drain_origin(view), time_scale_of(view)
        start, end = node.started_at, node.finished_at
        took = None if start is None or end is None else (end - start) * scale
        node_rows.append(
            f'<tr class="node" data-node="{_e(name)}"><td>{_e(name)}</td><td>{_e(node.phase.value)}</td>'
            f'<td class="num">{counts["total"]}</td><td class="num">{counts.get("Succeeded", 0)}</td>'
            f'<td class="num">{counts.get("Failed", 0)}</td>'
            f'<td class="num">{counts.get("Skipped", 0) + counts.get("Blocked", 0)}</td>'
            f'<td class="num">{counts["attempts"]}</td>'
            f'<td class="num">{_e(format_seconds(_cluster_s(start, origin, scale)))}</td>'
            f'<td class="num">{_e(format_seconds(took))}</td><td class="msg">{_e(node.message)}</td></tr>')
    attempt_html = [
        f'<tr class="attempt" data-vmi="{_e(r.vmi)}" data-attempt="{r.attempt}" data-outcome="{_e(r.outcome)}" '
        f'data-vmim="{_e(r.vmim or "")}">'
        f'<td>{_e(r.vmi)}</td><td>{_e(r.node)}</td><td class="num">{r.attempt}</td><td>{_e(r.target or "-")}</td>'
        f'<td><span class="phase" style="background:{_bar_color(r)}">{_e(r.outcome)}</span></td>'
        f'<td>{_e(r.failure_class or "")}</td><td class="num">{_e(format_seconds(r.start_s))}</td>'
        f'<td class="num">{_e(format_seconds(r.end_s))}</td><td class="num">{_e(format_seconds(r.duration_s))}</td>'
        f'<td>{_e(r.vmim or "-")}</td><td class="msg">{_e(r.reason)}</td></tr>'
        for r in rows
    ]
    unmoved = [
        f'<tr class="unmoved" data-vmi="{_e(vmi)}"><td>{_e(vmi)}</td><td>{_e(vm.node)}</td>'
        f'<td>{_e(vm.phase.value)}</td><td class="msg">{_e(vm.message or vm.reason)}</td></tr>'
        for vmi, vm in view.vms.items() if not vm.attempts
    ]
    legend = "".join(f'<span><i style="background:{c}"></i>{_e(k)}</span>'
                     for k, c in (*OUTCOME_COLORS.items(), ("Aborted by drainctl", ABORTED_COLOR)))
    warnings = "".join(f"<li>{_e(w)}</li>" for w in drain.warnings)
    created = drain.created_at
    created_text = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created)) if created else "-"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>drainctl report {_e(summary.drain_id)}</title><style>{_CSS}</style></head><body>",
        f'<h1>Drain {_e(summary.drain_id)} <span class="phase" style="background:{color}">{_e(summary.phase)}'
        "</span></h1>",
        f'<div class="sub">nodes {_e(", ".join(request.get("nodes") or []))}; '
        f'{_e(request.get("max_parallel_nodes", 1))} in parallel; submitted {_e(created_text)} from '
        f'{_e(drain.source or "?")}; times in cluster seconds (time scale {summary.time_scale:g}). '
        f'{_e(summary.message)}</div>',
        f'<div class="cards" id="summary">{"".join(cards)}</div>',
    ]
    if warnings:
        parts.append(f"<h2>Warnings</h2><ul>{warnings}</ul>")
    parts += [
        "<h2>Timeline</h2>",
        f'<div class="legend">{legend}<span>dashed line: estimate</span></div>',
        f'<div id="timeline">{_gantt(view, rows, summary)}</div>',
        "<h2>Nodes</h2>",
        _table(("node", "phase", "VMs", "succeeded", "failed", "left (skip/block)", "attempts", "started",
                "took", "message"), node_rows),
        f'<h2>Migration attempts ({len(rows)})</h2>',
        '<div id="attempts">'
        + _table(("VM", "source", "#", "target", "outcome", "class", "start", "end", "took", "VMIM", "reason"),
                 attempt_html) + "</div>",
    ]
    if unmoved:
        parts += ["<h2>VMs without a migration</h2>", _table(("VM", "node", "phase", "reason"), unmoved)]
    parts.append(f'<p class="msg">generated by drainctl at '
                 f'{_e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))}</p></body></html>')
    return "\n".join(parts) + "\n"
