"""Every call from the GPU kit into the `advisor` package, and every rule the kit decides itself.

When the package's internal API changes, this module is the only one of the kit to adapt: the rest
imports nothing from `advisor` and gets plain dicts back, or config objects it passes through. What
is GPU-only is not decided here: `advisor.constraints` says it, as it does for the planner.

Imports stay inside the functions: the kit loads this module before its packages are installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


# --- what a CPU can't run (for the dry run's CPU equivalents): asked of advisor.constraints --------


def _refused_on_a_cpu(config: Any, constraint: str) -> bool:
    from advisor.constraints import Platform, named

    cpu_only = Platform(accelerator=None, compute_capability=None, packages=None, cuda_devices=0, no_cuda="a CPU")
    return named(constraint).check(config, cpu_only) is not None


def bitsandbytes_needs_cuda(config: Any) -> bool:
    return _refused_on_a_cpu(config, "bitsandbytes-needs-cuda")


def offload_needs_cuda(config: Any) -> bool:
    return _refused_on_a_cpu(config, "cpu-offload-needs-cuda")


def streams_need_cuda(config: Any) -> bool:
    return _refused_on_a_cpu(config, "streams-need-cuda")


# The rule the dry run overrides: it measures offloading on a CPU to exercise the plumbing.
CPU_OFFLOAD_RULE = "offload-needs-an-accelerator"


# --- configs -----------------------------------------------------------------------------------------


def on_a_gpu(device: str) -> str:
    """The device of the GPU configs the kit measures (`cpu_equivalent` maps the dry run's to the CPU)."""
    return device if device.startswith("cuda") else "cuda"


def seed_configs(device: str, dtype: str) -> list[tuple[str, str, Any]]:
    """The seed page's three combinations: nf4 transformer + T5; + compile; + compile + model offload."""
    from advisor.config import Compile, Offload, OptimizationConfig, Quantization

    nf4 = Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"])
    base = OptimizationConfig(dtype=dtype, device=on_a_gpu(device), quantization=nf4)
    compiled = base.replace(compile=Compile(components=["transformer"]))
    offloaded = compiled.replace(offload=Offload(strategy="model"))
    return [
        ("quantization", "nf4 (transformer, T5)", base),
        ("quantization+compile", "nf4 + torch.compile (regional)", compiled),
        ("quantization+compile+model-offload", "nf4 + compile + model CPU offload", offloaded),
    ]


def offload_configs(device: str, dtype: str, blocks: int = 0) -> list[tuple[str, str, Any]]:
    """bf16 without offload (the compute baseline), group offload of the transformer in four forms,
    partial offload keeping a third and two thirds of its `blocks` resident, sequential."""
    from advisor.config import Offload, OptimizationConfig

    base = OptimizationConfig(dtype=dtype, device=on_a_gpu(device))
    group = dict(strategy="group", components=["transformer"])
    stream = dict(use_stream=True, record_stream=True)
    return (
        [
            ("none", "bf16, no offload (baseline)", base),
            ("group-block", "group offload, block level", base.replace(offload=Offload(**group))),
            (
                "group-block-stream",
                "group offload, block level, stream",
                base.replace(offload=Offload(**group, **stream)),
            ),
            (
                "group-leaf",
                "group offload, leaf level",
                base.replace(offload=Offload(**group, offload_type="leaf_level")),
            ),
            (
                "group-leaf-stream",
                "group offload, leaf level, stream",
                base.replace(offload=Offload(**group, offload_type="leaf_level", **stream)),
            ),
        ]
        + [
            (
                f"partial-{k}of3",
                f"partial offload, {max(1, blocks * k // 3)} of {blocks} blocks resident",
                base.replace(offload=Offload(**group, resident_blocks={"transformer": max(1, blocks * k // 3)})),
            )
            for k in (1, 2)
            if blocks >= 3
        ]
        + [
            (
                "sequential",
                "sequential CPU offload (every component)",
                base.replace(offload=Offload(strategy="sequential")),
            ),
        ]
    )


def attention_configs(device: str, dtype: str) -> list[tuple[str, str, Any]]:
    """bf16 with native attention, then each kernel that runs on this machine and is published at
    least as fast (`advisor.levers.attention`); on a CPU (the dry run) the unfused math kernel stands in."""
    from advisor.config import OptimizationConfig
    from advisor.constraints import first_violation, platform_here
    from advisor.levers.attention import BACKENDS

    platform = platform_here(device)
    base = OptimizationConfig(dtype=dtype, device=device)
    names = [
        name
        for name, backend in BACKENDS.items()
        if name != "native"
        and backend.speedup_at(platform.capability) >= 1.0
        and first_violation(base.replace(attention_backend=name), platform) is None
    ]
    if device == "cpu":
        names = ["_native_math"]
    return [("native", "bf16, native attention (torch SDPA)", base)] + [
        (name, f"bf16, {name} attention ({BACKENDS[name].kernel})", base.replace(attention_backend=name))
        for name in names
    ]


def cpu_equivalent(config: Any, *, torchao: bool) -> tuple[Any, list[str]]:
    """A CPU-valid stand-in for a GPU config, and a note per change (for --dry-run)."""
    from advisor.config import Offload, Quantization

    notes, update = [], {}
    if config.device != "cpu":
        update["device"] = "cpu"
    if config.dtype != "float32":
        update["dtype"] = "float32"
        notes.append(f"dtype {config.dtype} -> float32 (CPU)")
    q = config.quantization
    if bitsandbytes_needs_cuda(config):
        if torchao:
            update["quantization"] = Quantization(
                backend="torchao", components=q.components, scheme="int8_weight_only"
            )
            notes.append(f"{q.label()} -> torchao int8 weight-only (bitsandbytes needs CUDA)")
        else:
            update["quantization"] = None
            notes.append(f"{q.label()} dropped (bitsandbytes needs CUDA; torchao is not installed)")
    offload = config.offload
    if offload.strategy != "none":
        # On a CPU nothing moves whatever the offload form, so one form stands for all: block level,
        # or leaf level where a compiled torchao model rules block level out (no streams on a CPU).
        quantization = update.get("quantization", config.quantization)
        torchao_compiled = (
            quantization is not None and quantization.backend == "torchao" and config.compile is not None
        )
        level = "leaf_level" if torchao_compiled else "block_level"
        cpu_form = Offload(strategy="group", offload_type=level, components=offload.components or ["transformer"])
        if offload_needs_cuda(config):
            notes.append(
                f"{offload.strategy} offload -> {level.replace('_', '-')} group offload of the transformer "
                f"({offload.strategy} offload needs CUDA)"
            )
        elif streams_need_cuda(config) or offload.offload_type != level:
            notes.append(f"{offload.label()} -> {cpu_form.label()} (a CPU moves nothing; no CUDA streams)")
        if cpu_form != offload:
            update["offload"] = cpu_form
    if config.compile is not None and config.compile.backend == "inductor":
        update["compile"] = config.compile.replace(backend="eager")
        notes.append("compile backend inductor -> eager (inductor needs ~45 s per model on 2 CPU cores)")
    return config.replace(**update), notes


def config_from_dict(data: dict[str, Any]) -> Any:
    from advisor.config import OptimizationConfig

    return OptimizationConfig.from_dict(data)


def config_key(config: Any) -> str:
    """Identity of a config for reuse: everything but provenance."""
    return json.dumps(_without_provenance(config), sort_keys=True)


def config_record(config: Any) -> tuple[str, dict[str, Any]]:
    """The one-line summary of `config` (every lever's part) and its JSON form (without provenance)."""
    from advisor.run.steps import summary

    return summary(config), _without_provenance(config)


def _without_provenance(config: Any) -> dict[str, Any]:
    return {key: value for key, value in config.to_dict().items() if key != "provenance"}


# --- the machine, the model, the workload -----------------------------------------------------------


def catalog_entry(name: str = "black-forest-labs/FLUX.1-dev") -> dict[str, Any]:
    """The catalog's JSON entry for `name` (component classes, configs, parameter counts)."""
    from advisor.probe.layout import catalog_index

    return json.loads(catalog_index()[name.lower()].read_text())


def offline_tokenizer(model_max_length: int) -> Any:
    from advisor.testing import offline_tokenizer as tokenizer

    return tokenizer(model_max_length=model_max_length)


def build_tiny_flux(folder: Path) -> Path:
    """The dry run's pipeline: the tiny Flux at scale 2 (8 transformer blocks, enough for partial offload)."""
    from advisor.testing import build_tiny_flux as build

    return Path(build(folder, scale=2))


def calibrate(seconds: float) -> dict[str, Any]:
    from advisor.probe.calibrate import calibrate as run

    return run(seconds=seconds)


def probe_machine() -> Any:
    from advisor.probe.hardware import probe_machine as probe

    return probe()


def has_gpu(machine: Any) -> bool:
    return bool(machine.gpus)


def installed_packages(machine: Any) -> dict[str, str | None]:
    """The probe's package versions; planning leaves out a package set to None here."""
    return machine.software.packages


def target_from_probe(machine: Any) -> Any:
    from advisor.probe.target import target_from_probe as target

    return target(machine)


def target_record(target: Any) -> dict[str, Any]:
    """The planning target as plain data (``name``, ``source``, ``device``, ``h2d_bytes_per_s``, ...)."""
    return target.to_dict()


def profile_from_folder(folder: Path, model_id: str) -> Any:
    from advisor.probe.models import profile_from_folder as profile

    return profile(folder, model_id=model_id)


def full_size_profile() -> Any:
    """The catalog profile of the real FLUX.1-dev, which the budgets are meant for."""
    from advisor.probe.models import load_profile

    return load_profile("black-forest-labs/FLUX.1-dev")


def make_workload(profile: Any, **overrides: Any) -> Any:
    from advisor.probe.workload import make_workload as workload

    return workload(profile, **overrides)


def describe(profile: Any, workload: Any) -> dict[str, Any]:
    """The model and workload as the results record them."""
    return {
        "model_id": profile.model_id,
        "parameters": {c.name: c.parameters for c in profile.components},
        "workload": workload.to_dict(),
        "workload_label": workload.label(),
    }


# --- planning ----------------------------------------------------------------------------------------


def planning_context(profile: Any, workload: Any, target: Any, packages: dict[str, str | None]) -> Any:
    """What the rules look at (a scenario); the budget is left open (the kit's items choose their own)."""
    from advisor.plan.scenario import make_scenario

    return make_scenario(profile, workload, target, packages=packages, budget_bytes=1 << 62)


def finish(config: Any, scenario: Any, *, measure_cpu_offload: bool = False) -> tuple[Any, str | None]:
    """`config` completed by the adjust rules, and the first constraint or filter rejecting it (None if none).

    ``measure_cpu_offload`` lets offloading through on a CPU, for the dry run's plumbing check.
    """
    from advisor.plan.space import finish as complete
    from advisor.plan.space import rejection

    finished = complete(config, scenario)[0]
    rejected = rejection(finished, scenario)
    if rejected == CPU_OFFLOAD_RULE and measure_cpu_offload:
        rejected = None
    return finished, rejected


def default_budget(target: Any) -> int:
    from advisor.plan.scenario import default_budget as budget

    return budget(target)


def estimate_record(profile: Any, workload: Any, config: Any, target: Any) -> dict[str, Any]:
    """The estimate for `config` as plain data; ``peak_bytes`` is the peak that a budget limits,
    ``phase_device_bytes`` the device bytes of each phase (text_encoding, denoising, vae_decode)."""
    from advisor.levers.offload import block_split
    from advisor.plan.estimate import estimate
    from advisor.plan.weights import weight_bytes

    est = estimate(profile, workload, config, target)
    transformer = next(c for c in profile.components if c.name == "transformer")
    _, streamed = block_split(transformer, config)  # every block unless partial offload keeps some
    per_parameter = weight_bytes(transformer, config) / transformer.parameters
    return {
        "peak_bytes": est.limited_peak(target.device),
        "peak_vram_bytes": est.peak_vram_bytes,
        "peak_ram_bytes": est.peak_ram_bytes,
        "peak_phase": est.peak_phase,
        "phase_device_bytes": {phase.name: phase.device_bytes for phase in est.phases},
        "latency_s": est.latency_s,
        "step_latency_s": est.step_latency_s,
        # per call, whatever the steps: text encoding, VAE decode
        "fixed_s": max(est.latency_s - est.step_latency_s * workload.steps, 0.0),
        "latency_breakdown": est.latency_breakdown,
        "weight_bytes": est.weight_bytes,
        "streamed_block_bytes": int(sum(streamed) * per_parameter),  # what group offload moves per transformer call
    }


def measure(
    folder: Path,
    config: Any,
    workload: Any,
    target: Any,
    *,
    timeout_s: float,
    step_points: tuple[int, ...],
    repeats: int,
    max_rounds: int,
    output_path: Path | None = None,
) -> tuple[dict[str, Any], int | None]:
    """Measure `config` in its own process: the measurement as a dict, and the peak a budget limits
    (with `output_path`, its output at the workload's steps is saved there for `compare_outputs`)."""
    from advisor.run.measure import measure as run

    m = run(
        folder,
        config,
        workload,
        timeout_s=timeout_s,
        step_points=step_points,
        min_rounds=repeats,
        max_rounds=max_rounds,
        output_path=output_path,
    )
    return m.to_dict(), m.limited_peak(target.device)


def compare_outputs(output: Path, reference: Path) -> dict[str, Any] | None:
    """PSNR and SSIM of a saved output against the reference's (`advisor.run.quality`), if both exist."""
    import numpy as np

    from advisor.run.quality import compare

    return compare(np.load(output), np.load(reference)) if output.exists() and reference.exists() else None


def cache_configs(device: str, dtype: str, steps: int) -> list[tuple[str, str, Any]]:
    """The step caches the space offers for Flux under --quality fast (`advisor.levers.step_cache`), on
    bf16 without offload: First Block Cache at its two thresholds, MagCache over the workload's
    `steps`, TaylorSeer lite."""
    from types import SimpleNamespace

    from advisor.config import OptimizationConfig
    from advisor.levers import lever_named
    from advisor.levers.step_cache import PUBLISHED_BASELINE_S, PUBLISHED_S
    from advisor.probe.models import load_profile

    def label(choice: str, cache: Any) -> str:
        if cache.kind == "first_block":
            return f"bf16, First Block Cache {cache.threshold:g} (ParaAttention, L20: {PUBLISHED_BASELINE_S / PUBLISHED_S[cache.threshold]:.2f}x)"
        return f"bf16, {cache.label()}"

    flux = SimpleNamespace(profile=load_profile("flux-dev"), quality="fast", workload=SimpleNamespace(steps=steps))
    caches = [
        (choice, cache) for choice, cache in lever_named("cache").choices(flux, dtype).items() if cache is not None
    ]
    return [
        (choice, label(choice, cache), OptimizationConfig(dtype=dtype, device=device, cache=cache))
        for choice, cache in caches
    ]


def recommend(profile: Any, workload: Any, target: Any, *, machine: Any, budget_bytes: int) -> dict[str, Any]:
    """`advisor recommend` for this machine: the pick (a config, or None), and why."""
    from advisor.plan.recommend import recommend as run
    from advisor.plan.scenario import make_scenario

    scenario = make_scenario(profile, workload, target, packages=machine.software.packages, budget_bytes=budget_bytes)
    result = run(scenario)
    smallest = result.smallest
    return {
        "config": result.config,
        "reasons": result.reasons,
        "alternatives": [a.config.summary() for a in result.alternatives],
        "candidates": result.candidates,
        "smallest": smallest.config.summary() if smallest else None,
    }


TRIAL_FIELDS = (
    "number",
    "summary",
    "status",
    "source",
    "feasible",
    "latency_s",
    "latency_spread_s",
    "noisy",
    "peak_bytes",
    "predicted_peak_bytes",
    "reason",
    "config",
)


def tune(
    folder: Path,
    profile: Any,
    workload: Any,
    target: Any,
    *,
    budget_bytes: int,
    packages: dict[str, str | None],
    storage: str,
    study: str,
    trials: int,
    timeout_s: float,
    step_points: tuple[int, ...],
    repeats: int,
    max_rounds: int,
    compile_choices: tuple[bool, ...],
    on_trial: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """`advisor tune`: run the study; its trials as dicts (each with ``config``) and the best one."""
    from advisor.plan.scenario import make_scenario
    from advisor.run.tune import TuneSettings, run_study

    # No confirmation runs of the finalists: the kit's minutes go to more configurations.
    settings = TuneSettings(
        trials=trials,
        timeout_s=timeout_s,
        step_points=step_points,
        repeats=repeats,
        max_rounds=max_rounds,
        compile_choices=compile_choices,
        confirm_runs=0,
        min_psnr_db=0,
    )  # minutes for configurations, not repeats
    record = lambda trial: {k: getattr(trial, k) for k in TRIAL_FIELDS}  # noqa: E731
    scenario = make_scenario(profile, workload, target, packages=packages, budget_bytes=budget_bytes)
    result = run_study(
        str(folder),
        scenario,
        storage=storage,
        study=study,
        settings=settings,
        on_trial=lambda r: on_trial(record(r.trials[-1])) if r.trials else None,
    )
    best = None
    if result.best is not None:
        best = {
            **record(result.best),
            "config": config_from_dict(result.best.config),
            "measurement": result.best.measurement,
        }
    return {
        "study": result.study,
        "space_size": result.space_size,
        "trials": [record(t) for t in result.trials],
        "advice": result.advice,
        "best": best,
    }
