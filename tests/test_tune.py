"""advisor tune: the optuna study, through the real command and through `run_study`.

End to end on the tiny Flux pipeline (the config it writes loads, applies and runs); resumed (same
command: no new trials; more --trials: more trials); killed with SIGKILL mid-trial and resumed;
over budget (exit 3, infeasible, not an error); out-of-memory and timeout trials recorded as
infeasible results; several workers on one study through a journal file and PostgreSQL.

On a CPU the search space is small: quantization none / int8 weight-only / fp8 storage, no offload,
and no compile here (--no-compile). A study stops when it has measured --trials distinct
configurations *or* when every point of the space has an answer (more trials could only repeat
them), so with --trials 8 a study ends after 3 to 6 trials; the assertions use that rule
(`ran_to_its_end`). Misuse: bad numbers refused in one line, a study name that changes with the
trial timeout, a rerun after a crash that measures again, Ctrl-C that exits 130 with the table.

Every advisor process gets its caches and temp files under pytest's tmp (XDG_CACHE_HOME, TMPDIR)
and an explicit --storage, so nothing touches ~/.cache. The PostgreSQL tests run where
ADVISOR_TEST_POSTGRES_URL is set (CI: scripts/ci_postgres.sh) and skip elsewhere.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from advisor.run.storage import open_storage
from advisor.run.tune import TuneSettings, run_study

ADVISOR = shutil.which("advisor") or str(Path(sys.executable).with_name("advisor"))
POSTGRES_URL = os.environ.get("ADVISOR_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="ADVISOR_TEST_POSTGRES_URL is not set (scripts/ci_postgres.sh starts a server and sets it)"
)
# A wide timing tolerance: these tests check the study, not the timings (tests/test_measure.py
# checks those), and a 0.1 s generation on a shared CI runner would time 12 rounds to settle at ±5%.
# No confirmation runs of the finalists (each a trial process more) but where a test is about them.
SMALL = ["--no-compile", "--height", "32", "--width", "32", "--steps", "4", "--tolerance", "0.5", "--confirm", "0"]


# --- helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """In-process studies, like the advisor processes, read no calibration from and write nothing to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every advisor process these tests start."""
    base = tmp_path_factory.mktemp("tune-env")
    (base / "tmp").mkdir()
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(base / "cache"),
        # A killed `advisor tune` leaves its trial's scratch folder behind: keep it in tmp.
        "TMPDIR": str(base / "tmp"),
    }


def tune_args(model, storage: str, *extra: str, budget: str = "2GB", trials: int = 8) -> list[str]:
    return ["tune", "--model", str(model), "--budget", budget, "--trials", str(trials), *SMALL, "--storage", storage, *extra]


def advisor(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """The console script, as a user runs it."""
    return subprocess.run([ADVISOR, *args], capture_output=True, text=True, env=env, timeout=timeout)


def load_study(storage: str, name: str | None = None):
    """The study in `storage` (the only one there when `name` is None), read fresh from the storage."""
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(storage))


def complete(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def snapshot(trials) -> dict[int, tuple]:
    """What must never change about a finished trial."""
    return {t.number: (t.state.name, t.values, t.params, t.user_attrs.get("status"), t.user_attrs.get("measurement")) for t in trials}


def point(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def configs(records) -> set[str]:
    """The distinct configurations of some trial records."""
    return {json.dumps(t.config, sort_keys=True) for t in records}


@functools.lru_cache
def _space(model: str, budget_bytes: int) -> frozenset[str]:
    from advisor.plan.space import SearchSpace

    scenario = context(model, budget_bytes)
    return frozenset(point(p) for p in SearchSpace.for_scenario(scenario, compile_choices=(False,)).usable(scenario).points())


def space(model, budget_bytes: int = 2 * 2**30) -> frozenset[str]:
    """Every point of the search space `advisor tune ... --no-compile` explores for `model` here."""
    return _space(str(model), budget_bytes)


def answered(study) -> set[str]:
    """The points of the space that have a finished trial."""
    return {point(t.params) for t in complete(study)}


def ran_to_its_end(study, trials: int, points: frozenset[str]) -> bool:
    """The study's stopping rule: `trials` distinct configurations measured, or every point of the space answered."""
    measured = {point(t.params) for t in complete(study) if t.user_attrs.get("source") == "measured"}
    return len(measured) >= trials or answered(study) >= points


def context(model, budget_bytes: int):
    """The scenario `run_study` gets for `model` on this machine, 32x32, 4 steps."""
    from advisor.plan.scenario import scenario_for
    from advisor.probe.hardware import probe_machine

    return scenario_for(probe_machine(), str(model), height=32, width=32, steps=4, budget_bytes=budget_bytes)


@functools.lru_cache(maxsize=1)
def cpu_target() -> bool:
    from advisor.probe.hardware import probe_machine
    from advisor.probe.target import target_from_probe

    return target_from_probe(probe_machine()).device == "cpu"


def skip_unless_cpu_target() -> None:
    if not cpu_target():
        pytest.skip("the budget is peak RSS only where the target is the CPU; this machine tunes for its GPU")


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
    started = time.perf_counter()
    result = advisor(args, env)
    return SimpleNamespace(
        args=args, storage=storage, output=output, result=result, elapsed=time.perf_counter() - started, after_short=after_short
    )


@pytest.mark.slow
def test_tune_runs_to_the_end_and_its_config_loads_applies_and_runs(tuned, tiny_flux_dir):
    import numpy as np

    from advisor.config import OptimizationConfig, load_config
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
    trial_config = OptimizationConfig.model_validate(best.user_attrs["config"])
    assert config.model_dump(exclude={"provenance"}) == trial_config.model_dump(exclude={"provenance"})

    pipe = load_pipeline(tiny_flux_dir, config)
    images = pipe(**tiny_call_kwargs("image", seed=0)).images
    assert np.asarray(images).shape == (1, 32, 32, 3)
    assert np.isfinite(np.asarray(images)).all()


@pytest.mark.slow
def test_running_the_same_command_again_resumes_with_no_new_trial(tuned, tiny_flux_dir, env):
    assert tuned.result.returncode == 0, tuned.result.stderr[-3000:]
    before = snapshot(load_study(tuned.storage).get_trials())

    started = time.perf_counter()
    again = advisor(tuned.args, env)
    elapsed = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-3000:]
    assert snapshot(load_study(tuned.storage).get_trials()) == before
    assert elapsed < 20, f"a study with nothing left to do took {elapsed:.1f}s (the first run: {tuned.elapsed:.1f}s)"
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
    # The finalists (at most 3, within 25% of the fastest) got one run each, and no trial was added.
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

    # Run once more: the runs are in the study, so nothing is measured again.
    again = advisor(args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {key: value for key, value in load_study(storage).user_attrs.items() if key.startswith("confirm:")} == runs
    assert json.loads(again.stdout)["best"] == result["best"]


# --- killed and resumed ------------------------------------------------------------------------------


def default_sigint() -> None:
    """Ctrl-C's default in the started process: a test run from a script's background job (`cmd &`)
    inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_the_second_trial(process, study: str, storage: str, timeout_s: float = 300) -> None:
    """Return once the running `advisor tune` has finished one trial and is measuring the next
    (`storage` as the CLI takes it: sqlite:///..., journal:...)."""
    import optuna

    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"the tune ended (exit {process.returncode}) before the second trial"
        assert time.monotonic() < deadline, f"no finished trial after {timeout_s:.0f}s"
        time.sleep(0.25)
        try:
            trials = optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials()
        except Exception:  # no study yet, or the database is busy
            continue
        states = {t.state.name for t in trials if t.params}
        if "COMPLETE" in states and "RUNNING" in states:  # a trial done, the next one measuring
            return


def trial_processes(tuner_pid: int) -> list:
    """The trial processes (`python -m advisor.run.measure`) started by the tuner `tuner_pid`."""
    import psutil

    try:
        children = psutil.Process(tuner_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if "advisor.run.measure" in " ".join(p.cmdline())]


def gone(processes, timeout_s: float = 20) -> bool:
    """Whether every process in `processes` has exited (within `timeout_s`)."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return not alive


def scratch_folders(env: dict) -> list[Path]:
    from advisor.run.measure import SCRATCH_PREFIX

    return sorted(Path(env["TMPDIR"]).glob(f"{SCRATCH_PREFIX}*"))


def stopped_mid_trial(how: signal.Signals, model, env: dict, base: Path) -> SimpleNamespace:
    """`advisor tune --trials 8` sent `how` (the tuner process alone, not its trial) during its
    second trial, then the same command run again."""
    import optuna

    storage = f"sqlite:///{base / 'studies.db'}"
    args = tune_args(model, storage, "--study", "stopped")
    with open(base / "stdout.txt", "w") as stdout, open(base / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([ADVISOR, *args], env=env, stdout=stdout, stderr=stderr)
    try:
        wait_for_the_second_trial(process, "stopped", storage)
        deadline = time.monotonic() + 30
        while not (trials := trial_processes(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)  # the trial is RUNNING in the study a moment before its process starts
        scratch = [p for p in scratch_folders(env) if p.name.split("-")[2] == str(process.pid)]
        process.send_signal(how)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    trials_gone = gone(trials)
    left_scratch = [p for p in scratch if p.exists()]
    before = optuna.load_study(study_name="stopped", storage=storage).get_trials()
    rerun = advisor([*args, "--json"], env)
    after = optuna.load_study(study_name="stopped", storage=storage).get_trials()
    return SimpleNamespace(
        storage=storage, code=code, before=before, after=after, rerun=rerun, trials=trials, trials_gone=trials_gone,
        scratch=scratch, left_scratch=left_scratch, stdout=(base / "stdout.txt").read_text(), stderr=(base / "stderr.txt").read_text(),
    )


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_flux_dir, env, tmp_path_factory):
    """SIGKILL of the tuner alone mid-trial, as `kill -9 PID` does: nothing of the tuner runs after it."""
    return stopped_mid_trial(signal.SIGKILL, tiny_flux_dir, env, tmp_path_factory.mktemp("killed"))


@pytest.fixture(scope="module")
def terminated_and_resumed(tiny_flux_dir, env, tmp_path_factory):
    return stopped_mid_trial(signal.SIGTERM, tiny_flux_dir, env, tmp_path_factory.mktemp("terminated"))


@pytest.mark.slow
@pytest.mark.parametrize("stopped", ["killed_and_resumed", "terminated_and_resumed"])
def test_a_stopped_tuner_leaves_no_trial_running_and_resumes_with_its_finished_trials(stopped, request):
    k = request.getfixturevalue(stopped)
    assert k.trials, "the tuner was stopped while no trial process ran"
    # The trial process died with its tuner: no orphan keeps computing (or holding GPU memory).
    assert k.trials_gone, [p.pid for p in k.trials]
    finished_before = [t for t in k.before if t.state.name == "COMPLETE"]
    assert finished_before
    assert k.rerun.returncode == 0, k.rerun.stderr[-3000:]
    after = {t.number: t for t in k.after}
    # Finished trials are untouched: same numbers, values, parameters and measurements.
    assert snapshot(after[t.number] for t in finished_before) == snapshot(finished_before)
    # The rerun went on: more finished trials, each with its status, and none left RUNNING.
    finished_after = [t for t in k.after if t.state.name == "COMPLETE"]
    assert len(finished_after) > len(finished_before)
    assert all("status" in t.user_attrs for t in finished_after)
    assert len({t.number for t in k.after}) == len(k.after)
    assert "RUNNING" not in {t.state.name for t in k.after}
    # The stopped trial is failed and in no result; its point was measured again.
    (dead,) = [t for t in k.before if t.state.name in {"RUNNING", "FAIL"}]
    assert after[dead.number].state.name == "FAIL"
    result = json.loads(k.rerun.stdout)
    assert [t["number"] for t in result["trials"]] == sorted(t.number for t in finished_after)
    assert result["fits"] is True
    assert point(dead.params) in {point(t.params) for t in finished_after if t.number > dead.number}
    # Its scratch folder is gone: removed by the tuner on SIGTERM, by the rerun after SIGKILL.
    assert k.scratch and not any(p.exists() for p in k.scratch)


@pytest.mark.slow
def test_sigkill_leaves_the_trial_running_until_the_rerun_fails_it(killed_and_resumed):
    (dead,) = [t for t in killed_and_resumed.before if t.state.name != "COMPLETE"]
    assert dead.state.name == "RUNNING"  # nobody could mark it: the rerun did (above)
    assert killed_and_resumed.left_scratch  # nor remove its folder


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_with_the_table_and_exit_143(terminated_and_resumed):
    k = terminated_and_resumed
    assert k.code == 143, k.stderr[-3000:]
    assert "Traceback" not in k.stderr and "failed with value" not in k.stderr, k.stderr[-3000:]
    assert "advisor: interrupted" in k.stderr.splitlines()
    assert k.stdout.startswith("Trials of study stopped")
    assert not k.left_scratch  # cleaned by the tuner itself
    (dead,) = [t for t in k.before if t.state.name != "COMPLETE"]
    assert dead.state.name == "FAIL"  # failed by the tuner as it stopped


@pytest.mark.slow
def test_the_point_of_a_killed_trial_is_measured_when_the_study_resumes(killed_and_resumed, tiny_flux_dir):
    study = SimpleNamespace(get_trials=lambda deepcopy=False: killed_and_resumed.after)
    assert ran_to_its_end(study, 8, space(tiny_flux_dir))


# --- infeasible is a result, not an error ---------------------------------------------------------------


@pytest.mark.slow
def test_over_budget_is_infeasible_with_exit_3_not_an_error(tiny_flux_dir, env, tmp_path):
    skip_unless_cpu_target()
    from advisor.units import format_size

    output = tmp_path / "advisor.json"
    # --no-prune: measure them although the estimate already says they can't fit in 100 MB.
    args = tune_args(tiny_flux_dir, f"sqlite:///{tmp_path / 's.db'}", "--no-prune", "--json", "-o", str(output), budget="100MB", trials=1)
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
    started = time.perf_counter()
    result = advisor(tune_args(tiny_flux_dir, f"sqlite:///{tmp_path / 's.db'}", "--json", budget="100MB", trials=2), env)
    assert result.returncode == 3, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["trials"]
    for trial in data["trials"]:
        # When the sampler proposes a configuration already skipped, the trial says so (a repeat).
        assert trial["status"] == "skipped" and trial["source"] in {"estimate", "repeat"}
        assert "far over the 100.00 MB budget" in trial["reason"]
        assert trial["peak_bytes"] is None
    assert time.perf_counter() - started < 30  # no trial process was started
    # --trials counts measured configurations: none was, so every configuration was considered,
    # each once (none skipped twice while another was never looked at), and the study says why it stopped.
    configs = [json.dumps(t["config"], sort_keys=True) for t in data["trials"] if t["source"] == "estimate"]
    for trial in data["trials"]:
        if trial["source"] == "repeat":
            assert trial["reason"].startswith("same as trial ")
    assert len(configs) == len(set(configs)) == len(space(tiny_flux_dir, 100 * 2**20))
    assert data["notes"] == [f"the search space has only {len(configs)} configurations; all measured or ruled out by the estimate (0 measured)"]


@pytest.mark.slow
def test_out_of_memory_trials_are_infeasible_and_the_study_goes_on(flux_270mb, oom_limit, tmp_path):
    skip_unless_cpu_target()
    import optuna

    limit = oom_limit
    scenario = context(flux_270mb, 8 * 2**30)
    progress = []
    storage = f"sqlite:///{tmp_path / 's.db'}"
    result = run_study(
        str(flux_270mb), scenario, storage=storage, study="oom",
        settings=TuneSettings(trials=2, compile_choices=(False,), memory_limit_bytes=limit, timeout_s=300, confirm_runs=0),
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
    settings = TuneSettings(trials=2, compile_choices=(False,), memory_limit_bytes=limit, timeout_s=300, confirm_runs=0)
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
        str(tiny_flux_dir), scenario, storage=storage, study="slow",
        settings=TuneSettings(trials=2, compile_choices=(False,), timeout_s=1),
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
        str(tiny_flux_dir), scenario, storage=storage, study="slow",
        settings=TuneSettings(trials=2, compile_choices=(False,), timeout_s=300, tolerance=0.5, confirm_runs=0),
    )
    new = [t for t in again.trials if t.number not in {r.number for r in result.trials}]
    assert configs(new) == configs(result.trials) and len(new) == len(configs(new))
    assert all(t.source == "measured" and t.status == "ok" for t in new)
    assert again.best is not None and again.best.number in {t.number for t in new}


# --- several workers on one study -------------------------------------------------------------------------


def check_shared_study(study, trials: int, points: frozenset[str]) -> None:
    """What several workers must leave behind: every trial once, none lost, the study finished."""
    everything = study.get_trials(deepcopy=False)
    numbers = [t.number for t in everything]
    assert sorted(numbers) == list(range(len(numbers))), f"trial numbers {numbers}"
    assert not [t.number for t in everything if t.state.name == "RUNNING"]  # every worker finished its trial
    finished = complete(study)
    assert all("status" in t.user_attrs and "source" in t.user_attrs for t in finished), "a finished trial lost its result"
    assert ran_to_its_end(study, trials, points)
    # A configuration is measured twice only by trials that ran at the same time (a worker reuses
    # the measurement of a finished one): nothing was run twice in sequence.
    measured = [t for t in finished if t.user_attrs["source"] == "measured"]
    for a in measured:
        for b in measured:
            if a.number < b.number and a.params == b.params:
                assert b.datetime_start < a.datetime_complete, f"trials {a.number} and {b.number} measured the same config in turn"


@pytest.mark.slow
def test_two_workers_share_a_journal_file(tiny_flux_dir, shared_device_env, tmp_path):
    storage = f"journal:{tmp_path / 'journal.log'}"
    # --workers 2: two `advisor tune` processes started at once on the shared study.
    result = advisor(tune_args(tiny_flux_dir, storage, "--study", "shared", "--workers", "2", "--json", trials=2), shared_device_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "advisor: error" not in result.stderr  # no worker failed
    study = load_study(storage, "shared")
    check_shared_study(study, 2, space(tiny_flux_dir))
    data = json.loads(result.stdout)
    assert data["study"] == "shared" and data["fits"] is True
    assert [t["number"] for t in data["trials"]] == [t.number for t in complete(study)]
    assert any("shared one device" in note and "not comparable" in note for note in data["notes"])


@pytest.fixture(scope="module")
def shared_device_env(env):
    """Workers may share this machine's one device: only to test the worker machinery."""
    from advisor.run.workers import SHARED_DEVICE_ENV

    return {**env, SHARED_DEVICE_ENV: "1"}


def test_workers_that_would_share_one_device_are_refused(tiny_flux_dir, env, tmp_path):
    if not cpu_target():
        pytest.skip("with GPUs, workers get one each")
    storage = tmp_path / "journal.log"
    result = advisor(tune_args(tiny_flux_dir, f"journal:{storage}", "--workers", "2"), env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("advisor: tracing")]  # first use of the model
    assert len(lines) == 1 and lines[0].startswith("advisor: error: --workers: 2 workers would share this machine's CPU"), result.stderr
    assert "--workers 1" in lines[0]
    assert not storage.exists()  # refused before any study was opened


def test_a_second_tuner_of_one_sqlite_study_is_refused_while_the_first_runs(tiny_flux_dir, env, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    args = tune_args(tiny_flux_dir, storage, "--study", "one", "--quiet")
    first = subprocess.Popen([ADVISOR, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(t.state.name == "RUNNING" for t in _trials_or_none(storage, "one")):
            assert first.poll() is None and time.monotonic() < deadline, "the first tuner never started a trial"
            time.sleep(0.2)
        second = advisor(args, env, timeout=120)
        assert second.returncode == 1, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert lines == [f"advisor: error: --study: another advisor tune (pid {first.pid}) is working study one in "
                         f"{tmp_path / 's.db'}; wait for it to finish, or give this one another --study or --storage"], second.stderr
        assert first.poll() is None  # the first one goes on
    finally:
        first.kill()
        first.wait()
    # The lock died with its holder: the same command now runs.
    assert advisor([*args[:-1], "--trials", "1"], env).returncode == 0


def _trials_or_none(storage: str, name: str) -> list:
    try:
        return load_study(storage, name).get_trials()
    except Exception:  # no study yet
        return []


def test_processes_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path):
    go, url = tmp_path / "go", f"sqlite:///{tmp_path / 'new.db'}"
    processes = [
        subprocess.Popen([sys.executable, "-W", "ignore", "-c", _OPEN_AT_ONCE, url, str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    for process in processes:  # every one imported and waiting
        assert process.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert outputs == ["ok"] * 6


@pytest.fixture
def postgres_url():
    """ADVISOR_TEST_POSTGRES_URL with a fresh schema of its own (dropped afterwards), so runs never
    see each other's studies."""
    import sqlalchemy

    schema = f"advisor_test_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    url = sqlalchemy.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@needs_postgres
@pytest.mark.slow
def test_two_processes_share_a_postgres_study(tiny_flux_dir, env, postgres_url):
    # Create optuna's tables first: two processes that both find an empty database race to create
    # them; open_storage retries (see the test below).
    open_storage(postgres_url).engine.dispose()
    args = tune_args(tiny_flux_dir, postgres_url, "--study", "shared", "--quiet", trials=3)
    processes = [
        subprocess.Popen([ADVISOR, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    check_shared_study(load_study(postgres_url, "shared"), 3, space(tiny_flux_dir))


_OPEN_AT_ONCE = """
import os, sys, time
from advisor.run.storage import open_storage
import optuna, sqlalchemy
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
try:
    open_storage(sys.argv[1])
    print("ok")
except Exception as error:
    print(f"failed: {error}"[-300:])
"""


@needs_postgres
def test_processes_opening_an_empty_postgres_database_at_once_all_succeed(postgres_url, tmp_path):
    go = tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, "-W", "ignore", "-c", _OPEN_AT_ONCE, postgres_url, str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for process in processes:  # every one imported and waiting
        assert process.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert outputs == ["ok"] * 4


def test_several_workers_need_a_shared_storage(tiny_flux_dir, env, tmp_path):
    for storage in ([], ["--storage", f"sqlite:///{tmp_path / 's.db'}"]):
        result = advisor(["tune", "--model", str(tiny_flux_dir), "--budget", "2GB", "--workers", "2", *storage], env, timeout=120)
        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("advisor: error: --workers:"), result.stderr
    assert not (Path(env["XDG_CACHE_HOME"]) / "advisor" / "studies.db").exists()


@pytest.mark.slow
def test_workers_from_main_in_process_get_mains_arguments(tiny_flux_dir, tmp_path, capsys, monkeypatch):
    from advisor.cli import main
    from advisor.run.workers import SHARED_DEVICE_ENV

    monkeypatch.setenv(SHARED_DEVICE_ENV, "1")

    storage = f"journal:{tmp_path / 'journal.log'}"
    code = main(tune_args(tiny_flux_dir, storage, "--workers", "2", "--quiet", trials=1))
    assert code == 0, capsys.readouterr().err[-3000:]


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
    args = ["tune", "--model", str(tiny_flux_dir), "--budget", "2GB", "--storage", f"sqlite:///{storage}", f"{flag}={value}"]
    result = advisor(args, env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"advisor: error: {flag}: ") and valid in lines[0], result.stderr
    assert not storage.exists()  # refused before any study was opened


def test_run_study_refuses_bad_settings_too(tiny_flux_dir, tmp_path):
    from advisor.errors import UsageError

    scenario = context(tiny_flux_dir, 2 * 2**30)
    for settings, flag in ((TuneSettings(timeout_s=float("nan")), "--trial-timeout"), (TuneSettings(trials=0), "--trials")):
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


@pytest.mark.slow
def test_a_rerun_after_a_crash_measures_instead_of_reporting_nothing_feasible(tiny_flux_dir, env, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_flux_dir, model)
    tokenizer = model / "tokenizer" / "tokenizer.json"
    storage = f"sqlite:///{tmp_path / 's.db'}"
    args = tune_args(model, storage, "--json", trials=1)
    # The first run crashes: the pipeline can't be loaded without its tokenizer file.
    tokenizer.rename(tokenizer.with_suffix(".away"))
    crashed = advisor(args, env)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    (first,) = json.loads(crashed.stdout)["trials"]
    assert first["status"] == "crash" and first["source"] == "measured"
    # Fixed, the same command measures the crashed configuration again instead of reusing the crash.
    tokenizer.with_suffix(".away").rename(tokenizer)
    rerun = advisor(args, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    data = json.loads(rerun.stdout)
    assert data["fits"] is True
    later = [t for t in data["trials"] if t["number"] != first["number"]]
    assert [t["source"] for t in later] == ["measured"] and later[0]["config"] == first["config"]
    assert data["best"]["number"] == later[0]["number"]


@pytest.mark.slow
def test_ctrl_c_prints_the_finished_trials_and_how_to_resume_and_exits_130(tiny_flux_dir, env, tmp_path):

    storage = f"sqlite:///{tmp_path / 's.db'}"
    args = tune_args(tiny_flux_dir, storage, "--study", "stopped", "--report", str(tmp_path / "report"))
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([ADVISOR, *args], env=env, stdout=stdout, stderr=stderr, preexec_fn=default_sigint)
    try:
        wait_for_the_second_trial(process, "stopped", storage)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out, err = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "failed with value" not in err, err[-3000:]
    assert "advisor: interrupted" in err.splitlines()
    finished = complete(load_study(storage, "stopped"))
    assert finished
    assert out.startswith("Trials of study stopped")
    for t in finished:  # the table holds every finished trial
        assert any(line.startswith(f"│ {t.number} ") or line.startswith(f"│ {t.number} *") for line in out.splitlines()), out
    hint = [line for line in err.splitlines() if "to resume, run the same command again" in line]
    assert len(hint) == 1 and hint[0].endswith(" ".join(args)), err[-3000:]
    assert "*Interrupted:" in (tmp_path / "report" / "summary.md").read_text()  # the report of what finished
    # The interrupted trial is failed, not left running; the same command resumes the study.
    assert "RUNNING" not in {t.state.name for t in load_study(storage, "stopped").get_trials()}
    resumed = advisor([*args, "--json"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {t["number"] for t in json.loads(resumed.stdout)["trials"]} > {t.number for t in finished}


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_exits_130(tiny_flux_dir, shared_device_env, tmp_path):

    storage = f"journal:{tmp_path / 'journal.log'}"
    args = tune_args(tiny_flux_dir, storage, "--study", "shared", "--workers", "2")
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        # Its own process group, which Ctrl-C in a terminal signals as a whole: the command and its workers.
        process = subprocess.Popen([ADVISOR, *args], env=shared_device_env, stdout=stdout, stderr=stderr, start_new_session=True,
                                   preexec_fn=default_sigint)
    try:
        wait_for_the_second_trial(process, "shared", storage)
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    out, err = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "failed with value" not in err, err[-3000:]
    assert err.splitlines().count("advisor: interrupted") == 1, err[-3000:]
    assert out.startswith("Trials of study shared")
    assert len([line for line in err.splitlines() if "to resume, run the same command again" in line]) == 1


# --- the pick among trials as fast as each other within their spread ----------------------------------


INT8 = {"backend": "torchao", "scheme": "int8_weight_only", "components": ["transformer"]}


def _record(number: int, latency: float, spread: float | None, peak_mb: int, config: dict):
    from advisor.run.trials import TrialRecord

    return TrialRecord(
        number=number, summary=str(config), status="ok", source="measured", feasible=True, latency_s=latency,
        peak_bytes=peak_mb * 2**20, predicted_peak_bytes=None, reason=None, config={"device": "cpu", **config},
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
    assert choose_best([_record(4, 1.0, None, 500, {}), _record(5, 0.99, None, 900, {"vae": {"tiling": True}})])[0].number == 5
