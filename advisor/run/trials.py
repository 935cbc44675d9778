"""The typed study store: a trial's record, and everything the tuner keeps in optuna's storage.

A trial stores what it decided and measured as optuna user attributes (plain JSON, so that any
storage and `optuna-dashboard` can read it); the study keeps its own (the rule engine's seeds, the
quality guard's reference, the confirmation runs). This module is the one adapter between the tuner
and those attributes: it alone names them (`tests/test_layers.py` checks), statuses are `Status`,
and `judge` alone decides how a measured trial ends.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from advisor.config import SCHEMA_VERSION, OptimizationConfig, config_from_dict
from advisor.plan.quality import is_lossy
from advisor.plan.scenario import limited_peak
from advisor.run.timing import cost_per_generation, one_off_s
from advisor.units import format_size


class _Named(str, Enum):
    """A stored name: equal to its string (what the storage holds), hashed and printed as it."""

    __hash__ = str.__hash__  # Enum hashes the member's name: "ok" in {Status.OK} would be False

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Status(_Named):
    """How a trial ended."""

    OK = "ok"  # measured, within the budget and the quality floor
    OVER_BUDGET = "over-budget"
    LOW_QUALITY = "low-quality"  # under the quality floor against the lossless reference (`advisor.run.guard`)
    OOM = "oom"
    CRASH = "crash"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"  # predicted far over the budget: not measured
    INVALID = "invalid"  # a rule rejects the configuration on this target


class Source(_Named):
    """How a trial's answer was obtained."""

    MEASURED = "measured"
    ESTIMATE = "estimate"
    REPEAT = "repeat"  # the answer of an earlier trial of the same configuration
    REHEARSAL = "rehearsal"  # refused by its rehearsal on a virtual GPU (`advisor.run.screening`): not measured


class ClaimState(_Named):
    """Where a trial's claim on its configuration stands (`advisor.run.claims`)."""

    CLAIMED = "claimed"
    MEASURING = "measuring"
    YIELDED = "yielded"


# Failed measurements of an earlier run that a new run makes again (a trial, or the quality guard's
# reference): a crash or timeout may have been transient, or the timeout too short; out of memory at
# the same budget only when asked (``--retry-failed``).
RETRIED = frozenset({Status.CRASH, Status.TIMEOUT})
RETRIED_ON_REQUEST = frozenset({Status.OOM})


def measured_again(status: str | None, retry_failed: bool) -> bool:
    """Whether a new run measures again what an earlier one ended with `status`."""
    return status in RETRIED or (retry_failed and status in RETRIED_ON_REQUEST)


@dataclass(frozen=True)
class Verdict:
    """How a measured trial ends: its status, the constraint optuna keeps (> 0: infeasible), why."""

    status: Status
    violation: float
    reason: str | None = None


def judge(status: str, reason: str | None, peak: int | None, budget: int, too_far: str | None = None) -> Verdict:
    """The one rule for how a measurement ends: as it failed (oom, crash, timeout); over the budget
    by its measured `peak`; under the quality floor (`too_far`, the guard's reason); else ok."""
    if status != Status.OK:
        return Verdict(Status(status), 1.0, reason)
    if peak is not None and peak > budget:
        return Verdict(
            Status.OVER_BUDGET,
            float(peak - budget),
            f"measured peak {format_size(peak)} > budget {format_size(budget)}",
        )
    if too_far:
        return Verdict(Status.LOW_QUALITY, 1.0, too_far)
    return Verdict(Status.OK, float((peak or 0) - budget))


@dataclass
class TrialRecord:
    """One finished trial: the configuration, how it ended, and what was predicted and measured."""

    number: int
    summary: str
    status: Status
    source: Source
    feasible: bool  # measured, ok, and within the budget
    latency_s: float | None  # measured, whether or not it fits
    peak_bytes: int | None  # measured peak the budget limits
    predicted_peak_bytes: int | None
    reason: str | None
    config: dict[str, Any]
    measurement: dict[str, Any] | None = None
    predicted_latency_s: float | None = None
    # measured: the latency is latency_s ± this (see `advisor.run.measure.Timing`)
    latency_spread_s: float | None = None
    noisy: str | None = None  # measured: why the latency did not settle within the tolerance
    # Fresh processes the latency was measured in: 1, or more for a finalist (`advisor.run.confirm`),
    # whose latency is then the median of `process_latencies_s` and its spread their 95% t-interval.
    processes: int = 1
    process_latencies_s: list[float] | None = None
    # measured: a lossy output against the lossless reference (`advisor.run.guard`)
    quality: dict[str, Any] | None = None
    # measured: what the first call took beyond a warm one (`advisor.run.timing.one_off_s`: compiling,
    # autotuning), spread over the generations a process makes (`--generations`) in `cost_s`
    one_off_s: float | None = None
    generations: int = 1

    # Derived from the others (or from optuna and the confirmation runs) rather than stored.
    _DERIVED = (
        "number",
        "feasible",
        "latency_s",
        "peak_bytes",
        "latency_spread_s",
        "noisy",
        "processes",
        "process_latencies_s",
        "quality",
        "one_off_s",
        "generations",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def lossless(self) -> bool:
        """Measured, and its configuration computes what the reference does (nothing lossy to compare)."""
        return self.latency_s is not None and not is_lossy(stored_config(self.config))

    @property
    def cost_s(self) -> float | None:
        """The measured latency per generation with its share of the one-off time (`cost_per_generation`)."""
        return (
            None if self.latency_s is None else cost_per_generation(self.latency_s, self.one_off_s, self.generations)
        )

    @property
    def latency_range(self) -> tuple[float, float] | None:
        """(low, high) of the measured latency; the point itself where no spread was measured."""
        if self.latency_s is None:
            return None
        spread = self.latency_spread_s or 0.0
        return self.latency_s - spread, self.latency_s + spread

    @property
    def cost_range(self) -> tuple[float, float] | None:
        """(low, high) of `cost_s`: the latency's range and its share of the one-off time."""
        if self.latency_range is None:
            return None
        share = self.cost_s - self.latency_s
        return self.latency_range[0] + share, self.latency_range[1] + share

    @classmethod
    def stored_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls._DERIVED]

    @classmethod
    def from_trial(cls, trial: Any, device: str, generations: int = 1) -> TrialRecord | None:
        """The record of a finished optuna trial, its one-off time spread over `generations`; None
        for one still running or killed mid-run."""
        attrs = trial.user_attrs
        if _STATUS not in attrs:
            return None
        stored = {name: attrs.get(name) for name in cls.stored_fields()}
        stored.update(status=Status(stored["status"]), source=Source(stored["source"]))
        measurement = stored["measurement"] or {}
        within = all(value <= 0 for value in trial.constraints.values())
        return cls(
            number=trial.number,
            feasible=stored["status"] == Status.OK and stored["source"] != Source.ESTIMATE and within,
            latency_s=measurement.get("latency_s"),
            latency_spread_s=measurement.get("latency_spread_s"),
            noisy=measurement.get("noisy"),
            quality=measurement.get("quality"),
            one_off_s=one_off_s(measurement),
            generations=generations,
            peak_bytes=limited_peak(
                device, vram_bytes=measurement.get("peak_vram_bytes"), ram_bytes=measurement.get("peak_rss_bytes")
            ),
            **stored,
        )


# --- a trial's attributes ----------------------------------------------------------------------------
# What a finished trial stores is `TrialRecord.stored_fields()`, under their own names; besides those:
_STATUS, _SOURCE, _CONFIG, _MEASUREMENT = "status", "source", "config", "measurement"
# "host:pid" of the tuner running the trial, set when it starts, so that a later run can tell a trial
# whose tuner was killed (`advisor.run.storage.fail_orphaned_trials`) from a live one.
_RUNNER = "runner"
# The configuration a trial claims before measuring (`config_key`), and where that claim stands.
_CLAIM, _CLAIM_STATE = "claim", "claim_state"
_SEEDED_BY = "seeded_by"  # what queued a trial: "rules", "retry" or "untried" (`advisor.run.queue`)
_FIXED_PARAMS = "fixed_params"  # optuna's system attribute: the parameters of a queued trial


def write_result(trial: Any, violation: float, **stored: Any) -> None:
    """Store a finishing trial's record (every stored field of `TrialRecord`, named) and its
    constraint: how far its peak is over the budget (> 0: infeasible)."""
    if sorted(stored) != sorted(TrialRecord.stored_fields()):
        raise TypeError(f"a trial stores exactly {TrialRecord.stored_fields()}, got {sorted(stored)}")
    for name, value in stored.items():
        trial.set_user_attr(name, value)
    trial.set_constraint("peak_over_budget", violation)


def status_of(trial: Any) -> Status | None:
    """How a trial ended; None while it runs (or for one killed mid-run)."""
    status = trial.user_attrs.get(_STATUS)
    return Status(status) if status is not None else None


def source_of(trial: Any) -> Source | None:
    source = trial.user_attrs.get(_SOURCE)
    return Source(source) if source is not None else None


def reason_of(trial: Any) -> str | None:
    return trial.user_attrs.get("reason")


def config_of(trial: Any) -> dict[str, Any] | None:
    """The configuration a finished trial stored (`OptimizationConfig.to_dict(exclude_none=False)`)."""
    return trial.user_attrs.get(_CONFIG)


def stored_config(data: dict[str, Any]) -> OptimizationConfig:
    """A stored trial's configuration as today's schema reads it: a study outlives the advisor that
    began it, so its configs go through the schema's migrations (`advisor.migrations`)."""
    return config_from_dict({"schema_version": SCHEMA_VERSION, **data}, source="a stored trial's config")


def measurement_of(trial: Any) -> dict[str, Any] | None:
    return trial.user_attrs.get(_MEASUREMENT)


def set_runner(trial: Any, runner: str) -> None:
    trial.set_user_attr(_RUNNER, runner)


def runner_of(trial: Any) -> str | None:
    return trial.user_attrs.get(_RUNNER)


def set_claim(trial: Any, key: str, state: ClaimState) -> None:
    """Claim configuration `key` for `trial` (once), then say where the claim stands."""
    if trial.user_attrs.get(_CLAIM) != key:
        trial.set_user_attr(_CLAIM, key)
    trial.set_user_attr(_CLAIM_STATE, state)


def claim_of(trial: Any) -> str | None:
    return trial.user_attrs.get(_CLAIM)


def claim_state(trial: Any) -> ClaimState | None:
    state = trial.user_attrs.get(_CLAIM_STATE)
    return ClaimState(state) if state is not None else None


def enqueue(study: Any, params: dict[str, Any], seeded_by: str, skip_if_exists: bool = False) -> None:
    """Queue a trial of `params`, saying what queued it."""
    study.enqueue_trial(params, user_attrs={_SEEDED_BY: seeded_by}, skip_if_exists=skip_if_exists)


def queued_params(trial: Any) -> dict[str, Any]:
    """The parameters of a trial: those it was queued with, while it waits."""
    return trial.system_attrs.get(_FIXED_PARAMS) or trial.params


# --- the study's attributes ----------------------------------------------------------------------------
_SEEDED = "seeded"  # the rule engine's picks are queued (once per study)
_REFERENCE = "quality_reference"  # the quality guard's lossless reference: its status, configuration, note
_CONFIRM_PREFIX = "confirm:"  # + a configuration's hash: its confirmation runs (`advisor.run.confirm`)


def is_seeded(study: Any) -> bool:
    return bool(study.user_attrs.get(_SEEDED))


def mark_seeded(study: Any) -> None:
    study.set_user_attr(_SEEDED, True)


@dataclass(frozen=True)
class Reference:
    """What the study keeps of the quality guard's lossless reference output (`advisor.run.guard`)."""

    status: Status  # how its generation ended
    summary: str  # its configuration, in words
    config: dict[str, Any] | None = None  # generated: its configuration
    note: str | None = None  # failed: what the study's notes say about it


def reference_of(study: Any) -> Reference | None:
    stored = study.user_attrs.get(_REFERENCE)
    if not stored:
        return None
    return Reference(Status(stored["status"]), stored["summary"], stored.get("config"), stored.get("note"))


def store_reference(study: Any, reference: Reference) -> None:
    stored = {"status": reference.status, "summary": reference.summary}
    stored.update({"config": reference.config} if reference.status == Status.OK else {"note": reference.note})
    study.set_user_attr(_REFERENCE, stored)


def confirmation_key(config: dict[str, Any]) -> str:
    """Where the study keeps a configuration's confirmation runs."""
    return _CONFIRM_PREFIX + hashlib.sha1(config_key(config).encode()).hexdigest()[:16]


def confirmation_runs(study: Any) -> dict[str, list[dict[str, Any]]]:
    """Every configuration's confirmation runs, by `confirmation_key`."""
    return {key: runs for key, runs in study.user_attrs.items() if key.startswith(_CONFIRM_PREFIX)}


def runs_of(study: Any, config: dict[str, Any]) -> list[dict[str, Any]]:
    return list(study.user_attrs.get(confirmation_key(config), []))


def add_confirmation_run(study: Any, config: dict[str, Any], run: dict[str, Any]) -> None:
    study.set_user_attr(confirmation_key(config), runs_of(study, config) + [run])


def config_key(config: Any) -> str:
    """A configuration's identity across trials (its stored JSON, keys sorted): a repeat shares it."""
    return json.dumps(config, sort_keys=True)


def choose_best(feasible: list[TrialRecord]) -> tuple[TrialRecord | None, list[str]]:
    """The feasible trial that costs least per generation (`TrialRecord.cost_s`), and a note when
    others cost as little within the measured spread, or when another is faster once warm.

    Trials whose cost ranges overlap the cheapest one's are equally fast as far as the measurements
    can tell; among them the lossless configuration wins, then the smaller peak, so that the pick
    does not flip with the noise between runs."""
    if not feasible:
        return None, []
    cheapest = min(feasible, key=lambda r: (r.cost_s, r.peak_bytes or 0, r.number))
    ceiling = cheapest.cost_range[1]
    tied: dict[str, TrialRecord] = {}  # configuration -> its first trial (a repeat shares the measurement)
    for r in sorted(feasible, key=lambda r: r.number):
        if r.cost_range[0] <= ceiling:
            tied.setdefault(config_key(r.config), r)

    def lossy(r: TrialRecord) -> bool:
        return is_lossy(stored_config(r.config))

    best = min(tied.values(), key=lambda r: (lossy(r), r.peak_bytes or 0, r.cost_s, r.number))
    notes = []
    if len(tied) > 1:
        others = ", ".join(f"{r.number} ({_with_spread(r)})" for r in tied.values() if r is not best)
        note = f"trial {best.number} ({_with_spread(best)}) is as fast as {others} within the measured spread"
        if best is not cheapest:
            note += f"; chose it for being {'lossless' if lossy(cheapest) and not lossy(best) else 'smaller in peak memory'}"
        notes.append(note)
    warm = min(feasible, key=lambda r: (r.latency_s, r.number))
    if warm.latency_range[1] < best.latency_range[0] and config_key(warm.config) not in tied:
        notes.append(
            f"trial {warm.number} is faster once warm ({warm.latency_s:.3f}s against {best.latency_s:.3f}s), but its "
            f"first call took {warm.one_off_s:.1f}s more than a warm one{' (compiling)' if warm.config.get('compile') else ''}: "
            f"over the {warm.generations} "
            f"generations a process makes (--generations) it costs {warm.cost_s:.3f}s a generation, trial "
            f"{best.number} {best.cost_s:.3f}s"
        )
    return best, notes


def _with_spread(record: TrialRecord) -> str:
    return f"{record.cost_s:.3f}s ± {record.latency_spread_s or 0:.3f}"
