"""`advisor check CONFIG`: rehearse a config at full size on a virtual GPU (seconds, torch, no GPU needed)."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from advisor.arguments import Exit
from advisor.cli.common import planning_profile, print_json, recorded_job
from advisor.errors import UsageError
from advisor.units import format_size


if TYPE_CHECKING:
    from advisor.plan.scenario import Request

WOULD_FAIL_EXIT = 4  # the rehearsal found an op the card would refuse, or the allocator runs out of the budget
NOT_REHEARSED_EXIT = 5  # part of the config could not be rehearsed: nothing is claimed
# A rehearsal's phases in order (`advisor.rehearse.rehearsal` LOADING, APPLYING, PHASES: not imported
# at the top, which would import torch on every command's start).
PHASES = ("loading", "applying the config", "text_encoding", "denoising", "vae_decode")


def check(request: Request, config_file: str, as_json: bool = False) -> None:
    """Rehearse a config at full size on a virtual GPU: what would fail on the card, and the memory per phase."""
    from advisor.config import load_config
    from advisor.plan.estimate import estimate
    from advisor.plan.scenario import default_budget
    from advisor.probe import hardware

    config = load_config(config_file, flag="CONFIG")
    planned = config.provenance
    model = request.model or (planned.model if planned else None)
    if not model:
        raise UsageError(f"--model: {config_file} records no model (provenance.model); name it with --model")
    if not config.device.startswith("cuda"):
        raise UsageError(f"CONFIG: {config_file} runs on `device: {config.device}`; check rehearses GPU configs")
    if request.here and planned and planned.gpu_name:
        cards = planned.gpu_count or 1
        gpu = planned.gpu_name if cards == 1 else f"{cards}x {planned.gpu_name}"
        request = replace(request, gpu=gpu)  # the card(s) it was planned for
    machine = hardware.probe_machine() if request.here else None
    target = request.target(machine)
    if target.device != "cuda":
        raise UsageError("--gpu: this machine has no GPU and the config names none; pass --gpu NAME or --vram SIZE")
    profile = planning_profile(model, request.workload)
    job, _recorded = recorded_job(request, profile, planned, "CONFIG")
    predicted = estimate(profile, job, config, target)
    # The allocator may reserve what the config was planned within; for a card it wasn't, the default budget.
    budget = planned.budget_bytes if planned and planned.budget_bytes and not request.gpu else default_budget(target)
    if not as_json:
        print(f"rehearsing {profile.model_id} ({job.label()}) on a virtual {target.name} ...", file=sys.stderr)
    rehearsal = _rehearse(profile, job, config, target, budget)
    if as_json:
        print_json(_as_dict(profile, job, target, config, rehearsal, predicted))
    else:
        _render(profile, job, target, config, rehearsal, predicted)
    if rehearsal.failure or rehearsal.out_of_memory:
        raise Exit(WOULD_FAIL_EXIT)
    if rehearsal.not_rehearsed:
        raise Exit(NOT_REHEARSED_EXIT)


def _rehearse(profile: Any, job: Any, config: Any, target: Any, budget: int) -> Any:
    from advisor.run.quiet import quiet_library_noise

    quiet_library_noise()  # before torch and diffusers are imported
    from advisor.rehearse.build import rehearse_planned

    return rehearse_planned(profile, job, config, target, budget)


def _verdict(rehearsal: Any) -> str:
    if rehearsal.failure:
        return f"WOULD FAIL on the card: {rehearsal.failure}"
    if rehearsal.not_rehearsed:
        return f"NOT REHEARSED (nothing is claimed about this config): {rehearsal.not_rehearsed}"
    if rehearsal.out_of_memory:
        return (
            f"WOULD RUN OUT OF MEMORY within the budget of {format_size(rehearsal.budget_bytes)}: "
            f"{rehearsal.out_of_memory}"
        )
    return "rehearsed: no op mixed devices or dtypes, and the caching allocator stays within the budget"


def _as_dict(profile, job, target, config, rehearsal, predicted) -> dict[str, Any]:
    estimated = {p.name: p for p in predicted.phases}
    replayed = rehearsal.allocator
    return {
        "model": profile.model_id,
        "workload": job.to_dict(),
        "hardware": target.to_dict(),
        "config": config.to_dict(exclude_none=False),
        "passed": rehearsal.passed,
        "failure": rehearsal.failure,
        "not_rehearsed": rehearsal.not_rehearsed,
        "out_of_memory": rehearsal.out_of_memory,
        "budget_bytes": rehearsal.budget_bytes,
        "needs_bytes": rehearsal.needs_bytes
        if rehearsal.failure is None and rehearsal.not_rehearsed is None
        else None,
        "estimated_peak_vram_bytes": predicted.peak_vram_bytes,
        "rehearsal_seconds": round(rehearsal.seconds, 2),
        "phases": {
            phase: {
                "device_bytes": rehearsal.phase_peaks.get(phase, {}).get("cuda:0", 0),
                "reserved_bytes": replayed.reserved.get(phase),
                # the rehearsal runs no cuDNN: the estimate's tensors, without the conv workspace
                "estimated_device_bytes": estimated[phase].tensor_bytes if phase in estimated else None,
                "estimated_reserved_bytes": estimated[phase].cached_peak_bytes if phase in estimated else None,
                "pinned_host_bytes": rehearsal.phase_peaks.get(phase, {}).get("cpu-pinned", 0),
                "pageable_host_bytes": rehearsal.phase_peaks.get(phase, {}).get("cpu", 0),
            }
            for phase in PHASES
            if phase in rehearsal.phase_peaks
        },
    }


def _render(profile, job, target, config, rehearsal, predicted) -> None:
    from rich.table import Table

    from advisor.render import stdout_console

    console = stdout_console()
    console.print(f"{profile.model_id}: {job.label()} on a virtual {target.name}", highlight=False)
    for assumption in (*target.assumptions, *job.assumptions):
        console.print(f"assumed {assumption}", highlight=False)
    console.print(f"config: {config.summary()}", highlight=False)
    estimated = {p.name: p for p in predicted.phases}
    replayed = rehearsal.allocator
    table = Table(
        title="Memory per phase: rehearsed (the real hooks, every allocation) and estimated", title_justify="left"
    )
    columns = (
        "phase",
        "GPU allocated",
        "GPU reserved",
        "estimated",
        "estimated reserved",
        "pinned RAM",
        "pageable RAM",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in PHASES:
        peaks = rehearsal.phase_peaks.get(phase)
        if peaks is None:
            continue
        guess = estimated.get(phase)
        reserved = replayed.reserved.get(phase)
        table.add_row(
            phase.replace("_", " "),
            format_size(peaks.get("cuda:0", 0)),
            format_size(reserved) if reserved is not None else "-",
            format_size(guess.tensor_bytes) if guess else "-",
            format_size(guess.cached_peak_bytes) if guess else "-",
            format_size(peaks.get("cpu-pinned", 0)),
            format_size(peaks.get("cpu", 0)),
        )
    console.print(table)
    console.print(
        "GPU allocated is torch.cuda.max_memory_allocated per phase; GPU reserved is max_memory_reserved, from "
        "the rehearsal's allocations replayed through a model of PyTorch's caching allocator; host RAM counts "
        "the weights and copies the process holds.",
        highlight=False,
    )
    if rehearsal.failure is None and rehearsal.not_rehearsed is None:
        console.print(
            f"the run needs {format_size(rehearsal.needs_bytes)} of the card (the least the caching allocator "
            f"completes it in, giving cached blocks back when full); the estimate plans {format_size(predicted.peak_vram_bytes)}",
            highlight=False,
        )
    # One line however long: it names the module and every tensor, and scripts grep it.
    console.print(f"{_verdict(rehearsal)} ({rehearsal.seconds:.1f}s)", highlight=False, soft_wrap=True)
