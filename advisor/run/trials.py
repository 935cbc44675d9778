"""One tuning trial as a typed record, and its round trip through optuna's storage.

A trial stores what it decided and measured as optuna user attributes (plain JSON, so that any
storage and `optuna-dashboard` can read it); `TrialRecord.attrs()` names what is written and
`TrialRecord.from_trial()` reads them back, so no other module touches attribute names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from advisor.config import OptimizationConfig
from advisor.plan.quality import is_lossy
from advisor.plan.scenario import limited_peak

# The user attribute a trial sets when it starts: "host:pid" of the tuner running it, so that a later
# run can tell a trial whose tuner was killed (`advisor.run.storage.fail_orphaned_trials`) from a live one.
RUNNER_ATTR = "runner"
# What a trial claims before measuring, so that workers never measure one configuration twice
# (`advisor.run.claims`): the configuration's key (`config_key`), and "claimed", then "measuring" or "yielded".
CLAIM_ATTR = "claim"
CLAIM_STATE_ATTR = "claim_state"

TrialStatus = Literal["ok", "over-budget", "low-quality", "oom", "crash", "timeout", "skipped", "invalid"]

# Failed measurements of an earlier run that a new run makes again (a trial, or the quality guard's
# reference): a crash or timeout may have been transient, or the timeout too short; out of memory at
# the same budget only when asked (``--retry-failed``).
RETRIED = frozenset({"crash", "timeout"})
RETRIED_ON_REQUEST = frozenset({"oom"})


def measured_again(status: str | None, retry_failed: bool) -> bool:
    """Whether a new run measures again what an earlier one ended with `status`."""
    return status in RETRIED or (retry_failed and status in RETRIED_ON_REQUEST)
TrialSource = Literal["measured", "estimate", "repeat"]  # how the answer was obtained


@dataclass
class TrialRecord:
    """One finished trial: the configuration, how it ended, and what was predicted and measured."""

    number: int
    summary: str
    status: TrialStatus
    source: TrialSource
    feasible: bool  # measured, ok, and within the budget
    latency_s: float | None  # measured, whether or not it fits
    peak_bytes: int | None  # measured peak the budget limits
    predicted_peak_bytes: int | None
    reason: str | None
    config: dict[str, Any]
    measurement: dict[str, Any] | None = None
    predicted_latency_s: float | None = None
    latency_spread_s: float | None = None  # measured: the latency is latency_s ± this (see `advisor.run.measure.Timing`)
    noisy: str | None = None  # measured: why the latency did not settle within the tolerance
    # Fresh processes the latency was measured in: 1, or more for a finalist (`advisor.run.confirm`),
    # whose latency is then the median of `process_latencies_s` and its spread their 95% t-interval.
    processes: int = 1
    process_latencies_s: list[float] | None = None
    quality: dict[str, Any] | None = None  # measured: a lossy output against the lossless reference (`advisor.run.guard`)

    # Derived from the others (or from optuna and the confirmation runs) rather than stored.
    _DERIVED = ("number", "feasible", "latency_s", "peak_bytes", "latency_spread_s", "noisy", "processes", "process_latencies_s",
                "quality")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def latency_range(self) -> tuple[float, float] | None:
        """(low, high) of the measured latency; the point itself where no spread was measured."""
        if self.latency_s is None:
            return None
        spread = self.latency_spread_s or 0.0
        return self.latency_s - spread, self.latency_s + spread

    @classmethod
    def stored_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in cls._DERIVED]

    @classmethod
    def attrs(cls, **stored: Any) -> dict[str, Any]:
        """The user attributes a finishing trial stores (`trial.set_user_attr` for each): every stored
        field, named; the derived ones come from optuna and the measurement when it is read back."""
        if sorted(stored) != sorted(cls.stored_fields()):
            raise TypeError(f"a trial stores exactly {cls.stored_fields()}, got {sorted(stored)}")
        return stored

    @classmethod
    def from_trial(cls, trial: Any, device: str) -> TrialRecord | None:
        """The record of a finished optuna trial; None for one still running or killed mid-run."""
        attrs = trial.user_attrs
        if "status" not in attrs:
            return None
        stored = {name: attrs.get(name) for name in cls.stored_fields()}
        measurement = stored["measurement"] or {}
        within = all(value <= 0 for value in trial.constraints.values())
        return cls(
            number=trial.number,
            feasible=stored["status"] == "ok" and stored["source"] != "estimate" and within,
            latency_s=measurement.get("latency_s"),
            latency_spread_s=measurement.get("latency_spread_s"),
            noisy=measurement.get("noisy"),
            quality=measurement.get("quality"),
            peak_bytes=limited_peak(device, vram_bytes=measurement.get("peak_vram_bytes"), ram_bytes=measurement.get("peak_rss_bytes")),
            **stored,
        )


def config_key(config: Any) -> str:
    """A configuration's identity across trials (its stored JSON, keys sorted): a repeat shares it."""
    return json.dumps(config, sort_keys=True)


def choose_best(feasible: list[TrialRecord]) -> tuple[TrialRecord | None, list[str]]:
    """The fastest feasible trial, and a note when others are as fast within the measured spread.

    Trials whose latency ranges overlap the fastest one's are equally fast as far as the
    measurements can tell; among them the lossless configuration wins, then the smaller peak, so
    that the pick does not flip with the noise between runs."""
    if not feasible:
        return None, []
    fastest = min(feasible, key=lambda r: (r.latency_s, r.peak_bytes or 0, r.number))
    ceiling = fastest.latency_range[1]
    tied: dict[str, TrialRecord] = {}  # configuration -> its first trial (a repeat shares the measurement)
    for r in sorted(feasible, key=lambda r: r.number):
        if r.latency_range[0] <= ceiling:
            tied.setdefault(config_key(r.config), r)
    if len(tied) < 2:
        return fastest, []

    def lossy(r: TrialRecord) -> bool:
        return is_lossy(OptimizationConfig.from_dict(r.config))

    best = min(tied.values(), key=lambda r: (lossy(r), r.peak_bytes or 0, r.latency_s, r.number))
    others = ", ".join(f"{r.number} ({_with_spread(r)})" for r in tied.values() if r is not best)
    note = f"trial {best.number} ({_with_spread(best)}) is as fast as {others} within the measured spread"
    if best is not fastest:
        note += f"; chose it for being {'lossless' if lossy(fastest) and not lossy(best) else 'smaller in peak memory'}"
    return best, [note]


def _with_spread(record: TrialRecord) -> str:
    return f"{record.latency_s:.3f}s ± {record.latency_spread_s or 0:.3f}"
