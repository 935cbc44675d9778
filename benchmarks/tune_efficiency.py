"""`advisor tune` against an exhaustive grid over the same CPU search space, in one run.

Both measure real candidates of a Flux-like pipeline with tens of millions of parameters through
the same trial code (`advisor.run.measure`, one process per candidate). The grid measures every
configuration of the space; tune gets a third of the grid's trial count. Reported: whether tune
found the grid's best feasible configuration, and the trials and wall time each took.
Goal: the same best configuration in at most a third of the grid's time.

    python benchmarks/tune_efficiency.py [--scale 8] [--size 64] [--steps 20] [--budget 2GB]
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

from advisor.plan.scenario import make_scenario
from advisor.plan.space import SearchSpace
from advisor.probe.hardware import probe_machine
from advisor.probe.models import profile_from_folder
from advisor.probe.target import target_from_probe
from advisor.probe.workload import make_workload
from advisor.run.measure import measure
from advisor.run.tune import TuneSettings, run_study
from advisor.testing import build_tiny_flux
from advisor.units import format_size, parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", default="2GB")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "advisor-bench")
    args = parser.parse_args()

    folder = build_tiny_flux(args.dir / f"flux-x{args.scale}", scale=args.scale)
    profile = profile_from_folder(folder)
    workload = make_workload(profile, height=args.size, width=args.size, steps=args.steps)
    machine = probe_machine()
    target = target_from_probe(machine)
    budget = parse_size(args.budget, name="--budget")
    scenario = make_scenario(profile, workload, target, packages=machine.software.packages, budget_bytes=budget)
    space = SearchSpace.for_scenario(scenario).usable(scenario)
    print(f"machine: {target.name} ({target.device}), Python {platform.python_version()}")
    print(f"pipeline: {profile.parameters / 1e6:.0f} M parameters, {workload.label()}, budget {format_size(budget)}")
    print(
        f"space: {space.size()} configurations ({len(space.quantization)} quantization x {len(space.offload)} offload x {len(space.compile)} compile)"
    )

    started = time.perf_counter()
    grid = []
    for params in space.points():
        candidate = space.candidate(params, scenario)
        if candidate.rejected_by:
            continue
        config = candidate.config
        result = measure(folder, config, workload)
        peak = result.limited_peak(target.device)
        feasible = result.ok and peak is not None and peak <= budget
        grid.append((config.summary(), result.latency_s if feasible else None, result.wall_s))
        print(
            f"  grid: {config.summary():<55} {result.status:<8} {result.latency_s or 0:8.3f}s  (trial {result.wall_s:.0f}s)"
        )
    grid_time = time.perf_counter() - started
    feasible = [g for g in grid if g[1] is not None]
    grid_best = min(feasible, key=lambda g: g[1]) if feasible else None

    trials = max(1, math.ceil(len(grid) / 3))
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        tuned = run_study(
            str(folder), scenario, storage=f"sqlite:///{scratch}/bench.db", settings=TuneSettings(trials=trials)
        )
        tune_time = time.perf_counter() - started
    tune_best = tuned.best.summary if tuned.best else None
    print()
    print(f"{'':<6} {'trials':>6} {'wall time':>10}  best configuration (latency)")
    print(
        f"{'grid':<6} {len(grid):>6} {grid_time:>9.0f}s  {grid_best[0] if grid_best else '-'} ({grid_best[1]:.3f}s)"
        if grid_best
        else "grid: nothing feasible"
    )
    measured = sum(1 for t in tuned.trials if t.source == "measured")
    print(
        f"{'tune':<6} {len(tuned.trials):>6} {tune_time:>9.0f}s  {tune_best or '-'} ({tuned.best.latency_s:.3f}s); {measured} measured"
        if tuned.best
        else "tune: nothing feasible"
    )
    same = grid_best is not None and tune_best == grid_best[0]
    within = None
    if grid_best and tuned.best:
        within = (tuned.best.latency_s - grid_best[1]) / grid_best[1]
    print(
        f"tune found the grid's best: {'yes' if same else 'no'}"
        + (f" (its pick is {within:+.1%} from the grid's best latency)" if within is not None and not same else "")
        + f"; time ratio tune/grid: {tune_time / grid_time:.2f} (goal <= 0.33)"
    )


if __name__ == "__main__":
    main()
