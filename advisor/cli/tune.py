"""`advisor tune` on the command line: every check before the first trial, the progress display,
an interruption that keeps what was measured, the report."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from advisor.arguments import Exit
from advisor.cli.common import (
    NOTHING_FITS_EXIT,
    planning_profile,
    print_json,
    save_config,
    state,
)
from advisor.errors import AdvisorError, ModelError, UsageError
from advisor.files import check_cache_folder, check_output_file, check_output_folder, os_error_reason
from advisor.run.timing import CONFIRM_RUNS, MIN_PSNR_DB, TOLERANCE, TRIAL_TIMEOUT_S, TRIALS


if TYPE_CHECKING:
    from advisor.plan.scenario import Request


def tune(
    request: Request,
    trials: int = TRIALS,
    trial_timeout: float = TRIAL_TIMEOUT_S,
    tolerance: float = TOLERANCE,
    confirm: int = CONFIRM_RUNS,
    min_psnr: float = MIN_PSNR_DB,
    retry_failed: bool = False,
    no_prune: bool = False,
    no_rehearse: bool = False,
    no_compile: bool = False,
    storage: str | None = None,
    study: str | None = None,
    workers: int = 1,
    output: str | None = None,
    report: str | None = None,
    as_json: bool = False,
    quiet: bool = False,
) -> None:
    """Measure real candidates with optuna and emit the fastest configuration that truly fits the budget."""
    from advisor.paths import hub_offline
    from advisor.plan.scenario import on_one_gpu, scenario_for
    from advisor.probe.hardware import probe_machine
    from advisor.probe.models import hub_reachable
    from advisor.probe.target import target_from_probe
    from advisor.probe.workload import WORKLOAD_LIMITS, check_workload_value
    from advisor.run.storage import check_storage
    from advisor.run.tune import TuneInterrupted, TuneSettings, check_settings, run_study
    from advisor.run.workers import check_devices, run_workers

    if workers < 1:
        raise UsageError(f"--workers: {workers} is not valid; give a whole number of at least 1")
    settings = TuneSettings(
        trials=trials,
        timeout_s=trial_timeout,
        tolerance=tolerance,
        confirm_runs=confirm,
        min_psnr_db=min_psnr,
        prune=not no_prune,
        rehearse=not no_rehearse,
        compile_choices=(False,) if no_compile else (True, False),
        retry_failed=retry_failed,
    )
    check_settings(settings)  # --trials, --trial-timeout, --tolerance, --confirm, --min-psnr
    for name, value in request.job().items():
        if value is not None and name in WORKLOAD_LIMITS:  # before any model is read (the workload checks the rest)
            check_workload_value(name, value)
    # Before the first trial: otherwise a bad path is found only after every trial has run.
    if output is not None:
        check_output_file(output, flag="-o")
    if report is not None:
        check_output_folder(report, flag="--report")
    if storage is not None:
        check_storage(storage)
    if storage is None or settings.min_psnr_db > 0:  # the default study database, the quality guard's images
        check_cache_folder("advisor tune keeps its studies and the quality guard's images there")
    if workers > 1 and (storage is None or storage.startswith("sqlite")):
        raise UsageError(
            "--workers: several workers need a shared storage: --storage journal:PATH or postgresql://..."
        )
    machine = probe_machine()
    if workers > 1:  # before a local model is traced
        check_devices(workers, target_from_probe(machine).device)
    profile = planning_profile(request.model, request.workload)
    if request.lora_rank is not None:
        request = _with_stand_in_loras(request, profile, quiet or as_json)
    # a trial is one process on one GPU, and so is each worker's study (`on_one_gpu`)
    scenario, one_gpu = on_one_gpu(scenario_for(request, machine, profile=profile))
    if one_gpu and not (quiet or as_json):
        print(f"note: {one_gpu}", file=sys.stderr)
    profile = scenario.profile
    if profile.source == "catalog" and (hub_offline() or not hub_reachable()):
        raise ModelError(
            f"--model: {profile.model_id} is not downloaded and the hub can't be reached; tune measures real "
            "runs, so download it first (huggingface-cli download) or pass a local pipeline folder"
        )
    model_ref = profile.path if profile.source in {"folder", "cache"} else profile.model_id
    argv = state.get("argv", sys.argv[1:])
    try:
        if workers > 1:
            result = run_workers(
                request, workers, model_ref, scenario, storage=storage, study=study, settings=settings
            )
        else:
            result = _run_with_progress(
                lambda on_trial, on_phase: run_study(
                    model_ref,
                    scenario,
                    storage=storage,
                    study=study,
                    settings=settings,
                    on_trial=on_trial,
                    on_phase=on_phase,
                ),
                trials,
                quiet or as_json,
            )
    except TuneInterrupted as stop:
        _tune_interrupted(stop, argv, as_json, quiet, report)
    if result.config is not None and output:
        save_config(result.config, output)
    summary = _write_report(result, report) if report else None
    if as_json:
        print_json(result.to_dict())
    elif not quiet:
        from advisor.render import render_tune

        render_tune(result, output, summary)
    if result.best is None:
        raise Exit(NOTHING_FITS_EXIT)


def _write_report(result, report: str):
    from advisor.run.report import write_report

    try:
        return write_report(result, report)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise AdvisorError(f"--report {report}: could not write{where} ({os_error_reason(exc)})") from None


def _tune_interrupted(stop, argv: list[str], as_json: bool, quiet: bool, report: str | None) -> None:
    """Ctrl-C or SIGTERM during `advisor tune`: say so, show the finished trials and how to resume;
    exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    import shlex

    result = stop.result
    if not quiet:  # a worker's (--quiet) interruption is told by the command that started it
        print("advisor: interrupted", file=sys.stderr)
    result.interrupted = True
    summary = _write_report(result, report) if report else None  # what was finished, marked as interrupted
    if as_json:
        print_json(result.to_dict())
    elif not quiet:
        from advisor.render import render_tune

        render_tune(result, None, summary)
    if not quiet:
        finished = len(result.trials)
        print(
            f"advisor: {finished} finished trial{'s' if finished != 1 else ''} kept in study {result.study}; "
            f"to resume, run the same command again: advisor {shlex.join(argv)}",
            file=sys.stderr,
        )
    raise Exit(stop.exit_code)


def _with_stand_in_loras(request, profile, quiet: bool):
    """`request` with made-up LoRA files of its --lora-rank in place of the rank: trials run real
    adapters of that shape (`advisor.run.stand_in`)."""
    from dataclasses import replace

    from advisor.probe.lora import user_loras
    from advisor.run.stand_in import stand_in_loras

    user_loras(
        profile, (), request.lora_rank, request.lora_count
    )  # the rank's and count's checks, before anything is made
    paths = stand_in_loras(profile, request.lora_rank, request.lora_count or 1)
    if not quiet:
        print(
            f"--lora-rank {request.lora_rank}: trials run made-up LoRAs of that rank on every Linear layer of the "
            f"denoiser (random values, the same for every candidate): {', '.join(str(p) for p in paths)}",
            file=sys.stderr,
        )
    return replace(request, loras=tuple(str(p) for p in paths), lora_rank=None, lora_count=None)


def _run_with_progress(run, total: int, quiet: bool):
    """Run the study with a live progress display on stderr (`advisor.render.TuneProgress`)."""
    if quiet:
        return run(None, None)
    from rich.console import Console
    from rich.live import Live

    from advisor.render import TuneProgress

    display, console = TuneProgress(total), Console(stderr=True)
    try:
        with Live(display, console=console, refresh_per_second=4, transient=False):
            return run(display.trial_done, display.phase)
    finally:
        if not console.is_terminal:  # a log file gets the last frame without its line end
            console.print()
