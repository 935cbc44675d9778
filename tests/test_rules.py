"""The rule engine: each rule on its own, then whole scenarios pinned to the diffusers guidance."""

import pytest

from advisor.config import Compile, LayerwiseCasting, Offload, OptimizationConfig, Quantization
from advisor.errors import UsageError
from advisor.plan.recommend import recommend
from advisor.plan.rules import dynamic_quantization_needs_compile, every_rule
from advisor.plan.scenario import Scenario, default_budget, make_scenario, smallest_card_for
from advisor.plan.space import quantization_choices
from advisor.probe.models import load_profile
from advisor.probe.target import TargetHardware, planned_target
from advisor.probe.workload import make_workload


GIB = 2**30


def rule(name: str):
    """The rule `name` as the engine runs it (a lever's adjust gets the scenario's estimate)."""
    return next(r.evaluate for r in every_rule() if r.name == name)


offload_needs_an_accelerator = rule("offload-needs-an-accelerator")
dynamo_capture_for_bitsandbytes = rule("dynamo-capture-for-bitsandbytes")
dynamo_cache_limit_with_offload = rule("dynamo-cache-limit-with-offload")
no_fullgraph_with_offload_hooks = rule("no-fullgraph-with-offload-hooks")
vae_tiling_when_decode_dominates = rule("vae-tiling-when-decode-dominates")
vae_slicing_for_batches = rule("vae-slicing-for-batches")
channels_last_for_unets = rule("channels-last-for-unets")
images_prefer_model_offload = rule("images-prefer-model-offload")
video_prefers_group_offload = rule("video-prefers-group-offload")
NF4 = Quantization(backend="bitsandbytes_4bit", components=["transformer"])


def cpu_target(ram_gib: float = 24) -> TargetHardware:
    return TargetHardware(
        "cpu", "test CPU", 0, 0, int(ram_gib * GIB), int(ram_gib * GIB), None, True, 2e11, float("inf"), "test"
    )


def context(model="flux-dev", target=None, packages=None, budget=16 * GIB, **job) -> Scenario:
    profile = load_profile(model)
    target = target or planned_target(machine=None, gpu="RTX 4090")
    return make_scenario(profile, make_workload(profile, **job), target, packages=packages, budget_bytes=budget)


# --- every rule on its own ------------------------------------------------------------------------


def test_every_rule_has_a_reason_and_a_source():
    every = every_rule()
    assert len({r.name for r in every}) == len(every)
    for r in every:
        assert r.kind in {"filter", "adjust", "prefer"}
        assert len(r.reason) > 20 and r.source.startswith("https://")


def test_dynamic_quantization_is_never_offered_uncompiled():
    int8 = Quantization(backend="torchao", components=["transformer"], scheme="int8_dynamic")
    assert "never worth it" in dynamic_quantization_needs_compile(OptimizationConfig(quantization=int8), context())
    assert (
        dynamic_quantization_needs_compile(OptimizationConfig(quantization=int8, compile=Compile()), context()) is None
    )
    weight_only = Quantization(backend="torchao", components=["transformer"], scheme="int8_weight_only")
    assert dynamic_quantization_needs_compile(OptimizationConfig(quantization=weight_only), context()) is None


def test_offload_needs_an_accelerator():
    assert offload_needs_an_accelerator(
        OptimizationConfig(offload=Offload(strategy="model")), context(target=cpu_target())
    )
    assert offload_needs_an_accelerator(OptimizationConfig(offload=Offload(strategy="model")), context()) is None


def test_dynamo_flags_for_bitsandbytes_and_offload():
    compiled = OptimizationConfig(quantization=NF4, compile=Compile(), offload=Offload(strategy="model"))
    adjusted = dynamo_cache_limit_with_offload(dynamo_capture_for_bitsandbytes(compiled, context()), context())
    assert adjusted.compile.dynamo_config == {"capture_dynamic_output_shape_ops": True, "cache_size_limit": 1000}
    plain = OptimizationConfig(compile=Compile())
    assert dynamo_cache_limit_with_offload(dynamo_capture_for_bitsandbytes(plain, context()), context()) == plain
    uncompiled = OptimizationConfig(quantization=NF4, offload=Offload(strategy="model"))
    assert dynamo_capture_for_bitsandbytes(uncompiled, context()) == uncompiled


def test_no_fullgraph_where_hooks_wrap_the_compiled_layers():
    grouped = OptimizationConfig(compile=Compile(), offload=Offload(strategy="group"))
    assert no_fullgraph_with_offload_hooks(grouped, context()).compile.fullgraph is False
    cast = OptimizationConfig(compile=Compile(), layerwise_casting=LayerwiseCasting(components=["transformer"]))
    assert no_fullgraph_with_offload_hooks(cast, context()).compile.fullgraph is False
    model_offload = OptimizationConfig(compile=Compile(), offload=Offload(strategy="model"))
    assert no_fullgraph_with_offload_hooks(model_offload, context()).compile.fullgraph is True


def test_vae_tiling_only_where_the_decode_dominates_and_it_helps():
    hunyuan = context("hunyuanvideo", height=720, width=1280, frames=61)
    assert vae_tiling_when_decode_dominates(OptimizationConfig(), hunyuan).vae.tiling
    # Flux at 1024 px: its VAE tiles at 1024 px, so tiling would change nothing.
    assert not vae_tiling_when_decode_dominates(OptimizationConfig(), context(height=1024, width=1024)).vae.tiling


def test_vae_slicing_for_batches():
    assert vae_slicing_for_batches(OptimizationConfig(), context(batch=4)).vae.slicing
    assert not vae_slicing_for_batches(OptimizationConfig(), context(batch=1)).vae.slicing


def test_channels_last_only_for_compiled_unets():
    assert channels_last_for_unets(
        OptimizationConfig(compile=Compile(components=["unet"])), context("sdxl")
    ).channels_last
    assert not channels_last_for_unets(OptimizationConfig(compile=Compile()), context()).channels_last
    assert not channels_last_for_unets(OptimizationConfig(), context("sdxl")).channels_last


def test_offload_preferences_follow_the_workload():
    """Ranks, 0 first: images model over group offload, video the reverse (seed page); sequential always last."""

    def offload(strategy):
        return OptimizationConfig(offload=Offload(strategy=strategy))

    image, video = context(), context("wan2.1-t2v-14b")
    image_order = [images_prefer_model_offload(offload(s), image) for s in ("none", "model", "group", "sequential")]
    video_order = [video_prefers_group_offload(offload(s), video) for s in ("none", "group", "model", "sequential")]
    assert image_order == sorted(image_order) and len(set(image_order)) == 4
    assert video_order == sorted(video_order) and len(set(video_order)) == 4
    assert (
        images_prefer_model_offload(offload("group"), video)
        == 0
        == video_prefers_group_offload(offload("model"), image)
    )


def test_quantization_choices_never_touch_the_vae_and_skip_small_encoders():
    choices = quantization_choices(load_profile("flux-dev"))
    named = {name for q, c in choices for name in ((q.components if q else []) + (c.components if c else []))}
    assert named == {"transformer", "text_encoder_2"}  # CLIP-L (0.12 B) and the VAE are left alone


def test_default_budget_keeps_a_reserve():
    target = planned_target(machine=None, vram=24 * GIB)
    assert default_budget(target) == int(24 * GIB - GIB - 0.05 * 24 * GIB)
    assert default_budget(cpu_target(24)) == int(0.9 * 24 * GIB)


@pytest.mark.parametrize("peak_gib", [4.75, 15.2, 70.0])
def test_the_smallest_card_named_for_a_peak_holds_it_in_its_default_budget(peak_gib):
    """When nothing fits, recommend names a card: its default budget (free memory less 1 GiB + 5%
    of the card) must hold the peak, and 1% less card must not."""
    peak = int(peak_gib * GIB)
    card = smallest_card_for(peak)
    assert default_budget(planned_target(machine=None, vram=card)) >= peak
    assert default_budget(planned_target(machine=None, vram=int(card * 0.99))) < peak


# --- scenarios --------------------------------------------------------------------------------------


def pick(model, *, budget=None, packages=None, target=None, **job):
    profile = load_profile(model)
    target = target or planned_target(machine=None, gpu="RTX 4090")
    return recommend(
        make_scenario(profile, make_workload(profile, **job), target, packages=packages, budget_bytes=budget)
    )


# The seed page's combinations come from bitsandbytes alone: with torchao installed, its fp8/int8
# dynamic quantization + compile is faster still (tests/test_decisions.py), so these plan for a
# machine with bitsandbytes and diffusers but no torchao.
SEED_PACKAGES = {"bitsandbytes": "0.45.0", "diffusers": "0.42.1", "torchao": None}


def test_seed_page_flux_16gb_budget_quantizes_compiles_and_does_not_offload():
    best = pick("flux-dev", budget=16 * GIB, packages=SEED_PACKAGES, height=1024, width=1024).best.config
    assert best.quantization.backend == "bitsandbytes_4bit"
    assert set(best.quantization.components) == {"transformer", "text_encoder_2"}
    assert best.compile is not None and best.compile.dynamo_config["capture_dynamic_output_shape_ops"] is True
    assert best.offload.strategy == "none"


def test_seed_page_flux_11gb_budget_adds_model_cpu_offload():
    # The seed page measured 14.95 GB allocated without offload and 12.24 GB with model offload,
    # both with transformers 4.x keeping T5's `wo` in float32 (1.875 GiB more than the installed
    # transformers 5): 13.07 and 10.36 GB now. Of the first, the VAE decode's cuDNN workspace is
    # taken only where the card has room (PyTorch falls back to engines with less), so no offload
    # needs somewhat less than 13.07 GB, model offload 10.36 GB: 11 GB takes model offload.
    # The page loaded with no device_map, which left T5 and the transformer on the card through text
    # encoding; loaded onto the host (device_map="cpu") T5 runs alone, and its 9.5 GB of bf16 fit 11
    # GB: quantizing the transformer is what the budget needs.
    best = pick("flux-dev", budget=11 * GIB, packages=SEED_PACKAGES, height=1024, width=1024).best.config
    assert best.quantization.backend == "bitsandbytes_4bit"
    assert "transformer" in best.quantization.components
    assert best.compile is not None and best.compile.dynamo_config["cache_size_limit"] == 1000
    assert best.offload.strategy == "model"


def test_wan_14b_on_a_24gb_card_quantizes_and_never_model_offloads():
    """bf16 (37 GB of weights) can't fit 24 GB: quantized; for video, offloading (if any) is group
    offloading with streams, not model offload (diffusers' guidance); none at all when it fits."""
    result = pick("wan2.1-t2v-14b", target=planned_target(machine=None, vram=24 * GIB))
    best = result.best.config
    assert best.quantization is not None or best.layerwise_casting is not None
    assert best.offload.strategy in ("none", "group")
    if best.offload.strategy == "group":
        assert best.offload.use_stream and any(
            "video" in reason and "group offloading" in reason for reason in result.reasons
        )


def test_wan_14b_on_a_3060_cannot_use_fp8_compute():
    result = pick("wan2.1-t2v-14b", target=planned_target(machine=None, gpu="RTX 3060"))  # Ampere, 12 GB
    assert result.rejected.get("fp8-compute-needs-sm89", 0) > 0
    # 14 B weights never fit 12 GB: the transformer is streamed layer by layer (group or sequential
    # offload). bitsandbytes' 4-bit transformer and UMT5 together are 13.3 GB: loaded with no
    # device_map they would be on the card at once before offloading starts; under group offloading
    # they load onto the host and go to the card one at a time (the larger, the 4-bit transformer,
    # about 7.6 GB), so a plan that quantizes both never holds both there.
    best = result.best
    assert best.config.offload.strategy in ("group", "sequential")
    quantized = best.config.quantization.components if best.config.quantization else []
    if len(quantized) > 1:
        loading = next(p for p in best.estimate.phases if p.name == "loading")
        assert loading.device_bytes < 10 * GIB  # one 4-bit model whole, not both (13.3 GB)


def test_flux_on_an_80gb_h100_needs_no_offload_and_no_quantization():
    """bf16 fits whole: the default quality policy takes nothing lossy unless clearly faster (tests/test_decisions.py has --quality fast)."""
    result = pick("flux-dev", target=planned_target(machine=None, gpu="H100"))
    best = result.best.config
    assert best.offload.strategy == "none" and best.compile is not None
    assert best.quantization is None or any("faster than the best lossless" in r for r in result.reasons)


def test_small_model_on_a_big_card_stays_plain():
    best = pick("wan2.1-t2v-1.3b", target=planned_target(machine=None, gpu="H100")).best.config
    assert best.offload.strategy == "none"


def test_sdxl_on_an_8gb_card_offloads_and_uses_channels_last():
    best = pick("sdxl", target=planned_target(machine=None, vram=8 * GIB)).best.config
    assert best.offload.strategy != "none"
    assert best.channels_last is True


def test_hunyuan_video_gets_vae_tiling():
    best = pick(
        "hunyuanvideo", target=planned_target(machine=None, gpu="H100"), height=720, width=1280, frames=61
    ).best.config
    assert best.vae.tiling is True


def test_batches_get_vae_slicing():
    best = pick("sdxl", target=planned_target(machine=None, gpu="RTX 4090"), batch=4).best.config
    assert best.vae.slicing is True


def test_short_ram_moves_from_pinned_streams_to_low_ram_pinning_to_disk():
    def offload(ram_gib):
        # 16 GB: even quantized, Wan 14B's weights and activations need offloading there.
        best = pick("wan2.1-t2v-14b", target=planned_target(machine=None, vram=16 * GIB, ram=ram_gib * GIB)).best
        assert best.estimate.peak_ram_bytes <= ram_gib * GIB
        return best.config.offload

    def pins_every_weight(o) -> bool:
        # Group offloading on a stream keeps a pinned copy of each offloaded weight beside it (diffusers'
        # _init_cpu_param_dict) unless it pins on the fly, goes to disk or keeps part on the GPU.
        return o.use_stream and not (o.low_cpu_mem_usage or o.offload_to_disk_path or o.resident_blocks)

    plenty, short, scarce = offload(256), offload(24), offload(12)
    assert plenty.use_stream  # transfers hide behind compute; with equal speed the smaller RAM need wins the tie
    # Short of RAM for pinned copies of everything: a plan that doesn't keep them (pin on the fly, go
    # to disk, keep part of the transformer on the GPU, or sequential offload, which pins nothing).
    assert not pins_every_weight(short)
    assert scarce.offload_to_disk_path


def test_impossible_budget_says_what_would_fit():
    result = pick("flux-dev", budget=1 * GIB, target=planned_target(machine=None, vram=4 * GIB, ram=8 * GIB))
    assert result.best is None and result.smallest is not None
    assert any("smallest predicted peak" in line for line in result.advice)
    assert any("GPU with at least" in line or "RAM" in line for line in result.advice)


def test_cpu_machine_plans_cpu_inference_without_bitsandbytes_or_offload(tiny_flux_dir):
    result = pick(
        str(tiny_flux_dir),
        target=cpu_target(),
        packages={"torch": "2.13", "torchao": "0.18", "diffusers": "0.42.1"},
        height=64,
        width=64,
    )
    best = result.best.config
    assert best.device == "cpu" and best.offload.strategy == "none"
    assert best.quantization is None or best.quantization.backend == "torchao"
    assert result.rejected["bitsandbytes-needs-cuda"] > 0


def test_zero_budget_is_a_usage_error():
    with pytest.raises(UsageError, match="--budget: must be larger than 0"):
        pick("flux-dev", budget=0)


def test_every_candidate_is_scored_for_a_two_denoiser_pipeline():
    result = pick("wan2.2-t2v-a14b", target=planned_target(machine=None, vram=24 * GIB))
    assert result.candidates > 100  # each scored by the estimate; timing lives in benchmarks/
    assert set(result.best.config.quantization.components) >= {"transformer", "transformer_2"}


def test_docs_list_every_rule():
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "rules.md").read_text()
    for r in every_rule():
        assert f"`{r.name}`" in page and r.source in page


SCENARIOS = [
    ("flux-dev", {"gpu": "RTX 4090"}, 16 * GIB, {}),
    ("flux-dev", {"gpu": "RTX 4090"}, 13 * GIB, {}),
    ("flux-dev", {"vram": 8 * GIB}, None, {}),
    ("flux-dev", {"gpu": "H100"}, None, {}),
    ("sdxl", {"vram": 8 * GIB}, None, {"batch": 4}),
    ("sd3.5-large", {"gpu": "RTX 4080"}, None, {}),
    ("qwen-image", {"gpu": "RTX 4090"}, None, {}),
    ("wan2.1-t2v-14b", {"vram": 24 * GIB}, None, {}),
    ("wan2.1-t2v-14b", {"gpu": "RTX 3090"}, None, {}),
    ("wan2.2-t2v-a14b", {"gpu": "L40S"}, None, {}),
    ("hunyuanvideo", {"gpu": "H100"}, None, {"height": 544, "width": 960, "frames": 61}),
    ("ltx-video", {"gpu": "RTX 4060 Ti"}, None, {}),
    ("cogvideox-5b", {"gpu": "T4"}, None, {}),
]


@pytest.mark.parametrize(("model", "gpu", "budget", "job"), SCENARIOS)
def test_every_recommended_config_is_accepted_by_apply(model, gpu, budget, job):
    """The rule engine never proposes what advisor.run.apply would refuse (checked without a GPU)."""
    from advisor.run.checks import check_config

    result = pick(model, budget=budget, target=planned_target(machine=None, **gpu), **job)
    configs = ([result.best] if result.best else []) + result.alternatives
    assert configs, f"nothing fits for {model} on {gpu}"
    for scored in configs:
        check_config(scored.config)
        assert scored.estimate.peak_vram_bytes <= result.scenario.budget_bytes


def test_a_ram_warning_says_whose_ram_it_is():
    """A plan near the host RAM warns; when that RAM was assumed (another machine, no --ram), the
    warning says it is the assumed figure and asks for --ram, not to close programs on a machine
    the advisor never saw."""

    def ram_warning(**machine):
        # 15 GB of a 3090: bf16 with most of the transformer streamed from pinned copies in RAM.
        scenario = context(target=planned_target(machine=None, gpu="RTX 3090", **machine), budget=15 * GIB)
        return [r for r in recommend(scenario).reasons if r.startswith("warning: host RAM")]

    assumed = ram_warning()
    assert len(assumed) == 1 and "of the assumed" in assumed[0] and "pass --ram" in assumed[0]
    given = ram_warning(ram=47 * GIB)
    assert len(given) == 1 and "of the machine's" in given[0] and "close other programs" in given[0]


def test_fp16_warnings_on_a_card_without_bf16_give_advice_it_can_follow():
    """A T4 has no bf16 (compute capability 7.5): telling its user to run Flux in bf16 is no help.
    diffusers clips Flux's fp16 activations and its Flux docs run the text encoders in fp32 for
    fp16 inference; T5 overflows in fp16 (transformers keeps its `wo` layers in fp32)."""
    result = recommend(context(target=planned_target(machine=None, gpu="T4", ram=64 * GIB), budget=14 * GIB))
    assert result.config.dtype == "float16"
    warnings = [r for r in result.reasons if r.startswith("warning: fp16")]
    flux = next(w for w in warnings if "FluxTransformer2DModel" in w)
    assert "bf16" not in flux.split("): ", 1)[1].replace(
        "from bf16's", ""
    )  # no advice to switch to what the card lacks
    assert "text encoders in fp32" in flux and "diffusers/main/en/api/pipelines/flux#running-fp16-inference" in flux
    assert any("T5EncoderModel" in w and "_keep_in_fp32_modules" in w for w in warnings)
