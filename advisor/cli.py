"""The `advisor` command line: parsing and rendering only; the work lives in the modules.

Every error ends as one line on stderr (``advisor: error: ...``) and a non-zero exit status: the
advisor's own errors with their exit codes (usage errors 2, the rest 1), an OS error on a file
with the file's name, and anything unexpected as one line that says it is a bug; ``--debug``
shows the traceback instead. Warnings (`AdvisorWarning`) are one ``advisor: warning: ...`` line each.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from advisor.errors import AdvisorError, AdvisorWarning, ModelError, UsageError
from advisor.files import check_output_file, check_output_folder, os_error_reason
from advisor.render import format_count, render_probe, render_recommendation, render_tune, stdout_console
from advisor.units import format_size, parse_size

app = typer.Typer(
    name="advisor",
    help="Find the fastest way to run a diffusers pipeline within your GPU memory.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


def _strict(data: Any) -> Any:
    """`data` with non-finite numbers (a CPU's infinite host->device bandwidth) as null: JSON has no Infinity."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _strict(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_strict(value) for value in data]
    return data


def print_json(data: Any) -> None:
    """Machine output: exactly one strict JSON object on stdout."""
    sys.stdout.write(json.dumps(_strict(data), indent=2, allow_nan=False) + "\n")


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    _state["debug"] = debug


def planning_profile(model: str, workload: str | None):
    """The model's profile with its traced FLOP and activation curves: the catalog carries them; a
    local folder or hub model is traced on first use (this imports torch) and cached."""
    from advisor.probe.models import load_profile

    profile = load_profile(model, workload=workload)
    if profile.source == "catalog":
        return profile
    from advisor.trace.cache import with_traces

    return with_traces(profile, log=lambda line: print(f"advisor: {line}", file=sys.stderr, flush=True))


@app.command()
def probe(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema in docs/probe.md)."),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="Also measure matmul throughput and host->GPU bandwidth (a few seconds; imports torch)."
    ),
) -> None:
    """Show this machine's GPUs, host memory, disk and inference libraries (no weights loaded)."""
    from advisor.probe.hardware import probe_machine

    profile = probe_machine()
    if calibrate:
        from advisor.probe.calibrate import calibrate as run_calibration

        profile.extra["calibration"] = run_calibration()
    if as_json:
        print_json(profile.to_dict())
        return
    render_probe(profile)
    if calibrate:
        result = profile.extra["calibration"]
        line = f"calibrated {result['name']}: {result['matmul_flops'] / 1e12:.2f} TFLOP/s {result['matmul_dtype']} matmul"
        if "h2d_bytes_per_s" in result:
            line += f", {result['h2d_bytes_per_s'] / 1e9:.1f} GB/s host->GPU (pinned)"
        stdout_console().print(f"{line}; saved to {result['path']}")


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Hub id, catalog alias, or a local pipeline folder."),
    workload: str = typer.Option(None, "--workload", help="Override the workload kind: image, video or audio."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema in docs/models.md)."),
    include_config: bool = typer.Option(False, "--config", help="With --json: include each component's config."),
) -> None:
    """Show what a pipeline weighs, per component, without loading its weights."""
    from advisor.probe.models import load_profile

    profile = load_profile(model, workload=workload)
    if as_json:
        print_json(profile.to_dict(include_config=include_config))
        return
    console = stdout_console()
    console.print(f"{profile.model_id}  ({profile.pipeline_class}, from the {profile.source})")
    console.print(f"workload: {profile.workload} ({profile.workload_reason})")
    console.print(f"model CPU offload order: {' -> '.join(profile.offload_sequence)}")
    table = Table(show_footer=True)
    table.add_column("component", footer="total")
    table.add_column("class")
    table.add_column("role")
    table.add_column("params", justify="right", footer=format_count(profile.parameters))
    table.add_column("dtype")
    table.add_column("size", justify="right", footer=format_size(profile.bytes))
    for component in profile.components:
        table.add_row(
            component.name,
            component.class_name,
            component.role,
            format_count(component.parameters),
            component.dtype,
            format_size(component.bytes),
        )
    console.print(table)


def _size(text: str | None, flag: str) -> int | None:
    return parse_size(text, name=flag) if text is not None else None


@app.command()
def estimate(
    model: str = typer.Argument(..., help="Hub id, catalog alias, or a local pipeline folder."),
    config_file: str = typer.Option(None, "--config", help="An advisor config file (default: plain bf16, no offload)."),
    workload: str = typer.Option(None, "--workload", help="Override the workload kind: image or video."),
    height: int = typer.Option(None, "--height", help="Image/video height in pixels (default: the pipeline's)."),
    width: int = typer.Option(None, "--width", help="Image/video width in pixels (default: the pipeline's)."),
    frames: int = typer.Option(None, "--frames", help="Video frames (default: the pipeline's)."),
    steps: int = typer.Option(None, "--steps", help="Denoising steps (default: the pipeline's)."),
    batch: int = typer.Option(None, "--batch", help="Images or videos per prompt (default 1)."),
    vram: str = typer.Option(None, "--vram", help="Plan for a GPU with this much memory, e.g. 24GB."),
    ram: str = typer.Option(None, "--ram", help="Plan for this much host RAM, e.g. 64GB."),
    gpu: str = typer.Option(None, "--gpu", help="Plan for this GPU model, e.g. 'RTX 4090' (see docs/estimate.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Predict peak GPU memory, peak RAM and latency of one configuration, per phase and component."""
    from advisor.config import OptimizationConfig, load_config
    from advisor.plan.estimate import estimate as run_estimate
    from advisor.probe.hardware import probe_machine
    from advisor.probe.target import resolve_target
    from advisor.probe.workload import make_workload

    loaded = load_config(config_file, flag="--config") if config_file else None  # before a local model is traced
    profile = planning_profile(model, workload)
    job = make_workload(profile, height=height, width=width, frames=frames, steps=steps, batch=batch)
    target = resolve_target(probe_machine(), vram=_size(vram, "--vram"), ram=_size(ram, "--ram"), gpu=gpu)
    config = loaded if loaded is not None else OptimizationConfig(device=target.device)
    result = run_estimate(profile, job, config, target)
    if as_json:
        print_json(
            {
                "model": profile.model_id,
                "workload": job.to_dict(),
                "hardware": target.to_dict(),
                "config": config.model_dump(mode="json"),
                "estimate": result.to_dict(),
            }
        )
        return
    console = stdout_console()
    console.print(f"{profile.model_id}: {job.label()} on {target.name} ({target.source})")
    console.print(f"config: {config.summary()}")
    title = "Memory per phase (CPU inference: all of it is RAM)" if target.device == "cpu" else "GPU memory per phase"
    table = Table(title=title, title_justify="left")
    table.add_column("phase")
    table.add_column("resident weights", justify="right")
    table.add_column("activations", justify="right")
    table.add_column("total", justify="right")
    table.add_column("components on the device")
    for phase in result.phases:
        parts = ", ".join(f"{name} {format_size(size)}" for name, size in phase.weights_bytes.items())
        marker = " (peak)" if phase.name == result.peak_phase else ""
        table.add_row(
            phase.name + marker,
            format_size(sum(phase.weights_bytes.values())),
            format_size(phase.activation_bytes),
            format_size(phase.device_bytes),
            parts or "-",
        )
    console.print(table)
    ram_parts = ", ".join(f"{k.replace('_', ' ')} {format_size(v)}" for k, v in result.ram_breakdown.items())
    if target.device != "cpu":
        console.print(
            f"peak VRAM: {format_size(result.peak_vram_bytes)} reserved by the caching allocator "
            f"({format_size(result.peak_vram_allocated_bytes)} allocated, the table's totals; without the CUDA context)"
        )
    console.print(f"peak host RAM: {format_size(result.peak_ram_bytes)} ({ram_parts})")
    if result.disk_bytes:
        console.print(f"disk: {format_size(result.disk_bytes)} of offloaded weights")
    parts = ", ".join(
        f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f}s" for k, v in result.latency_breakdown.items() if v and not k.startswith("step")
    )
    console.print(f"predicted latency: {result.latency_s:.1f}s ({parts}; {result.step_latency_s:.3f}s per step)")
    for note in result.notes:
        console.print(f"note: {note}")


DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
NOTHING_FITS_EXIT = 3


@app.command("recommend")
def recommend_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id, catalog alias, or a local pipeline folder."),
    workload: str = typer.Option(None, "--workload", help="Override the workload kind: image or video."),
    height: int = typer.Option(None, "--height", help="Height in pixels (default: the pipeline's)."),
    width: int = typer.Option(None, "--width", help="Width in pixels (default: the pipeline's)."),
    frames: int = typer.Option(None, "--frames", help="Video frames (default: the pipeline's)."),
    steps: int = typer.Option(None, "--steps", help="Denoising steps (default: the pipeline's)."),
    batch: int = typer.Option(None, "--batch", help="Images or videos per prompt (default 1)."),
    budget: str = typer.Option(None, "--budget", help="GPU memory the run may use, e.g. 16GB (default: free VRAM minus a reserve)."),
    vram: str = typer.Option(None, "--vram", help="Plan for a GPU with this much memory, e.g. 24GB."),
    ram: str = typer.Option(None, "--ram", help="Plan for this much host RAM, e.g. 64GB."),
    gpu: str = typer.Option(None, "--gpu", help="Plan for this GPU model, e.g. 'RTX 4090'."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Leave torch.compile out (no warm-up compile on the first call)."),
    quality: str = typer.Option("balanced", "--quality", help="exact: nothing lossy; balanced: lossy only when nothing lossless fits or it is >=20% faster; fast: the fastest."),
    output: str = typer.Option(None, "--output", "-o", help="Write the chosen config to this file (for advisor.load_config)."),
    emit: str = typer.Option(None, "--emit", help="Print code instead of the summary: 'python'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Recommend the fastest configuration predicted to fit, and explain why (instant, no weights loaded)."""
    from advisor.plan.recommend import recommend
    from advisor.plan.scenario import scenario_for
    from advisor.probe.hardware import probe_machine

    if emit not in (None, "python"):
        raise UsageError(f"--emit: {emit!r} is not supported; use --emit python")
    if output is not None:
        check_output_file(output, flag="-o")
    budget_bytes = _size(budget, "--budget")
    scenario = scenario_for(
        probe_machine(), model, workload=workload, height=height, width=width, frames=frames, steps=steps, batch=batch,
        vram=_size(vram, "--vram"), ram=_size(ram, "--ram"), gpu=gpu, budget_bytes=budget_bytes, quality=quality,
        profile=planning_profile(model, workload),
    )
    if as_json and emit:
        raise UsageError("--emit: prints a script, --json an object; choose one")
    result = recommend(scenario, compile_choices=(False,) if no_compile else (True, False))
    config = result.config
    if config is not None and output:
        _save_config(config, output)
    if as_json:
        print_json(result.to_dict())
    elif emit == "python" and config is not None:
        from advisor.run.emit import emit_python

        profile = scenario.profile
        sys.stdout.write(emit_python(profile.path if profile.source == "folder" else profile.model_id, config))
    else:
        render_recommendation(result, config, output)
    if config is None:
        raise typer.Exit(NOTHING_FITS_EXIT)


@app.command()
def tune(
    budget: str = typer.Option(..., "--budget", help="Memory the run may use, e.g. 12GB (GPU memory; RAM on a CPU-only machine)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hub id, catalog alias, or a local pipeline folder."),
    workload: str = typer.Option(None, "--workload", help="Override the workload kind: image or video."),
    height: int = typer.Option(None, "--height", help="Height in pixels (default: the pipeline's)."),
    width: int = typer.Option(None, "--width", help="Width in pixels (default: the pipeline's)."),
    frames: int = typer.Option(None, "--frames", help="Video frames (default: the pipeline's)."),
    steps: int = typer.Option(None, "--steps", help="Denoising steps the latency is reported for (default: the pipeline's)."),
    batch: int = typer.Option(None, "--batch", help="Images or videos per prompt (default 1)."),
    trials: int = typer.Option(8, "--trials", help="Distinct configurations the study should measure (a rerun resumes up to this)."),
    trial_timeout: float = typer.Option(900.0, "--trial-timeout", help="Seconds one trial may take before it counts as a timeout."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Measure again the trials that failed in earlier runs, out-of-memory ones too."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Measure candidates the estimate predicts far over budget too."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Leave torch.compile out of the search (faster trials)."),
    quality: str = typer.Option("balanced", "--quality", help="exact: search lossless configurations only; balanced or fast: all."),
    storage: str = typer.Option(None, "--storage", help="Optuna storage: sqlite:///PATH (default ~/.cache/advisor/studies.db), journal:PATH, postgresql://..."),
    study: str = typer.Option(None, "--study", help="Study name (default: derived from model, workload, machine and budget)."),
    workers: int = typer.Option(1, "--workers", help="Worker processes sharing the study (needs a journal or PostgreSQL storage)."),
    output: str = typer.Option(None, "--output", "-o", help="Write the fastest feasible config to this file."),
    report: str = typer.Option(None, "--report", help="Write tune.png (latency vs peak memory) and summary.md to this folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with every trial."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or table (used by worker processes)."),
) -> None:
    """Measure real candidates with optuna and emit the fastest configuration that truly fits the budget."""
    from advisor.plan.scenario import scenario_for
    from advisor.probe.hardware import probe_machine
    from advisor.probe.models import hub_offline, hub_reachable
    from advisor.probe.workload import check_workload_value
    from advisor.run.tune import TuneInterrupted, TuneSettings, check_settings, run_study
    from advisor.run.workers import run_workers

    budget_bytes = _size(budget, "--budget")
    if workers < 1:
        raise UsageError(f"--workers: {workers} is not valid; give a whole number of at least 1")
    settings = TuneSettings(
        trials=trials, timeout_s=trial_timeout, prune=not no_prune, compile_choices=(False,) if no_compile else (True, False),
        retry_failed=retry_failed,
    )
    check_settings(settings)  # --trials, --trial-timeout
    for name, value in (("height", height), ("width", width), ("frames", frames), ("steps", steps), ("batch", batch)):
        if value is not None:  # before any model is read (the workload checks the rest)
            check_workload_value(name, value)
    # Before the first trial: otherwise a bad path is found only after every trial has run.
    if output is not None:
        check_output_file(output, flag="-o")
    if report is not None:
        check_output_folder(report, flag="--report")
    if workers > 1 and (storage is None or storage.startswith("sqlite")):
        raise UsageError("--workers: several workers need a shared storage: --storage journal:PATH or postgresql://...")
    machine = probe_machine()
    scenario = scenario_for(
        machine, model, workload=workload, height=height, width=width, frames=frames, steps=steps, batch=batch,
        budget_bytes=budget_bytes, quality=quality, profile=planning_profile(model, workload),
    )
    profile = scenario.profile
    if profile.source == "catalog" and (hub_offline() or not hub_reachable()):
        raise ModelError(
            f"--model: {profile.model_id} is not downloaded and the hub can't be reached; tune measures real "
            "runs, so download it first (huggingface-cli download) or pass a local pipeline folder"
        )
    model_ref = profile.path if profile.source in {"folder", "cache"} else profile.model_id
    argv = _state.get("argv", sys.argv[1:])
    try:
        if workers > 1:
            result = run_workers(argv, workers, model_ref, scenario, storage=storage, study=study, settings=settings)
        else:
            result = _run_with_progress(
                lambda on_trial: run_study(model_ref, scenario, storage=storage, study=study, settings=settings, on_trial=on_trial),
                trials, quiet or as_json,
            )
    except TuneInterrupted as stop:
        _tune_interrupted(stop.result, argv, as_json, quiet, report)
    if not (quiet or as_json):
        for note in result.notes:
            stdout_console().print(note)
    if result.config is not None and output:
        _save_config(result.config, output)
    if report:
        summary = _write_report(result, report)
        if not (quiet or as_json):
            stdout_console().print(f"report: {summary} and {summary.with_name('tune.png')}")
    if as_json:
        print_json(result.to_dict())
    elif not quiet:
        render_tune(result, output)
    if result.best is None:
        raise typer.Exit(NOTHING_FITS_EXIT)


def _save_config(config, output: str) -> None:
    """`config.save(output)`; a failure (the path was checked up front: a full disk, say) names ``-o``."""
    try:
        config.save(output)
    except OSError as exc:
        raise AdvisorError(f"-o {output}: could not write the config ({os_error_reason(exc)})") from None


def _write_report(result, report: str):
    from advisor.run.report import write_report

    try:
        return write_report(result, report)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise AdvisorError(f"--report {report}: could not write{where} ({os_error_reason(exc)})") from None


def _tune_interrupted(result, argv: list[str], as_json: bool, quiet: bool, report: str | None) -> None:
    """Ctrl-C during `advisor tune`: say so, show the finished trials and how to resume; exit 130."""
    import shlex

    if not quiet:  # a worker's (--quiet) interruption is told by the command that started it
        print("advisor: interrupted", file=sys.stderr)
    result.interrupted = True
    if report:  # what was finished, marked as interrupted
        _write_report(result, report)
    if as_json:
        print_json(result.to_dict())
    elif not quiet:
        render_tune(result, None)
    if not quiet:
        finished = len(result.trials)
        print(f"advisor: {finished} finished trial{'s' if finished != 1 else ''} kept in study {result.study}; "
              f"to resume, run the same command again: advisor {shlex.join(argv)}", file=sys.stderr)
    raise typer.Exit(130)


def _run_with_progress(run, total: int, quiet: bool):
    """Run the study with a progress bar: trials done, elapsed time, current best."""
    if quiet:
        return run(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("tuning"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task("starting the first trial...", total=total)

        def on_trial(partial) -> None:
            best = partial.best
            text = f"best {best.latency_s:.2f}s: {best.summary}" if best else "no feasible trial yet"
            measured = {json.dumps(t.config, sort_keys=True) for t in partial.trials if t.source == "measured"}
            progress.update(task, completed=min(len(measured), total), description=text)

        return run(on_trial)


def _stdout_gone() -> bool:
    """Whether stdout's reader went away: rich has pointed it at /dev/null, or click wrapped it."""
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    try:
        here, null = os.fstat(sys.__stdout__.fileno()), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return (here.st_dev, here.st_ino) == (null.st_dev, null.st_ino)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _show_warning(previous, message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, AdvisorWarning):
        print(f"advisor: warning: {_one_line(message)}", file=sys.stderr)
    else:
        previous(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    _state["argv"] = args  # what `tune --workers` hands on to its worker processes
    with warnings.catch_warnings():
        warnings.simplefilter("default", AdvisorWarning)  # each distinct warning once per command
        warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
        return _run(args)


def _run(args: list[str]) -> int:
    command = typer.main.get_command(app)
    debug = "--debug" in args
    try:
        result = command.main(args=args or ["--help"], prog_name="advisor", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("advisor: interrupted", file=sys.stderr)
        return 130
    except (BrokenPipeError, SystemExit) as exc:
        # `advisor ... | head` closed the pipe: what was read was what was wanted. rich and click turn
        # the EPIPE into exit 1 after pointing stdout at /dev/null (or wrapping it); anything else re-raises.
        if isinstance(exc, SystemExit) and not _stdout_gone():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())  # the final flush must not fail again
        return 0
    except typer.TyperException as exc:  # click's usage errors: unknown option, missing value, ...
        if debug:
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx else ""
        print(f"advisor: error: {_one_line(exc.format_message())}{hint}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if _state["debug"] or debug:
            raise
        if isinstance(exc, AdvisorError):
            message, code = _one_line(exc), exc.exit_code
        elif isinstance(exc, OSError):  # a file no check named a flag for: name the file
            message, code = (f"{exc.filename}: " if exc.filename else "") + os_error_reason(exc), 1
        else:  # a bug: still one line, and the way to see more
            message = f"unexpected {type(exc).__name__}: {_one_line(exc)[:300]} (a bug in the advisor; --debug shows the traceback)"
            code = 1
        print(f"advisor: error: {message}", file=sys.stderr)
        return code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
