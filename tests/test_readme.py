"""The README's walk-through, run as it is written: its shell blocks (marked `<!-- walkthrough: NAME -->`) go to
bash unchanged, in a fresh directory holding the repository's `.venv` and `k8s/`, against the simulated cluster
the walk-through starts, a real Redis and real worker processes. The only liberties: the test's own Redis
database and queue (through `DRAIN_REDIS_URL` / `DRAIN_QUEUE_NAME`, which the README documents), and a free
port in place of the API's 8080, so that parallel runs do not collide. Success is judged on the cluster's
objects (`kubectl get vmi`), not on what drainctl prints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.redis_db import claimed_db, free_port, requires_redis

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^( *)<!-- walkthrough: (\w+) -->\n *```sh\n(.*?)\n *```", re.S | re.M)

pytestmark = [requires_redis, pytest.mark.integration, pytest.mark.timeout(600)]


def walkthrough() -> dict[str, str]:
    blocks = {name: textwrap.dedent(indent + body) for indent, name, body in BLOCK.findall(README.read_text())}
    assert {"cli", "http", "drainrequest"} <= set(blocks), sorted(blocks)
    return blocks


def test_the_readme_never_points_outside_the_repository() -> None:
    text = README.read_text()
    assert "../shared" not in text and "/work/" not in text
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in link:
            assert (ROOT / link).exists(), link


def run_walkthrough(script: list[str], work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """bash in a process group of its own: whatever the walk-through leaves running (the simulator, workers, the
    API) is stopped with it, even when it does not end in time."""
    proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the walk-through did not end: {out[-4000:]}\n--- stderr ---\n{err[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(shutil.which("kubectl") is None or shutil.which("jq") is None
                    or shutil.which("curl") is None, reason="needs kubectl, jq and curl")
async def test_walkthrough_runs_verbatim(tmp_path: Path) -> None:
    blocks = walkthrough()
    port = free_port()
    script = [
        "set -eo pipefail",
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT",
        blocks["cli"],
        blocks["http"].replace("8080", str(port)),
        # `kubectl apply` validates against the simulator's OpenAPI document; the namespace is created for real.
        blocks["drainrequest"],
        # What the cluster says at the end: where every VMI runs.
        "kubectl get vmi -A -o json > vmis.json",
    ]
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "k8s").symlink_to(ROOT / "k8s")
    async with claimed_db() as url:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("DRAIN_") and k not in ("KUBECONFIG", "VIRTUAL_ENV")}
        env.update(HOME=str(tmp_path), DRAIN_REDIS_URL=url, DRAIN_QUEUE_NAME=f"readme-{secrets.token_hex(4)}",
                   PYTHONUNBUFFERED="1")
        done = await asyncio.to_thread(run_walkthrough, script, work, env)
    output = done.stdout[-6000:] + "\n--- stderr ---\n" + done.stderr[-6000:]
    assert done.returncode == 0, output
    assert "Traceback" not in done.stderr, output
    assert re.search(r"drain [0-9a-f]{12}: Succeeded", done.stdout), output
    assert (work / "report.html").read_text().startswith("<!DOCTYPE html>")
    vmis = json.loads((work / "vmis.json").read_text())["items"]
    assert vmis, output
    drained = {"worker-01", "worker-02", "worker-03"}
    left = [v["metadata"]["name"] for v in vmis if (v.get("status") or {}).get("nodeName") in drained]
    assert left == [], output
