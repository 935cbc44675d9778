"""advisor.run.confirm: which trials are finalists, how their runs in fresh processes combine, and
the order they are measured in. The runs themselves are real trial processes in tests/test_tune.py
(`test_confirming_measures_each_finalist_again_in_a_fresh_process`); here a run's result is given."""

from __future__ import annotations

import optuna
import pytest

from advisor.run.confirm import confirm, finalists, with_confirmations
from advisor.run.trials import TrialRecord, confirmation_key, runs_of


MB = 2**20
BUDGET = 1000 * MB
INT8 = {"quantization": {"backend": "torchao", "scheme": "int8_weight_only", "components": ["transformer"]}}
FP8 = {"quantization": {"backend": "layerwise", "scheme": "float8_e4m3fn", "components": ["transformer"]}}
TILED = {"vae": {"tiling": True}}


def record(
    number: int,
    latency: float,
    spread: float = 0.01,
    peak_mb: int = 500,
    config: dict | None = None,
    source: str = "measured",
    feasible: bool = True,
) -> TrialRecord:
    measurement = {"status": "ok", "latency_s": latency, "latency_spread_s": spread, "peak_rss_bytes": peak_mb * MB}
    return TrialRecord(
        number=number,
        summary=str(config),
        status="ok" if feasible else "over-budget",
        source=source,
        feasible=feasible,
        latency_s=latency,
        peak_bytes=peak_mb * MB,
        predicted_peak_bytes=None,
        reason=None,
        config={"device": "cpu", **(config or {})},
        measurement=measurement,
        latency_spread_s=spread,
    )


def run(
    latency: float, spread: float = 0.01, peak_mb: int = 500, status: str = "ok", reason: str | None = None
) -> dict:
    return {
        "status": status,
        "reason": reason,
        "latency_s": latency,
        "latency_spread_s": spread,
        "peak_vram_bytes": None,
        "peak_rss_bytes": peak_mb * MB,
        "noisy": None,
    }


def test_finalists_are_the_feasible_configurations_near_the_fastest_first_trial_each():
    fastest = record(0, 1.00)
    near = record(1, 1.30, config=INT8)  # within 35% of the fastest
    far = record(2, 1.40, config=FP8)  # beyond it
    repeat = record(3, 1.00, source="repeat")  # the same configuration as trial 0, answered again
    over = record(4, 0.50, config=TILED, feasible=False)  # faster, but over the budget
    assert [r.number for r in finalists([far, over, near, repeat, fastest])] == [0, 1]
    kinds = [{}, INT8, FP8, TILED, {"vae": {"slicing": True}}]
    many = [record(i, 1.0 + i / 100, spread=0.001, config=kinds[i]) for i in range(5)]
    assert [r.number for r in finalists(many, limit=3)] == [0, 1, 2]
    assert finalists([over]) == []
    # A tie within the spread goes to the lossless configuration (choose_best): a finalist however slow.
    lossy_fastest = record(0, 1.00, spread=0.40, config=INT8)
    lossless_slower = record(1, 1.42, spread=0.05)  # beyond the 35% margin, inside the int8 trial's spread
    assert [r.number for r in finalists([lossy_fastest, lossless_slower])] == [1, 0]


def test_a_confirmed_latency_is_the_median_across_processes_and_its_spread_a_t_interval():
    trial = record(0, 0.60, spread=0.02, peak_mb=500)
    stored = {confirmation_key(trial.config): [run(0.80, peak_mb=520), run(0.70, peak_mb=510)]}
    [combined] = with_confirmations([trial], stored, "cpu", BUDGET)
    assert combined.processes == 3 and combined.process_latencies_s == [0.60, 0.80, 0.70]
    assert combined.latency_s == pytest.approx(0.70)
    # Student's t for 2 degrees of freedom at 95% is 4.303 (any t table); s = 0.10 over 3 processes.
    assert combined.latency_spread_s == pytest.approx(4.303 * 0.10 / 3**0.5, rel=1e-3)
    assert combined.peak_bytes == 520 * MB  # the largest any process measured
    assert combined.feasible
    # Processes that agree better than each one's rounds: the spread stays one process's own.
    steady = {confirmation_key(trial.config): [run(0.61, spread=0.05), run(0.60, spread=0.04)]}
    assert with_confirmations([trial], steady, "cpu", BUDGET)[0].latency_spread_s == pytest.approx(0.04)
    # An unconfirmed trial is left as it was.
    other = record(1, 0.5, config=INT8)
    assert with_confirmations([other], stored, "cpu", BUDGET) == [other]


def test_a_confirmation_run_over_the_budget_or_failed_makes_the_configuration_infeasible():
    trial = record(0, 0.60, peak_mb=990)
    over = with_confirmations([trial], {confirmation_key(trial.config): [run(0.6, peak_mb=1010)]}, "cpu", BUDGET)[0]
    assert not over.feasible and over.status == "over-budget"
    assert "fresh process" in over.reason and "> budget" in over.reason
    crashed = with_confirmations(
        [trial],
        {confirmation_key(trial.config): [run(0.6), run(0, status="crash", reason="exit code -11")]},
        "cpu",
        BUDGET,
    )[0]
    assert not crashed.feasible and crashed.status == "crash"
    assert crashed.reason == "run 3 of 3 in a fresh process: exit code -11"


def test_finalists_take_turns_and_a_resumed_confirmation_measures_only_what_is_missing():
    study = optuna.create_study()
    a, b, c = record(0, 1.0), record(1, 1.1, config=INT8), record(2, 1.2, config=FP8)
    order = []

    def measure_one(r: TrialRecord, number: int, of: int) -> dict:
        order.append((r.number, number, of))
        if len(order) == 4:
            raise KeyboardInterrupt  # stopped during the second turn's first run
        return run(r.latency_s)

    with pytest.raises(KeyboardInterrupt):
        confirm(study, [a, b, c], 2, measure_one)
    assert order == [(0, 2, 3), (1, 2, 3), (2, 2, 3), (1, 3, 3)]
    assert [len(runs_of(study, r.config)) for r in (a, b, c)] == [1, 1, 1]  # what ran is kept
    order.clear()
    confirm(study, [a, b, c], 2, lambda r, number, of: order.append((r.number, number, of)) or run(r.latency_s))
    assert sorted(order) == [(0, 3, 3), (1, 3, 3), (2, 3, 3)]  # one more run each, nothing measured twice
    order.clear()
    confirm(study, [a, b, c], 2, lambda r, number, of: order.append(r.number) or run(r.latency_s))
    assert order == []


def test_a_crashed_trial_of_a_confirmed_configuration_stays_a_crash():
    """A configuration that crashed once and was measured again later (a re-run retries crashes):
    its confirmation runs belong to the measurement that succeeded, not to the crash, whose
    latency is None (combining them raised TypeError, and every later run of the study with it)."""
    crash = {
        "status": "crash",
        "reason": "exit code -11",
        "latency_s": None,
        "latency_spread_s": None,
        "peak_vram_bytes": None,
        "peak_rss_bytes": 300 * MB,
        "noisy": None,
    }
    crashed = TrialRecord(
        number=0,
        summary="{}",
        status="crash",
        source="measured",
        feasible=False,
        latency_s=None,
        peak_bytes=None,
        predicted_peak_bytes=None,
        reason="exit code -11",
        config={"device": "cpu"},
        measurement=crash,
    )
    again = record(1, 0.60)
    stored = {confirmation_key(again.config): [run(0.62), run(0.58)]}
    first, second = with_confirmations([crashed, again], stored, "cpu", BUDGET)
    assert first == crashed
    assert second.processes == 3 and second.latency_s == pytest.approx(0.60) and second.feasible
