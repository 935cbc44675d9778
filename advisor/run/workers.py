"""`advisor tune --workers N`: several processes working one optuna study through shared storage.

Each worker is a process of its own (``python -m advisor.run.workers SPEC``) that runs the same study
quietly: the planning question (`advisor.plan.scenario.Request`), the study's settings and name go
to it as data (`WorkerSpec`), not as an edited command line. The workers share the study through a
journal file or PostgreSQL (`advisor.run.storage.open_storage`). Each worker gets a GPU
of its own (``CUDA_VISIBLE_DEVICES``): workers that would share a device are refused, since each
would time the others' load as well (two workers on a 2-core CPU measured fp32 at 1.90 s against
0.38 s alone). To test this machinery on one device anyway, set ``ADVISOR_ALLOW_SHARED_DEVICE=1``:
the result then says its latencies are not comparable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from advisor.errors import TuneError, UsageError
from advisor.plan.scenario import Request, Scenario
from advisor.plan.space import SearchSpace
from advisor.run.measure import die_with_parent
from advisor.run.queue import seed_with_rules
from advisor.run.results import TuneResult, collect
from advisor.run.stopping import Terminated, interrupts, raise_if_lost, terminate_as_interrupt
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


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker runs: the planning question, the model to load, the study and its settings."""

    request: Request
    model: str  # what the trials load: a local folder or a hub id
    storage: str
    study: str
    settings: TuneSettings  # the finalists are confirmed by the command that started the workers

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "request": self.request.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        settings = data.pop("settings")
        tuples = {name: tuple(settings[name]) for name in ("step_points", "compile_choices")}
        return cls(
            **{
                **data,
                "request": Request.from_dict(data["request"]),
                "settings": TuneSettings(**{**settings, **tuples}),
            }
        )


def run_workers(
    request: Request,
    workers: int,
    model: str,
    scenario: Scenario,
    *,
    storage: str,
    study: str | None,
    settings: TuneSettings,
) -> TuneResult:
    """Run `workers` worker processes of the study `request` asks for (its `scenario`) on one shared
    storage, then confirm the finalists here and collect the result.

    Each worker gets a GPU of its own (CUDA_VISIBLE_DEVICES); more workers than devices are refused
    (UsageError) unless ADVISOR_ALLOW_SHARED_DEVICE=1. SIGTERM is passed on to the workers; Ctrl-C and
    SIGTERM raise `TuneInterrupted` with the finished trials.
    """
    import subprocess

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
    # once, here: workers seeding together would queue each pick twice
    seed_with_rules(created, space, scenario, settings.trials)
    spec = WorkerSpec(request, model, storage, name, dataclasses.replace(settings, confirm_runs=0))
    folder = Path(tempfile.mkdtemp(prefix="advisor-workers-"))
    (folder / "spec.json").write_text(spec.to_json())
    processes = []

    def start_workers() -> None:
        for index in range(workers):
            env = dict(os.environ)
            if scenario.target.device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
            # Same process group (Ctrl-C in the terminal reaches every worker); dead with this process.
            before = interrupts()
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "advisor.run.workers", str(folder / "spec.json")],
                    env=env,
                    preexec_fn=die_with_parent(),
                )
            )
            raise_if_lost(before)  # a Ctrl-C while the worker started

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
            start_workers()
            codes = [p.wait() for p in processes]
            if FINISHED in codes:
                the_study = optuna.load_study(study_name=name, storage=open_storage(storage))
                confirm_study(the_study, model, scenario, settings, result)
        # Ctrl-C reached the workers too (one process group): let them finish quietly.
        except KeyboardInterrupt as stop:
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
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if FINISHED not in codes:
        raise TuneError(f"--workers: every worker failed (exit codes {codes})")
    for index, code in enumerate(codes, start=1):
        if code != FINISHED:
            print(f"advisor: warning: worker {index} of {workers} exited with code {code}", file=sys.stderr)
    return result()


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


# --- a worker ------------------------------------------------------------------------------------

FINISHED = 0  # a worker's exit status when its share of the study is done, whatever the study found


def _worker_main(spec_path: str) -> int:
    """One worker: the study `spec_path` describes, run quietly until it is done. An error is one
    line on stderr (the command that started the workers says how many failed)."""
    from advisor.errors import AdvisorError
    from advisor.plan.scenario import scenario_for
    from advisor.probe.models import load_profile
    from advisor.run.tune import run_study
    from advisor.trace.cache import with_traces

    spec = WorkerSpec.from_json(Path(spec_path).read_text())
    request = spec.request
    try:
        profile = with_traces(load_profile(request.model, workload=request.workload))  # traced by the command already
        run_study(
            spec.model,
            scenario_for(request, profile=profile),
            storage=spec.storage,
            study=spec.study,
            settings=spec.settings,
        )
    except TuneInterrupted as stop:  # the finished trials are in the study; the command reports them
        return stop.exit_code
    except KeyboardInterrupt:  # before the study started: nothing to keep
        return 130
    except AdvisorError as error:
        print(f"advisor: error: worker: {' '.join(str(error).split())}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # one line, as the command line says it: a storage write cut short by Ctrl-C, say
        said = " ".join(str(error).split())[:300]
        print(f"advisor: error: worker: unexpected {type(error).__name__}: {said}", file=sys.stderr)
        return 1
    return FINISHED


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
