"""Are tune's latencies as certain as they say? The same search measured in separate studies.

Each study is a fresh `run_study` of the same Flux-like pipeline on this machine (every trial in
its own process, as `advisor tune` runs them). For each configuration the table shows the latency
every study reported with the spread its trial stated, the spread across the studies, and how many
studies' intervals (latency ± stated spread) hold the median of all of them. Goals: the
spread across studies within the spread each trial reports, and the same pick in every study.
The finalists of each study are measured in fresh processes too (`advisor.run.confirm`): their
latency and spread are across processes (``×N`` in the table), the others' within one process.

    python benchmarks/tune_noise.py [--studies 5] [--scale 1] [--size 64] [--steps 28]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from advisor.plan.scenario import make_scenario
from advisor.probe.hardware import probe_machine
from advisor.probe.models import profile_from_folder
from advisor.probe.target import target_from_probe
from advisor.probe.workload import make_workload
from advisor.run.tune import TuneSettings, run_study
from advisor.testing import build_tiny_flux
from advisor.units import format_size, parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument(
        "--scale", type=int, default=1, help="width multiplier of the tiny Flux (advisor.testing.build_tiny_flux)"
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--budget", default="4GB")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "advisor-bench")
    parser.add_argument(
        "--confirm", type=int, default=TuneSettings.confirm_runs, help="runs in fresh processes per finalist"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()

    folder = build_tiny_flux(args.dir / f"flux-x{args.scale}", scale=args.scale)
    profile = profile_from_folder(folder)
    workload = make_workload(profile, height=args.size, width=args.size, steps=args.steps)
    machine = probe_machine()
    target = target_from_probe(machine)
    scenario = make_scenario(
        profile,
        workload,
        target,
        packages=machine.software.packages,
        budget_bytes=parse_size(args.budget, name="--budget"),
    )
    settings = TuneSettings(trials=8, compile_choices=(False,), confirm_runs=args.confirm)
    print(
        f"machine: {target.name} ({target.device}), {machine.host.cpu_model}, {machine.host.cpu_cores_logical} logical cores, Python {platform.python_version()}"
    )
    print(
        f"pipeline: {profile.parameters / 1e6:.0f} M parameters, {workload.label()}, budget {format_size(scenario.budget_bytes)}; "
        f"tolerance ±{settings.tolerance:.0%}, {settings.repeats}-{settings.max_rounds} rounds of {settings.step_points} steps, "
        f"finalists measured in {settings.confirm_runs} more processes"
    )

    storage = f"sqlite:///{args.dir / f'noise-{int(time.time())}.db'}"
    studies = []
    for index in range(args.studies):
        started = time.perf_counter()
        result = run_study(str(folder), scenario, storage=storage, study=f"noise-{index}", settings=settings)
        measured = {t.summary: t for t in result.trials if t.source == "measured" and t.latency_s is not None}
        studies.append(
            {
                "best": result.best.summary if result.best else None,
                "notes": result.notes,
                "trials": {
                    summary: {
                        "latency_s": t.latency_s,
                        "spread_s": t.latency_spread_s,
                        "noisy": t.noisy,
                        "rounds": (t.measurement or {}).get("rounds"),
                        "processes": t.processes,
                        "process_latencies_s": t.process_latencies_s,
                    }
                    for summary, t in measured.items()
                },
            }
        )
        print(
            f"study {index + 1}/{args.studies}: {len(measured)} configurations in {time.perf_counter() - started:.0f} s; "
            f"best: {studies[-1]['best']}",
            flush=True,
        )

    print()
    print(
        "| configuration | latency per study (s, ± stated spread) | across studies (half range) | median stated spread "
        "| intervals holding the median | noisy |"
    )
    print("|---|---|---|---|---|---|")
    covered_all = covered_confirmed = True
    for summary in sorted({s for study in studies for s in study["trials"]}):
        runs = [study["trials"][summary] for study in studies if summary in study["trials"]]
        latencies = [r["latency_s"] for r in runs]
        spreads = [r["spread_s"] or 0.0 for r in runs]
        middle = statistics.median(latencies)
        across = (max(latencies) - min(latencies)) / 2
        held = sum(abs(r["latency_s"] - middle) <= (r["spread_s"] or 0.0) for r in runs)
        covered = across <= statistics.median(spreads)
        covered_all &= covered
        if all(r["processes"] > 1 for r in runs):
            covered_confirmed &= covered
        shown = ", ".join(
            f"{r['latency_s']:.3f} ± {r['spread_s'] or 0:.3f}" + (f" ×{r['processes']}" if r["processes"] > 1 else "")
            for r in runs
        )
        print(
            f"| {summary} | {shown} | {across:.3f} ({across / middle:.1%}) | {statistics.median(spreads):.3f} "
            f"({statistics.median(spreads) / middle:.1%}) | {held}/{len(runs)} | {sum(bool(r['noisy']) for r in runs)}/{len(runs)} |"
        )
    picks = [study["best"] for study in studies]
    print()
    print(
        f"spread across studies within the median stated spread, every configuration: {'yes' if covered_all else 'no'}; "
        f"configurations confirmed in every study: {'yes' if covered_confirmed else 'no'}"
    )
    print(
        f"same pick in all {len(studies)} studies: {'yes' if len(set(picks)) == 1 else 'no'} ({'; '.join(map(str, picks))})"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": target.name, "workload": workload.label(), "studies": studies}, indent=2)
        )


if __name__ == "__main__":
    main()
