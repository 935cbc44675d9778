"""One tuning trial as a typed record, and its round trip through optuna's storage.

A trial stores what it decided and measured as optuna user attributes (plain JSON, so that any
storage and `optuna-dashboard` can read it); `TrialRecord.attrs()` names what is written and
`TrialRecord.from_trial()` reads them back, so no other module touches attribute names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from advisor.plan.scenario import limited_peak

# The user attribute a trial sets when it starts: "host:pid" of the tuner running it, so that a later
# run can tell a trial whose tuner was killed (`advisor.run.tune.fail_orphaned_trials`) from a live one.
RUNNER_ATTR = "runner"

TrialStatus = Literal["ok", "over-budget", "oom", "crash", "timeout", "skipped", "invalid"]
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

    # Derived from the others (or from optuna) rather than stored.
    _DERIVED = ("number", "feasible", "latency_s", "peak_bytes", "latency_spread_s", "noisy")

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
            peak_bytes=limited_peak(device, vram_bytes=measurement.get("peak_vram_bytes"), ram_bytes=measurement.get("peak_rss_bytes")),
            **stored,
        )
