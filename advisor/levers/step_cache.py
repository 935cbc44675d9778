"""The step cache lever: diffusers' step caches, what each needs, saves, holds and costs, and how to apply it.

Three caches skip whole blocks, so their saving is a share of the denoiser's work:

- First Block Cache (below): the share depends on the prompt; modelled on ParaAttention's
  published measurements.
- MagCache (``MagCacheConfig``, ``diffusers/hooks/mag_cache.py``): after the first
  ``retention_ratio`` of the steps, a step is skipped (every block returns its input plus the last
  residual) while the product of the model's calibrated magnitude ratios has drifted by less than
  ``threshold`` in total, at most ``max_skip_steps`` in a row. The ratios decide, not the data, so
  the computed steps follow from the ratios exactly (`mag_computed_steps`). diffusers ships ratios
  for Flux only (``FLUX_MAG_RATIOS``, from MagCache's authors); another model needs a calibration
  run first, so the advisor offers it for Flux only.
- TaylorSeer, lite mode (``TaylorSeerCacheConfig(use_lite_mode=True)``,
  ``diffusers/hooks/taylorseer_cache.py``): after ``warmup_steps`` it computes every
  ``interval``-th step and predicts the denoiser's output on the others by a Taylor expansion of
  the computed ones; the blocks are skipped on predicted steps. Its schedule is fixed too
  (`taylorseer_computed_steps`). (The default mode predicts only attention outputs, needs ~3 GB
  of Flux 1024x1024 state, and hooks nothing on Wan, whose attention is named attn1/attn2.)

Not offered: Pyramid Attention Broadcast and FasterCache (``diffusers/hooks/pyramid_attention_broadcast.py``,
``faster_cache.py``). They reuse attention outputs only (the MLPs run every step), keep one step
counter for the conditional and unconditional calls (with classifier-free guidance run as two
calls, as Wan and HunyuanVideo do, the unconditional call gets the conditional attention),
recompile the denoiser at every step under torch.compile (a guard on the step counter, up to
dynamo's recompile limit), and FasterCache fails on its first step on pipelines that run guidance
as a second call unless told the model is guidance-distilled. Their published numbers (diffusers
PR 9562) are for Latte and CogVideoX only.

First Block Cache (``transformer.enable_cache(FirstBlockCacheConfig(threshold))``, from
ParaAttention; ``diffusers/hooks/first_block_cache.py``) runs the first transformer block at every
step and skips the others when the first block's residual changed by less than ``threshold``
(relative mean absolute difference) since the last full step, reusing the cached residual of the
rest. It changes the output: it is lossy, offered only under ``--quality fast``, and `tune` measures
how far its output drifts from the lossless reference.

It hooks the blocks of the model's top-level block lists whose names diffusers knows
(``_ALL_TRANSFORMER_BLOCK_IDENTIFIERS``) and whose classes it has registered (their return
signature, ``TransformerBlockRegistry``): both are copied here from diffusers 0.42.1 and checked
against the installed package by tests/test_caching.py. Pure Python at import: torch and
diffusers only inside the apply step.
"""

from __future__ import annotations

from typing import Any

from advisor.config import CACHE_SETTINGS, Cache, OptimizationConfig
from advisor.levers.base import ActivationShape, Filter, Lever, Pick, StepContext
from advisor.levers.code import Expr, Step, call_source


SOURCE = "https://huggingface.co/docs/diffusers/main/en/optimization/para_attn"

# ParaAttention's measurements (diffusers docs), NVIDIA L20, FLUX.1-dev 1024x1024, 28 steps:
# the generation's latency without a cache and with First Block Cache at each threshold.
PUBLISHED_BASELINE_S = 26.36
PUBLISHED_S = {0.06: 21.83, 0.08: 17.01, 0.10: 16.00, 0.12: 13.78}
THRESHOLDS = (0.08, 0.12)  # what the space offers: a mild (1.55x) and a strong (1.91x) setting

# The block lists First Block Cache hooks, and the block classes it can hook (diffusers 0.42.1).
BLOCK_LISTS = frozenset(
    {
        "blocks",
        "layers",
        "single_transformer_blocks",
        "temporal_transformer_blocks",
        "transformer_blocks",
        "visual_transformer_blocks",
    }
)
REGISTERED_BLOCKS = frozenset(
    {
        "BasicTransformerBlock",
        "BriaTransformerBlock",
        "CogVideoXBlock",
        "CogView4TransformerBlock",
        "Cosmos3VLTextMoTDecoderLayer",
        "Flux2SingleTransformerBlock",
        "Flux2TransformerBlock",
        "FluxSingleTransformerBlock",
        "FluxTransformerBlock",
        "HunyuanImageSingleTransformerBlock",
        "HunyuanImageTransformerBlock",
        "HunyuanVideoSingleTransformerBlock",
        "HunyuanVideoTokenReplaceSingleTransformerBlock",
        "HunyuanVideoTokenReplaceTransformerBlock",
        "HunyuanVideoTransformerBlock",
        "JointTransformerBlock",
        "Kandinsky5TransformerDecoderBlock",
        "LTXVideoTransformerBlock",
        "MochiTransformerBlock",
        "MotifVideoSingleTransformerBlock",
        "MotifVideoTransformerBlock",
        "QwenImageTransformerBlock",
        "WanTransformerBlock",
        "ZImageTransformerBlock",
    }
)


def computed_share(threshold: float) -> float:
    """The share of the denoiser's work that still runs at `threshold`: the published latency over
    the baseline's (the text encoders and the VAE decode, a few percent of Flux's 26 s, are counted
    as denoising, so the share errs high: the saving is not overstated). Linear between the
    published thresholds, from no saving at 0; above the last, the last one's share."""
    points = [(0.0, 1.0)] + [(t, s / PUBLISHED_BASELINE_S) for t, s in sorted(PUBLISHED_S.items())]
    for (t0, s0), (t1, s1) in zip(points, points[1:]):
        if threshold <= t1:
            return s0 + (s1 - s0) * (max(threshold, t0) - t0) / (t1 - t0)
    return points[-1][1]


def cacheable(block_lists: list[str], block_classes: list[str], model_class: str | None = None) -> str | None:
    """Why diffusers' caches can't hook a denoiser of class `model_class` whose top-level block
    lists are `block_lists` and whose blocks are of `block_classes`, or None."""
    if model_class is not None and model_class not in CACHE_MODELS:
        return f"{model_class} has no enable_cache (it does not inherit diffusers' CacheMixin)"
    if not any(name in BLOCK_LISTS for name in block_lists):
        return f"none of its block lists ({', '.join(block_lists) or 'none'}) is one diffusers' cache hooks"
    unregistered = sorted(set(block_classes) - REGISTERED_BLOCKS) or (
        [] if block_classes else ["no block classes known"]
    )
    if unregistered:
        return f"diffusers has not registered its blocks ({', '.join(unregistered)}) for caching"
    return None


# The denoiser classes with ``enable_cache`` (diffusers' ``CacheMixin``) in diffusers 0.42.1; SD3's
# SD3Transformer2DModel is not one of them.
CACHE_MODELS = frozenset(
    {
        "AceStepTransformer1DModel",
        "AllegroTransformer3DModel",
        "BriaTransformer2DModel",
        "ChromaTransformer2DModel",
        "ChronoEditTransformer3DModel",
        "CogVideoXTransformer3DModel",
        "CogView4Transformer2DModel",
        "Cosmos3OmniTransformer",
        "Flux2Transformer2DModel",
        "FluxTransformer2DModel",
        "GlmImageTransformer2DModel",
        "HeliosTransformer3DModel",
        "HunyuanImageTransformer2DModel",
        "HunyuanVideo15Transformer3DModel",
        "HunyuanVideoFramepackTransformer3DModel",
        "HunyuanVideoTransformer3DModel",
        "Kandinsky5Transformer3DModel",
        "Kandinsky6Transformer3DModel",
        "LTX2VideoTransformer3DModel",
        "LTXVideoTransformer3DModel",
        "LatteTransformer3DModel",
        "LongCatImageTransformer2DModel",
        "MiniMaxH3Transformer3DModel",
        "MochiTransformer3DModel",
        "MotifVideoTransformer3DModel",
        "NucleusMoEImageTransformer2DModel",
        "OvisImageTransformer2DModel",
        "QwenImage21Transformer2DModel",
        "QwenImageControlNetModel",
        "QwenImageMultiControlNetModel",
        "QwenImageTransformer2DModel",
        "SanaWMLTX2RefinerTransformer3DModel",
        "SkyReelsV2Transformer3DModel",
        "WanAnimateTransformer3DModel",
        "WanTransformer3DModel",
        "WanVACETransformer3DModel",
    }
)

# --- MagCache --------------------------------------------------------------------------------------

MAG_SOURCE = "https://github.com/Zehong-Ma/MagCache"
# diffusers.hooks.mag_cache.FLUX_MAG_RATIOS (Flux dev and schnell, 28 steps), by denoiser class.
MAG_RATIOS = {
    "FluxTransformer2DModel": (
        1.0,
        1.21094,
        1.11719,
        1.07812,
        1.0625,
        1.03906,
        1.03125,
        1.03906,
        1.02344,
        1.03125,
        1.02344,
        0.98047,
        1.01562,
        1.00781,
        1.0,
        1.00781,
        1.0,
        1.00781,
        1.0,
        1.0,
        0.99609,
        0.99609,
        0.98047,
        0.98828,
        0.96484,
        0.95703,
        0.93359,
        0.89062,
    ),
}


def mag_computed_steps(
    ratios: tuple[float, ...], steps: int, threshold: float, max_skip_steps: int, retention_ratio: float
) -> list[bool]:
    """Which of `steps` steps MagCache computes (True) or skips, as diffusers' MagCache decides:
    the ratios stretched to `steps` by nearest index, then the accumulated drift rule."""
    if len(ratios) != steps:  # diffusers' nearest_interp (round half to even, as torch.round)
        scale = (len(ratios) - 1) / (steps - 1) if steps > 1 else 0
        ratios = tuple(ratios[round(i * scale)] for i in range(steps)) if steps > 1 else ratios[-1:]
    retention = int(retention_ratio * steps + 0.5)
    computed, ratio, count, error = [], 1.0, 0, 0.0
    for step in range(steps):
        compute = True
        if step >= retention:
            ratio *= ratios[step] if step < len(ratios) else 1.0
            count += 1
            error += abs(1.0 - ratio)
            if step > 0 and error <= threshold and count <= max_skip_steps:  # a residual exists after step 0
                compute = False
            else:
                ratio, count, error = 1.0, 0, 0.0
        computed.append(compute)
    return computed


# --- TaylorSeer (lite) -----------------------------------------------------------------------------

TAYLORSEER_SOURCE = "https://huggingface.co/docs/diffusers/main/en/optimization/cache#taylorseer-cache"


def taylorseer_computed_steps(steps: int, interval: int, warmup_steps: int) -> list[bool]:
    """Which of `steps` steps TaylorSeer computes (True) or predicts, as diffusers decides."""
    return [step < warmup_steps or (step - warmup_steps - 1) % interval == 0 for step in range(steps)]


def cache_share(cache: Cache, steps: int, model_class: str | None) -> float:
    """The share of the denoiser's block work that still runs with `cache` over `steps` steps."""
    if cache.kind == "first_block":
        return computed_share(cache.threshold)
    if cache.kind == "mag":
        ratios = MAG_RATIOS.get(model_class or "")
        if ratios is None:
            return 1.0  # refused where it runs: no ratios to decide with
        run = mag_computed_steps(ratios, steps, cache.threshold, cache.max_skip_steps, cache.retention_ratio)
    else:
        run = taylorseer_computed_steps(steps, cache.interval, cache.warmup_steps)
    return sum(run) / len(run)


# --- the lever ---------------------------------------------------------------------------------------

# What each kind holds between steps (``diffusers/hooks/``), in tensors of one call's hidden states:
# First Block Cache the first block's output and residual and the other blocks' residual, MagCache
# the last residual and the head block's input. TaylorSeer lite holds two Taylor factors of the
# denoiser's output instead (its output channels, not the hidden width).
HELD_HIDDEN_STATES = {"first_block": 3, "mag": 2}
TAYLOR_FACTORS = 2

QUALITY_COSTS = {
    "first_block": (
        "First Block Cache reuses the other blocks' output on steps whose first block barely changed: "
        "fine detail drifts, more at a higher threshold; tune measures it against the lossless output",
        SOURCE,
    ),
    "mag": (
        "MagCache reuses the last computed step's residual on the steps its ratios mark as near-identical: small "
        "drift, more at a higher threshold; tune measures it against the lossless output",
        MAG_SOURCE,
    ),
    "taylorseer": (
        "TaylorSeer predicts the skipped steps' output by extrapolating the computed ones: soft detail "
        "where the output changes fast; tune measures it against the lossless output",
        TAYLORSEER_SOURCE,
    ),
}


def _not_with_offload_hooks(config: OptimizationConfig, scenario: Any) -> str | None:
    if config.cache is not None and config.offload.hooks_blocks:
        return "a step cache skips the blocks' offload hooks"
    return None


class StepCache(Lever):
    """First Block Cache, MagCache or TaylorSeer on every denoiser (``enable_cache``)."""

    name = key = "cache"
    order = 60  # after the attention backend: its hooks wrap the blocks' forward, as offloading's do
    names = frozenset({*CACHE_SETTINGS, *(f"first-block-{t:g}" for t in THRESHOLDS), "mag", "taylorseer"})
    filters = (
        Filter(
            "first-block-cache-not-with-offload-hooks",
            "First Block Cache returns a skipped block's cached residual without calling the block, and so without "
            "the group or sequential offload hooks beneath it, which onload and prefetch that block: the planner "
            "doesn't combine them (untested on a GPU)",
            "https://github.com/huggingface/diffusers/blob/main/src/diffusers/hooks/first_block_cache.py",
            _not_with_offload_hooks,
        ),
    )

    def choices(self, scenario: Any, dtype: str) -> dict[str, Cache | None]:
        """Under ``--quality fast`` only (the cost depends on the prompt and is measured only by
        tune), where every denoiser has diffusers' cache hooks and its blocks are ones they know:
        First Block Cache at each published threshold, MagCache at its defaults over the workload's
        steps (only where diffusers ships the denoiser's ratios), TaylorSeer lite at the diffusers
        guide's settings."""
        from advisor.probe.layout import (
            repeated_block_classes,  # the class table: read where a plan is made
        )

        denoisers = scenario.profile.by_role("denoiser")

        def blocked(
            denoiser,
        ) -> str | None:  # a folder's profile knows the list names; the class table, the block classes
            classes = [b.class_name for b in denoiser.blocks if b.class_name] or repeated_block_classes(
                denoiser.class_name
            )
            return cacheable([b.name for b in denoiser.blocks], classes, denoiser.class_name)

        offered: dict[str, Cache | None] = {self.off_choice: None}
        if scenario.quality != "fast" or not denoisers or any(blocked(d) for d in denoisers):
            return offered
        offered |= {f"first-block-{t:g}": Cache(kind="first_block", threshold=t) for t in THRESHOLDS}
        if all(d.class_name in MAG_RATIOS for d in denoisers):
            offered["mag"] = Cache(kind="mag", steps=scenario.workload.steps)
        offered["taylorseer"] = Cache(kind="taylorseer")
        return offered

    def work_key(self, config: OptimizationConfig) -> str | None:
        return config.cache.kind if config.cache else None

    def compute_share(self, config: OptimizationConfig, step: StepContext) -> float:
        return cache_share(config.cache, step.steps, step.denoiser_class) if config.cache else 1.0

    def held_bytes(self, config: OptimizationConfig, shape: ActivationShape) -> int:
        if config.cache is None:
            return 0
        per_call = shape.batch * shape.tokens * shape.dtype_bytes
        if config.cache.kind == "taylorseer":
            return TAYLOR_FACTORS * per_call * shape.out_channels * shape.calls
        return HELD_HIDDEN_STATES[config.cache.kind] * per_call * shape.hidden * shape.calls

    def lossy(self, config: OptimizationConfig) -> bool:
        return config.cache is not None

    def quality_cost(self, config: OptimizationConfig) -> tuple[str, str] | None:
        return QUALITY_COSTS[config.cache.kind] if config.cache else None

    def reason(self, pick: Pick) -> str | None:
        """What the cache skips, what its saving is modelled on, the predicted gain and the quality cost."""
        config, scenario, latency_s = pick.config, pick.scenario, pick.latency_s
        cache = config.cache
        if cache is None:
            return None
        steps = scenario.workload.steps
        share = cache_share(cache, steps, scenario.profile.by_role("denoiser")[0].class_name)
        if cache.kind == "first_block":
            published = PUBLISHED_S.get(cache.threshold)
            measured = (
                f"ParaAttention measured FLUX.1-dev on an L20 at {published:.2f}s against {PUBLISHED_BASELINE_S:.2f}s "
                f"({PUBLISHED_BASELINE_S / published:.2f}x) at this threshold, "
                if published
                else ""
            )
            what = (
                f"the blocks after the first are skipped on steps where its output changed by less than {cache.threshold:.0%}; "
                f"{measured}modelled as {share:.0%} of the denoising compute ({SOURCE})"
            )
        else:
            skipped = round((1 - share) * steps)
            rule = (
                "the model's calibrated magnitude ratios decide"
                if cache.kind == "mag"
                else "the others' output is predicted by a Taylor expansion of the computed steps"
            )
            what = (
                f"every block is skipped on {skipped} of {steps} steps ({rule}: the same steps whatever the "
                f"prompt), so {share:.0%} of the denoising compute runs "
                f"({MAG_SOURCE if cache.kind == 'mag' else TAYLORSEER_SOURCE})"
            )
        cost, _ = QUALITY_COSTS[cache.kind]
        return (
            f"{cache.label()}: {what}: predicted {latency_s:.1f}s against {pick.without(self):.1f}s without; "
            f"quality cost: {cost}; offered under --quality fast only"
        )

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        return [_cache_step(config.cache, name) for name in components.denoisers()] if config.cache else []


def _cache_step(cache: Cache, name: str) -> Step:
    """The step cache on denoiser `name`; refused in one line where diffusers' hooks can't reach its
    blocks or MagCache has no ratios for it, rather than inside the first step."""
    if cache.kind == "mag":
        arguments = (
            f"threshold={cache.threshold!r}, max_skip_steps={cache.max_skip_steps!r}, retention_ratio={cache.retention_ratio!r}, "
            f"num_inference_steps={cache.steps!r}, mag_ratios=FLUX_MAG_RATIOS"
        )
        expression, imports = (
            f"MagCacheConfig({arguments})",
            ("from diffusers.hooks import MagCacheConfig", "from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS"),
        )
    elif cache.kind == "taylorseer":
        arguments = (
            f"cache_interval={cache.interval!r}, disable_cache_before_step={cache.warmup_steps!r}, use_lite_mode=True"
        )
        expression, imports = (
            f"TaylorSeerCacheConfig({arguments})",
            ("from diffusers.hooks import TaylorSeerCacheConfig",),
        )
    else:
        expression, imports = (
            f"FirstBlockCacheConfig(threshold={cache.threshold!r})",
            ("from diffusers.hooks import FirstBlockCacheConfig",),
        )
    code = call_source(f"pipe.{name}.enable_cache", [Expr(expression, None)])

    def run(pipe: Any) -> None:
        import diffusers.hooks
        import torch

        from advisor.errors import ConfigError

        model = getattr(pipe, name)
        lists = {key: child for key, child in model.named_children() if isinstance(child, torch.nn.ModuleList)}
        why = cacheable(
            list(lists),
            sorted({type(block).__name__ for child in lists.values() for block in child}),
            type(model).__name__,
        )
        if why is None and cache.kind == "mag" and type(model).__name__ not in MAG_RATIOS:
            why = (
                f"diffusers ships MagCache ratios for {', '.join(MAG_RATIOS)} only; calibrate them first "
                "(MagCacheConfig(calibrate=True)) and apply MagCache yourself"
            )
        if why is not None:
            raise ConfigError(f"`cache` can't apply to {name} ({type(model).__name__}): {why}; remove `cache`")
        # The code shown, with diffusers' FLUX_MAG_RATIOS as the values held here (tests check they are
        # equal): the module's tensor is made at import, on the meta device if that is when it was.
        ratios = list(MAG_RATIOS.get(type(model).__name__, ()))
        model.enable_cache(eval(expression, {**vars(diffusers.hooks), "FLUX_MAG_RATIOS": ratios}))

    return Step("cache", f"{cache.label()} on {name}", code, run, imports)
