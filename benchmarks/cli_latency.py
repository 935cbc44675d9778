"""Cold start-up latency of the fast CLI paths, against `python -c "import diffusers"` side by side.

Each command runs in a fresh process (nothing warm but the OS file cache), the commands taking
turns so that a machine that slows down slows them all; the table shows the median and the slowest
of N runs, and each median as a ratio of importing diffusers (what any diffusers script pays
first). Goal (issue 15): `advisor probe` and `advisor recommend` at or under 0.05 of it. Ratios,
not absolute times, are what compare across machines.

Bytecode caches as a user has them: Python writes a module's ``.pyc`` the first time it imports it
and reuses it after; an environment with ``PYTHONDONTWRITEBYTECODE=1`` (this project's development
VM sets it) would compile the advisor's sources at every start instead (site-packages is compiled
by pip at install time). So every command first runs once with bytecode writing on, and all runs
use that environment.

    python benchmarks/cli_latency.py [--runs 9]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


ADVISOR = shutil.which("advisor") or str(Path(sys.executable).with_name("advisor"))

REFERENCE = "python -c 'import diffusers'"
GOAL = 0.05  # of the reference's median

# (label, argv, whether the goal applies)
COMMANDS = [
    ("python -c pass (floor)", [sys.executable, "-c", "pass"], False),
    (REFERENCE, [sys.executable, "-c", "import diffusers"], False),
    ("advisor --help", [ADVISOR, "--help"], False),
    ("advisor probe", [ADVISOR, "probe"], True),
    ("advisor probe --json", [ADVISOR, "probe", "--json"], True),
    (
        "advisor recommend --model FLUX.1-dev --vram 24GB",
        [ADVISOR, "recommend", "--model", "black-forest-labs/FLUX.1-dev", "--vram", "24GB"],
        True,
    ),
    ("advisor inspect FLUX.1-dev --json", [ADVISOR, "inspect", "black-forest-labs/FLUX.1-dev", "--json"], False),
]


ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs per command (default 9)")
    args = parser.parse_args()

    for _, argv, _ in COMMANDS:  # writes the bytecode caches a user's first run writes
        time_once(argv)
    times: dict[str, list[float]] = {label: [] for label, _, _ in COMMANDS}
    for _ in range(args.runs):  # interleaved: every command once per round
        for label, argv, _ in COMMANDS:
            times[label].append(time_once(argv))
    reference = statistics.median(times[REFERENCE])
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    print(f"{'command':<48} {'median':>9} {'max':>9} {'/ diffusers':>12} {'goal':>7}  ok")
    for label, _, goal in COMMANDS:
        median = statistics.median(times[label])
        ratio = median / reference
        verdict = ("yes" if ratio <= GOAL else "NO") if goal else "-"
        print(
            f"{label:<48} {median * 1000:>7.0f}ms {max(times[label]) * 1000:>7.0f}ms {ratio:>12.3f} "
            f"{f'<={GOAL}' if goal else '-':>7}  {verdict}"
        )


if __name__ == "__main__":
    main()
