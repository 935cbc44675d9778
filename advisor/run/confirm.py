"""The finalists of a study measured again in fresh processes, taking turns: the noise between processes.

One trial's timed rounds agree within a few percent, yet on a shared machine the same configuration
measured in another process minutes later differed by up to ±17% (docs/benchmarks.md, "Tune
noise"): noise that one process cannot see from inside (other tenants, clocks, memory layout). So
after the search, the configurations within `FINALIST_MARGIN` of the fastest (at most `FINALISTS`)
are measured `CONFIRM_RUNS` (`advisor.run.timing`) more times each in new processes, in turns (A B C, B C A, ...) so that a
machine that slows down slows them all. A finalist's latency becomes the median over its processes,
its spread the 95% confidence half-width across them (`process_spread`; never less than one
process's own), and its peak the largest any process measured; the pick is made on those.

The runs are stored in the study's user attributes (`confirmation_key`), so a resumed study keeps
them and only measures what is missing.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any, Callable

from advisor.plan.scenario import limited_peak
from advisor.run.trials import (
    Source,
    Status,
    TrialRecord,
    add_confirmation_run,
    choose_best,
    config_key,
    confirmation_key,
    judge,
    runs_of,
)


FINALISTS = 3  # configurations measured again, the fastest first
FINALIST_MARGIN = 0.35  # within this of the fastest latency: twice the ±17% seen between processes
MAX_PASSES = 3  # a confirmed finalist can fall behind one that was not: confirm the new ones, this often

# What one confirmation run keeps of its measurement.
# Student's t at 95% (two-sided) for 1-10 degrees of freedom; beyond, the normal 1.96 is within 12%.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)

KEPT = ("status", "reason", "latency_s", "latency_spread_s", "peak_vram_bytes", "peak_rss_bytes", "noisy")


def finalists(records: list[TrialRecord], limit: int = FINALISTS) -> list[TrialRecord]:
    """The first measured trial of each feasible configuration that could be the pick: the one
    `choose_best` picks now (a tie can go to a slower, lossless one), then the others within
    FINALIST_MARGIN of the cheapest per generation (`TrialRecord.cost_s`), cheapest first; at most `limit`."""
    firsts: dict[str, TrialRecord] = {}
    for r in sorted(records, key=lambda r: r.number):
        if r.feasible and r.source == Source.MEASURED and r.latency_s is not None:
            firsts.setdefault(config_key(r.config), r)
    ranked = sorted(firsts.values(), key=lambda r: (r.cost_s, r.number))
    if not ranked:
        return []
    best, _ = choose_best(ranked)
    ceiling = ranked[0].cost_s * (1 + FINALIST_MARGIN)
    return ([best] + [r for r in ranked if r is not best and r.cost_s <= ceiling])[:limit]


def with_confirmations(
    records: list[TrialRecord], stored: dict[str, Any], device: str, budget: int
) -> list[TrialRecord]:
    """`records` with each confirmed configuration's latency, spread and peak taken over all its
    processes; a confirmation run that failed or went over the budget makes the configuration
    infeasible, with that run's reason. A trial of the configuration that crashed (or ran out of
    memory) before a later one measured it stays as it ended: the runs confirm a latency it has not."""
    out = []
    for r in records:
        measured = r.source != Source.ESTIMATE and r.measurement and r.measurement.get("latency_s") is not None
        runs = stored.get(confirmation_key(r.config)) if measured else None
        out.append(_combined(r, runs, device, budget) if runs else r)
    return out


def _combined(r: TrialRecord, runs: list[dict[str, Any]], device: str, budget: int) -> TrialRecord:
    processes = [r.measurement] + runs
    failed = next((i for i, run in enumerate(runs, start=2) if run.get("status") != Status.OK), None)
    if failed is not None:
        run = runs[failed - 2]
        verdict = judge(run["status"], run.get("reason"), None, budget)
        return replace(
            r,
            status=verdict.status,
            feasible=False,
            processes=len(processes),
            reason=f"run {failed} of {len(processes)} in a fresh process: {verdict.reason or verdict.status}",
        )
    latencies = [p["latency_s"] for p in processes]
    within = statistics.median(p.get("latency_spread_s") or 0.0 for p in processes)
    peaks = [
        limited_peak(device, vram_bytes=p.get("peak_vram_bytes"), ram_bytes=p.get("peak_rss_bytes")) for p in processes
    ]
    peak = max((p for p in peaks if p is not None), default=None)
    combined = replace(
        r,
        latency_s=statistics.median(latencies),
        latency_spread_s=max(process_spread(latencies), within),
        processes=len(processes),
        process_latencies_s=latencies,
        peak_bytes=peak,
        noisy=next((p["noisy"] for p in processes if p.get("noisy")), None),
    )
    verdict = judge(Status.OK, None, peak, budget)
    if r.feasible and verdict.status != Status.OK:
        return replace(
            combined, status=verdict.status, feasible=False, reason=f"a run in a fresh process {verdict.reason}"
        )
    return combined


def process_spread(latencies: list[float]) -> float:
    """The 95% confidence half-width of the latency across processes: t x s / sqrt(n).

    Half the range of 3 processes taken a minute apart understated how far another study's latency
    fell (across 5 studies: 8.8% against 4.9% stated, docs/benchmarks.md): with so few samples the
    range is as often too small as not, and the processes share the minute's load. Student's t
    widens the interval for the few samples there are (x2.5 of s for 3 processes)."""
    n = len(latencies)
    if n < 2:
        return 0.0
    t = T95[n - 2] if n - 2 < len(T95) else 1.96
    return t * statistics.stdev(latencies) / n**0.5


def missing_runs(study, chosen: list[TrialRecord], runs: int) -> list[TrialRecord]:
    """The finalists still short of `runs` confirmation runs in this study."""
    return [r for r in chosen if len(runs_of(study, r.config)) < runs]


def confirm(
    study,
    chosen: list[TrialRecord],
    runs: int,
    measure_one: Callable[[TrialRecord, int, int], dict[str, Any]],
) -> None:
    """Measure each of `chosen` until it has `runs` confirmation runs, in turns; each run is stored
    as soon as it ends (an interrupted confirmation keeps what it measured). ``measure_one(record,
    run, of)`` measures one in a fresh process and returns the `Measurement` as a dict."""
    for turn in range(runs):
        order = chosen[turn % len(chosen) :] + chosen[: turn % len(chosen)] if chosen else []
        for r in order:
            done = runs_of(study, r.config)
            if len(done) >= runs or len(done) > turn:
                continue
            measured = measure_one(r, len(done) + 2, runs + 1)
            add_confirmation_run(study, r.config, {name: measured.get(name) for name in KEPT})


def confirm_finalists(
    study,
    runs: int,
    result: Callable[[], Any],
    measure: Callable[[TrialRecord, Callable[[str], None] | None], Any],
    on_trial: Callable[[Any], None] | None = None,
    on_phase: Callable[[int, str, str], None] | None = None,
) -> None:
    """Measure the finalists of `result()` (the study's `TuneResult`, with the runs so far) in
    turns until each has `runs` confirmation runs; then again for any configuration that became a
    finalist. ``measure(record, on_phase)`` measures a trial's configuration in a fresh process."""
    if runs < 1:
        return

    def measure_one(record: TrialRecord, run: int, of: int) -> dict[str, Any]:
        shown = (
            (lambda phase: on_phase(record.number, record.summary, f"run {run} of {of}, {phase}"))
            if on_phase
            else None
        )
        measured = measure(record, shown)
        if on_trial is not None:
            on_trial(result())
        return measured.to_dict()

    for _ in range(MAX_PASSES):  # a finalist confirmed slower can let in one that was not confirmed yet
        chosen = missing_runs(study, finalists(result().trials), runs)
        if not chosen:
            return
        confirm(study, chosen, runs, measure_one)
