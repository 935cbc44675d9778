"""advisor tune stopped: SIGKILL and SIGTERM mid-trial, then resumed (no orphan, no stale RUNNING
trial, no leaked folder, finished trials kept); Ctrl-C (the table, exit 130), of one tuner and of
its workers; a rerun after a crash that measures again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tuning import (
    ADVISOR,
    advisor,
    complete,
    default_sigint,
    gone,
    load_study,
    point,
    ran_to_its_end,
    scratch_folders,
    snapshot,
    space,
    trial_processes,
    tune_args,
    wait_for_the_second_trial,
    with_option,
)


pytestmark = pytest.mark.usefixtures("private_cache")


# --- killed and resumed ------------------------------------------------------------------------------


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
        storage=storage,
        code=code,
        before=before,
        after=after,
        rerun=rerun,
        trials=trials,
        trials_gone=trials_gone,
        scratch=scratch,
        left_scratch=left_scratch,
        stdout=(base / "stdout.txt").read_text(),
        stderr=(base / "stderr.txt").read_text(),
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
    (dead,) = [
        t for t in killed_and_resumed.before if t.state.name not in {"COMPLETE", "WAITING"}
    ]  # WAITING: seeds a stop left queued
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
    (dead,) = [t for t in k.before if t.state.name not in {"COMPLETE", "WAITING"}]  # WAITING: seeds a stop left queued
    assert dead.state.name == "FAIL"  # failed by the tuner as it stopped


@pytest.mark.slow
def test_the_point_of_a_killed_trial_is_measured_when_the_study_resumes(killed_and_resumed, tiny_flux_dir):
    study = SimpleNamespace(get_trials=lambda deepcopy=False: killed_and_resumed.after)
    assert ran_to_its_end(study, 8, space(tiny_flux_dir))


@pytest.mark.slow
def test_a_rerun_after_a_crash_measures_again_and_so_does_every_later_run(tiny_flux_dir, env, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_flux_dir, model)
    tokenizer = model / "tokenizer" / "tokenizer.json"
    storage = f"sqlite:///{tmp_path / 's.db'}"
    # One confirmation run and the quality guard (the defaults are 2 and 30 dB): each a process more.
    args = with_option(
        with_option(tune_args(model, storage, "--json", trials=1), "--min-psnr", None), "--confirm", "1"
    )
    # The first run crashes: the pipeline can't be loaded without its tokenizer file, the reference neither.
    tokenizer.rename(tokenizer.with_suffix(".away"))
    crashed = advisor(args, env)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    data = json.loads(crashed.stdout)
    (first,) = data["trials"]
    assert first["status"] == "crash" and first["source"] == "measured"
    assert any(note.startswith("no lossless reference output") for note in data["notes"]), data["notes"]
    # Fixed, the same command measures the crashed configuration again instead of reusing the crash,
    # makes the reference it could not make, and confirms the pick in a fresh process.
    tokenizer.with_suffix(".away").rename(tokenizer)
    rerun = advisor(args, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    data = json.loads(rerun.stdout)
    assert data["fits"] is True and data["reference"] is not None
    later = [t for t in data["trials"] if t["number"] != first["number"]]
    assert [t["source"] for t in later] == ["measured"] and later[0]["config"] == first["config"]
    assert data["best"]["number"] == later[0]["number"] and data["best"]["processes"] == 2
    assert load_study(storage).user_attrs["quality_reference"]["status"] == "ok"
    # Every later run of the study reads the crash, the measurement and its confirmation together.
    again = advisor(args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["best"] == data["best"]


# A Ctrl-C that arrives while a child process starts: the fork runs Python's at-fork handlers, where
# an interrupt is dropped and printed as "Exception ignored", traceback and all (the CI run of stop 41
# met one in logging's). Made certain here by sending it from one.
SWALLOWED = """
import os, signal, subprocess, sys
from advisor.run.stopping import interrupts, raise_if_lost, terminate_as_interrupt

os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
with terminate_as_interrupt():
    before = interrupts()
    child = subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=lambda: None)
    child.wait()
    print("Popen returned")
    try:
        raise_if_lost(before)
    except KeyboardInterrupt:
        print("raised again")
"""


def test_an_interrupt_a_child_start_swallowed_is_raised_again():
    run = subprocess.run([sys.executable, "-c", SWALLOWED], capture_output=True, text=True, timeout=120)
    # Popen returned, so the interrupt was dropped inside it; it is raised again, and nothing printed.
    assert run.stdout.split() == ["Popen", "returned", "raised", "again"], (run.stdout, run.stderr)
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr, run.stderr


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
        assert any(
            line.startswith(f"│ {t.number} ") or line.startswith(f"│ {t.number} *") for line in out.splitlines()
        ), out
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
        process = subprocess.Popen(
            [ADVISOR, *args],
            env=shared_device_env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=default_sigint,
        )
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
