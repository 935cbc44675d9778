"""advisor tune: the study through the real command and through `run_study`.

End to end on the tiny Flux pipeline (the config it writes loads, applies and runs); resumed (same
command: no new trials; more --trials: more trials); the finalists confirmed in fresh processes;
over budget (exit 3, infeasible, not an error); out-of-memory and timeout trials recorded as
infeasible results; bad numbers refused in one line; a study name that changes with the trial
timeout; the pick among trials as fast as each other. Stopping and resuming: test_tune_stop.py;
several workers and shared storage: test_tune_workers.py.

On a CPU the search space is small: quantization none / int8 weight-only / fp8 storage, no offload,
and no compile here (--no-compile). A study stops when it has measured --trials distinct
configurations *or* when every point of the space has an answer (more trials could only repeat
them), so with --trials 8 a study ends after 3 to 6 trials; the assertions use that rule
(`ran_to_its_end`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from tuning import (
    advisor,
    answered,
    complete,
    configs,
    context,
    load_study,
    point,
    ran_to_its_end,
    skip_unless_cpu_target,
    snapshot,
    space,
    stored_protocol,
    tune_args,
)

from advisor.run.tune import TuneSettings, run_study


# What a small tune keeps in optuna storage (`stored_protocol`), recorded before the study store
# moved (issue 26) so that a move that renames or drops an attribute shows. Re-record deliberately:
# ADVISOR_RECORD_GOLDEN=1 pytest tests/test_tune.py -k confirming
STORED_GOLDEN = Path(__file__).parent / "golden" / "tune_attrs.json"

pytestmark = pytest.mark.usefixtures("private_cache")

# --- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tiny_flux_dir, env, tmp_path_factory):
    """A study of the tiny Flux started with --trials 2, then `advisor tune --trials 8 -o FILE` (the
    end-to-end command) on the same storage, which resumes it and runs it to its end."""
    base = tmp_path_factory.mktemp("tuned")
    storage = f"sqlite:///{base / 'studies.db'}"
    output = base / "advisor.json"
    short = advisor(tune_args(tiny_flux_dir, storage, "--quiet", trials=2), env)
    assert short.returncode == 0, short.stderr[-3000:]
    after_short = load_study(storage).get_trials()
    args = tune_args(tiny_flux_dir, storage, "-o", str(output))
    result = advisor(args, env)
    return SimpleNamespace(args=args, storage=storage, output=output, result=result, after_short=after_short)


@pytest.mark.slow
def test_tune_runs_to_the_end_and_its_config_loads_applies_and_runs(tuned, tiny_flux_dir):
    import numpy as np

    from advisor.config import OptimizationConfig, Provenance, load_config
    from advisor.run.apply import load_pipeline
    from advisor.testing import tiny_call_kwargs

    assert tuned.result.returncode == 0, tuned.result.stderr[-3000:]
    assert "Fastest that fits" in tuned.result.stdout
    assert str(tuned.output) in tuned.result.stdout

    study = load_study(tuned.storage)
    finished = complete(study)
    assert finished and all("status" in t.user_attrs for t in finished)
    assert ran_to_its_end(study, 8, space(tiny_flux_dir))

    config = load_config(tuned.output)
    assert config.device == "cpu"
    assert config.provenance.made_by == "tune"
    assert config.provenance.budget_bytes == 2 * 2**30
    # The file is the fastest feasible measured trial's config, with its measurement.
    measured = config.provenance.measured
    best = next(t for t in finished if t.number == measured["trial"])
    assert best.user_attrs["status"] == "ok" and best.user_attrs["source"] == "measured"
    # No feasible trial is faster beyond the spreads measured (ties within them go to the lossless,
    # then the smaller configuration).
    spread = {t.number: (t.user_attrs["measurement"] or {}).get("latency_spread_s") or 0.0 for t in finished}
    low = measured["latency_s"] - spread[best.number]
    assert all(t.values[0] + spread[t.number] >= low for t in finished if t.user_attrs["status"] == "ok")
    trial_config = OptimizationConfig.from_dict(best.user_attrs["config"])
    assert config.replace(provenance=Provenance()) == trial_config.replace(provenance=Provenance())

    pipe = load_pipeline(tiny_flux_dir, config)
    images = pipe(**tiny_call_kwargs("image", seed=0)).images
    assert np.asarray(images).shape == (1, 32, 32, 3)
    assert np.isfinite(np.asarray(images)).all()


@pytest.mark.slow
def test_running_the_same_command_again_resumes_with_no_new_trial(tuned, tiny_flux_dir, env):
    assert tuned.result.returncode == 0, tuned.result.stderr[-3000:]
    study = load_study(tuned.storage)
    before, attrs = snapshot(study.get_trials()), dict(study.user_attrs)

    again = advisor(tuned.args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    # It measures nothing: no trial added or changed, no confirming run stored in the study.
    study = load_study(tuned.storage)
    assert snapshot(study.get_trials()) == before and dict(study.user_attrs) == attrs
    assert "Fastest that fits" in again.stdout

    # The first run stopped because every point of the space had an answer: more --trials can only
    # repeat them, so they add nothing either.
    assert answered(load_study(tuned.storage)) == space(tiny_flux_dir)
    more = advisor([*tuned.args, "--trials", "10"], env)
    assert more.returncode == 0, more.stderr[-3000:]
    assert snapshot(load_study(tuned.storage).get_trials()) == before
    # ... and it says so, in one line.
    note = f"the search space has only {len(space(tiny_flux_dir))} configurations; all measured"
    assert [line for line in more.stdout.splitlines() if "the search space has only" in line] == [f"note: {note}"]


@pytest.mark.slow
def test_trials_count_distinct_configurations_and_none_is_measured_twice(tuned, tiny_flux_dir):
    assert tuned.result.returncode == 0, tuned.result.stderr[-3000:]
    finished = complete(load_study(tuned.storage))
    measured = [point(t.params) for t in finished if t.user_attrs["source"] == "measured"]
    # One run at a time: every configuration measured once; repeats reuse a measurement.
    assert len(measured) == len(set(measured)) == len(space(tiny_flux_dir))
    for t in finished:
        if t.user_attrs["source"] == "repeat":
            assert t.user_attrs["reason"].startswith("same as trial ")


@pytest.mark.slow
def test_more_trials_resume_the_study_where_it_stopped(tuned):
    # --trials 2 left two finished trials; --trials 8 kept them as they were and added more.
    assert [t.number for t in tuned.after_short if t.state.name == "COMPLETE"] == [0, 1]
    assert tuned.result.returncode == 0, tuned.result.stderr[-3000:]
    after = load_study(tuned.storage).get_trials()
    assert snapshot(after[:2]) == snapshot(tuned.after_short[:2])
    assert len(complete(load_study(tuned.storage))) > 2


@pytest.mark.slow
def test_confirming_measures_each_finalist_again_in_a_fresh_process(tuned, tiny_flux_dir, env, tmp_path):
    """The finished study of `tuned` (copied), run again with --confirm 1: nothing is searched, each
    finalist is measured once more in a new process, and the pick is made on both processes."""
    import statistics

    assert tuned.result.returncode == 0, tuned.result.stderr[-3000:]
    copy = tmp_path / "studies.db"
    shutil.copy(tuned.storage.removeprefix("sqlite:///"), copy)
    storage = f"sqlite:///{copy}"
    args = [*tune_args(tiny_flux_dir, storage, "--json"), "--confirm", "1"]  # the last --confirm counts
    first = advisor(args, env)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)
    runs = {key: value for key, value in load_study(storage).user_attrs.items() if key.startswith("confirm:")}
    confirmed = [t for t in result["trials"] if t["source"] == "measured" and t["processes"] > 1]
    # The finalists (at most 3: within 35% of the fastest, or a tie's pick) got one run each, and no trial was added.
    assert 1 <= len(runs) <= 3 and len(confirmed) == len(runs)
    assert all(len(value) == 1 and value[0]["status"] == "ok" for value in runs.values())
    assert snapshot(load_study(storage).get_trials()) == snapshot(load_study(tuned.storage).get_trials())
    for t in confirmed:
        first_process, second_process = t["process_latencies_s"]
        assert first_process == t["measurement"]["latency_s"]  # the trial's own process, then the new one
        assert t["latency_s"] == pytest.approx(statistics.median([first_process, second_process]))
        assert t["latency_spread_s"] >= abs(first_process - second_process) / 2 - 1e-12
    fastest = min(t["latency_s"] for t in confirmed)
    assert all(t["processes"] == 1 for t in result["trials"] if t["feasible"] and t["latency_s"] < fastest)
    assert result["best"]["processes"] == 2
    measured = result["config"]["provenance"]["measured"]
    assert measured["processes"] == 2 and measured["latency_s"] == result["best"]["latency_s"]
    assert any("fresh processes" in note for note in result["notes"])
    _check_stored_protocol(stored_protocol(load_study(storage)))

    # Run once more: the runs are in the study, so nothing is measured again.
    again = advisor(args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {key: value for key, value in load_study(storage).user_attrs.items() if key.startswith("confirm:")} == runs
    assert json.loads(again.stdout)["best"] == result["best"]


def _check_stored_protocol(found: dict) -> None:
    """Every kind of trial this study stored has the golden names; a measured trial is among them."""
    if os.environ.get("ADVISOR_RECORD_GOLDEN"):  # kinds from earlier recordings stay (a repeat comes and goes)
        earlier = json.loads(STORED_GOLDEN.read_text()) if STORED_GOLDEN.exists() else {"trials": {}, "seeded_by": []}
        recorded = {
            **found,
            "trials": {**earlier["trials"], **found["trials"]},
            "seeded_by": sorted({*earlier["seeded_by"], *found["seeded_by"]}),
        }
        STORED_GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    golden = json.loads(STORED_GOLDEN.read_text())
    assert found["study"] == golden["study"]
    assert set(found["seeded_by"]) <= set(golden["seeded_by"]) and "rules" in found["seeded_by"]
    assert "COMPLETE/ok/measured" in found["trials"]
    for kind, names in found["trials"].items():
        assert names == golden["trials"].get(kind), kind


# --- infeasible is a result, not an error ---------------------------------------------------------------


@pytest.mark.slow
def test_over_budget_is_infeasible_with_exit_3_not_an_error(tiny_flux_dir, env, tmp_path):
    skip_unless_cpu_target()
    from advisor.units import format_size

    output = tmp_path / "advisor.json"
    # --no-prune: measure them although the estimate already says they can't fit in 100 MB.
    args = tune_args(
        tiny_flux_dir,
        f"sqlite:///{tmp_path / 's.db'}",
        "--no-prune",
        "--json",
        "-o",
        str(output),
        budget="100MB",
        trials=1,
    )
    result = advisor(args, env)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "advisor: error" not in result.stderr
    assert not output.exists()
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["best"] is None and data["config"] is None
    assert data["budget_bytes"] == 100 * 2**20
    assert data["trials"]
    for trial in data["trials"]:
        assert trial["status"] == "over-budget" and trial["feasible"] is False
        assert trial["peak_bytes"] > 100 * 2**20
        assert "> budget" in trial["reason"]
    measured = [t for t in data["trials"] if t["source"] == "measured"]
    assert measured
    smallest = min(t["peak_bytes"] for t in measured)
    assert data["advice"][0].startswith(f"the smallest measured peak was {format_size(smallest)}")


def test_over_budget_by_the_estimate_is_skipped_without_measuring(tiny_flux_dir, env, tmp_path):
    skip_unless_cpu_target()
    result = advisor(
        tune_args(tiny_flux_dir, f"sqlite:///{tmp_path / 's.db'}", "--json", budget="100MB", trials=2), env
    )
    assert result.returncode == 3, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["trials"]
    for trial in data["trials"]:
        # When the sampler proposes a configuration already skipped, the trial says so (a repeat).
        assert trial["status"] == "skipped" and trial["source"] in {"estimate", "repeat"}
        assert "far over the 100.00 MB budget" in trial["reason"]
        assert trial["peak_bytes"] is None  # no trial process was started: nothing measured
    # --trials counts measured configurations: none was, so every configuration was considered,
    # each once (none skipped twice while another was never looked at), and the study says why it stopped.
    configs = [json.dumps(t["config"], sort_keys=True) for t in data["trials"] if t["source"] == "estimate"]
    for trial in data["trials"]:
        if trial["source"] == "repeat":
            assert trial["reason"].startswith("same as trial ")
    assert len(configs) == len(set(configs)) == len(space(tiny_flux_dir, 100 * 2**20))
    assert data["notes"] == [
        f"the search space has only {len(configs)} configurations; all measured or ruled out by the estimate, a rule "
        "or a rehearsal (0 measured)"
    ]


@pytest.mark.slow
def test_out_of_memory_trials_are_infeasible_and_the_study_goes_on(flux_270mb, oom_limit, tmp_path):
    skip_unless_cpu_target()
    import optuna

    limit = oom_limit
    scenario = context(flux_270mb, 8 * 2**30)
    progress = []
    storage = f"sqlite:///{tmp_path / 's.db'}"
    result = run_study(
        str(flux_270mb),
        scenario,
        storage=storage,
        study="oom",
        settings=TuneSettings(
            trials=2, compile_choices=(False,), memory_limit_bytes=limit, timeout_s=300, confirm_runs=0, min_psnr_db=0
        ),
        on_trial=progress.append,
    )
    assert len(result.trials) == 2 and len(progress) == 2
    assert result.best is None and result.config is None
    for trial in result.trials:
        assert trial.status == "oom", trial.reason
        assert trial.feasible is False and trial.latency_s is None
        assert "memory" in trial.reason.lower()
    assert any(t.source == "measured" for t in result.trials)
    assert any("oom" in line for line in result.advice)
    # In the storage they are finished trials that violate the budget constraint, not failed ones.
    for trial in optuna.load_study(study_name="oom", storage=storage).get_trials():
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.constraints == {"peak_over_budget": 1.0}

    # Out of memory at the same budget is an answer: a later run of the study does not retry it...
    settings = TuneSettings(
        trials=2, compile_choices=(False,), memory_limit_bytes=limit, timeout_s=300, confirm_runs=0, min_psnr_db=0
    )
    again = run_study(str(flux_270mb), scenario, storage=storage, study="oom", settings=settings)
    assert [t.number for t in again.trials] == [t.number for t in result.trials]
    # ... unless --retry-failed asks for it: then each one is measured again.
    settings.retry_failed = True
    retried = run_study(str(flux_270mb), scenario, storage=storage, study="oom", settings=settings)
    new = [t for t in retried.trials if t.number not in {r.number for r in result.trials}]
    assert configs(new) == configs(result.trials) and len(new) == len(configs(new))
    assert all(t.source == "measured" and t.status == "oom" for t in new)


@pytest.mark.slow
def test_timed_out_trials_are_infeasible_and_the_study_goes_on(tiny_flux_dir, tmp_path):
    import optuna

    scenario = context(tiny_flux_dir, 2 * 2**30)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    result = run_study(
        str(tiny_flux_dir),
        scenario,
        storage=storage,
        study="slow",
        settings=TuneSettings(trials=2, compile_choices=(False,), timeout_s=1, min_psnr_db=0),
    )
    assert len(result.trials) == 2
    assert result.best is None and result.config is None
    for trial in result.trials:
        assert trial.status == "timeout" and trial.feasible is False
        assert "no result within 1s" in trial.reason
    assert any("timeout" in line for line in result.advice)
    states = {t.state for t in optuna.load_study(study_name="slow", storage=storage).get_trials()}
    assert states == {optuna.trial.TrialState.COMPLETE}

    # A later run of the same study (with a timeout that suffices) measures the timed-out ones again.
    again = run_study(
        str(tiny_flux_dir),
        scenario,
        storage=storage,
        study="slow",
        settings=TuneSettings(
            trials=2, compile_choices=(False,), timeout_s=300, tolerance=0.5, confirm_runs=0, min_psnr_db=0
        ),
    )
    new = [t for t in again.trials if t.number not in {r.number for r in result.trials}]
    assert configs(new) == configs(result.trials) and len(new) == len(configs(new))
    assert all(t.source == "measured" and t.status == "ok" for t in new)
    assert again.best is not None and again.best.number in {t.number for t in new}


# --- misuse: bad numbers, a stale study, a crash, Ctrl-C ------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "valid"),
    [
        ("--trial-timeout", "0", "a finite number of seconds greater than 0"),
        ("--trial-timeout", "-1", "a finite number of seconds greater than 0"),
        ("--trial-timeout", "-inf", "a finite number of seconds greater than 0"),
        ("--trial-timeout", "nan", "a finite number of seconds greater than 0"),
        ("--trial-timeout", "inf", "a finite number of seconds greater than 0"),
        ("--trials", "0", "a whole number of at least 1"),
        ("--trials", "-2", "a whole number of at least 1"),
        ("--workers", "0", "a whole number of at least 1"),
        ("--confirm", "-1", "a whole number of runs, 0 or more"),
        ("--height", "0", "a whole number >= 1"),
        ("--steps", "-1", "a whole number >= 1"),
    ],
)
def test_bad_numbers_are_refused_in_one_line_naming_the_flag(tiny_flux_dir, env, tmp_path, flag, value, valid):
    storage = tmp_path / "s.db"
    args = [
        "tune",
        "--model",
        str(tiny_flux_dir),
        "--budget",
        "2GB",
        "--storage",
        f"sqlite:///{storage}",
        f"{flag}={value}",
    ]
    result = advisor(args, env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"advisor: error: {flag}: ") and valid in lines[0], result.stderr
    assert not storage.exists()  # refused before any study was opened


def test_run_study_refuses_bad_settings_too(tiny_flux_dir, tmp_path):
    from advisor.errors import UsageError

    scenario = context(tiny_flux_dir, 2 * 2**30)
    for settings, flag in (
        (TuneSettings(timeout_s=float("nan")), "--trial-timeout"),
        (TuneSettings(trials=0), "--trials"),
    ):
        with pytest.raises(UsageError, match=f"^{flag}: "):
            run_study(str(tiny_flux_dir), scenario, storage=f"sqlite:///{tmp_path / 's.db'}", settings=settings)


def test_the_default_study_name_includes_the_trial_timeout(tiny_flux_dir):
    from advisor.run.tune import study_name

    scenario = context(tiny_flux_dir, 2 * 2**30)
    short, default = study_name(scenario, 1), study_name(scenario, 900)
    assert short != default
    assert "-t1s-" in short and "-t900s-" in default
    assert study_name(scenario, 900.0) == default  # the same command gets the same study
    assert study_name(scenario, 0.5) not in {short, default}


# --- the pick among trials as fast as each other within their spread ----------------------------------


INT8 = {"backend": "torchao", "scheme": "int8_weight_only", "components": ["transformer"]}


def _record(number: int, latency: float, spread: float | None, peak_mb: int, config: dict):
    from advisor.run.trials import TrialRecord

    return TrialRecord(
        number=number,
        summary=str(config),
        status="ok",
        source="measured",
        feasible=True,
        latency_s=latency,
        peak_bytes=peak_mb * 2**20,
        predicted_peak_bytes=None,
        reason=None,
        config={"device": "cpu", **config},
        latency_spread_s=spread,
    )


def test_trials_as_fast_within_their_spread_go_to_the_lossless_then_the_smaller_one():
    from advisor.run.trials import choose_best

    lossless = _record(0, 1.00, 0.05, 500, {})
    int8 = _record(1, 0.97, 0.04, 480, {"quantization": INT8})
    # 0.97 + 0.04 overlaps 1.00 - 0.05: the measurements can't tell them apart; the lossless one is chosen.
    best, notes = choose_best([lossless, int8])
    assert best is lossless
    assert notes and "as fast as 1" in notes[0] and "lossless" in notes[0]
    # Clearly faster (ranges apart): the fastest wins, whatever it costs.
    clear = _record(2, 0.80, 0.02, 480, {"quantization": INT8})
    assert choose_best([lossless, clear]) == (clear, [])
    # Two lossless ones within the spread: the smaller peak.
    small = _record(3, 1.02, 0.05, 300, {"vae": {"tiling": True}})
    best, notes = choose_best([lossless, small])
    assert best is small and "smaller in peak memory" in notes[0]
    # No spread measured (older trials): the plain minimum.
    assert (
        choose_best([_record(4, 1.0, None, 500, {}), _record(5, 0.99, None, 900, {"vae": {"tiling": True}})])[0].number
        == 5
    )


COMPILED = {"compile": {"components": ["transformer"], "regional": True}}


def test_a_compiled_trial_is_picked_only_where_its_warm_up_pays_over_the_generations():
    """Issue 27: the first call of a compiled configuration compiles (Flux.1-dev on an H100: 9.6 s
    regionally, the PyTorch blog), a one-off a process pays once. A process making one image pays it
    whole; one making a hundred, a hundredth of it each."""
    from dataclasses import replace

    from advisor.run.trials import choose_best

    eager = replace(_record(0, 4.3, 0.02, 500, {}), one_off_s=0.4)
    compiled = replace(_record(1, 3.0, 0.02, 500, COMPILED), one_off_s=9.6)
    once = [replace(r, generations=1) for r in (eager, compiled)]
    best, notes = choose_best(once)
    assert best.number == 0  # 4.3 + 0.4 against 3.0 + 9.6
    (note,) = notes
    assert "trial 1 is faster once warm" in note and "9.6s" in note and "1 generations" in note
    many = [replace(r, generations=100) for r in (eager, compiled)]
    assert choose_best(many) == (many[1], [])  # 3.0 + 0.096 against 4.3 + 0.004


def test_the_one_off_time_is_the_first_call_beyond_a_warm_call_of_its_steps():
    from advisor.run.timing import one_off_s

    extrapolated = {"warmup_s": 12.0, "warmup_steps": 2, "fixed_s": 0.5, "per_step_s": 0.25}
    assert one_off_s(extrapolated) == pytest.approx(12.0 - (0.5 + 2 * 0.25))
    timed_at_full_steps = {"warmup_s": 3.0, "warmup_steps": 4, "step_times": {"4": 1.0}}
    assert one_off_s(timed_at_full_steps) == pytest.approx(2.0)
    assert one_off_s({"warmup_s": 0.9, "warmup_steps": 4, "step_times": {"4": 1.0}}) == 0.0  # noise, not negative
    assert one_off_s({"warmup_s": 12.0, "fixed_s": 0.5, "per_step_s": 0.25}) is None  # steps unknown: an older study


def test_the_advice_for_trials_out_of_memory_names_retry_failed():
    from advisor.run.results import failure_advice

    (line,) = failure_advice({"oom", "crash"})
    assert (
        "crash, oom" in line and "--retry-failed" in line
    )  # a later run retries crashes by itself, OOM only when asked
    assert "--retry-failed" not in " ".join(failure_advice({"crash", "timeout"}))
    assert failure_advice(set()) == []


def test_the_rules_seed_at_most_the_trials_a_run_measures_and_respect_no_compile():
    """The rule engine's picks fill the first trials, no more: seeds left waiting would run ahead of
    what a later run asks for (the failed trials --retry-failed measures again). Under --no-compile
    the seeds are the picks without compile, not compiled ones the space can't hold."""
    import optuna

    from advisor.plan.scenario import make_scenario
    from advisor.plan.space import SearchSpace
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload
    from advisor.run.queue import seed_with_rules, waiting
    from advisor.run.trials import queued_params

    profile = load_profile("flux-dev")
    target = planned_target(machine=None, gpu="RTX 4090", ram=64 * 2**30, os="linux")
    scenario = make_scenario(profile, make_workload(profile), target, generations=100)
    study = optuna.create_study()
    seed_with_rules(study, SearchSpace.for_scenario(scenario).usable(scenario), scenario, 2)
    assert len(waiting(study)) == 2
    seed_with_rules(study, SearchSpace.for_scenario(scenario).usable(scenario), scenario, 8)  # once per study
    assert len(waiting(study)) == 2
    no_compile = optuna.create_study()
    space = SearchSpace.for_scenario(scenario, compile_choices=(False,)).usable(scenario)
    seed_with_rules(no_compile, space, scenario, 3)
    seeds = [queued_params(t) for t in waiting(no_compile)]
    assert len(seeds) == 3 and not any(seed["compile"] for seed in seeds)


# --- rehearsing a GPU candidate before its trial ----------------------------------------------------


def test_a_gpu_candidate_its_rehearsal_refuses_is_answered_without_a_trial_process(tiny_flux_dir, tmp_path):
    """Issue 28: a trial loads the real weights before a device mix crashes it; the rehearsal runs the
    same hooks on a virtual copy of the card first, in a child process that sees no GPU. nf4 with
    block-level group offloading leaves the scales on the CPU (diffusers #10797): with diffusers
    0.42.1 a rule refuses it; for a later diffusers the rule lets the rehearsal decide, which
    refuses it here: `invalid (rehearsal)`, the op in the reason, no measurement. Proposed again, the
    answer is reused. With `rehearse=False` the same config goes to a trial process, which on this
    machine without CUDA crashes: the screening is what kept it from running."""
    import dataclasses

    import optuna

    from advisor.plan.scenario import Request, scenario_for
    from advisor.plan.space import SearchSpace
    from advisor.run.guard import QualityGuard
    from advisor.run.trials import TrialRecord
    from advisor.run.tune import _objective

    request = Request(str(tiny_flux_dir), gpu="RTX 4090", ram=64 * 2**30, height=32, width=32, steps=4)
    later = {"torch": "2.13.0", "diffusers": "0.43.0", "transformers": "5.25.0", "bitsandbytes": "0.50.2"}
    scenario = dataclasses.replace(scenario_for(request, None), packages=later)
    space = SearchSpace.for_scenario(scenario, compile_choices=(False,)).usable(scenario)

    def scales_left_on_the_cpu(params) -> bool:
        candidate = space.candidate(params, scenario)
        q, offload = candidate.config.quantization, candidate.config.offload
        return (
            not candidate.rejected_by
            and q is not None
            and q.backend == "bitsandbytes_4bit"
            and offload.strategy == "group"
            and offload.offload_type == "block_level"
            and not offload.use_stream
        )

    params = next(p for p in space.points() if scales_left_on_the_cpu(p))
    guard = QualityGuard(tmp_path / "quality", 0)

    def trials(settings: TuneSettings, proposals: int) -> list[TrialRecord]:
        study = optuna.create_study(direction="minimize")
        for _ in range(proposals):
            study.enqueue_trial(params)
        study.optimize(_objective(space, scenario, str(tiny_flux_dir), settings, set(), guard), n_trials=proposals)
        return [TrialRecord.from_trial(t, "cuda") for t in study.trials]

    screened, again = trials(TuneSettings(compile_choices=(False,), min_psnr_db=0), 2)
    assert screened.status == "invalid" and screened.source == "rehearsal" and screened.measurement is None
    assert "the card would refuse it" in screened.reason and "mixes cpu and cuda:0" in screened.reason
    assert "quant_state.absmax" in screened.reason
    assert (
        again.source == "repeat" and again.status == "invalid" and f"same as trial {screened.number}" in again.reason
    )

    [unscreened] = trials(
        TuneSettings(compile_choices=(False,), min_psnr_db=0, rehearse=False), 1
    )  # default timeout: a busy machine still ends in its crash
    assert unscreened.source == "measured" and unscreened.status == "crash"
