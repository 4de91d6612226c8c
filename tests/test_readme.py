"""The README's walk-through, run as it is written: its shell blocks (marked `<!-- walkthrough: NAME -->`) go to
bash unchanged, in a fresh directory holding the repository's `.venv` and `k8s/`, against the simulated cluster
the walk-through starts, a real Redis and real worker processes. The only liberties: the test's own Redis
database and queue (through `DRAIN_REDIS_URL` / `DRAIN_QUEUE_NAME`, which the README documents), and a free
port in place of the API's 8080, so that parallel runs do not collide. Success is judged on the cluster's
objects (`kubectl get vmi`), not on what drainctl prints."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
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
        try:
            done = await asyncio.to_thread(
                subprocess.run, ["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True,
                text=True, timeout=540, check=False)
        except subprocess.TimeoutExpired as exc:
            def text(raw: bytes | str | None) -> str:
                return raw.decode(errors="replace") if isinstance(raw, bytes) else (raw or "")
            pytest.fail(f"the walk-through did not end: {text(exc.stdout)[-4000:]}\n--- stderr ---\n"
                        f"{text(exc.stderr)[-4000:]}")
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
