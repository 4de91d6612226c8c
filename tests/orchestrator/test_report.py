"""The HTML report, the terminal summary and the live progress, on drain views built by hand."""

from __future__ import annotations

import io
import re
import time
from html.parser import HTMLParser
from typing import Any

import pytest
from rich.console import Console

from orchestrator.model import DrainPhase
from orchestrator.progress import follow, print_summary
from orchestrator.records import DrainRecord, NodeRecord, VmRecord
from orchestrator.report import attempt_rows, drain_summary, format_seconds, render_html
from orchestrator.settings import Settings
from orchestrator.store import DrainView

T0 = 1_700_000_000.0
SCALE = 10.0


def attempt(n: int, *, target: str | None, start: float | None, end: float | None, outcome: str | None,
            reason: str = "", failure: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"attempt": n, "target": target, "vmim": f"drain-x-vm-{n}" if start else None}
    if start is not None:
        entry["started_at"] = T0 + start
    if end is not None:
        entry.update(finished_at=T0 + end, outcome=outcome, reason=reason, failure_class=failure)
    return entry


def vm(node: str, phase: str, attempts: list[dict[str, Any]], *, message: str = "",
       verdict: str = "Migrate") -> dict[str, Any]:
    latest = attempts[-1] if attempts else {}
    return {"node": node, "phase": phase, "verdict": verdict, "attempt": latest.get("attempt", 0),
            "attempts": attempts, "message": message, "target": latest.get("target")}


def make_view(*, phase: str = "Failed") -> DrainView:
    drain = {"id": "abc123def456", "phase": phase, "message": "nodes: 1 Drained, 1 Failed", "source": "cli",
             "created_at": T0 - 1, "started_at": T0, "finished_at": T0 + 30 if phase != "Running" else None,
             "estimate_s": 200.0, "time_scale": SCALE, "request": {"nodes": ["n1", "n2"], "max_parallel_nodes": 2},
             "warnings": ["<b>capacity is tight</b>"]}
    nodes = {"n1": {"node": "n1", "index": 0, "phase": "Drained", "message": "drained", "started_at": T0,
                    "finished_at": T0 + 21},
             "n2": {"node": "n2", "index": 1, "phase": "Failed", "message": "1 VM(s) could not be moved",
                    "started_at": T0, "finished_at": T0 + 30}}
    vms = {
        "ns/a": vm("n1", "Succeeded", [
            attempt(1, target="n3", start=1, end=10, outcome="Failed", failure="NotConverging",
                    reason="Migration is not completed after 90 s"),
            attempt(2, target="n4", start=12, end=20, outcome="Succeeded", reason="migrated to n4")]),
        "ns/b": vm("n2", "Failed", [
            attempt(1, target=None, start=None, end=5, outcome="Failed", failure="Unschedulable",
                    reason="no node fits <script>alert(1)</script>"),
            attempt(2, target="n3", start=8, end=29, outcome="Failed", failure="TargetFailed",
                    reason="target pod shutdown")], message="failed after 2 attempt(s)"),
        "ns/c": vm("n2", "Skipped", [], message="evictionStrategy None", verdict="Skip"),
        "ns/d": vm("n1", "Migrating", [attempt(1, target="n5", start=25, end=None, outcome=None)]),
    }
    return DrainView(DrainRecord.model_validate(drain), {k: NodeRecord.model_validate(v) for k, v in nodes.items()},
                     {k: VmRecord.model_validate({"vmi": k, **v}) for k, v in vms.items()})


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.bars: list[dict[str, str]] = []
        self.rows: list[dict[str, str]] = []
        self.cells: list[list[str]] = []
        self._in_row = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "rect" and a.get("class") == "attempt":
            self.bars.append(a)
        if tag == "tr":
            self._in_row = a.get("class") == "attempt"
            if self._in_row:
                self.rows.append(a)
                self.cells.append([])

    def handle_data(self, data: str) -> None:
        if self._in_row and data.strip():
            self.cells[-1].append(data.strip())


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def test_every_attempt_is_a_bar_and_a_row() -> None:
    page = parse(render_html(make_view()))
    expected = {("ns/a", "1"), ("ns/a", "2"), ("ns/b", "1"), ("ns/b", "2"), ("ns/d", "1")}
    assert {(b["data-vmi"], b["data-attempt"]) for b in page.bars} == expected
    assert {(r["data-vmi"], r["data-attempt"]) for r in page.rows} == expected
    assert len(page.bars) == len(page.rows) == 5
    outcomes = {(r["data-vmi"], r["data-attempt"]): r["data-outcome"] for r in page.rows}
    assert outcomes[("ns/a", "1")] == "Failed" and outcomes[("ns/a", "2")] == "Succeeded"
    assert outcomes[("ns/d", "1")] == "Running"


def test_page_is_self_contained_and_escapes_what_it_shows() -> None:
    text = render_html(make_view())
    page = parse(text)
    assert not {"script", "link", "img", "iframe"} & set(page.tags)
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;capacity is tight&lt;/b&gt;" in text
    without_svg_namespace = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_svg_namespace and "https://" not in without_svg_namespace
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text and "<svg" in text


def test_times_are_cluster_seconds_since_the_drain_started() -> None:
    page = parse(render_html(make_view()))
    by_key = {(r["data-vmi"], r["data-attempt"]): cells for r, cells in zip(page.rows, page.cells, strict=True)}
    # ns/a attempt 1: wall +1 s .. +10 s at time scale 10 -> 10 s .. 1 m 40 s, took 1 m 30 s
    times = [c for c in by_key[("ns/a", "1")] if c[0].isdigit() and " " in c]
    assert times == ["10 s", "1 m 40 s", "1 m 30 s"]
    bars = {(b["data-vmi"], b["data-attempt"]): b for b in page.bars}
    a1, a2 = bars[("ns/a", "1")], bars[("ns/a", "2")]
    # Bar widths are proportional to durations: 90 s and 80 s.
    assert float(a1["width"]) / float(a2["width"]) == pytest.approx(90 / 80, rel=0.01)
    assert float(a2["x"]) > float(a1["x"]) + float(a1["width"])


def test_summary_numbers() -> None:
    s = drain_summary(make_view())
    assert (s.nodes, s.nodes_drained, s.vms) == (2, 1, 4)
    assert (s.succeeded, s.failed, s.skipped, s.open_vms) == (1, 1, 1, 1)
    assert (s.attempts, s.retries) == (5, 2)
    assert s.duration_s == pytest.approx(300.0)
    assert s.estimate_s == 200.0
    rows = attempt_rows(make_view())
    assert [r.node for r in rows] == ["n1", "n1", "n1", "n2", "n2"]  # node order, then VM, then attempt
    assert rows[2].end_s is None and rows[2].outcome == "Running"


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (0.4, "0 s"), (59.6, "1 m 00 s"), (125, "2 m 05 s"),
                                               (3725, "1 h 02 m"), (float("nan"), "-")])
def test_format_seconds(seconds: float | None, text: str) -> None:
    assert format_seconds(seconds) == text


def test_print_summary_lists_nodes_vms_and_failed_attempts() -> None:
    console = Console(record=True, width=220)
    print_summary(make_view(), console)
    out = console.export_text()
    assert "drain abc123def456: Failed" in out
    assert "nodes drained: 1/2" in out and "attempts: 5 (2 retries)" in out
    assert "took 5 m 00 s cluster time, estimate 3 m 20 s, 1.50x the estimate" in out
    assert "n3 (failed) -> n4 (ok)" in out
    assert "Failed attempts" in out and "target pod shutdown" in out and "NotConverging" in out


class StubService:
    """What `follow` uses of the service: `get` (replaying views) and the settings."""

    def __init__(self, views: list[DrainView]) -> None:
        self.views = list(views)
        self.settings = Settings()

    async def get(self, drain_id: str) -> DrainView:
        return self.views.pop(0) if len(self.views) > 1 else self.views[0]


async def test_live_progress_prints_one_line_per_change_when_not_a_terminal() -> None:
    running, done = make_view(phase="Running"), make_view()
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    followed = await follow(StubService([running, running, done]), "abc123def456",  # type: ignore[arg-type]
                            console=console, notice=print, poll_s=0)
    assert followed.view is done and followed.final
    lines = buffer.getvalue().splitlines()
    assert sum("drain abc123def456: Running" in line for line in lines) == 1  # unchanged views print nothing
    assert any("drain abc123def456: Failed" in line for line in lines)
    assert any("ns/d -> n5  Migrating, attempt 1" in line for line in lines)
    assert any("node n2: Failed" in line for line in lines)


async def test_live_progress_draws_bars_on_a_terminal() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=True)
    followed = await follow(StubService([make_view(phase="Running"), make_view()]), "x",  # type: ignore[arg-type]
                            console=console, notice=print, poll_s=0)
    assert followed.view.drain.phase == "Failed"
    text = buffer.getvalue()
    assert "drain abc123def456 [Failed]" in text and "n1 [Drained]" in text


def test_a_cancelled_drain_shows_no_ratio_to_the_estimate() -> None:
    view = make_view(phase="Cancelled")
    console = Console(record=True, width=220)
    print_summary(view, console)
    out = console.export_text()
    assert "drain abc123def456: Cancelled" in out and "took 5 m 00 s cluster time" in out
    assert "x the estimate" not in out
    page = render_html(view)
    assert "actual / estimate" in page and ">-</div><div class=\"k\">actual / estimate" in page


def test_summary_of_an_unstarted_drain_says_so() -> None:
    drain = DrainRecord(id="pending12345", phase="Pending", message="waiting for a worker", created_at=T0,
                        estimate_s=200.0, time_scale=SCALE, request={"nodes": ["n1", "n2"]})
    console = Console(record=True, width=220)
    print_summary(DrainView(drain, {}, {}), console)
    out = console.export_text()
    assert "Pending (not finished: it goes on in the workers)" in out
    assert "nodes drained: 0/2; not started" in out
    assert "took" not in out and "x the estimate" not in out


async def test_progress_stamps_never_go_backwards_when_the_drain_starts() -> None:
    """Stamps count from submission, so the line printed when planning ends is not earlier than the one
    before it."""
    running = make_view(phase="Running")
    queued = DrainView(running.drain.model_copy(update={"phase": DrainPhase.PENDING, "started_at": None,
                                                         "created_at": time.time() - 5}), running.nodes, running.vms)
    started = DrainView(running.drain.model_copy(update={"created_at": queued.drain.created_at,
                                                          "started_at": time.time()}), running.nodes, running.vms)
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    await follow(StubService([queued, started, make_view()]), "x", console=console,  # type: ignore[arg-type]
                 notice=print, poll_s=0)
    stamps = [float(m.group(1)) for m in re.finditer(r"^\[\s*(\d+) s\]", buffer.getvalue(), re.MULTILINE)]
    assert stamps and stamps == sorted(stamps), buffer.getvalue()
