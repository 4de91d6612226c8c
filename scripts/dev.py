#!/usr/bin/env python3
"""Set up and run drainctl with nothing but Python 3.11: `python3 scripts/dev.py demo|test|check`.

Creates `.venv` beside the project (once, or again when pyproject.toml changed), installs the project with its
dev extras, then runs the demo, the tests, or lint + types + tests. `make demo` / `make test` do the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("VENV", ROOT / ".venv")).resolve()
BIN = VENV / "bin"
STAMP = VENV / ".drainctl-installed"


def ensure_venv() -> None:
    if STAMP.exists() and STAMP.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.touch()


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "demo"
    commands = {
        "demo": [[str(BIN / "drainctl"), "demo", *argv[1:]]],
        "test": [[str(BIN / "pytest"), "-q", *argv[1:]]],
        "check": [[str(BIN / "ruff"), "check", "."], [str(BIN / "mypy")], [str(BIN / "lint-imports")],
                  [str(BIN / "pytest"), "-q"]],
    }
    if command not in commands:
        print(f"usage: python3 scripts/dev.py {'|'.join(commands)} [args]", file=sys.stderr)
        return 2
    ensure_venv()
    for cmd in commands[command]:
        code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
