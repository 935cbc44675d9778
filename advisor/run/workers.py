"""`advisor tune --workers N`: several processes working one optuna study through shared storage.

Each worker is this same `advisor tune` command, re-run with ``--study NAME --quiet``; they share the
study through a journal file or PostgreSQL (`advisor.run.storage.open_storage`). Each worker gets a GPU
of its own (``CUDA_VISIBLE_DEVICES``): workers that would share a device are refused, since each
would time the others' load as well (two workers on a 2-core CPU measured fp32 at 1.90 s against
0.38 s alone). To test this machinery on one device anyway, set ``ADVISOR_ALLOW_SHARED_DEVICE=1``:
the result then says its latencies are not comparable.
"""

from __future__ import annotations

import os
import signal

from advisor.errors import TuneError, UsageError
from advisor.plan.scenario import Scenario
from advisor.plan.space import SearchSpace
from advisor.run.measure import die_with_parent
from advisor.run.queue import seed_with_rules
from advisor.run.results import TuneResult, collect
from advisor.run.stopping import Terminated, terminate_as_interrupt
from advisor.run.storage import open_storage, shown_storage
from advisor.run.tune import (
    Progress,
    TuneInterrupted,
    TuneSettings,
    confirm_study,
    exhausted_note,
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

    Each worker gets a GPU of its own (CUDA_VISIBLE_DEVICES); more workers than devices are refused
    (UsageError) unless ADVISOR_ALLOW_SHARED_DEVICE=1. SIGTERM is passed on to the workers; Ctrl-C and
    SIGTERM raise `TuneInterrupted` with the finished trials.
    """
    import subprocess
    import sys

    import optuna

    devices = check_devices(workers, scenario.target.device)
    shared = workers > len(devices)
    name = study or study_name(scenario, settings.timeout_s)
    # Create the study (and the database tables) once, before the workers race to do it.
    created = optuna.create_study(
        study_name=name, storage=open_storage(storage), direction="minimize", load_if_exists=True
    )
    stale = stale_trials(created, settings)  # what the workers retry: the result judges without them
    space = SearchSpace.for_scenario(scenario, compile_choices=settings.compile_choices).usable(scenario)
    seed_with_rules(created, space, scenario)  # once, here: workers seeding together would queue each pick twice
    base = [a for a in argv if a not in {"--json", "--quiet"}]
    for option in ("--workers", "--study", "--output", "--report", "-o", "--confirm"):
        base = _drop_option(base, option)
    base += ["--confirm", "0"]  # the finalists are confirmed here, once the workers are done
    processes = []
    for index in range(workers):
        env = dict(os.environ)
        if scenario.target.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
        # Same process group (Ctrl-C in the terminal reaches every worker); dead with this process.
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "advisor", *base, "--study", name, "--quiet"],
                env=env,
                preexec_fn=die_with_parent(),
            )
        )

    def result() -> TuneResult:
        the_study = optuna.load_study(study_name=name, storage=open_storage(storage))
        done = collect(the_study, name, shown_storage(storage), space, scenario)
        note = exhausted_note(space, Progress.of(the_study, stale), settings.trials)
        done.notes = done.notes + ([note] if note else [])
        if shared:
            done.notes.append(
                f"{workers} workers shared one device ({SHARED_DEVICE_ENV}=1): their latencies are not comparable"
            )
        return done

    with terminate_as_interrupt():
        try:
            codes = [p.wait() for p in processes]
            if any(code in (0, 3) for code in codes):
                the_study = optuna.load_study(study_name=name, storage=open_storage(storage))
                confirm_study(the_study, model, scenario, settings, result)
        except (
            KeyboardInterrupt
        ) as stop:  # Ctrl-C reached the workers too (one process group): let them finish quietly
            terminated = isinstance(stop, Terminated)
            for process in processes:
                if terminated:  # SIGTERM reached this process only: pass it on
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5 if not terminated else 60)
                except subprocess.TimeoutExpired:  # only this process was interrupted: pass it on
                    process.send_signal(signal.SIGINT)
                    process.wait()
            raise TuneInterrupted(result(), 143 if terminated else 130) from None
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


SHARED_DEVICE_ENV = "ADVISOR_ALLOW_SHARED_DEVICE"


def check_devices(workers: int, device: str) -> list[str]:
    """The devices the workers get, one each; a UsageError naming --workers when there are fewer
    devices than workers (unless ADVISOR_ALLOW_SHARED_DEVICE=1)."""
    devices = _devices(device)
    if workers > len(devices) and os.environ.get(SHARED_DEVICE_ENV) != "1":
        what = "this machine's CPU" if device == "cpu" else f"{len(devices)} GPU{'s' if len(devices) != 1 else ''}"
        raise UsageError(
            f"--workers: {workers} workers would share {what}, and each would time the others' load too; "
            f"use --workers {len(devices)} here, or run one `advisor tune --storage URL --study NAME` per machine"
        )
    return devices


def _devices(device: str) -> list[str]:
    """The devices workers can have one each of: CUDA_VISIBLE_DEVICES' entries (or every GPU NVML
    sees) for a CUDA target, the one CPU otherwise."""
    if device != "cuda":
        return ["cpu"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip()]
    from advisor.probe.hardware import probe_gpus

    return [str(index) for index in range(len(probe_gpus()[0]))]
