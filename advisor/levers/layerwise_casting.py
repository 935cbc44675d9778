"""The layerwise casting lever: weights stored in fp8, each layer upcast to the compute dtype as it runs (config section ``layerwise_casting``).

diffusers' memory guide, "Layerwise casting": ``model.enable_layerwise_casting(storage_dtype,
compute_dtype)`` for a diffusers model, ``diffusers.hooks.apply_layerwise_casting`` for a text
encoder. It hooks every Linear, Conv and Embedding layer but those whose names match the skip
patterns: diffusers' defaults (``DEFAULT_SKIP_MODULES_PATTERN``: embeddings of positions and
patches, norms, the first and last projections) and the model's own; a text encoder also keeps its
embeddings (`ENCODER_CASTING_SKIP_PATTERNS`). The weight bytes it saves follow from those patterns
(`casting_skipped`: the profile counts the parameters they keep, `advisor.probe.weights`).

It is one of the storage choices of the search space, beside quantization (`advisor.plan.space`):
the planner picks one or the other per candidate. It changes the output a little (lossy).

Pure Python at import: torch and diffusers only inside a step's ``run`` and `pipeline_problem`.
"""

from __future__ import annotations

import re
from typing import Any

from advisor.config import OptimizationConfig
from advisor.levers.base import Lever, Pick
from advisor.levers.code import Step, dtype_expr, function_step, method_step
from advisor.levers.quantization import storage_reason


DOCS = "https://huggingface.co/docs/diffusers/main/en/optimization/memory#layerwise-casting"

# diffusers' ``DEFAULT_SKIP_MODULES_PATTERN`` (``diffusers/hooks/layerwise_casting.py``), checked
# against the installed diffusers by tests/test_emit.py.
DEFAULT_CASTING_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
# Text encoders (transformers models) also keep their embeddings at the compute dtype: transformers
# reports a model's dtype from its first weight (the token embedding), and pipelines cast the prompt
# embeddings to it, so an fp8 embedding would feed fp8 inputs to the denoiser. And their output head
# (`lm_head`): a causal LM may tie it to the token embedding (Qwen3-4B, FLUX.2 [klein]'s encoder:
# tie_word_embeddings), and casting the head would cast the shared weight the embedding reads
# unhooked (rehearsed and run: "mm mixes bfloat16 and float8_e4m3fn"); the pipelines read hidden
# states, never its logits.
ENCODER_CASTING_SKIP_PATTERNS = ("embed", "shared", "lm_head")


def casting_skipped(module: str, patterns: tuple[str, ...]) -> bool:
    # Like diffusers: a module is skipped when it, or any module above it, matches a pattern.
    parts = module.split(".")
    return any(re.search(p, ".".join(parts[:i])) for i in range(1, len(parts) + 1) for p in patterns)


def encoder_casting_skips(keep_in_fp32: tuple[str, ...]) -> tuple[str, ...]:
    """Modules a text encoder keeps at the compute dtype under layerwise casting: diffusers' defaults,
    the embeddings and its own fp32 modules."""
    return tuple(dict.fromkeys((*DEFAULT_CASTING_SKIP_PATTERNS, *ENCODER_CASTING_SKIP_PATTERNS, *keep_in_fp32)))


def casting_skips(cls: type | None) -> tuple[str, ...]:
    """`encoder_casting_skips` of a text encoder class (its ``_keep_in_fp32_modules``)."""
    return encoder_casting_skips(tuple(getattr(cls, "_keep_in_fp32_modules", None) or ()) if cls is not None else ())


def casts(config: OptimizationConfig, name: str) -> bool:
    """Whether component `name` is stored in fp8."""
    return config.layerwise_casting is not None and name in config.layerwise_casting.components


def _first_weight_cast(module: Any, patterns: tuple[str, ...]) -> str | None:
    """The name of `module`'s first floating-point weight if layerwise casting with `patterns` would cast it."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    modules = dict(module.named_modules())
    for name, param in module.named_parameters():
        if not param.is_floating_point():
            continue
        owner = name.rpartition(".")[0]
        if (owner and casting_skipped(owner, patterns)) or not isinstance(
            modules[owner], _GO_LC_SUPPORTED_PYTORCH_LAYERS
        ):
            return None
        return name
    return None


class LayerwiseCastingLever(Lever):
    """fp8 storage of the named components (config section ``layerwise_casting``)."""

    name = key = "layerwise_casting"
    order = 10  # before channels_last (20) and placement (30): it rewrites the weights in place
    # Not one of the optional dimensions: a storage choice of the space, beside quantization.
    searched = False

    def lossy(self, config: OptimizationConfig) -> bool:
        return config.layerwise_casting is not None

    def quality_cost(self, config: OptimizationConfig) -> tuple[str, str] | None:
        if config.layerwise_casting is None:
            return None
        return "weights stored in fp8, computed in bf16: near-identical images", DOCS

    def stored_bytes(self, config: OptimizationConfig, component: Any, compute_bytes: int, k: dict) -> float | None:
        if not casts(config, component.name):
            return None
        skipped = component.casting_skipped_parameters  # kept at the compute dtype (`casting_skips`)
        return (component.parameters - skipped) * k["fp8_storage_bytes_per_weight"] + skipped * compute_bytes

    def per_call_written_bytes(self, config: OptimizationConfig, component: Any, compute_bytes: int, k: dict) -> float:
        """Every hooked layer's weights upcast to the compute dtype before it runs and cast back to
        the storage dtype after (diffusers/hooks/layerwise_casting.py: ``pre_forward`` and
        ``post_forward`` each call ``module.to(dtype=...)``, a new tensor each way): memory
        traffic, not FLOPs."""
        if not casts(config, component.name):
            return 0.0
        hooked = component.parameters - component.casting_skipped_parameters
        return hooked * (k["fp8_storage_bytes_per_weight"] + compute_bytes)

    def per_call_host_seconds(self, config: OptimizationConfig, component: Any, k: dict) -> float:
        """Two ``Module.to`` calls per hooked layer (`layerwise_casting_hook_host_s`), counted in
        full: the estimate doesn't model the eager host time they could hide behind, and small
        models (SDXL's UNet) are host-bound under these hooks."""
        return component.cast_layers * k["layerwise_casting_hook_host_s"] if casts(config, component.name) else 0.0

    def memory_reasons(self, pick: Pick) -> list[str]:
        casting = pick.config.layerwise_casting
        return [] if casting is None else [storage_reason(pick, f"fp8 storage({', '.join(casting.components)})", self)]

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        if config.layerwise_casting is None:
            return []
        storage = config.layerwise_casting.storage_dtype
        kwargs = {"storage_dtype": dtype_expr(storage), "compute_dtype": dtype_expr(config.dtype)}
        steps = []
        for name in config.layerwise_casting.components:
            description = f"store {name} weights in {storage}, compute in {config.dtype}"
            if components.is_diffusers_model(name):
                steps.append(method_step(self.key, description, name, "enable_layerwise_casting", (), kwargs))
            else:
                skip = {**kwargs, "skip_modules_pattern": encoder_casting_skips(components.keep_in_fp32(name))}
                steps.append(
                    function_step(self.key, description, "diffusers.hooks", "apply_layerwise_casting", name, skip)
                )
        return steps

    def pipeline_problem(self, config: OptimizationConfig, pipe: Any, components: Any) -> str | None:
        """A text encoder whose first weight would be cast: transformers would report its dtype as fp8."""
        if config.layerwise_casting is None:
            return None
        for name in config.layerwise_casting.components:
            if components.is_diffusers_model(name):
                continue
            first = _first_weight_cast(pipe.components[name], casting_skips(components.cls(name)))
            if first is not None:
                return (
                    f"`layerwise_casting.components` cannot include {name!r} ({components.class_name(name)}): its first "
                    f"weight {first!r} would be stored in fp8, so {name}.dtype would read fp8 and the pipeline would "
                    f"cast prompt embeddings to it; remove {name!r}"
                )
        return None


LAYERWISE_CASTING = LayerwiseCastingLever()
