"""Cold start-up latency of the fast CLI paths, against `python -c pass` as the floor.

Each command runs in a fresh process (nothing warm but the OS file cache); the table shows the
median and the slowest of N runs. Goals: `advisor probe` < 1 s; `advisor recommend` < 0.5 s.

    python benchmarks/cli_latency.py [--runs 9]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ADVISOR = shutil.which("advisor") or str(Path(sys.executable).with_name("advisor"))

# (label, argv, goal in seconds or None)
COMMANDS = [
    ("python -c pass (floor)", [sys.executable, "-c", "pass"], None),
    ("advisor --help", [ADVISOR, "--help"], None),
    ("advisor probe", [ADVISOR, "probe"], 1.0),
    ("advisor probe --json", [ADVISOR, "probe", "--json"], 1.0),
    (
        "advisor recommend --model FLUX.1-dev --vram 24GB",
        [ADVISOR, "recommend", "--model", "black-forest-labs/FLUX.1-dev", "--vram", "24GB"],
        0.5,
    ),
    ("advisor inspect FLUX.1-dev --json", [ADVISOR, "inspect", "black-forest-labs/FLUX.1-dev", "--json"], None),
]


def time_command(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs per command (default 9)")
    args = parser.parse_args()

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'command':<48} {'median':>9} {'max':>9} {'goal':>7}  ok")
    for label, argv, goal in COMMANDS:
        times = time_command(argv, args.runs)
        median = statistics.median(times)
        verdict = "-" if goal is None else ("yes" if median < goal else "NO")
        goal_text = "-" if goal is None else f"<{goal:.1f}s"
        print(f"{label:<48} {median * 1000:>7.0f}ms {max(times) * 1000:>7.0f}ms {goal_text:>7}  {verdict}")


if __name__ == "__main__":
    main()
