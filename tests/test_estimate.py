"""The estimate: weights against real loaded footprints, the published Flux anchor, and its behaviour."""

import subprocess
import sys

import pytest

from advisor.config import Compile, LayerwiseCasting, Offload, OptimizationConfig, Quantization, Vae
from advisor.errors import EstimateError, UsageError
from advisor.levers.offload import load_device_map
from advisor.plan.estimate import estimate
from advisor.plan.weights import weight_bytes
from advisor.probe.models import load_profile, profile_from_folder
from advisor.probe.target import planned_target
from advisor.probe.workload import make_workload


GIB = 2**30
RTX_4090 = planned_target(machine=None, gpu="RTX 4090")


def _tensor_bytes(tensor) -> int:
    """Real storage of a tensor, including torchao's subclasses (qdata + scales + zero points)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


CPU_CONFIGS = {
    "fp32": OptimizationConfig(device="cpu", dtype="float32"),
    "bf16": OptimizationConfig(device="cpu", dtype="bfloat16"),
    "torchao int8": OptimizationConfig(
        device="cpu",
        quantization=Quantization(backend="torchao", components=["transformer"], scheme="int8_weight_only"),
    ),
    "torchao fp8": OptimizationConfig(
        device="cpu",
        quantization=Quantization(
            backend="torchao", components=["transformer", "text_encoder"], scheme="float8_weight_only"
        ),
    ),
    "quanto fp8": OptimizationConfig(
        device="cpu",
        quantization=Quantization(backend="quanto", weights="float8", components=["transformer", "text_encoder"]),
    ),
    "layerwise fp8": OptimizationConfig(
        device="cpu", layerwise_casting=LayerwiseCasting(components=["transformer", "text_encoder"])
    ),
    "group offload (cpu)": OptimizationConfig(device="cpu", offload=Offload(strategy="group", num_blocks_per_group=1)),
}


@pytest.mark.parametrize("name", list(CPU_CONFIGS))
@pytest.mark.parametrize("fixture", ["tiny_flux_dir", "tiny_wan_dir"])
def test_predicted_weight_bytes_match_the_loaded_footprint(name, fixture, request):
    from advisor.run.apply import load_pipeline

    if fixture == "tiny_wan_dir" and name.startswith("quanto"):
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="quanto loads less of Wan's _keep_in_fp32_modules in fp32 than the estimate keeps there "
                "(predicted 59% over the loaded bytes); not understood yet (issue 30)",
            )
        )
    folder = request.getfixturevalue(fixture)
    config = CPU_CONFIGS[name]
    profile = profile_from_folder(folder)
    pipe = load_pipeline(folder, config)  # the real path: from_pretrained kwargs, then the post-load steps
    for component in profile.components:
        measured = sum(_tensor_bytes(p) for p in getattr(pipe, component.name).parameters())
        predicted = weight_bytes(component, config)
        assert predicted == pytest.approx(measured, rel=0.01), f"{name}: {component.name}"


@pytest.fixture(scope="module")
def flux_dev():
    return load_profile("black-forest-labs/FLUX.1-dev")


def _seed_config(**changes) -> OptimizationConfig:
    nf4 = Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"])
    return OptimizationConfig(quantization=nf4, **changes)


def test_seed_page_anchor_without_offload(flux_dev):
    # RTX 4090, transformer + T5 in nf4, 1024x1024: 14.9453 GB allocated (diffusers prints GiB),
    # measured with transformers 4.x (see the next test for the float32 T5 `wo` it kept)
    result = estimate(flux_dev, make_workload(flux_dev, height=1024, width=1024), _seed_config(), RTX_4090)
    then = flux_dev.component("text_encoder_2").keep_in_fp32_parameters * 2
    assert (result.peak_vram_allocated_bytes + then) / GIB == pytest.approx(14.9453, rel=0.10)
    # What must fit: what is allocated less the decode's cuDNN workspace, which PyTorch takes only
    # where the card has room (on OOM it tries the next engine), and within what the allocator
    # reserves with room.
    decode = next(p for p in result.phases if p.name == "vae_decode")
    assert decode.workspace_bytes > 0
    assert result.peak_vram_allocated_bytes - decode.workspace_bytes <= result.peak_vram_bytes
    assert result.peak_vram_bytes <= result.peak_vram_reserved_bytes


def test_the_decode_workspace_is_taken_only_where_the_card_has_room(flux_dev):
    # PyTorch allocates cuDNN's workspace through the caching allocator and, when that fails, tries
    # the next engine (Conv_v8.cpp try_configs): it never has to fit, and it can't exceed what the
    # card has left. HunyuanVideo's untiled 720p decode has 26 GB tensors: its workspace takes the
    # rest of an 80 GB card; Flux's 1024x1024 decode takes all it asks for.
    h100 = planned_target(machine=None, gpu="H100")
    hunyuan = load_profile("hunyuanvideo-community/HunyuanVideo")
    decode = next(
        p
        for p in estimate(hunyuan, make_workload(hunyuan), OptimizationConfig(), h100).phases
        if p.name == "vae_decode"
    )
    assert decode.workspace_bytes == max(h100.vram_total_bytes - decode.reserved_bytes, 0)
    assert decode.device_bytes - decode.workspace_bytes + decode.reserve_bytes == decode.reserved_bytes
    flux = next(
        p
        for p in estimate(flux_dev, make_workload(flux_dev), OptimizationConfig(), h100).phases
        if p.name == "vae_decode"
    )
    assert 0 < flux.workspace_bytes < h100.vram_total_bytes - flux.reserved_bytes


def test_seed_page_anchor_with_model_offload(flux_dev):
    config = _seed_config(compile=Compile(), offload=Offload(strategy="model"))
    result = estimate(flux_dev, make_workload(flux_dev, height=1024, width=1024), config, RTX_4090)
    # The page measured with transformers 4.x, which kept T5's `_keep_in_fp32_modules` in float32
    # under bitsandbytes (2 more bytes per parameter); transformers 5 keeps them at bf16.
    then = flux_dev.component("text_encoder_2").keep_in_fp32_parameters * 2
    # The page loaded with no device_map, so bitsandbytes quantized T5 and the transformer straight
    # onto the GPU, where they stayed until the transformer's hook first fired: CLIP ran beside both.
    # The plan loads with device_map="cpu" (offload.load_device_map), so its text encoding holds T5
    # alone; the page's peak is that phase plus the weights its loading left on the card.
    assert load_device_map(config) == "cpu"
    encoding = next(p for p in result.phases if p.name == "text_encoding")
    assert set(encoding.weights_bytes) == {"text_encoder_2"}
    left_on_card = sum(weight_bytes(flux_dev.component(name), config) for name in ("transformer", "text_encoder"))
    page_peak = max(result.peak_vram_allocated_bytes, encoding.device_bytes + left_on_card)
    assert (page_peak + then) / GIB == pytest.approx(12.2369, rel=0.10)
    # Loading onto the host saves what the page's loading left there.
    assert result.peak_vram_allocated_bytes < page_peak


def test_group_offloaded_4bit_models_reach_the_card_one_at_a_time_while_loading(flux_dev):
    """Loaded onto the host, each 4-bit model goes to the card whole right before its group
    offloading (rehearsed: tests/test_rehearse.py): the loading peak holds the largest of them
    beside what the others keep resident, never both whole. An 8-bit model can't move later with
    its scales, so those still load onto the card together."""
    both = Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"])
    leaf = Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True)
    rtx_3060 = planned_target(machine=None, gpu="RTX 3060")

    def loading(config):
        result = estimate(flux_dev, make_workload(flux_dev), config, rtx_3060)
        weights = {name: weight_bytes(flux_dev.component(name), config) for name in both.components}
        return next(p for p in result.phases if p.name == "loading").weights_bytes, weights

    on_card, weights = loading(OptimizationConfig(device="cuda", quantization=both, offload=leaf))
    assert on_card["transformer"] == weights["transformer"]  # the larger, whole
    assert on_card.get("text_encoder_2", 0) < weights["text_encoder_2"] / 10  # what leaf streaming keeps
    eight = both.replace(backend="bitsandbytes_8bit")
    on_card, weights = loading(OptimizationConfig(device="cuda", quantization=eight, offload=leaf))
    assert on_card == weights


def test_group_offloading_keeps_bitsandbytes_scales_on_the_card_and_8bit_weights_whole(flux_dev):
    """Group offloading moves parameters' data, not what a bitsandbytes layer keeps beside it
    (rehearsed: tests/test_rehearse.py): an offloaded nf4 transformer still holds one fp32 absmax
    per 64 weights on the card while T5 encodes; an 8-bit one holds its int8 weights and row scales,
    so offloading it frees only the few layers it does not convert."""
    leaf = Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True)
    transformer = flux_dev.component("transformer")
    rtx_3060 = planned_target(machine=None, gpu="RTX 3060")

    def while_encoding(backend: str) -> tuple[int, int]:
        config = OptimizationConfig(
            device="cuda", quantization=Quantization(backend=backend, components=["transformer"]), offload=leaf
        )
        result = estimate(flux_dev, make_workload(flux_dev), config, rtx_3060)
        encoding = next(p for p in result.phases if p.name == "text_encoding")
        return encoding.weights_bytes.get("transformer", 0), weight_bytes(transformer, config)

    on_card, _ = while_encoding("bitsandbytes_4bit")
    assert on_card == pytest.approx(transformer.linear_parameters * 4 / 64, rel=0.001)
    on_card, weights = while_encoding("bitsandbytes_8bit")
    assert on_card == transformer.linear_parameters + 4 * transformer.linear_rows  # all but the unconverted layers
    assert on_card > 0.99 * weights


def _encoding_weights(profile, config) -> set[str]:
    result = estimate(profile, make_workload(profile), config, RTX_4090)
    return set(next(p for p in result.phases if p.name == "text_encoding").weights_bytes)


def test_model_offload_runs_one_text_encoder_at_a_time(flux_dev):
    # accelerate's CpuOffload.pre_forward offloads the previous model of model_cpu_offload_seq as
    # the next one runs: Flux encodes CLIP, then T5, which sends CLIP back to the CPU.
    model = OptimizationConfig(offload=Offload(strategy="model"))
    assert _encoding_weights(flux_dev, model) == {"text_encoder_2"}
    assert _encoding_weights(flux_dev, OptimizationConfig()) >= {"text_encoder", "text_encoder_2"}
    # bitsandbytes would load T5 and the transformer straight onto the GPU, where they would stay
    # until the transformer's hook first fired; the plan loads them onto the host (device_map="cpu").
    assert _encoding_weights(flux_dev, _seed_config(offload=Offload(strategy="model"))) == {"text_encoder_2"}


def test_group_offloading_runs_one_text_encoder_at_a_time(flux_dev):
    # diffusers onloads a group-offloaded transformers encoder as one group when it is called and
    # offloads it when its forward returns (GroupOffloadingHook.post_forward): T5 alone at the peak.
    streamed = OptimizationConfig(offload=Offload(strategy="group", use_stream=True))
    assert _encoding_weights(flux_dev, streamed) >= {"text_encoder_2"}
    assert "text_encoder" not in _encoding_weights(flux_dev, streamed)
    # An encoder left out of the offloaded components stays on the card beside it.
    partly = OptimizationConfig(offload=Offload(strategy="group", components=["transformer", "text_encoder_2"]))
    assert _encoding_weights(flux_dev, partly) >= {"text_encoder", "text_encoder_2"}


def test_a_negative_prompt_pass_brings_the_first_encoder_back():
    # SD3 encodes "" for the negative prompt through CLIP-L, CLIP-G and T5 again. CLIP-L's hook has
    # no predecessor, so it comes back beside T5; CLIP-G's then offloads CLIP-L, not T5.
    sd3 = load_profile("stabilityai/stable-diffusion-3.5-large")
    assert _encoding_weights(sd3, OptimizationConfig(offload=Offload(strategy="model"))) == {
        "text_encoder_2",
        "text_encoder_3",
    }


def test_seed_page_latency_ranking(flux_dev):
    job = make_workload(flux_dev, height=1024, width=1024)
    plain = estimate(flux_dev, job, _seed_config(), RTX_4090).latency_s
    compiled = estimate(flux_dev, job, _seed_config(compile=Compile()), RTX_4090).latency_s
    offloaded = estimate(
        flux_dev, job, _seed_config(compile=Compile(), offload=Offload(strategy="model")), RTX_4090
    ).latency_s
    assert compiled < offloaded < plain * 1.05  # the page: 25.8 s < 32.3 s ~ 32.6 s
    assert plain == pytest.approx(32.602, rel=0.25)


def test_weights_by_storage_format(flux_dev):
    transformer = flux_dev.component("transformer")
    bf16 = weight_bytes(transformer, OptimizationConfig())
    assert bf16 == transformer.parameters * 2
    assert weight_bytes(transformer, OptimizationConfig(dtype="float32")) == 2 * bf16
    nf4 = weight_bytes(transformer, _seed_config())
    assert nf4 / bf16 == pytest.approx(0.5625 / 2, rel=0.01)  # almost every Flux weight is in a Linear
    double = weight_bytes(
        transformer,
        OptimizationConfig(
            quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"], double_quant=True)
        ),
    )
    int8 = weight_bytes(
        transformer,
        OptimizationConfig(quantization=Quantization(backend="bitsandbytes_8bit", components=["transformer"])),
    )
    fp8 = weight_bytes(transformer, OptimizationConfig(layerwise_casting=LayerwiseCasting(components=["transformer"])))
    assert double < nf4 < int8 < fp8 < bf16
    # Layerwise casting keeps the adaptive norms (3.2 B parameters of Flux) at bf16.
    assert fp8 == transformer.casting_skipped_parameters * 2 + (
        transformer.parameters - transformer.casting_skipped_parameters
    )


def test_t5_output_layers_stay_unquantized(flux_dev):
    t5 = flux_dev.component("text_encoder_2")
    quantized = weight_bytes(t5, _seed_config())
    # transformers keeps T5's `wo` layers (~1 B parameters) out of bitsandbytes: they stay bf16.
    assert t5.parameters - t5.linear_parameters > 1.0e9
    assert quantized > t5.linear_parameters * 0.5625 + (t5.parameters - t5.linear_parameters) * 2 - 1


def test_offload_strategies_order_peak_vram_and_ram(flux_dev):
    job = make_workload(flux_dev)
    peaks = {}
    for name, offload in {
        "none": Offload(),
        "model": Offload(strategy="model"),
        "group": Offload(strategy="group", num_blocks_per_group=2),
        "group+stream": Offload(strategy="group", use_stream=True),
        "leaf": Offload(strategy="group", offload_type="leaf_level"),
        "sequential": Offload(strategy="sequential"),
    }.items():
        peaks[name] = estimate(flux_dev, job, OptimizationConfig(offload=offload), RTX_4090)
    vram = {name: e.peak_vram_bytes for name, e in peaks.items()}
    assert vram["none"] > vram["model"] > vram["group"] > vram["leaf"] >= vram["sequential"]
    ram = {name: e.peak_ram_bytes for name, e in peaks.items()}
    assert ram["group+stream"] > ram["group"]  # pinned copies: about 2x the offloaded weights
    latency = {name: e.latency_s for name, e in peaks.items()}
    assert latency["sequential"] > latency["group"] and latency["sequential"] > latency["none"]


def test_disk_offload_moves_weights_from_ram_to_disk(flux_dev):
    job = make_workload(flux_dev)
    in_ram = estimate(flux_dev, job, OptimizationConfig(offload=Offload(strategy="group")), RTX_4090)
    on_disk = estimate(
        flux_dev, job, OptimizationConfig(offload=Offload(strategy="group", offload_to_disk_path="/tmp/x")), RTX_4090
    )
    assert on_disk.disk_bytes == sum(in_ram.weight_bytes.values())
    assert on_disk.steady_ram_weight_bytes == 0 < in_ram.steady_ram_weight_bytes
    # Weights stored in the dtype they run in load from their mmapped files (tests/test_host_memory.py):
    # loading does not pass them through the process's memory, so the disk keeps RAM down.
    assert on_disk.peak_ram_bytes < in_ram.peak_ram_bytes - 20 * 2**30
    assert on_disk.latency_s > in_ram.latency_s


def test_activations_grow_with_resolution_frames_and_batch():
    wan = load_profile("Wan-AI/Wan2.1-T2V-14B-Diffusers")
    config = OptimizationConfig()

    def denoise_activations(**job):
        result = estimate(wan, make_workload(wan, **job), config, RTX_4090)
        return next(p for p in result.phases if p.name == "denoising").activation_bytes

    small = denoise_activations(height=480, width=832, frames=33)
    assert denoise_activations(height=480, width=832, frames=81) > small
    assert denoise_activations(height=720, width=1280, frames=33) > small
    assert denoise_activations(height=480, width=832, frames=33, batch=2) > small


def test_vae_tiling_cuts_the_video_decode_peak():
    hunyuan = load_profile("hunyuanvideo-community/HunyuanVideo")
    job = make_workload(hunyuan, height=720, width=1280, frames=61)
    plain = estimate(hunyuan, job, OptimizationConfig(), RTX_4090)
    tiled = estimate(hunyuan, job, OptimizationConfig(vae=Vae(tiling=True)), RTX_4090)
    decode = {p.name: p.activation_bytes for p in plain.phases}["vae_decode"]
    decode_tiled = {p.name: p.activation_bytes for p in tiled.phases}["vae_decode"]
    assert decode_tiled < decode / 10


def test_quantization_and_compile_change_latency_as_published(flux_dev):
    job = make_workload(flux_dev)
    h100 = planned_target(machine=None, gpu="H100")
    base = estimate(flux_dev, job, OptimizationConfig(), h100).latency_s
    compiled = estimate(flux_dev, job, OptimizationConfig(compile=Compile()), h100).latency_s
    int8_eager = OptimizationConfig(
        quantization=Quantization(backend="torchao", components=["transformer"], scheme="int8_dynamic")
    )
    slow = estimate(flux_dev, job, int8_eager, h100)
    assert compiled < base < slow.latency_s / 10  # diffusers-torchao: 130 s uncompiled vs 3.4 s
    assert any("without torch.compile" in note for note in slow.notes)


@pytest.mark.parametrize("gpu", ["H100", "L40S"])
def test_layerwise_casting_costs_its_casts_traffic_and_hooks(flux_dev, gpu):
    # diffusers' casting hooks upcast every hooked layer's fp8 weights to bf16 before it runs and
    # cast them back after: 1 + 2 bytes written and as many read per weight, at the card's streaming
    # rate, and two Module.to calls per layer on the host.
    from advisor.plan.compute import constants

    k = constants()
    card = planned_target(machine=None, gpu=gpu)
    job = make_workload(flux_dev)
    casting = OptimizationConfig(layerwise_casting=LayerwiseCasting(components=["transformer"]))
    base = estimate(flux_dev, job, OptimizationConfig(), card).step_latency_s
    cast = estimate(flux_dev, job, casting, card).step_latency_s
    t = flux_dev.component("transformer")
    traffic = (t.parameters - t.casting_skipped_parameters) * (1 + 2) * 2
    streaming = card.memory_bytes_per_s * k["memory_bandwidth_efficiency"]
    hooks = t.cast_layers * k["layerwise_casting_hook_host_s"]
    assert cast - base == pytest.approx(traffic / streaming + hooks, rel=0.01)
    assert 400 < t.cast_layers < 500  # 19 double and 38 single blocks' linear layers, less the skipped


def test_layerwise_casting_slows_a_small_many_layered_unet_most():
    # SDXL's UNet hooks about twice Flux's layers for a fifth of the work per step: the hooks'
    # host time weighs far more (diffusers' benchmark runs: SDXL 2.0x, Flux 1.12x on one forward).
    sdxl, flux = load_profile("stabilityai/stable-diffusion-xl-base-1.0"), load_profile("black-forest-labs/FLUX.1-dev")
    card = planned_target(machine=None, gpu="L40S")

    def slowdown(profile, name):
        job = make_workload(profile)
        casting = OptimizationConfig(layerwise_casting=LayerwiseCasting(components=[name]))
        return (
            estimate(profile, job, casting, card).step_latency_s
            / estimate(profile, job, OptimizationConfig(), card).step_latency_s
        )

    assert slowdown(sdxl, "unet") > slowdown(flux, "transformer") + 0.2


def test_quantization_speeds_up_the_linear_layers_alone(flux_dev):
    """torchao and bitsandbytes replace nn.Linear: attention, convolutions and memory-bound ops run
    as in bf16. Flux's compiled fp8 gain is the published 1.42x (diffusers-torchao, H100: 4.21 s ->
    2.97 s); a step that is mostly attention (HunyuanVideo, 129 frames at 720p) gains less than a
    step whose linear layers took no time at all would: 1 / (1 - their share of the FLOPs)."""
    from advisor.plan.compute import phase_work

    h100 = planned_target(machine=None, gpu="H100")
    fp8 = Quantization(backend="torchao", components=["transformer"], scheme="float8_dynamic")

    def denoising_gain(profile):
        job = make_workload(profile)
        bf16 = estimate(profile, job, OptimizationConfig(compile=Compile()), h100).latency_breakdown["denoising_s"]
        quantized = estimate(
            profile, job, OptimizationConfig(compile=Compile(), quantization=fp8), h100
        ).latency_breakdown["denoising_s"]
        return bf16 / quantized, phase_work(profile, job, OptimizationConfig())["denoising"]

    flux_gain, _ = denoising_gain(flux_dev)
    assert flux_gain == pytest.approx(4.21 / 2.97, rel=0.03)
    hunyuan_gain, work = denoising_gain(load_profile("hunyuanvideo"))
    linear_share = work.matmul_flops / (work.matmul_flops + work.attention_flops + work.conv_flops)
    assert linear_share < 0.3  # attention grows with the square of the 119k tokens
    assert 1.0 < hunyuan_gain < 1 / (1 - linear_share) < flux_gain


@pytest.mark.parametrize(
    "offload", [Offload(strategy="group", offload_type="leaf_level", use_stream=True), Offload(strategy="sequential")]
)
def test_offloaded_text_encoders_and_vae_pay_for_moving_their_weights_in(flux_dev, offload):
    """Group and sequential offload stream every offloaded model's weights over PCIe each time it
    runs, the text encoders and the VAE too: their phases can't take less than those bytes over
    the card's host->device rate (9.5 GB of T5 on PCIe 4.0 x16: over a third of a second), and
    the VAE's decode takes longer than with its weights resident."""
    job = make_workload(flux_dev)
    plain = estimate(flux_dev, job, OptimizationConfig(), RTX_4090)
    offloaded = estimate(flux_dev, job, OptimizationConfig(offload=offload), RTX_4090)
    weights = {c.name: weight_bytes(c, OptimizationConfig()) for c in flux_dev.components}
    encoders = weights["text_encoder"] + weights["text_encoder_2"]
    assert offloaded.latency_breakdown["text_encoding_s"] >= encoders / RTX_4090.h2d_bytes_per_s > 0.3
    assert (
        offloaded.latency_breakdown["vae_decode_s"] > plain.latency_breakdown["vae_decode_s"]
    )  # a stream hides some, not all


def test_cpu_target_puts_everything_in_ram(tiny_flux_dir):
    from advisor.probe.hardware import probe_machine
    from advisor.probe.target import target_from_probe

    machine = probe_machine()
    if machine.gpus:
        pytest.skip("this machine has a GPU")
    profile = profile_from_folder(tiny_flux_dir)
    result = estimate(
        profile,
        make_workload(profile, height=64, width=64),
        OptimizationConfig(device="cpu"),
        target_from_probe(machine),
    )
    assert result.peak_vram_bytes == 0
    assert result.ram_breakdown["weights"] == result.steady_ram_weight_bytes == sum(result.weight_bytes.values())
    assert result.peak_ram_bytes == sum(result.ram_breakdown.values())


def test_config_naming_a_missing_component_is_refused(flux_dev):
    config = OptimizationConfig(quantization=Quantization(backend="torchao", components=["unet"]))
    with pytest.raises(EstimateError, match=r"config names \['unet'\]"):
        estimate(flux_dev, make_workload(flux_dev), config, RTX_4090)


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"height": 1020}, "--height: 1020 is not a multiple of 16"),
        ({"steps": 0}, "--steps: 0 must be"),
        ({"frames": 9}, "--frames: 9 given for an image"),
    ],
)
def test_bad_workloads_name_the_flag(flux_dev, job, message):
    with pytest.raises(UsageError, match=message):
        make_workload(flux_dev, **job)


def test_video_frames_must_fit_the_time_compression():
    wan = load_profile("wan2.1-t2v-1.3b")
    with pytest.raises(UsageError, match="--frames: 80 does not fit the VAE's 4x time compression; use 4k\\+1"):
        make_workload(wan, frames=80)


def test_estimate_imports_no_torch():
    code = (
        "import sys; from advisor.probe.models import load_profile; from advisor.probe.workload import make_workload; "
        "from advisor.probe.target import planned_target; from advisor.config import OptimizationConfig; "
        "from advisor.plan.estimate import estimate; p = load_profile('flux-dev'); "
        "estimate(p, make_workload(p), OptimizationConfig(), planned_target(machine=None, vram=24 * 2**30)); "
        "print('torch' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_compile_warm_up_follows_what_it_compiles(flux_dev):
    """Compiling is one-off work at the first call, beside the per-generation latency: the PyTorch blog
    measured Flux.1-dev on an H100 at 67.4 s whole and 9.6 s with compile_repeated_blocks (two kinds
    of block), and a model that lists no repeated blocks (SD3 in diffusers 0.42) compiles whole."""
    from advisor.probe.models import load_profile

    def warmup(profile, regional):
        denoisers = [c.name for c in profile.by_role("denoiser")]
        config = OptimizationConfig(compile=Compile(components=denoisers, regional=regional))
        return estimate(profile, make_workload(profile), config, RTX_4090).warmup_s

    assert estimate(flux_dev, make_workload(flux_dev), OptimizationConfig(), RTX_4090).warmup_s == 0
    assert warmup(flux_dev, True) == pytest.approx(9.6, abs=0.1)
    assert warmup(flux_dev, False) == pytest.approx(67.4, abs=0.5)
    sd3 = load_profile("sd3.5-large")  # 38 blocks compiled whole: more than Flux's regional, less than its whole
    assert warmup(flux_dev, True) < warmup(sd3, False) < warmup(flux_dev, False)


def test_max_autotune_says_its_autotuning_is_not_in_the_warm_up(flux_dev):
    """Issue 27: the warm-up figures are the default mode's (the PyTorch blog's Flux compile times);
    max-autotune also benchmarks kernel choices as it compiles, and no published figure prices that."""
    workload = make_workload(flux_dev, height=1024, width=1024)
    plain = estimate(flux_dev, workload, OptimizationConfig(compile=Compile(components=["transformer"])), RTX_4090)
    tuned = OptimizationConfig(compile=Compile(components=["transformer"], mode="max-autotune"))
    result = estimate(flux_dev, workload, tuned, RTX_4090)
    assert result.warmup_s == plain.warmup_s > 0
    assert not any("autotun" in note for note in plain.notes)
    assert any("max-autotune" in note and "not costed" in note for note in result.notes)


# --- the guidance scale: classifier-free guidance on or off ----------------------------------------


def test_a_turbo_model_runs_its_cards_steps_without_guidance():
    # Z-Image-Turbo's model card: num_inference_steps=9, guidance_scale=0.0 ("Guidance should be 0
    # for the Turbo models"); ZImagePipeline guides at any scale above 0 (do_classifier_free_guidance
    # is guidance_scale > 0), batching the prompt and the negative prompt: twice the denoiser's work.
    turbo = load_profile("z-image-turbo")
    card = make_workload(turbo)
    assert (card.steps, card.guidance_scale) == (9, 0.0)
    assert any("model card" in line and "--guidance-scale" in line for line in card.assumptions)
    assert card.call_kwargs()["guidance_scale"] == 0.0
    guided = make_workload(turbo, guidance_scale=5.0)
    h100 = planned_target(machine=None, gpu="H100", ram=256 * GIB)
    per_step = {
        scale: estimate(turbo, job, OptimizationConfig(), h100).step_latency_s
        for scale, job in (("off", card), ("on", guided))
    }
    assert per_step["on"] / per_step["off"] == pytest.approx(2.0, rel=0.15)


def test_guidance_at_or_below_one_turns_a_guided_pipeline_off():
    # SD3, Wan, CogVideoX: do_classifier_free_guidance is guidance_scale > 1; no negative prompt then.
    from advisor.probe.workload import encoding_passes, run_behaviour

    sd3 = load_profile("stabilityai/stable-diffusion-3.5-large")
    assert run_behaviour(sd3.pipeline_class, make_workload(sd3))["cfg"] == "batched"
    assert encoding_passes(sd3.pipeline_class, make_workload(sd3)) == 2
    off = make_workload(sd3, guidance_scale=1.0)
    assert run_behaviour(sd3.pipeline_class, off)["cfg"] == "none"
    assert encoding_passes(sd3.pipeline_class, off) == 1
    # Guidance-distilled Flux has no CFG to turn on: the scale is an input of its transformer.
    flux = load_profile("flux-dev")
    assert run_behaviour(flux.pipeline_class, make_workload(flux, guidance_scale=3.5))["cfg"] == "none"


def test_a_guidance_scale_outside_what_pipelines_take_is_a_usage_error():
    with pytest.raises(UsageError, match="--guidance-scale"):
        make_workload(load_profile("z-image-turbo"), guidance_scale=-1.0)


def test_a_step_distilled_klein_never_guides_whatever_the_scale():
    # Flux2KleinPipeline: do_classifier_free_guidance is `guidance_scale > 1 and not
    # self.config.is_distilled`; the 4B repo's model_index.json says is_distilled: true.
    from advisor.probe.workload import run_behaviour

    klein = load_profile("flux2-klein-4b")
    assert klein.pipeline_config.get("is_distilled") is True
    guided = make_workload(klein, guidance_scale=4.0)
    assert run_behaviour(klein.pipeline_class, guided, klein.pipeline_config)["cfg"] == "none"
    assert run_behaviour(klein.pipeline_class, guided)["cfg"] == "separate"  # a klein base model
