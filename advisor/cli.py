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
from typing import TYPE_CHECKING, Any

from advisor.arguments import Exit, build_parser, take_model, values_may_start_with_a_dash
from advisor.errors import AdvisorError, AdvisorWarning, ModelError, UsageError, is_oom
from advisor.files import check_cache_folder, check_output_file, check_output_folder, os_error_reason
from advisor.run.timing import CONFIRM_RUNS, MIN_PSNR_DB, TOLERANCE, TRIAL_TIMEOUT_S, TRIALS
from advisor.terminal import escape_what_the_terminal_cannot_show
from advisor.units import parse_size

if TYPE_CHECKING:
    from advisor.plan.recommend import Fit

_state: dict[str, Any] = {"debug": False}


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


def planning_profile(model: str, workload: str | None):
    """The model's profile with its traced FLOP and activation curves: the catalog carries them; a
    local folder or hub model is traced on first use (this imports torch) and cached."""
    from advisor.probe.models import load_profile

    profile = _checked_kind(load_profile(model, workload=workload), workload)
    if profile.workload not in ("image", "video"):  # before a local model is traced
        raise UsageError(f"--workload: {profile.workload} pipelines are not planned (yet); the advisor plans image and video")
    if profile.source == "catalog":
        return profile
    from advisor.trace.cache import with_traces

    return with_traces(profile, log=lambda line: print(f"advisor: {line}", file=sys.stderr, flush=True))


def _checked_kind(profile, workload: str | None):
    """`profile`, unless --workload contradicts what the advisor knows its pipeline class to be:
    --workload is for pipelines it does not know (a Flux pipeline makes no video)."""
    from advisor.probe.models import known_workload

    known = known_workload(profile.pipeline_class)
    if workload is not None and known is not None and workload != known:
        article = "an" if known[0] in "aeiou" else "a"
        raise UsageError(f"--workload: {profile.model_id} is a {profile.pipeline_class}, {article} {known} pipeline, so it makes no "
                         f"{workload}; leave --workload out (it is for pipelines the advisor does not know)")
    return profile


def probe(as_json: bool = False, calibrate: bool = False) -> None:
    """Show this machine's GPUs, host memory, disk and inference libraries (no weights loaded)."""
    from advisor.probe.hardware import probe_machine

    profile = probe_machine()
    if calibrate:
        from advisor.probe.calibrate import calibrate as run_calibration

        profile.extra["calibration"] = run_calibration()
    if as_json:
        print_json(profile.to_dict())
        return
    from advisor.render import render_probe, text_console

    render_probe(profile)
    if calibrate:
        result = profile.extra["calibration"]
        line = f"calibrated {result['name']}: {result['matmul_flops'] / 1e12:.2f} TFLOP/s {result['matmul_dtype']} matmul"
        if "h2d_bytes_per_s" in result:
            line += f", {result['h2d_bytes_per_s'] / 1e9:.1f} GB/s host->GPU (pinned)"
        text_console().print(f"{line}; saved to {result['path']}")


def inspect(model: str | None = None, workload: str | None = None, as_json: bool = False, include_config: bool = False) -> None:
    """Show what a pipeline weighs, per component, without loading its weights."""
    from advisor.probe.models import load_profile

    profile = _checked_kind(load_profile(_required(model, "inspect"), workload=workload), workload)
    if as_json:
        print_json(profile.to_dict(include_config=include_config))
        return
    from advisor.render import render_inspect

    render_inspect(profile)


def _required(model: str | None, command: str) -> str:
    if not model:
        raise UsageError(f"MODEL: none given; name the pipeline first (advisor {command} flux-dev ...) or as --model: "
                         "a hub id, a catalog alias or a local folder")
    return model


def _size(text: str | None, flag: str) -> int | None:
    return parse_size(text, name=flag) if text is not None else None


def estimate(
    model: str | None = None,
    config_file: str | None = None,
    workload: str | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    steps: int | None = None,
    batch: int | None = None,
    vram: str | None = None,
    ram: str | None = None,
    gpu: str | None = None,
    as_json: bool = False,
) -> None:
    """Predict peak GPU memory, peak RAM and latency of one configuration, per phase and component."""
    from advisor.config import OptimizationConfig, load_config
    from advisor.constraints import Platform, violations
    from advisor.errors import ConfigError
    from advisor.plan.estimate import estimate as run_estimate
    from advisor.probe import hardware
    from advisor.probe.target import resolve_target
    from advisor.probe.workload import make_workload, recorded_workload

    model = _required(model, "estimate")
    loaded = load_config(config_file, flag="--config") if config_file else None  # before a local model is traced
    profile = planning_profile(model, workload)
    flags = {"height": height, "width": width, "frames": frames, "steps": steps, "batch": batch}
    job = make_workload(profile, **flags)  # the flags alone first: their errors name them
    # What the config was made for, where no flag says otherwise (flags win one by one).
    recorded = {name: value for name, value in recorded_workload(loaded and loaded.provenance, profile).items() if flags[name] is None}
    if recorded:
        try:
            job = make_workload(profile, **{**flags, **recorded})
        except UsageError as exc:
            raise ConfigError(f"--config {config_file}: its workload (provenance.workload) does not suit {profile.model_id}: {exc}") from None
    machine = hardware.probe_machine() if vram is None and gpu is None else None  # planning for this machine
    target = resolve_target(machine, vram=_size(vram, "--vram"), ram=_size(ram, "--ram"), gpu=gpu)
    config = loaded if loaded is not None else OptimizationConfig(device=target.device)
    made_for = config.provenance.pipeline_class if config.provenance else None
    if made_for and made_for != profile.pipeline_class:
        warnings.warn(AdvisorWarning(f"--config {config_file}: made for a {made_for} ({config.provenance.model}), estimated here "
                                     f"for {profile.model_id}, a {profile.pipeline_class}: the numbers are for a config it was not chosen for"))
    if loaded is not None:  # what recommend would never have proposed for this target (advisor.constraints)
        platform = Platform.of_target(target.device, target.compute_capability, machine.software.packages if machine else None)
        for violation in violations(config, platform):
            warnings.warn(AdvisorWarning(f"--config {config_file}: {target.name} can't run it as written: {violation.message}"))
    result = run_estimate(profile, job, config, target)
    fit = fit_verdict(result, target)
    if as_json:
        print_json({"model": profile.model_id, "workload": job.to_dict(), "hardware": target.to_dict(), **fit.to_dict(),
                    "config": config.to_dict(exclude_none=False), "estimate": result.to_dict()})
        return
    from advisor.render import render_estimate

    given = [f"--{name}" for name, value in flags.items() if value is not None]
    source = f"workload from --config {config_file}: {job.label()}" + (f" ({' and '.join(given)} as given on the command line)" if given else "")
    render_estimate(profile, job, target, config, result, fit, notes=(source,) if recorded else ())


def fit_verdict(result, target) -> Fit:
    """Whether an estimate fits `target` as recommend judges a candidate (`why_it_does_not_fit`),
    within recommend's default budget (free memory less a reserve: `default_budget`)."""
    from advisor.plan.recommend import Fit, why_it_does_not_fit
    from advisor.plan.scenario import default_budget

    budget = default_budget(target)
    return Fit(budget, why_it_does_not_fit(result, target, budget))


DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"  # recommend's, said as an assumption
NOTHING_FITS_EXIT = 3


def recommend_command(
    model: str | None = None,
    workload: str | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    steps: int | None = None,
    batch: int | None = None,
    budget: str | None = None,
    vram: str | None = None,
    ram: str | None = None,
    gpu: str | None = None,
    no_compile: bool = False,
    quality: str = "balanced",
    output: str | None = None,
    emit: str | None = None,
    as_json: bool = False,
) -> None:
    """Recommend the fastest configuration predicted to fit, and explain why (instant, no weights loaded)."""
    from advisor.plan.recommend import recommend
    from advisor.plan.scenario import scenario_for

    if emit not in (None, "python"):
        raise UsageError(f"--emit: {emit!r} is not supported; use --emit python")
    if output is not None:
        check_output_file(output, flag="-o")
    budget_bytes = _size(budget, "--budget")
    assumed = () if model else (f"model: {DEFAULT_MODEL} (none given; pass MODEL or --model)",)
    model = model or DEFAULT_MODEL
    scenario = scenario_for(
        None, model, workload=workload, height=height, width=width, frames=frames, steps=steps, batch=batch,
        vram=_size(vram, "--vram"), ram=_size(ram, "--ram"), gpu=gpu, budget_bytes=budget_bytes, quality=quality,
        profile=planning_profile(model, workload), assumed=assumed,
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
        from advisor.render import render_recommendation

        render_recommendation(result, config, output)
    if config is None:
        raise Exit(NOTHING_FITS_EXIT)


def tune(
    budget: str | None = None,
    model: str | None = None,
    workload: str | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    steps: int | None = None,
    batch: int | None = None,
    trials: int = TRIALS,
    trial_timeout: float = TRIAL_TIMEOUT_S,
    tolerance: float = TOLERANCE,
    confirm: int = CONFIRM_RUNS,
    min_psnr: float = MIN_PSNR_DB,
    retry_failed: bool = False,
    no_prune: bool = False,
    no_compile: bool = False,
    quality: str = "balanced",
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
    from advisor.plan.scenario import scenario_for
    from advisor.probe.hardware import probe_machine
    from advisor.probe.models import hub_reachable
    from advisor.probe.target import target_from_probe
    from advisor.probe.workload import check_workload_value
    from advisor.run.storage import check_storage
    from advisor.run.tune import TuneInterrupted, TuneSettings, check_settings, run_study
    from advisor.run.workers import check_devices, run_workers

    model = _required(model, "tune")  # measuring a model nobody named would start a download of tens of GB
    budget_bytes = _size(budget, "--budget")
    if workers < 1:
        raise UsageError(f"--workers: {workers} is not valid; give a whole number of at least 1")
    settings = TuneSettings(
        trials=trials, timeout_s=trial_timeout, tolerance=tolerance, confirm_runs=confirm, min_psnr_db=min_psnr, prune=not no_prune,
        compile_choices=(False,) if no_compile else (True, False), retry_failed=retry_failed,
    )
    check_settings(settings)  # --trials, --trial-timeout, --tolerance, --confirm, --min-psnr
    for name, value in (("height", height), ("width", width), ("frames", frames), ("steps", steps), ("batch", batch)):
        if value is not None:  # before any model is read (the workload checks the rest)
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
        raise UsageError("--workers: several workers need a shared storage: --storage journal:PATH or postgresql://...")
    machine = probe_machine()
    if workers > 1:  # before a local model is traced
        check_devices(workers, target_from_probe(machine).device)
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
                lambda on_trial, on_phase: run_study(model_ref, scenario, storage=storage, study=study, settings=settings,
                                                     on_trial=on_trial, on_phase=on_phase),
                trials, quiet or as_json,
            )
    except TuneInterrupted as stop:
        _tune_interrupted(stop, argv, as_json, quiet, report)
    if result.config is not None and output:
        _save_config(result.config, output)
    summary = _write_report(result, report) if report else None
    if as_json:
        print_json(result.to_dict())
    elif not quiet:
        from advisor.render import render_tune

        render_tune(result, output, summary)
    if result.best is None:
        raise Exit(NOTHING_FITS_EXIT)


COMMANDS = {"probe": probe, "inspect": inspect, "estimate": estimate, "recommend": recommend_command, "tune": tune}


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
        print(f"advisor: {finished} finished trial{'s' if finished != 1 else ''} kept in study {result.study}; "
              f"to resume, run the same command again: advisor {shlex.join(argv)}", file=sys.stderr)
    raise Exit(stop.exit_code)


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


def _stdout_gone() -> bool:
    """Whether stdout's reader went away: rich has pointed it at /dev/null."""
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
    # pydantic looks for plugins in every installed distribution's entry points when the config
    # schema is built: ~80 ms of each command in a full environment, for plugins the advisor has no use for.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    escape_what_the_terminal_cannot_show()
    with warnings.catch_warnings():
        warnings.simplefilter("default", AdvisorWarning)  # each distinct warning once per command
        warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
        return _run(args)


def _run(args: list[str]) -> int:
    debug = "--debug" in args
    try:
        parser = build_parser(COMMANDS)
        if not args:
            parser.print_help()
            return 0
        parsed, unknown = parser.parse_known_args(values_may_start_with_a_dash(parser, args))
        if unknown:  # said by the subcommand, whose help lists what it takes
            where = f"advisor {parsed.command}" if parsed.command else "advisor"
            what = "option" if unknown[0].startswith("-") else "argument"
            raise UsageError(f"no such {what}: {unknown[0]} (see '{where} --help')")
        namespace = vars(parsed)
        take_model(namespace)
        _state["debug"] = namespace.pop("debug")
        run = namespace.pop("run", None)
        if run is None:  # `advisor --debug` alone
            parser.print_help()
            return 0
        namespace.pop("command")
        run(**namespace)
    except Exit as exc:
        return exc.code
    except KeyboardInterrupt:
        print("advisor: interrupted", file=sys.stderr)
        return 130
    except (BrokenPipeError, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not _stdout_gone():
            return exc.code if isinstance(exc.code, int) else 0  # --help printed its text
        # `advisor ... | head` closed the pipe: what was read was what was wanted. rich turns the
        # EPIPE into exit 1 after pointing stdout at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())  # the final flush must not fail again
        return 0
    except Exception as exc:
        if _state["debug"] or debug:
            raise
        if isinstance(exc, AdvisorError):
            message, code = _one_line(exc), exc.exit_code
        elif is_oom(exc):  # the advisor's own process (a trial's is a result): not a bug, a machine too full
            said = f"{type(exc).__name__}: {_one_line(exc)[:200]}".rstrip(": ")
            message, code = f"out of memory in the advisor's own process ({said}); free some memory, or raise its limit, and run again", 1
        elif isinstance(exc, OSError):  # a file no check named a flag for: name the file
            message, code = (f"{exc.filename}: " if exc.filename else "") + os_error_reason(exc), 1
        else:  # a bug: still one line, and the way to see more
            message = f"unexpected {type(exc).__name__}: {_one_line(exc)[:300]} (a bug in the advisor; --debug shows the traceback)"
            code = 1
        print(f"advisor: error: {message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
