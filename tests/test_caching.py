"""Step caches (First Block Cache, MagCache, TaylorSeer lite): the facts against diffusers' own, the
schema, what the planner offers and predicts, and on the CPU that each really skips blocks (as many
as predicted where the schedule is fixed) and changes the output by a measured amount."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from advisor.config import Cache, Offload, OptimizationConfig
from advisor.errors import ConfigError
from advisor.levers.step_cache import (
    BLOCK_LISTS,
    CACHE_MODELS,
    MAG_RATIOS,
    PUBLISHED_BASELINE_S,
    PUBLISHED_S,
    REGISTERED_BLOCKS,
    cache_share,
    cacheable,
    computed_share,
    mag_computed_steps,
    taylorseer_computed_steps,
)


def test_the_block_lists_and_classes_are_the_installed_diffusers_ones():
    from diffusers.hooks import _helpers
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    _helpers._register_transformer_blocks_metadata()
    assert BLOCK_LISTS == set(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)
    assert REGISTERED_BLOCKS == {cls.__name__ for cls in _helpers.TransformerBlockRegistry._registry}


def test_the_cache_models_and_flux_ratios_are_the_installed_diffusers_ones():
    import ast

    import diffusers
    import diffusers.hooks.mag_cache
    from diffusers.models.cache_utils import CacheMixin

    # FLUX_MAG_RATIOS is a tensor made at import, on the meta device when a trace imported it: read its source.
    tree = ast.parse(Path(diffusers.hooks.mag_cache.__file__).read_text())
    value = next(
        node.value for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "FLUX_MAG_RATIOS"
    )
    flux_ratios = eval(
        compile(ast.Expression(value.args[0]), "FLUX_MAG_RATIOS", "eval"), {}
    )  # a list expression of literals

    classes = {name for name in dir(diffusers) if isinstance(getattr(diffusers, name, None), type)}
    assert CACHE_MODELS == {
        name for name in classes if issubclass(getattr(diffusers, name), CacheMixin) and name != "CacheMixin"
    }
    assert "SD3Transformer2DModel" in classes and "SD3Transformer2DModel" not in CACHE_MODELS
    assert MAG_RATIOS["FluxTransformer2DModel"] == pytest.approx(flux_ratios)


def test_the_fixed_schedules():
    """MagCache at its defaults on Flux's 28 ratios: the first int(0.2 x 28 + 0.5) = 6 steps always
    run, then drift accumulates; TaylorSeer computes steps < warmup and every interval-th after."""
    run = mag_computed_steps(MAG_RATIOS["FluxTransformer2DModel"], 28, 0.06, 3, 0.2)
    # The steps diffusers' MagCache hooks skipped on a tiny Flux over these 28 ratios (run once by hand).
    assert [step for step, computed in enumerate(run) if not computed] == [
        6,
        8,
        10,
        11,
        12,
        14,
        15,
        16,
        18,
        19,
        20,
        22,
        23,
        25,
    ]
    assert (
        sum(mag_computed_steps(MAG_RATIOS["FluxTransformer2DModel"], 28, 0.12, 3, 0.2)) < 14
    )  # a higher threshold skips more
    # TaylorSeer computes steps 0-9, then 11 (the first after the warm-up that is not predicted) and every 5th.
    run = taylorseer_computed_steps(28, 5, 10)
    assert [step for step, computed in enumerate(run) if computed] == [*range(10), 11, 16, 21, 26]
    assert cache_share(Cache(kind="mag", threshold=0.06, steps=28), 28, "FluxTransformer2DModel") == 0.5


def test_the_computed_share_is_the_published_latency_ratio():
    for threshold, seconds in PUBLISHED_S.items():
        assert computed_share(threshold) == pytest.approx(seconds / PUBLISHED_BASELINE_S)
    assert computed_share(0.0) == 1.0 and computed_share(0.5) == computed_share(0.12)
    shares = [computed_share(t / 100) for t in range(0, 20)]
    assert shares == sorted(shares, reverse=True)  # a higher threshold never computes more


def test_the_schema_refuses_thresholds_outside_0_to_1_and_settings_of_another_kind():
    assert OptimizationConfig(cache=Cache(threshold=0.08)).summary() == "bf16, no offload, first-block cache 0.08"
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            Cache(threshold=bad)
    with pytest.raises(ValueError, match="`cache.steps` is required for kind mag"):
        Cache(kind="mag")
    with pytest.raises(ValueError, match="`cache.interval` is for kind taylorseer, not first_block"):
        Cache(interval=3)


def test_which_denoisers_diffusers_can_cache():
    assert (
        cacheable(
            ["transformer_blocks", "single_transformer_blocks"], ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
        )
        is None
    )
    assert "not registered" in cacheable(["transformer_blocks"], ["MyBlock"])
    assert "no enable_cache" in cacheable(["transformer_blocks"], ["JointTransformerBlock"], "SD3Transformer2DModel")
    # SDXL's UNet keeps its attention in down/up blocks, which the cache hooks don't know.
    assert "none of its block lists" in cacheable(["down_blocks", "up_blocks"], ["DownBlock2D", "UpBlock2D"])


def _scenario(model: str, gpu: str, quality: str):
    from advisor.plan.scenario import make_scenario
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    profile = load_profile(model)
    return make_scenario(
        profile, make_workload(profile), planned_target(machine=None, gpu=gpu, ram=64 * 2**30), quality=quality
    )


def test_caching_is_offered_under_fast_only_and_never_with_offload_hooks():
    from advisor.plan.recommend import recommend
    from advisor.plan.space import SearchSpace, rejection

    assert SearchSpace.for_scenario(_scenario("flux-dev", "RTX 4090", "balanced")).choices("cache") == ["none"]
    assert SearchSpace.for_scenario(_scenario("sdxl", "RTX 4090", "fast")).choices("cache") == ["none"]  # a UNet
    fast = _scenario("flux-dev", "RTX 4090", "fast")
    space = SearchSpace.for_scenario(fast)
    assert space.choices("cache") == ["none", "first-block-0.08", "first-block-0.12", "mag", "taylorseer"]
    # MagCache needs the model's ratios (diffusers ships Flux's); SD3's transformer has no enable_cache.
    assert SearchSpace.for_scenario(_scenario("wan2.1-t2v-14b", "H100", "fast")).choices("cache") == [
        "none",
        "first-block-0.08",
        "first-block-0.12",
        "taylorseer",
    ]
    assert SearchSpace.for_scenario(_scenario("stabilityai/stable-diffusion-3.5-large", "H100", "fast")).choices(
        "cache"
    ) == ["none"]
    grouped = OptimizationConfig(cache=Cache(threshold=0.08), offload=Offload(strategy="group", use_stream=True))
    assert rejection(grouped, fast) == "first-block-cache-not-with-offload-hooks"
    result = recommend(fast)
    assert result.config.cache is not None and result.config.offload.strategy not in ("group", "sequential")
    assert any("quality cost" in r and "offered under --quality fast only" in r for r in result.reasons)


def test_the_estimate_skips_the_computed_share_and_holds_three_hidden_states():
    """Flux at 1024x1024: 4096 image + 512 text tokens of width 3072; the cache holds the first
    block's output and residual and the rest's residual, 3 x 4608 x 3072 bf16 values."""
    from advisor.plan.estimate import estimate

    scenario = _scenario("flux-dev", "H100", "fast")
    plain = estimate(scenario.profile, scenario.workload, OptimizationConfig(), scenario.target)
    cached = estimate(
        scenario.profile, scenario.workload, OptimizationConfig(cache=Cache(threshold=0.12)), scenario.target
    )
    compute = cached.latency_breakdown["step_compute_s"] / plain.latency_breakdown["step_compute_s"]
    assert compute == pytest.approx(computed_share(0.12))
    denoising = {p.name: p for p in cached.phases}["denoising"].activation_bytes - {p.name: p for p in plain.phases}[
        "denoising"
    ].activation_bytes
    assert denoising == pytest.approx(3 * 4608 * 3072 * 2, abs=1)  # each phase's bytes are floored apart
    # MagCache: half the steps run (the schedule above); it holds the last residual and the head block's input.
    mag = estimate(
        scenario.profile,
        scenario.workload,
        OptimizationConfig(cache=Cache(kind="mag", threshold=0.06, steps=28)),
        scenario.target,
    )
    assert mag.latency_breakdown["step_compute_s"] / plain.latency_breakdown["step_compute_s"] == pytest.approx(0.5)
    held = {p.name: p for p in mag.phases}["denoising"].activation_bytes - {p.name: p for p in plain.phases}[
        "denoising"
    ].activation_bytes
    assert held == pytest.approx(2 * 4608 * 3072 * 2, abs=1)


# --- for real, on the CPU ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_8_blocks(tmp_path_factory):
    from advisor.testing import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux-x2"), scale=2)


def _generate(path, config: OptimizationConfig) -> tuple[np.ndarray, int]:
    """The image of 8 steps, and how many times a block's attention ran (8 blocks x 8 steps uncached)."""
    from advisor.run.apply import load_pipeline
    from advisor.testing import tiny_call_kwargs

    pipe = load_pipeline(path, config)
    runs = []
    for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
        block.attn.register_forward_pre_hook(lambda module, args: runs.append(1))
    image = pipe(**{**tiny_call_kwargs("image", seed=0), "num_inference_steps": 8}).images
    return np.asarray(image, dtype=np.float64), len(runs)


def test_first_block_cache_skips_blocks_and_changes_the_output_by_a_measured_amount(flux_8_blocks):
    from advisor.run.quality import psnr

    cpu = OptimizationConfig(device="cpu", dtype="float32")
    reference, computed = _generate(flux_8_blocks, cpu)
    assert computed == 8 * 8
    # A threshold no step's change is under: every block runs, the image is the same.
    same, computed = _generate(flux_8_blocks, cpu.replace(cache=Cache(threshold=1e-9)))
    assert computed == 64 and np.array_equal(same, reference)
    # Random tiny weights change a lot between steps: only a high threshold skips here.
    cached, computed = _generate(flux_8_blocks, cpu.replace(cache=Cache(threshold=0.5)))
    assert 8 <= computed < 64  # the first block runs at every step; others were skipped
    assert not np.array_equal(cached, reference)
    assert 20 < psnr(cached, reference) < 100  # changed, by a measured amount (dB)
    # The quality guard: this aggressive cache is under a floor it can't reach; the identical output passes.
    from advisor.run.guard import QualityGuard
    from advisor.run.quality import compare

    guard = QualityGuard(Path("unused"), min_psnr_db=100.0)
    assert guard.verdict(compare(cached, reference)).startswith("PSNR ")
    assert guard.verdict(compare(same, reference)) is None


@pytest.mark.parametrize("kind", ["mag", "taylorseer"])
def test_mag_and_taylorseer_skip_exactly_the_predicted_steps_and_change_the_output(flux_8_blocks, kind):
    """Their schedules don't depend on the data: every block runs on exactly the steps predicted."""
    from advisor.run.quality import psnr

    cpu = OptimizationConfig(device="cpu", dtype="float32")
    reference, _ = _generate(flux_8_blocks, cpu)
    if kind == "mag":  # Flux's 28 ratios laid over 8 steps; a threshold that lets steps be skipped
        cache = Cache(kind="mag", threshold=0.2, steps=8, retention_ratio=0.25)
        predicted = mag_computed_steps(MAG_RATIOS["FluxTransformer2DModel"], 8, 0.2, 3, 0.25)
    else:
        cache = Cache(kind="taylorseer", interval=2, warmup_steps=2)
        predicted = taylorseer_computed_steps(8, 2, 2)
    assert 0 < sum(predicted) < 8
    cached, computed = _generate(flux_8_blocks, cpu.replace(cache=cache))
    assert computed == 8 * sum(predicted)  # 8 blocks on each computed step, none on the others
    assert 10 < psnr(cached, reference) < 100  # changed, by a measured amount (dB)


def test_a_denoiser_the_cache_cannot_hook_is_refused_in_one_line(tmp_path):
    from advisor.run.apply import load_pipeline
    from advisor.testing import build_tiny_sd3, build_tiny_sdxl, build_tiny_wan

    path = build_tiny_sdxl(tmp_path / "sdxl")
    with pytest.raises(
        ConfigError,
        match=r"`cache` can't apply to unet \(UNet2DConditionModel\): UNet2DConditionModel has no enable_cache",
    ):
        load_pipeline(path, OptimizationConfig(device="cpu", dtype="float32", cache=Cache()))
    path = build_tiny_sd3(tmp_path / "sd3")
    with pytest.raises(
        ConfigError,
        match=r"can't apply to transformer \(SD3Transformer2DModel\): SD3Transformer2DModel has no enable_cache",
    ):
        load_pipeline(path, OptimizationConfig(device="cpu", dtype="float32", cache=Cache()))
    path = build_tiny_wan(tmp_path / "wan")
    with pytest.raises(
        ConfigError, match=r"diffusers ships MagCache ratios for FluxTransformer2DModel only; calibrate them first"
    ):
        load_pipeline(
            path, OptimizationConfig(device="cpu", dtype="float32", cache=Cache(kind="mag", threshold=0.06, steps=8))
        )


def test_a_cached_candidate_is_timed_over_the_whole_run():
    """Extrapolating 2- and 8-step runs to 28 steps would miss what a cache skips (MagCache runs
    every one of its first 6 steps; First Block Cache skips by how much the output changes)."""
    from advisor.probe.workload import Workload
    from advisor.run.measure import timed_step_points
    from advisor.run.timing import STEP_POINTS

    workload = Workload("image", height=1024, width=1024, steps=28)
    assert timed_step_points(OptimizationConfig(), workload, STEP_POINTS) == STEP_POINTS
    for cache in (Cache(), Cache(kind="mag", steps=28), Cache(kind="taylorseer")):
        assert timed_step_points(OptimizationConfig(cache=cache), workload, STEP_POINTS) == (28,)


def test_why_pyramid_attention_broadcast_and_fastercache_are_not_offered(tmp_path):
    """The reasons docs/rules.md gives, on a pipeline that runs guidance as a second call (Wan): PAB
    keeps one step counter for both calls, so at every step the second call reuses the first's
    attention instead of computing its own; FasterCache fails on the first step. If diffusers
    changes either, this fails: time to reconsider offering them."""
    import torch
    from diffusers import DiffusionPipeline, FasterCacheConfig, PyramidAttentionBroadcastConfig

    from advisor.testing import build_tiny_wan, tiny_call_kwargs

    pipe = DiffusionPipeline.from_pretrained(build_tiny_wan(tmp_path / "wan"), dtype=torch.float32)
    computed = []  # the timestep of every attention computed (its query projection runs)
    for block in pipe.transformer.blocks:
        block.attn1.to_q.register_forward_pre_hook(lambda module, args: computed.append(float(pipe.current_timestep)))
    call = {**tiny_call_kwargs("video", seed=0), "num_inference_steps": 8}
    everywhere = dict(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
    )
    pipe(**call)
    assert len(computed) == 2 * 8 * 2  # blocks x steps x (conditional, unconditional)
    computed.clear()
    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(**everywhere))
    pipe(**call)
    # Each call of its own would compute every other step, both calls at the same 4 timesteps; the
    # shared counter computes at all 8 steps, once per block: the conditional call's, reused by the other.
    assert len(computed) == 2 * 8 and len(set(computed)) == 8
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FasterCacheConfig(**everywhere))
    with pytest.raises(IndexError):
        pipe(**call)
