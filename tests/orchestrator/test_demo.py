"""`drainctl demo` as a user runs it: the installed command, a clean environment (no DRAIN_* variables, no
KUBECONFIG, HOME in a temporary directory), no Redis and no cluster. It must drain the node, say so, and
write a report that holds every migration attempt the drain recorded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

DRAINCTL = Path(sys.executable).parent / "drainctl"


class Attempts(HTMLParser):
    """Collects the attempt bars of the timeline and the rows of the attempts table."""

    def __init__(self) -> None:
        super().__init__()
        self.bars: list[tuple[str, int]] = []
        self.rows: list[tuple[str, int, str]] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "rect" and a.get("class") == "attempt":
            self.bars.append((a["data-vmi"], int(a["data-attempt"])))
        if tag == "tr" and a.get("class") == "attempt":
            self.rows.append((a["data-vmi"], int(a["data-attempt"]), a["data-vmim"]))
        if tag in ("script", "link", "img", "iframe") or "src" in a:
            self.external.append(tag)


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    return subprocess.run([str(DRAINCTL), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=110, check=False)


def parse_report(path: Path) -> Attempts:
    parser = Attempts()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_demo_drains_the_node_and_prints_summary_and_truth(tmp_path: Path) -> None:
    done = run_demo(tmp_path, "demo")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"drain [0-9a-f]{12}: Succeeded", out)
    assert "nodes drained: 1/1" in out
    assert "worker-01" in out and "Drained" in out
    migrated = int(re.search(r"VMs: 15 \((\d+) migrated, 0 failed", out).group(1))  # type: ignore[union-attr]
    assert migrated == 15
    assert "ground truth (measured by the simulator)" in out
    truth_migrations = int(re.search(r"migrations: (\d+) \(", out).group(1))  # type: ignore[union-attr]
    cluster = re.search(r"max in flight cluster-wide: (\d+) \(limit (\d+)\)", out)
    assert cluster is not None and 1 <= int(cluster.group(1)) <= int(cluster.group(2)) == 5
    per_node = re.search(r"max in flight per source node: worker-01 (\d+) \(limit (\d+)\)", out)
    assert per_node is not None and int(per_node.group(1)) <= int(per_node.group(2)) == 2
    assert "VMIs with two migrations at once: 0" in out
    report = tmp_path / "drainctl-report.html"
    assert f"report written to {report.name}" in out
    parsed = parse_report(report)
    # The simulator saw one migration per attempt that created a VMIM: the report must show each of them.
    assert len(parsed.rows) == len(parsed.bars) == truth_migrations >= 15
    assert parsed.external == []


def test_demo_report_holds_every_attempt_the_drain_recorded(tmp_path: Path) -> None:
    report = tmp_path / "custom.html"
    done = run_demo(tmp_path, "-o", "json", "demo", "--report", str(report), "--time-scale", "40")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    body: dict[str, Any] = json.loads(done.stdout)
    drain = body["drain"]
    assert drain["phase"] == "Succeeded" and drain["time_scale"] == 40
    recorded = {(vmi, int(a["attempt"])) for vmi, vm in drain["vms"].items() for a in vm["attempts"]}
    assert len(recorded) >= 15
    parsed = parse_report(report)
    assert set(parsed.bars) == recorded and len(parsed.bars) == len(recorded)
    assert {(vmi, attempt) for vmi, attempt, _ in parsed.rows} == recorded
    # ...and the attempts are the migrations the simulator really ran, VMIM by VMIM.
    truth = {(m["vmi"], m["name"]) for m in body["ground_truth"]["migrations"]}
    assert {(vmi, vmim) for vmi, _, vmim in parsed.rows} == truth
    assert body["ground_truth"]["max_in_flight_cluster"] <= 5
