"""How long `drainctl` takes to start: `--help`, `status`, `list` and `cancel` (which read Redis only).

Each command runs `--runs` times as a fresh process; it prints the median and the fastest wall time, and the
heaviest modules the process imported (from `python -X importtime`). Redis-only commands run against
`--redis-url` (an unreachable Redis still measures start-up: the command exits 5 after one refused
connection).

    python -m bench.startup [--runs 7] [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: tuple[tuple[str, ...], ...] = (
    ("--help",),
    ("status", "--help"),
    ("list",),
    ("status", "bench-no-such-drain"),
    ("cancel", "bench-no-such-drain"),
)


def time_command(drainctl: str, args: tuple[str, ...], env: dict[str, str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([drainctl, *args], env=env, capture_output=True, check=False, timeout=60)
        out.append(time.perf_counter() - t0)
    return out


def heaviest_imports(env: dict[str, str], top: int = 5) -> list[tuple[str, int]]:
    """Modules of `drainctl --help` by cumulative import time (microseconds), top-level entries only."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", "--help"], env=env,
                          capture_output=True, text=True, check=False, timeout=60)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        if name.startswith("  "):  # nested: counted in its parent
            continue
        rows.append((name.strip(), int(parts[1])))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--redis-url", default=os.environ.get("DRAIN_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    drainctl = str(Path(sys.executable).with_name("drainctl"))
    env = dict(os.environ, DRAIN_REDIS_URL=args.redis_url)
    print(f"drainctl start-up, {args.runs} runs each (wall seconds)")
    print(f"{'command':<40} {'median':>8} {'fastest':>8}")
    for cmd in COMMANDS:
        times = time_command(drainctl, cmd, env, args.runs)
        print(f"{' '.join(('drainctl', *cmd)):<40} {statistics.median(times):>8.3f} {min(times):>8.3f}")
    print("heaviest top-level imports of `drainctl --help` (cumulative ms):")
    for name, micros in heaviest_imports(env):
        print(f"  {name:<40} {micros / 1000:>8.1f}")


if __name__ == "__main__":
    main()
