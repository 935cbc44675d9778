"""What a study's trials add up to: every finished trial, judged, and the fastest that fits.

`collect` reads the study (`advisor.run.trials`), takes each finalist's confirmation runs into
account (`advisor.run.confirm`), judges each lossy output against this run's quality floor
(`advisor.run.guard`) and picks the fastest feasible trial (`choose_best`), with the notes and
advice a person reads; `TuneResult` is what `advisor tune` prints, writes and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advisor.config import OptimizationConfig
from advisor.plan.scenario import Scenario
from advisor.plan.space import SearchSpace
from advisor.run.confirm import with_confirmations
from advisor.run.guard import QualityGuard
from advisor.run.trials import (
    RETRIED,
    RETRIED_ON_REQUEST,
    Source,
    Status,
    TrialRecord,
    choose_best,
    confirmation_runs,
    stored_config,
)
from advisor.units import format_size


# What `provenance.measured` of a tuned config carries from the best trial's measurement.
MEASURED_IN_PROVENANCE = (
    "rounds",
    "discarded_rounds",
    "peak_vram_bytes",
    "peak_vram_reserved_bytes",
    "peak_rss_bytes",
    "per_step_s",
    "fixed_s",
    "warmup_s",
    "load_s",
)


@dataclass
class TuneResult:
    study: str
    storage: str
    budget_bytes: int
    trials: list[TrialRecord]
    best: TrialRecord | None
    config: OptimizationConfig | None
    space_size: int
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each: why the study stopped early
    interrupted: bool = False
    # the quality guard's folder: the reference and lossy trials' outputs (`advisor.run.guard`)
    images: str | None = None
    reference: str | None = None  # the configuration whose output is the reference

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "budget_bytes": self.budget_bytes,
            "space_size": self.space_size,
            "fits": self.best is not None,
            "best": self.best.to_dict() if self.best else None,
            "config": self.config.to_dict() if self.config else None,
            "trials": [t.to_dict() for t in self.trials],
            "advice": self.advice,
            "notes": self.notes,
            "interrupted": self.interrupted,
            "images": self.images,
            "reference": self.reference,
        }


def failure_advice(statuses: set[str]) -> list[str]:
    """What to say about trials that failed: where to read why, and how to measure out-of-memory ones again."""
    failed = statuses & (RETRIED | RETRIED_ON_REQUEST)
    if not failed:
        return []
    line = f"some trials ended as {', '.join(sorted(failed))}: see the reasons in the table"
    if failed & RETRIED_ON_REQUEST:
        line += "; the same command measures crashed and timed-out ones again, out-of-memory ones with --retry-failed"
    return [line]


def nothing_fits_advice(records: list[TrialRecord], budget: int, space_size: int) -> list[str]:
    """What a study where nothing fits tells the user: the smallest measured peak, the failures, and
    what to try (more --trials only where the space has untried points, --no-prune only where the
    estimate skipped some)."""
    advice = []
    measured_peaks = [
        r for r in records if r.peak_bytes and r.status == Status.OVER_BUDGET
    ]  # not a crash's partial peak
    if measured_peaks:
        smallest = min(measured_peaks, key=lambda r: r.peak_bytes)
        advice.append(
            f"the smallest measured peak was {format_size(smallest.peak_bytes)} ({smallest.summary}), "
            f"over the {format_size(budget)} budget"
        )
    advice += failure_advice({r.status for r in records})
    refused = sum(1 for r in records if r.source == Source.REHEARSAL)
    if refused:
        advice.append(
            f"{refused} configuration(s) were refused by their rehearsal on a virtual GPU (the op is in the reason); "
            "`advisor check` rehearses one alone, --no-rehearse measures them anyway"
        )
    ways = ["a larger --budget", "a lower --height/--width/--frames"]
    ways += ["more --trials"] if len({r.summary for r in records}) < space_size else []
    ways += ["--no-prune"] if any(r.status == Status.SKIPPED for r in records) else []
    advice.append(f"try {', '.join(ways[:-1])} or {ways[-1]}")
    return advice


def collect(
    study, name: str, storage: str, space: SearchSpace, scenario: Scenario, guard: QualityGuard | None = None
) -> TuneResult:
    """The results so far: every finished trial (its quality judged by this run's floor), and the fastest that fits."""
    device, budget = scenario.target.device, scenario.budget_bytes
    records = [
        r
        for r in (TrialRecord.from_trial(t, device, scenario.generations) for t in study.get_trials(deepcopy=False))
        if r is not None
    ]
    records = with_confirmations(records, confirmation_runs(study), device, budget)
    if guard is not None:
        records = [guard.judged(r, budget) for r in records]
    feasible = [r for r in records if r.feasible and r.latency_s is not None]
    best, notes = choose_best(feasible)
    config = None
    advice: list[str] = []
    if best is not None:
        measured = {
            "latency_s": best.latency_s,
            "latency_spread_s": best.latency_spread_s,
            "noisy": best.noisy,
            "processes": best.processes,
            "process_latencies_s": best.process_latencies_s,
            "peak_bytes": best.peak_bytes,
            "trial": best.number,
            "study": name,
        }
        measured.update({key: (best.measurement or {}).get(key) for key in MEASURED_IN_PROVENANCE})
        config = stored_config(best.config).replace(provenance=scenario.provenance("tune", measured=measured))
    elif records:
        advice = nothing_fits_advice(records, budget, space.size())
    confirmed = [r for r in records if r.source == Source.MEASURED and r.processes > 1]
    if confirmed:
        numbers = ", ".join(str(r.number) for r in confirmed)
        notes.append(
            f"trial{'s' if len(confirmed) > 1 else ''} {numbers} (×N) measured in N fresh processes, taking turns: "
            "the latency is the median across them, ± its 95% confidence interval (Student's t; at least one process's spread)"
        )
    noisy = [r.number for r in records if r.source == Source.MEASURED and r.noisy]
    if noisy:
        notes.append(
            f"trial{'s' if len(noisy) > 1 else ''} {', '.join(map(str, noisy))} did not settle within the timing "
            "tolerance (marked noisy): compare them by their spread, or re-run on a quieter machine"
        )
    return TuneResult(name, storage, budget, records, best, config, space.size(), advice, notes)
