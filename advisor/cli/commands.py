"""`advisor probe`, `inspect`, `estimate` and `recommend`: instant, nothing loaded (`advisor tune` is `advisor.cli.tune`)."""

from __future__ import annotations

import sys
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

from advisor.arguments import Exit
from advisor.cli.common import (
    NOTHING_FITS_EXIT,
    checked_kind,
    planning_profile,
    print_json,
    recorded_job,
    required_model,
    save_config,
)
from advisor.errors import AdvisorWarning, UsageError
from advisor.files import check_output_file
from advisor.units import format_size


if TYPE_CHECKING:
    from advisor.plan.recommend import Fit
    from advisor.plan.scenario import Request


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
        line = (
            f"calibrated {result['name']}: {result['matmul_flops'] / 1e12:.2f} TFLOP/s {result['matmul_dtype']} matmul"
        )
        if "h2d_bytes_per_s" in result:
            line += f", {result['h2d_bytes_per_s'] / 1e9:.1f} GB/s host->GPU (pinned)"
        text_console().print(f"{line}; saved to {result['path']}")


def inspect(
    model: str | None = None, workload: str | None = None, as_json: bool = False, include_config: bool = False
) -> None:
    """Show what a pipeline weighs, per component, without loading its weights (or a GGUF file, from its header)."""
    from advisor.levers.gguf.header import gguf_files
    from advisor.probe.models import load_profile

    model = required_model(model, "inspect")
    files = gguf_files(model)
    if files:
        _inspect_gguf(files, as_json)
        return
    profile = checked_kind(load_profile(model, workload=workload), workload)
    if as_json:
        print_json(profile.to_dict(include_config=include_config))
        return
    from advisor.render import render_inspect

    render_inspect(profile)


def _inspect_gguf(files: list, as_json: bool) -> None:
    """What each GGUF file holds, per tensor type: what it weighs loaded as a diffusers component."""
    from advisor.levers.gguf.header import read_gguf_header
    from advisor.render import format_count, print_columns, text_console
    from advisor.units import format_size

    headers = [read_gguf_header(file) for file in files]
    if as_json:
        print_json([h.to_dict() for h in headers])
        return
    console = text_console()
    for h in headers:
        console.print(
            f"{h.path}  (GGUF v{h.version}: {len(h.tensors)} tensors, {format_count(h.parameters)} parameters, "
            f"{format_size(h.tensor_bytes)}; mostly {h.main_type})"
        )
        rows = [[kind, str(n), format_count(w), format_size(b), f"{b * 8 / w:g}"] for kind, n, w, b in h.by_type()]
        print_columns(console, ["type", "tensors", "params", "size", "bits/weight"], rows, right={1, 2, 3})
    console.print("packed types stay packed as loaded; F32/F16 tensors load at the pipeline's dtype")


def estimate(request: Request, config_file: str | None = None, as_json: bool = False) -> None:
    """Predict peak GPU memory, peak RAM and latency of one configuration, per phase and component."""
    from advisor.config import OptimizationConfig, load_config
    from advisor.constraints import Platform, violations
    from advisor.levers.attention import mask_problem
    from advisor.plan.compute import batches_samples
    from advisor.plan.estimate import estimate as run_estimate
    from advisor.probe import hardware

    loaded = load_config(config_file, flag="--config") if config_file else None  # before a local model is traced
    profile = planning_profile(request.model, request.workload)
    request.workload_for(profile)  # the flags alone first: their errors name them
    flags = request.job()
    job, recorded = recorded_job(request, profile, loaded and loaded.provenance, f"--config {config_file}")
    machine = hardware.probe_machine() if request.here else None  # planning for this machine
    planned = loaded.provenance if loaded is not None and loaded.provenance else None
    notes = []
    target = request.target(machine)
    if planned and planned.ram_bytes and request.ram is None and not request.here and target.name == planned.gpu_name:
        # another machine, the one the config was planned for: its host RAM too, unless --ram says otherwise
        request = replace(request, ram=planned.ram_bytes)
        target = request.target(machine)
        notes.append(f"host RAM from --config {config_file}: {format_size(planned.ram_bytes)}, as it was planned for")
    config = loaded if loaded is not None else OptimizationConfig(device=target.device)
    made_for = config.provenance.pipeline_class if config.provenance else None
    if made_for and made_for != profile.pipeline_class:
        warnings.warn(
            AdvisorWarning(
                f"--config {config_file}: made for a {made_for} ({config.provenance.model}), estimated here "
                f"for {profile.model_id}, a {profile.pipeline_class}: the numbers are for a config it was not chosen for"
            )
        )
    if loaded is not None:  # what recommend would never have proposed for this target (advisor.constraints)
        platform = Platform.of_target(
            target.device, target.compute_capability, machine.software.packages if machine else None, target.os
        )
        for violation in violations(config, platform):
            warnings.warn(
                AdvisorWarning(f"--config {config_file}: {target.name} can't run it as written: {violation.message}")
            )
        problem = mask_problem(config, profile, batched=batches_samples(profile, job))
        if problem:  # what the model itself refuses (an attention kernel without mask support)
            warnings.warn(
                AdvisorWarning(f"--config {config_file}: {profile.model_id} can't run it as written: {problem}")
            )
    result = run_estimate(profile, job, config, target)
    if request.budget_bytes is not None:
        fit = fit_verdict(result, target, request.budget_bytes, "--budget")
    elif planned and planned.budget_bytes and planned.gpu_name == target.name:
        fit = fit_verdict(result, target, planned.budget_bytes, f"the budget --config {config_file} was planned for")
    else:
        fit = fit_verdict(result, target)
    if as_json:
        print_json(
            {
                "model": profile.model_id,
                "workload": job.to_dict(),
                "hardware": target.to_dict(),
                **fit.to_dict(),
                "config": config.to_dict(exclude_none=False),
                "estimate": result.to_dict(),
            }
        )
        return
    from advisor.render import render_estimate

    given = [f"--{name}" for name, value in flags.items() if value is not None]
    source = f"workload from --config {config_file}: {job.label()}" + (
        f" ({' and '.join(given)} as given on the command line)" if given else ""
    )
    notes += [source] if recorded else []
    render_estimate(profile, job, target, config, result, fit, notes=tuple(notes))


def fit_verdict(result, target, budget: int | None = None, source: str | None = None) -> Fit:
    """Whether an estimate fits `target` as recommend judges a candidate (`why_it_does_not_fit`),
    within `budget` (from `source`), else recommend's default (free memory less a reserve:
    `default_budget`)."""
    from advisor.plan.recommend import Fit, why_it_does_not_fit
    from advisor.plan.scenario import default_budget

    if budget is None:
        budget, source = default_budget(target), None
    return Fit(budget, why_it_does_not_fit(result, target, budget), source)


def recommend_command(
    request: Request,
    no_compile: bool = False,
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
    scenario = scenario_for(request, profile=planning_profile(request.model, request.workload))
    if as_json and emit:
        raise UsageError("--emit: prints a script, --json an object; choose one")
    result = recommend(scenario, compile_choices=(False,) if no_compile else (True, False))
    config = result.config
    if config is not None and output:
        save_config(config, output)
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
