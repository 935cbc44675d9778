"""advisor.trace: the traced FLOP and activation curves against the real modules on CPU.

* the input builders against the arguments each real pipeline passes its denoiser (a forward
  pre-hook on the tiny pipeline of every catalog class stops the call and records them);
* traced FLOPs against `torch.utils.flop_counter.FlopCounterMode` on the real, loaded module, at a
  size that is not one of the fit points;
* traced activation peaks (as the estimate scales them to float32) against the peak the CPU
  allocator reports for a real forward (`torch.profiler` memory events), within 10%.
"""

from __future__ import annotations

import inspect
import os

import pytest


torch = pytest.importorskip("torch")

from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.profiler._memory_profiler import Action, MemoryProfileTimeline  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from advisor.levers import DecodeMode  # noqa: E402
from advisor.plan.compute import (  # noqa: E402
    constants,  # noqa: E402
    denoiser_work,
    latent_geometry,
    text_encoder_work,
    vae_decode_work,
)
from advisor.probe.models import profile_from_folder  # noqa: E402
from advisor.probe.workload import Workload  # noqa: E402
from advisor.testing import build_tiny_for, tiny_call_kwargs  # noqa: E402
from advisor.trace.inputs import Geometry, Maker, denoiser_inputs, text_encoder_inputs, vae_latents  # noqa: E402
from advisor.trace.tracer import TraceSizes, trace_component  # noqa: E402


os.environ["HF_HUB_OFFLINE"] = "1"

CLASSES = {
    "FluxPipeline": "black-forest-labs/FLUX.1-dev",
    "ChromaPipeline": "lodestones/Chroma1-HD",
    "Flux2Pipeline": "black-forest-labs/FLUX.2-dev",
    "StableDiffusion3Pipeline": "stabilityai/stable-diffusion-3.5-large",
    "StableDiffusionXLPipeline": "stabilityai/stable-diffusion-xl-base-1.0",
    "QwenImagePipeline": "Qwen/Qwen-Image",
    "ZImagePipeline": "Tongyi-MAI/Z-Image-Turbo",
    "WanPipeline": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "WanPipeline-TI2V": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "CogVideoXPipeline": "THUDM/CogVideoX-5b",
    "HunyuanVideoPipeline": "hunyuanvideo-community/HunyuanVideo",
    "LTXPipeline": "Lightricks/LTX-Video",
}


class _Stop(Exception):
    pass


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    return value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(pipeline_class: str):
        if pipeline_class not in cache:
            folder = build_tiny_for(CLASSES[pipeline_class], tmp_path_factory.mktemp(pipeline_class))
            cache[pipeline_class] = (folder, profile_from_folder(folder))
        return cache[pipeline_class]

    return get


@pytest.mark.parametrize("pipeline_class", sorted(CLASSES))
def test_denoiser_inputs_match_what_the_pipeline_passes(pipeline_class, tiny):
    import diffusers

    folder, profile = tiny(pipeline_class)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    denoiser = getattr(pipe, profile.by_role("denoiser")[0].name)
    seen = {}

    def stop(module, args, kwargs):
        seen.update(kwargs, _args=args)
        raise _Stop

    denoiser.register_forward_pre_hook(stop, with_kwargs=True)
    call = tiny_call_kwargs(profile.pipeline_class, seed=0)
    with pytest.raises(_Stop):
        pipe(**call)
    # Arguments passed positionally (the UNet's sample and timestep, all of Z-Image's) by their names.
    args = seen.pop("_args")
    seen |= inspect.signature(denoiser.forward).bind_partial(*args).arguments
    latent = seen.get("hidden_states", seen.get("sample", seen.get("x")))
    text = seen.get("encoder_hidden_states", seen.get("cap_feats"))
    workload = Workload(
        profile.workload, height=call["height"], width=call["width"], frames=call.get("num_frames", 1), steps=1
    )
    frames, height, width = latent_geometry(profile, workload)
    if isinstance(latent, list):  # Z-Image: a tensor per sample, its caption's real tokens
        batch, tokens = len(latent), text[0].shape[0]
    else:
        batch, tokens = latent.shape[0], text.shape[1]
    geometry = Geometry(batch, frames, height, width, text_tokens=tokens)
    built = denoiser_inputs(denoiser, geometry, Maker("meta", torch.float32), profile.pipeline_config)
    ignored = {
        "attention_kwargs",
        "joint_attention_kwargs",
        "cross_attention_kwargs",
        "return_dict",
        "rope_interpolation_scale",
    }
    passed = {k: v for k, v in seen.items() if v is not None and k not in ignored}
    assert set(passed) == {k for k, v in built.items() if v is not None and k not in ignored}
    for key, value in passed.items():  # tensors, tuples of tensors, dicts of them, ints and shape lists
        if key == "cap_feats":  # Z-Image's captions keep their real lengths: the builder gives all the prompt's
            assert len(built[key]) == len(value) and _shapes(built[key][0]) == _shapes(value[0]), key
            continue
        assert _shapes(built[key]) == _shapes(value), key


def _allocator_peak(fn) -> int:
    """Peak bytes the CPU allocator held during `fn` beyond what existed before (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _time, action, _key, size in MemoryProfileTimeline(prof._memory_profile()).timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def _flops(fn) -> int:
    """FLOPs of `fn` by FlopCounterMode, attention through the math path: the CPU's fused kernel
    is an op FlopCounterMode has no formula for, the math path's matmuls it counts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def _loaded(folder, component):
    import importlib

    library = importlib.import_module(component.library)
    return getattr(library, component.class_name).from_pretrained(folder / component.name).eval()


# (pipeline, height, width, frames): sizes off the fit points, large enough that activations
# dwarf the kernels' fixed scratch buffers.
# The tiny Flux and SDXL VAEs do not downsample (latents at full size); the tiny Wan VAE does 8x.
# Each is traced at three sizes around the size it is checked at (the catalog's sizes would be far
# too large for a real CPU forward of a model whose latents are not downsampled).
IMAGE_SIZES = TraceSizes(
    denoiser={"image": [(64, 64, 1), (128, 128, 1), (224, 224, 1)]},
    vae=[(128, 128), (256, 256), (384, 384)],
    vae_check=(512, 512, 1),
)
# The tiny Wan's rope table covers 32 patches a side: 512 pixels at most.
VIDEO_SIZES = TraceSizes(
    denoiser={"video": [(256, 384, 17), (384, 448, 25), (512, 512, 41)]},
    vae=[(128, 128), (192, 192), (256, 256)],
    vae_frames=[5, 9],
    vae_check=(320, 320, 9),
)
TRACE_SIZES = {"image": IMAGE_SIZES, "video": VIDEO_SIZES}
REAL_SIZES = [("FluxPipeline", 192, 160, 1), ("WanPipeline", 448, 512, 33), ("StableDiffusionXLPipeline", 64, 80, 1)]


@pytest.mark.slow
@pytest.mark.parametrize(("pipeline_class", "height", "width", "frames"), REAL_SIZES)
def test_traced_denoiser_matches_the_real_module(pipeline_class, height, width, frames, tiny):
    folder, profile = tiny(pipeline_class)
    component = profile.by_role("denoiser")[0]
    component.trace = trace_component(profile, component, TRACE_SIZES[profile.workload])
    module = _loaded(folder, component)
    workload = Workload(profile.workload, height=height, width=width, frames=frames, steps=1)
    f, h, w = latent_geometry(profile, workload)
    kwargs = denoiser_inputs(module, Geometry(1, f, h, w, component.trace["text_tokens"]), Maker("cpu", torch.float32))
    predicted = denoiser_work(profile, component, workload, "float32", 1, constants())

    def forward():
        with torch.no_grad():
            module(**kwargs)

    assert predicted.matmul_flops + predicted.conv_flops + predicted.attention_flops == pytest.approx(
        _flops(forward), rel=1e-6
    )
    # The CPU's convolution kernels (oneDNN) hold workspaces the trace doesn't count, and how much
    # depends on the CPU: the tiny SDXL UNet's peak is within 10% on AMD EPYC, 17% above on Intel Xeon.
    tolerance = 0.20 if pipeline_class == "StableDiffusionXLPipeline" else 0.10
    assert predicted.activation_bytes == pytest.approx(_allocator_peak(forward), rel=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline_class", ["FluxPipeline", "WanPipeline"])
def test_traced_vae_decode_matches_the_real_module(pipeline_class, tiny, request):
    if pipeline_class == "WanPipeline":
        # A known gap, kept visible: CPU's conv3d (slow_conv3d) builds im2col columns inside the
        # kernel, which no dispatch-level trace sees (measured 3.9x the traced peak here). On CUDA,
        # cuDNN's convolution workspace is what `vae_decode_workspace_factor` adds to the trace.
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="CPU conv3d's in-kernel im2col buffers are invisible to the trace")
        )
    folder, profile = tiny(pipeline_class)
    component = profile.vae
    component.trace = trace_component(profile, component, TRACE_SIZES[profile.workload])
    module = _loaded(folder, component)
    frames = 9 if profile.workload == "video" else 1

    def predicted_and_decode(height, width):
        workload = Workload(profile.workload, height=height, width=width, frames=frames, steps=1)
        f, h, w = latent_geometry(profile, workload)
        z = vae_latents(module, Geometry(1, f, h, w, 0), Maker("cpu", torch.float32))

        def decode():
            with torch.no_grad():
                module.decode(z, return_dict=False)

        return vae_decode_work(component, workload, "float32", DecodeMode(), k=constants()), decode

    # FLOPs at a small size: the math path that FlopCounterMode counts materialises the mid-block's
    # attention scores over every latent position (the tiny Flux VAE does not downsample).
    predicted, decode = predicted_and_decode(64, 96) if profile.workload == "image" else predicted_and_decode(96, 128)
    assert predicted.matmul_flops + predicted.conv_flops + predicted.attention_flops == pytest.approx(
        _flops(decode), rel=0.01
    )
    predicted, decode = (
        predicted_and_decode(320, 256) if profile.workload == "image" else predicted_and_decode(192, 192)
    )
    assert predicted.activation_bytes == pytest.approx(_allocator_peak(decode), rel=0.10)


@pytest.mark.slow
def test_traced_text_encoder_matches_the_real_module(tiny):
    folder, profile = tiny("FluxPipeline")
    component = next(c for c in profile.by_role("text_encoder") if c.class_name.startswith("T5"))
    component.trace = trace_component(profile, component)
    module = _loaded(folder, component)
    kwargs = text_encoder_inputs(component.trace["tokens"], 1, Maker("cpu", torch.float32)) | {
        "output_hidden_states": False
    }
    predicted = text_encoder_work(component, Workload("image", height=64, width=64, steps=1), "float32", constants())

    def encode():
        with torch.no_grad():
            module(**kwargs)

    assert predicted.matmul_flops + predicted.conv_flops + predicted.attention_flops == pytest.approx(
        _flops(encode), rel=1e-6
    )
    assert predicted.activation_bytes == pytest.approx(_allocator_peak(encode), rel=0.10)


@pytest.mark.parametrize(
    ("pipeline_class", "masked", "masked_when_batched"),
    [("ChromaPipeline", True, False), ("FluxPipeline", False, False), ("ZImagePipeline", False, True)],
)
def test_the_trace_says_whether_the_denoisers_attention_is_given_a_mask(
    pipeline_class, masked, masked_when_batched, tiny
):
    """Chroma's transformer gives every attention call the padding mask its pipeline builds (flash
    and Sage kernels refuse one); FLUX.1's calls take none; Z-Image masks a batch whose captions
    differ in length (transformer_z_image.py builds attn_mask only then), as batched guidance's do."""
    _, profile = tiny(pipeline_class)
    denoiser = profile.by_role("denoiser")[0]
    trace = trace_component(profile, denoiser, IMAGE_SIZES if profile.workload == "image" else VIDEO_SIZES)
    assert (trace["masked_attention"], trace["masked_when_batched"]) == (masked, masked_when_batched)
    every_call = all(p["masked_attention_flops"] == p["attention_flops"] for p in trace["points"])
    assert every_call is masked


def test_ltx_masks_only_its_cross_attention(tiny):
    """LTX-Video passes the text mask to its cross-attention alone (attn2; attn1 takes none): the
    masked share of a call's attention FLOPs is the text's share of the keys, T / (N + T), with N
    latent tokens attending to N in self-attention and to T text tokens across."""
    _, profile = tiny("LTXPipeline")
    denoiser = profile.by_role("denoiser")[0]
    trace = trace_component(profile, denoiser, VIDEO_SIZES)
    text = trace["text_tokens"]
    for p in trace["points"]:
        assert p["masked_attention_flops"] / p["attention_flops"] == pytest.approx(text / (p["x"] + text), rel=1e-6)


# --- local models: traced on first use, cached ------------------------------------------------------


def test_a_local_folder_is_traced_once_then_read_from_the_cache(tiny, tmp_path, monkeypatch):
    import advisor.trace.tracer as tracer
    from advisor.trace.cache import cache_path, with_traces

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder, _ = tiny("FluxPipeline")
    lines = []
    first = with_traces(profile_from_folder(folder), log=lines.append)
    traced = {c.name for c in first.components if c.trace}
    assert traced == {c.name for c in first.components if c.role in ("denoiser", "text_encoder", "vae")}, lines
    assert cache_path(first).exists() and any("first use" in line for line in lines)

    def must_not_trace(*args, **kwargs):
        raise AssertionError("traced again although the cache holds it")

    monkeypatch.setattr(tracer, "trace_component", must_not_trace)
    again = with_traces(profile_from_folder(folder))
    assert {c.name: c.trace for c in again.components} == {c.name: c.trace for c in first.components}


def test_a_kernel_set_earlier_in_the_process_does_not_change_the_trace(tiny):
    # set_attention_backend on any pipeline also sets the process's default kernel (diffusers 0.42),
    # and flex refuses meta tensors: a pipeline applied with it earlier must not break tracing.
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend

    folder, _ = tiny("FluxPipeline")
    profile = profile_from_folder(folder)
    transformer = profile.by_role("denoiser")[0]
    native = trace_component(profile, transformer)
    with attention_backend("flex"):
        assert _AttentionBackendRegistry.get_active_backend()[0] == "flex"
        assert trace_component(profile, transformer) == native


@pytest.mark.parametrize("junk", ["[" * 100_000, '{"a": ' + "9" * 5000 + "}", "[]", "{truncated"])
def test_an_unusable_trace_cache_is_traced_again_not_an_error(tiny, tmp_path, monkeypatch, junk):
    from advisor.trace.cache import cache_path, with_traces

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder, _ = tiny("FluxPipeline")
    path = cache_path(profile_from_folder(folder))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(junk)
    lines = []
    traced = with_traces(profile_from_folder(folder), log=lines.append)
    assert any(c.trace for c in traced.components) and any("first use" in line for line in lines)


def test_a_component_the_tracer_cannot_run_falls_back_to_the_formula_and_says_so(tiny, tmp_path, monkeypatch):
    from advisor.config import OptimizationConfig
    from advisor.plan.estimate import estimate
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload
    from advisor.trace.cache import with_traces

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder, _ = tiny("FluxPipeline")
    profile = profile_from_folder(folder)
    denoiser = profile.by_role("denoiser")[0]
    denoiser.class_name = "SomeNewTransformer"  # no input builder for it
    lines = []
    with_traces(profile, log=lines.append)
    assert denoiser.trace is None and any("not traced" in line and "parameter formula" in line for line in lines)
    result = estimate(
        profile, make_workload(profile), OptimizationConfig(), planned_target(machine=None, gpu="RTX 4090")
    )
    assert any(denoiser.name in note and "formula" in note for note in result.notes)
