"""`advisor tune --workers N`: several processes working one optuna study through shared storage.

Each worker is this same `advisor tune` command, re-run with ``--study NAME --quiet``; they share the
study through a journal file or PostgreSQL (`advisor.run.tune.open_storage`). With several GPUs each
worker gets its own (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import os
import signal

from advisor.errors import TuneError
from advisor.plan.scenario import Scenario
from advisor.plan.space import SearchSpace
from advisor.run.tune import (
    Progress,
    TuneInterrupted,
    TuneResult,
    TuneSettings,
    collect,
    exhausted_note,
    open_storage,
    shown_storage,
    stale_trials,
    study_name,
)


def run_workers(
    argv: list[str],
    workers: int,
    model: str,
    scenario: Scenario,
    *,
    storage: str,
    study: str | None,
    settings: TuneSettings,
) -> TuneResult:
    """Run `workers` copies of this `advisor tune` command on one shared study and collect the result.

    With several GPUs each worker gets its own (CUDA_VISIBLE_DEVICES); on one GPU or a CPU they share it.
    """
    import subprocess
    import sys

    import optuna

    name = study or study_name(scenario, settings.timeout_s)
    # Create the study (and the database tables) once, before the workers race to do it.
    created = optuna.create_study(study_name=name, storage=open_storage(storage), direction="minimize", load_if_exists=True)
    stale = stale_trials(created, settings)  # what the workers retry: the result judges without them
    base = [a for a in argv if a not in {"--json", "--quiet"}]
    for option in ("--workers", "--study", "--output", "--report", "-o"):
        base = _drop_option(base, option)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    processes = []
    for index in range(workers):
        env = dict(os.environ)
        if scenario.target.device == "cuda" and gpus is None and _gpu_count() > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(index % _gpu_count())
        processes.append(subprocess.Popen([sys.executable, "-m", "advisor", *base, "--study", name, "--quiet"], env=env))
    space = SearchSpace.for_scenario(scenario, compile_choices=settings.compile_choices).usable(scenario)

    def result() -> TuneResult:
        the_study = optuna.load_study(study_name=name, storage=open_storage(storage))
        done = collect(the_study, name, shown_storage(storage), space, scenario)
        note = exhausted_note(space, Progress.of(the_study, stale), settings.trials)
        done.notes = [note] if note else []
        return done

    try:
        codes = [p.wait() for p in processes]
    except KeyboardInterrupt:  # Ctrl-C reached the workers too (one process group): let them finish quietly
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # only this process was interrupted: pass it on
                process.send_signal(signal.SIGINT)
                process.wait()
        raise TuneInterrupted(result()) from None
    if all(code not in (0, 3) for code in codes):
        raise TuneError(f"--workers: every worker failed (exit codes {codes})")
    for index, code in enumerate(codes, start=1):
        if code not in (0, 3):
            print(f"advisor: warning: worker {index} of {workers} exited with code {code}", file=sys.stderr)
    return result()


def _drop_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (``--x v`` or ``--x=v``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def _gpu_count() -> int:
    from advisor.probe.hardware import probe_gpus

    return len(probe_gpus()[0])
