"""Refuse, before anything loads, what a config can't do: on any machine, on this one, or with this pipeline.

What can run where is `advisor.constraints`; this module asks it (for any machine, then for this
one as torch sees it) and adds what only the installed torch and diffusers can answer (dynamo
options, compile backends, attention backends) and what only a pipeline can (its components).
Every problem is a `ConfigError` naming the key; mismatches that still run are `ConfigWarning`s.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from advisor.constraints import Platform, first_violation, platform_here
from advisor.errors import ConfigError, ConfigWarning
from advisor.levers import LEVERS
from advisor.run.classes import Components


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig


def check_config(config: OptimizationConfig) -> None:
    """Checks that need the installed libraries but neither a pipeline nor a GPU; raises ConfigError."""
    import torch
    import torch._dynamo

    # On a machine that has everything, with the GPU the script may yet run on: only combinations
    # that no machine can run are refused here.
    violation = first_violation(config.replace(device="cuda"), Platform.anywhere())
    if violation is not None:
        raise ConfigError(violation.message)
    if config.compile is not None:
        for option in config.compile.dynamo_config:
            if not hasattr(torch._dynamo.config, option):
                raise ConfigError(f"`compile.dynamo_config.{option}`: torch._dynamo.config has no option {option!r}")
        backends = torch._dynamo.list_backends(exclude_tags=())
        if config.compile.backend not in backends:
            raise ConfigError(
                f"`compile.backend: {config.compile.backend}` is not a torch.compile backend here; "
                f"use one of {', '.join(sorted(backends))}"
            )
    if config.attention_backend is not None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        names = sorted(member.value for member in AttentionBackendName)
        if config.attention_backend.lower() not in names:
            raise ConfigError(
                f"`attention_backend: {config.attention_backend}` is unknown; use one of {', '.join(names)}"
            )


def _device(config: OptimizationConfig) -> Any:
    import torch

    try:
        return torch.device(config.device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"`device: {config.device}` is not a torch device; use e.g. `cuda`, `cuda:1` or `cpu`"
        ) from None


def check_machine(config: OptimizationConfig) -> None:
    """Refuse, before anything loads, what this machine cannot run; each message names the key and the way out."""
    import torch

    check_config(config)
    device = _device(config)
    violation = first_violation(config, platform_here(config.device))
    if violation is not None:
        raise ConfigError(violation.message)
    if device.type not in ("cuda", "cpu"):
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ConfigError(f"`device: {config.device}` is not available on this machine; use `device: cpu`")
    if config.attention_backend is not None:
        try:
            from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

            _check_attention_backend_requirements(AttentionBackendName(config.attention_backend.lower()))
        except ImportError:
            pass
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"`attention_backend: {config.attention_backend}`: {exc}") from None


def check_components(config: OptimizationConfig, components: Components, what: str) -> None:
    """Every component the config names exists in the pipeline and is a model."""
    if not components.known:
        return
    models = components.modules()
    for key, name in config.named_components():
        if name not in components.names():
            raise ConfigError(
                f"`{key}` names {name!r}, which {what} does not have; its components are {', '.join(sorted(models))}"
            )
        if name not in models:
            raise ConfigError(
                f"`{key}` names {name!r}, a {components.class_name(name)} rather than a model; "
                f"the models of {what} are {', '.join(sorted(models))}"
            )


def _same_card(planned: str, actual: str, total_memory: int) -> bool:
    """Whether the card a config was planned for (its datasheet name, `--gpu RTX 4090`) is this one
    (NVML's name, 'NVIDIA GeForce RTX 4090', and its memory for the variant)."""
    if planned == actual:
        return True
    from advisor.probe.gpus import lookup_gpu

    here, there = lookup_gpu(actual, memory_gib=total_memory / 2**30), lookup_gpu(planned)
    return here is not None and there is not None and here[0] == there[0]


def gpu_warnings(config: OptimizationConfig, gpu_name: str, total_memory: int) -> None:
    p = config.provenance
    if p.budget_bytes is not None and p.budget_bytes > total_memory:
        warnings.warn(
            f"`provenance.budget_bytes` ({p.budget_bytes}) is more than this GPU's {total_memory} bytes ({gpu_name}); "
            "the config was made for a bigger GPU and may run out of memory here",
            ConfigWarning,
            stacklevel=3,
        )
    if p.gpu_name is not None and not _same_card(p.gpu_name, gpu_name, total_memory):
        warnings.warn(
            f"`provenance.gpu_name` is {p.gpu_name!r} but this GPU is {gpu_name!r}; re-run `advisor tune` for this GPU",
            ConfigWarning,
            stacklevel=3,
        )


def check_pipeline(pipe: Any, config: OptimizationConfig) -> None:
    """Checks against a loaded pipeline: ConfigError for missing components, warnings for mismatches."""
    import torch

    components = Components.of_pipe(pipe)
    what = type(pipe).__name__
    check_components(config, components, f"this {what}")
    expected = config.provenance.pipeline_class
    if expected is not None and expected != what:
        warnings.warn(
            f"`provenance.pipeline_class` is {expected} but the pipeline is a {what}; the config was made for another model",
            ConfigWarning,
            stacklevel=3,
        )
    for lever in LEVERS:
        problem = lever.pipeline_problem(config, pipe, components)
        if problem is not None:
            raise ConfigError(problem)
    for name, count in (config.offload.resident_blocks or {}).items():
        lists = [
            child
            for child in pipe.components[name].children()
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
        ]
        blocks = sum(len(child) for child in lists)
        if count >= blocks:
            have = (
                f"has {blocks} repeated blocks"
                if lists
                else "has no top-level block list (ModuleList) to offload in part"
            )
            keep = (
                f"give fewer than {blocks}, or `offload.strategy: none` to keep it all"
                if lists
                else "use plain group offload"
            )
            raise ConfigError(
                f"`offload.resident_blocks.{name}: {count}`: {name} ({components.class_name(name)}) {have}; {keep}"
            )
    if config.quantization is not None:
        plain = [
            name
            for name in config.quantization.components
            if getattr(pipe.components[name], "hf_quantizer", None) is None
        ]
        if plain:
            warnings.warn(
                f"`quantization.components` {plain} are not quantized in this pipeline: load it with "
                "`**advisor.pipeline_kwargs(config)` or `advisor.load_pipeline`",
                ConfigWarning,
                stacklevel=3,
            )
    device = _device(config)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        gpu_warnings(config, props.name, props.total_memory)
