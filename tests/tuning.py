"""What the tune tests share: the advisor command, its arguments, the environment of the processes
they start, and readers of the optuna study they leave (tests/test_tune*.py).

Every advisor process gets its caches and temp files under pytest's tmp (XDG_CACHE_HOME, TMPDIR)
and an explicit --storage, so nothing touches ~/.cache: the fixtures `env` (their environment),
`shared_device_env` and `private_cache` (for studies run in the test process) are in conftest.py.
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
from pathlib import Path

import pytest

from advisor.run.storage import open_storage


ADVISOR = shutil.which("advisor") or str(Path(sys.executable).with_name("advisor"))
POSTGRES_URL = os.environ.get("ADVISOR_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL,
    reason="ADVISOR_TEST_POSTGRES_URL is not set (scripts/ci_postgres.sh starts a server and sets it)",
)
# A wide timing tolerance: these tests check the study, not the timings (tests/test_measure.py
# checks those), and a 0.1 s generation on a shared CI runner would time 12 rounds to settle at ±5%.
# No confirmation runs of the finalists (each a trial process more) and no quality reference (one
# more) but where a test is about them.
SMALL = "--no-compile --height 32 --width 32 --steps 4 --tolerance 0.5 --confirm 0 --min-psnr 0".split()


def tune_args(model, storage: str, *extra: str, budget: str = "2GB", trials: int = 8) -> list[str]:
    return [
        "tune",
        "--model",
        str(model),
        "--budget",
        budget,
        "--trials",
        str(trials),
        *SMALL,
        "--storage",
        storage,
        *extra,
    ]


def with_option(args: list[str], flag: str, value: str | None) -> list[str]:
    """`args` with `flag` given `value` instead (None: `flag` and its value left out)."""
    at = args.index(flag)
    return args[:at] + args[at + 2 :] if value is None else args[: at + 1] + [value] + args[at + 2 :]


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
    return {
        t.number: (t.state.name, t.values, t.params, t.user_attrs.get("status"), t.user_attrs.get("measurement"))
        for t in trials
    }


def point(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def configs(records) -> set[str]:
    """The distinct configurations of some trial records."""
    return {json.dumps(t.config, sort_keys=True) for t in records}


@functools.lru_cache
def _space(model: str, budget_bytes: int) -> frozenset[str]:
    from advisor.plan.space import SearchSpace

    scenario = context(model, budget_bytes)
    return frozenset(
        point(p) for p in SearchSpace.for_scenario(scenario, compile_choices=(False,)).usable(scenario).points()
    )


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
    from advisor.plan.scenario import Request, scenario_for
    from advisor.probe.hardware import probe_machine

    return scenario_for(Request(str(model), height=32, width=32, steps=4, budget_bytes=budget_bytes), probe_machine())


@functools.lru_cache(maxsize=1)
def cpu_target() -> bool:
    from advisor.probe.hardware import probe_machine
    from advisor.probe.target import target_from_probe

    return target_from_probe(probe_machine()).device == "cpu"


def skip_unless_cpu_target() -> None:
    if not cpu_target():
        pytest.skip("the budget is peak RSS only where the target is the CPU; this machine tunes for its GPU")


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


def stored_protocol(study) -> dict:
    """What a study keeps in optuna storage, without the values that change between runs: for each
    kind of finished trial (its state, status and source), the names of its attributes and of its
    measurement's and config's fields, the optional ``seeded_by`` aside (what queued it, if anything:
    "rules", "retry", "untried"); the study's attribute names (a confirmation run's by prefix)."""
    kinds, seeded_by = {}, set()
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if "seeded_by" in attrs:
            seeded_by.add(attrs["seeded_by"])
        kinds[f"{t.state.name}/{attrs.get('status')}/{attrs.get('source')}"] = {
            "attrs": sorted(set(attrs) - {"seeded_by"}),
            "measurement": sorted(attrs.get("measurement") or {}),
            "config": sorted(attrs.get("config") or {}),
        }
    study_attrs = sorted({key.split(":")[0] + (":" if ":" in key else "") for key in study.user_attrs})
    return {"trials": kinds, "seeded_by": sorted(seeded_by), "study": study_attrs}
