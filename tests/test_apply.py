"""advisor.run (apply, steps, checks, emit, quantize): configs applied to real (tiny) diffusers pipelines on CPU, the generated script, and the checks.

Every option that can run on a CPU is applied to the tiny Flux (image) and Wan (video) pipelines and
the pipeline is run; GPU-only options are checked up to the diffusers objects and code they build
and the ConfigError a CPU machine gives, and run for real in the `cuda` tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from advisor.config import (
    Compile,
    LayerwiseCasting,
    Offload,
    OptimizationConfig,
    Provenance,
    Quantization,
    Vae,
)
from advisor.errors import ConfigError, ConfigWarning, UsageError
from advisor.levers import torchao
from advisor.run import apply, checks, emit, quantize
from advisor.run import steps as run_steps


CUDA = torch.cuda.is_available()
KINDS = ["image", "video"]


@pytest.fixture
def tiny(tiny_flux_dir, tiny_wan_dir):
    return {"image": tiny_flux_dir, "video": tiny_wan_dir}


# Fresh dynamo caches per test, dynamo flags put back (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("dynamo_isolated")


def cpu(**fields) -> OptimizationConfig:
    return OptimizationConfig(device="cpu", **fields)


def run(pipe, kind: str) -> np.ndarray:
    from advisor.testing import tiny_call_kwargs

    out = pipe(**tiny_call_kwargs(kind, seed=0))
    return np.asarray(out.images if kind == "image" else out.frames)


def load(path, config, **kwargs):
    return apply.load_pipeline(path, config, **kwargs)


def a_linear(pipe, kind: str):
    """An nn.Linear inside the first transformer block."""
    return (
        pipe.transformer.transformer_blocks[0].attn.to_q if kind == "image" else pipe.transformer.blocks[0].ffn.net[2]
    )


def group_hooked(module) -> list[str]:
    """Names of the submodules that carry a diffusers group-offloading hook."""
    return [
        name
        for name, sub in module.named_modules()
        if hasattr(sub, "_diffusers_hook") and sub._diffusers_hook.get_hook("group_offloading") is not None
    ]


@pytest.fixture
def baseline(tiny):
    """The unoptimized float32/bfloat16 CPU output of each tiny pipeline, computed once per test that asks."""
    cache = {}

    def get(kind: str, dtype: str = "bfloat16") -> np.ndarray:
        if (kind, dtype) not in cache:
            cache[kind, dtype] = run(load(tiny[kind], cpu(dtype=dtype)), kind)
        return cache[kind, dtype]

    return get


# --- dtype and quantization -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_loads_runs_and_does_not_use_the_deprecated_keyword(tiny, kind, dtype):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load(tiny[kind], cpu(dtype=dtype))
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
    assert pipe.transformer.dtype == getattr(torch, dtype)
    assert pipe.text_encoder.dtype == getattr(torch, dtype)
    out = run(pipe, kind)
    assert out.shape == ((1, 32, 32, 3) if kind == "image" else (1, 5, 32, 32, 3))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kind, encoder", [("image", "text_encoder_2"), ("video", "text_encoder")])
def test_torchao_int8_weight_only_quantizes_diffusers_and_transformers_components(tiny, baseline, kind, encoder):
    from torchao.quantization import Int8Tensor

    assert type(a_linear(load(tiny[kind], cpu()), kind).weight) is torch.nn.Parameter
    config = cpu(quantization=Quantization(backend="torchao", components=["transformer", encoder]))
    pipe = load(tiny[kind], config)
    assert isinstance(a_linear(pipe, kind).weight, Int8Tensor)
    encoder_weights = [m.weight for m in getattr(pipe, encoder).modules() if isinstance(m, torch.nn.Linear)]
    assert encoder_weights and all(isinstance(w, Int8Tensor) for w in encoder_weights)
    out = run(pipe, kind)
    assert np.isfinite(out).all()
    # int8 weights change the numbers a little, not the picture
    assert np.abs(out - baseline(kind)).mean() < 0.05


@pytest.mark.parametrize("scheme, cls", list(torchao.SCHEMES.items()))
def test_torchao_config_per_component_library(tiny_flux_dir, scheme, cls):
    import diffusers
    import torchao.quantization
    import transformers

    config = cpu(
        quantization=Quantization(backend="torchao", scheme=scheme, components=["transformer", "text_encoder_2"])
    )
    for model in (tiny_flux_dir, None):  # from model_index.json, and by component name
        q = quantize.pipeline_kwargs(config, model)["quantization_config"]
        assert q.quant_backend is None and q.is_granular
        assert type(q.quant_mapping["transformer"]) is diffusers.TorchAoConfig
        assert type(q.quant_mapping["text_encoder_2"]) is transformers.TorchAoConfig
        for component in q.quant_mapping.values():
            assert type(component.quant_type) is getattr(torchao.quantization, cls)
    code = quantize.loading_code(config, tiny_flux_dir)
    assert f'"transformer": TorchAoConfig({cls}())' in code
    assert f'"text_encoder_2": TransformersTorchAoConfig({cls}())' in code


@pytest.mark.skipif(CUDA, reason="checks what a CPU-only machine refuses")
@pytest.mark.parametrize("scheme", ["float8_dynamic", "int4_weight_only"])
def test_torchao_schemes_without_cpu_kernels_are_refused_before_loading(tiny_flux_dir, monkeypatch, scheme):
    _forbid_loading(monkeypatch)
    config = cpu(quantization=Quantization(backend="torchao", scheme=scheme, components=["transformer"]))
    with pytest.raises(ConfigError, match=f"`quantization.scheme: {scheme}`.*on CPU use int8_weight_only"):
        load(tiny_flux_dir, config)


# --- layerwise casting ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_fp8_casting_stores_float8_and_runs(tiny, baseline, kind):
    config = cpu(layerwise_casting=LayerwiseCasting(components=["transformer", "text_encoder"]))
    steps = run_steps.plan(config, model=tiny[kind])
    assert [s.code for s in steps if s.key == "layerwise_casting"] == [
        "pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)",
        "apply_layerwise_casting(\n"
        "    pipe.text_encoder,\n"
        "    storage_dtype=torch.float8_e4m3fn,\n"
        "    compute_dtype=torch.bfloat16,\n"
        '    skip_modules_pattern=("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", "embed", "shared", '
        '"lm_head"' + (', "wo"' if kind == "video" else "") + "),\n)",
    ]
    pipe = load(tiny[kind], config)
    blocks = pipe.transformer.transformer_blocks if kind == "image" else pipe.transformer.blocks
    assert (
        all(block.attn1.to_q.weight.dtype == torch.float8_e4m3fn for block in blocks)
        if kind == "video"
        else all(block.attn.to_q.weight.dtype == torch.float8_e4m3fn for block in blocks)
    )
    attention = [m for n, m in pipe.text_encoder.named_modules() if n.endswith(("q_proj", ".q"))]
    assert attention and all(m.weight.dtype == torch.float8_e4m3fn for m in attention)
    # the embeddings stay at the compute dtype: pipelines cast prompt embeddings to text_encoder.dtype
    assert pipe.text_encoder.dtype == torch.bfloat16
    # diffusers' skip patterns keep norms (and their modulation linears) out of fp8
    norms = [p for n, p in pipe.transformer.named_parameters() if "norm" in n]
    assert norms and not any(p.dtype == torch.float8_e4m3fn for p in norms)
    stored = [p.dtype for p in pipe.transformer.parameters()]
    assert stored.count(torch.float8_e4m3fn) > len(stored) / 2
    out = run(pipe, kind)
    assert np.isfinite(out).all()
    assert np.abs(out - baseline(kind)).mean() < 0.1


def test_layerwise_casting_of_an_encoder_whose_dtype_would_read_fp8_is_refused():
    class FakePipeline:  # a text encoder whose first weight is an ordinary Linear
        components = {"text_encoder": torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))}

    config = cpu(layerwise_casting=LayerwiseCasting(components=["text_encoder"]))
    with pytest.raises(
        ConfigError,
        match=r"`layerwise_casting.components` cannot include 'text_encoder' \(Sequential\): its first weight '0.weight'",
    ):
        checks.check_pipeline(FakePipeline(), config)


# --- group offloading (CPU as both devices) -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_installs_hooks_and_keeps_outputs(tiny, baseline, kind, offload_type):
    config = cpu(offload=Offload(strategy="group", offload_type=offload_type, num_blocks_per_group=1))
    pipe = load(tiny[kind], config)
    blocks = pipe.transformer.transformer_blocks if kind == "image" else pipe.transformer.blocks
    hooked = group_hooked(pipe.transformer)
    if offload_type == "block_level":
        assert blocks[0]._diffusers_hook.get_hook("group_offloading") is not None
    else:
        first_linear = next(m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear))
        assert first_linear._diffusers_hook.get_hook("group_offloading") is not None
        assert len(hooked) > len(blocks)
    for name in ("text_encoder", "vae"):  # pipe.enable_group_offload covers every model
        assert group_hooked(getattr(pipe, name))
    out = run(pipe, kind)
    assert torch.allclose(torch.from_numpy(out), torch.from_numpy(baseline(kind)), rtol=0, atol=0)


@pytest.mark.parametrize("kind, components", [("image", ["transformer"]), ("video", ["transformer", "text_encoder"])])
def test_group_offload_of_chosen_components_moves_the_others(tiny, baseline, kind, components):
    config = cpu(offload=Offload(strategy="group", components=components, num_blocks_per_group=2))
    codes = [s.code for s in run_steps.plan(config, model=tiny[kind]) if s.key == "offload"]
    assert codes[0].startswith("pipe.transformer.enable_group_offload(")
    if "text_encoder" in components:  # a transformers model: diffusers' function, not a method
        assert codes[1].startswith("apply_group_offloading(\n    pipe.text_encoder,\n")
    assert 'pipe.vae.to("cpu")' in codes
    pipe = load(tiny[kind], config)
    for name in components:
        assert group_hooked(getattr(pipe, name))
    assert not group_hooked(pipe.vae)
    np.testing.assert_array_equal(run(pipe, kind), baseline(kind))


def test_group_offload_low_ram_and_disk_on_cpu(tiny_wan_dir, baseline, tmp_path):
    config = cpu(
        offload=Offload(
            strategy="group", offload_type="leaf_level", non_blocking=True, low_cpu_mem_usage=True,
            offload_to_disk_path=str(tmp_path / "spill"), components=["transformer"],
        )
    )  # fmt: skip
    (step,) = [s for s in run_steps.plan(config, model=tiny_wan_dir) if "enable_group_offload" in s.code]
    for text in ('offload_type="leaf_level"', "non_blocking=True", "low_cpu_mem_usage=True", "offload_to_disk_path="):
        assert text in step.code
    assert "num_blocks_per_group" not in step.code  # block_level only
    pipe = load(tiny_wan_dir, config)
    assert list((tmp_path / "spill").glob("*.safetensors"))
    np.testing.assert_array_equal(run(pipe, "video"), baseline("video"))


# --- VAE, attention, channels_last ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_vae_tiling_and_slicing_are_enabled(tiny, kind):
    pipe = load(tiny[kind], cpu(vae=Vae(tiling=True, slicing=True)))
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    assert np.isfinite(run(pipe, kind)).all()


def test_vae_without_tiling_is_skipped_with_a_warning():
    class FakePipeline:
        components = {"transformer": torch.nn.Linear(2, 2), "vae": torch.nn.Conv2d(1, 1, 1)}

    with pytest.warns(ConfigWarning, match=r"`vae.tiling: true` but Conv2d has no enable_tiling\(\)"):
        steps = run_steps.plan(cpu(vae=Vae(tiling=True)), FakePipeline())
    assert not [s for s in steps if s.key == "vae"]


@pytest.mark.parametrize("kind", KINDS)
def test_attention_backend_and_channels_last(tiny, baseline, kind):
    from diffusers.models.attention_dispatch import AttentionBackendName

    config = cpu(attention_backend="native", channels_last=kind == "image")  # Wan has Conv3d weights: see below
    codes = [s.code for s in run_steps.plan(config, model=tiny[kind])]
    assert codes == ["pipe.transformer.to(memory_format=torch.channels_last)"] * (kind == "image") + [
        'pipe.to("cpu")',
        'pipe.transformer.set_attention_backend("native")',
    ]
    pipe = load(tiny[kind], config)
    processors = [getattr(m, "processor", None) for m in pipe.transformer.modules()]
    backends = {p._attention_backend for p in processors if hasattr(p, "_attention_backend")}
    assert backends == {AttentionBackendName.NATIVE}
    np.testing.assert_array_equal(run(pipe, kind), baseline(kind))


def test_channels_last_refused_for_a_3d_denoiser(tiny_wan_dir):
    with pytest.raises(
        ConfigError, match=r"`channels_last: true` cannot apply to transformer \(WanTransformer3DModel\).*5-D"
    ):
        load(tiny_wan_dir, cpu(channels_last=True))


# --- compile ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, blocks",
    [("image", {"FluxTransformerBlock", "FluxSingleTransformerBlock"}), ("video", {"WanTransformerBlock"})],
)
def test_regional_compile_compiles_only_the_repeated_blocks(tiny, baseline, kind, blocks):
    config = cpu(compile=Compile(backend="eager", dynamo_config={"cache_size_limit": 64}))
    steps = run_steps.plan(config, model=tiny[kind])
    assert [s.code for s in steps] == [
        "torch._dynamo.config.cache_size_limit = 64",
        'pipe.to("cpu")',
        'pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")',
    ]
    pipe = load(tiny[kind], config)
    assert torch._dynamo.config.cache_size_limit == 64
    compiled = [
        type(m).__name__ for m in pipe.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None
    ]
    assert set(compiled) == blocks
    assert pipe.transformer._compiled_call_impl is None
    np.testing.assert_allclose(run(pipe, kind), baseline(kind), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_full_compile_of_the_transformer(tiny, baseline, kind):
    config = cpu(compile=Compile(regional=False, backend="aot_eager", dynamic=False))
    (step,) = [s for s in run_steps.plan(config, model=tiny[kind]) if s.key == "compile"]
    assert step.code == 'pipe.transformer.compile(fullgraph=True, dynamic=False, backend="aot_eager")'
    pipe = load(tiny[kind], config)
    assert pipe.transformer._compiled_call_impl is not None
    np.testing.assert_allclose(run(pipe, kind), baseline(kind), atol=1e-2)


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"offload": Offload(strategy="group")}, "is group-offloaded"),
        ({"layerwise_casting": LayerwiseCasting(components=["transformer"])}, "is layerwise-cast"),
    ],
)
def test_fullgraph_with_diffusers_hooks_is_refused_and_works_without_it(tiny_wan_dir, baseline, fields, why):
    with pytest.raises(
        ConfigError, match=f"`compile.fullgraph: true` fails on `transformer`, which {why}.*`compile.fullgraph: false`"
    ):
        load(tiny_wan_dir, cpu(compile=Compile(backend="eager"), **fields))
    config = cpu(compile=Compile(backend="eager", fullgraph=False, dynamo_config={"cache_size_limit": 1000}), **fields)
    pipe = load(tiny_wan_dir, config)
    out = run(pipe, "video")
    if "offload" in fields:  # offloading moves weights, it does not change them
        np.testing.assert_allclose(out, baseline("video"), atol=1e-6)
    assert np.isfinite(out).all()


def test_torchao_with_compile_and_group_offload(tiny_flux_dir, monkeypatch):
    quantized = Quantization(backend="torchao", components=["transformer"])
    compiled = Compile(backend="eager", fullgraph=False)
    # leaf-level works: compiled, quantized and offloaded gives what quantized alone gives
    config = cpu(
        quantization=quantized, compile=compiled, offload=Offload(strategy="group", offload_type="leaf_level")
    )
    out = run(load(tiny_flux_dir, config), "image")
    np.testing.assert_allclose(out, run(load(tiny_flux_dir, cpu(quantization=quantized)), "image"), atol=1e-6)
    # block-level moves blocks with Module.to, which cannot swap torchao weights that compile holds
    _forbid_loading(monkeypatch)
    block = cpu(quantization=quantized, compile=compiled, offload=Offload(strategy="group"))
    with pytest.raises(
        ConfigError,
        match="compiled `transformer` cannot be group-offloaded with `offload.offload_type: block_level`.*leaf_level",
    ):
        load(tiny_flux_dir, block)
    disk = cpu(quantization=quantized, offload=Offload(strategy="group", offload_to_disk_path="/tmp/x"))
    with pytest.raises(ConfigError, match="`offload.offload_to_disk_path` cannot hold `transformer`"):
        load(tiny_flux_dir, disk)


def test_regional_compile_of_a_model_without_repeated_blocks_warns_and_compiles_it_whole(tiny_flux_dir):
    config = cpu(compile=Compile(components=["text_encoder"], backend="eager"))
    with pytest.warns(ConfigWarning, match="text_encoder \\(CLIPTextModel\\) has no `_repeated_blocks`"):
        steps = run_steps.plan(config, model=tiny_flux_dir)
    assert steps[-1].code == 'pipe.text_encoder.compile(fullgraph=True, backend="eager")'


@pytest.mark.slow
def test_regional_inductor_compile_runs_and_matches_eager(tiny_flux_dir, baseline):
    from torch._dynamo.utils import counters

    pipe = load(tiny_flux_dir, cpu(dtype="float32", compile=Compile()))
    before = counters["stats"]["unique_graphs"]
    out = run(pipe, "image")
    assert counters["stats"]["unique_graphs"] > before  # inductor really compiled graphs
    np.testing.assert_allclose(out, baseline("image", "float32"), atol=1e-4)


# --- GPU-only options: the objects and code they build, and the refusal on CPU ---------------------

SEED_PAGE_QUANT = """pipeline_quant_config = PipelineQuantizationConfig(
    quant_backend="bitsandbytes_4bit",
    quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
    components_to_quantize=["transformer", "text_encoder_2"],
)"""


def test_bitsandbytes_4bit_builds_the_seed_page_config():
    config = OptimizationConfig(
        quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"])
    )
    kwargs = quantize.pipeline_kwargs(config)
    q = kwargs["quantization_config"]
    assert q.quant_backend == "bitsandbytes_4bit"
    assert q.quant_kwargs == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }
    assert q.components_to_quantize == ["transformer", "text_encoder_2"]
    assert kwargs[quantize.dtype_keyword()] is torch.bfloat16
    assert quantize.loading_code(config) == SEED_PAGE_QUANT
    # what diffusers builds from it for each library at load time
    import diffusers
    import transformers

    assert type(q._resolve_quant_config(True, "transformer")) is diffusers.BitsAndBytesConfig
    assert type(q._resolve_quant_config(False, "text_encoder_2")) is transformers.BitsAndBytesConfig
    assert q._resolve_quant_config(False, "text_encoder") is None


def test_bitsandbytes_variants():
    fp4 = OptimizationConfig(
        dtype="float16",
        quantization=Quantization(
            backend="bitsandbytes_4bit", quant_type="fp4", double_quant=True, components=["transformer"]
        ),
    )
    q = quantize.pipeline_kwargs(fp4)["quantization_config"]
    assert q.quant_kwargs == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_compute_dtype": torch.float16,
        "bnb_4bit_use_double_quant": True,
    }
    int8 = OptimizationConfig(quantization=Quantization(backend="bitsandbytes_8bit", components=["transformer"]))
    q = quantize.pipeline_kwargs(int8)["quantization_config"]
    assert (q.quant_backend, q.quant_kwargs, q.components_to_quantize) == (
        "bitsandbytes_8bit",
        {"load_in_8bit": True},
        ["transformer"],
    )


@pytest.mark.parametrize(
    "offload, device, code",
    [
        (Offload(strategy="model"), "cuda", "pipe.enable_model_cpu_offload()"),
        (Offload(strategy="model"), "cuda:1", 'pipe.enable_model_cpu_offload(device="cuda:1")'),
        (Offload(strategy="sequential"), "cuda", "pipe.enable_sequential_cpu_offload()"),
        (
            Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True),
            "cuda",
            "pipe.enable_group_offload(\n"
            '    onload_device="cuda",\n'
            '    offload_device="cpu",\n'
            '    offload_type="leaf_level",\n'
            "    use_stream=True,\n"
            "    record_stream=True,\n"
            ")",
        ),
    ],
)
def test_gpu_offload_steps_code(tiny_flux_dir, offload, device, code):
    config = OptimizationConfig(device=device, offload=offload)
    assert [s.code for s in run_steps.plan(config, model=tiny_flux_dir)] == [code]


def _forbid_loading(monkeypatch):
    from diffusers import DiffusionPipeline

    def fail(*args, **kwargs):
        raise AssertionError("loaded a pipeline the config should have refused first")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fail)


GPU_ONLY = {
    "bnb4": (
        dict(device="cpu", quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"])),
        r"`quantization.backend: bitsandbytes_4bit` needs CUDA.*use `quantization.backend: torchao` or `layerwise_casting`",
    ),
    "bnb8": (
        dict(quantization=Quantization(backend="bitsandbytes_8bit", components=["transformer"])),
        r"`quantization.backend: bitsandbytes_8bit` needs CUDA",
    ),
    "model": (
        dict(offload=Offload(strategy="model")),
        r"`offload.strategy: model` moves weights to a CUDA GPU.*`device: cpu`",
    ),
    "sequential": (
        dict(offload=Offload(strategy="sequential")),
        r"`offload.strategy: sequential`.*`offload.strategy: group`",
    ),
    "stream": (
        dict(device="cpu", offload=Offload(strategy="group", use_stream=True)),
        r"`offload.use_stream: true` needs CUDA streams.*set `offload.use_stream: false`",
    ),
    "device": (dict(), r"`device: cuda` but this machine has no CUDA GPU.*use `device: cpu`"),
}


@pytest.mark.skipif(CUDA, reason="checks what a CPU-only machine refuses")
@pytest.mark.parametrize("name", list(GPU_ONLY))
def test_gpu_only_options_are_refused_on_cpu(tiny_flux_dir, monkeypatch, name):
    fields, message = GPU_ONLY[name]
    config = OptimizationConfig(**fields)
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tiny_flux_dir)
    with pytest.raises(ConfigError, match=message):
        apply.apply_config(loaded, config)
    _forbid_loading(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        load(tiny_flux_dir, config)
    # the script can still be written for a GPU machine
    assert "pipe = DiffusionPipeline.from_pretrained(" in emit.emit_python(str(tiny_flux_dir), config)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "kind, fields",
    [
        ("image", dict(quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"]),
                       offload=Offload(strategy="model"),
                       compile=Compile(dynamo_config={"capture_dynamic_output_shape_ops": True, "cache_size_limit": 1000}))),
        ("video", dict(quantization=Quantization(backend="bitsandbytes_8bit", components=["transformer"]))),
        ("image", dict(offload=Offload(strategy="sequential"))),
        ("video", dict(offload=Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True))),
        ("video", dict(offload=Offload(strategy="group", use_stream=True, low_cpu_mem_usage=True), vae=Vae(tiling=True))),
    ],
)  # fmt: skip
def test_gpu_options_run_on_cuda(tiny, kind, fields):
    pipe = load(tiny[kind], OptimizationConfig(device="cuda", **fields))
    offload = fields.get("offload", Offload())
    if offload.strategy == "group":
        assert group_hooked(pipe.transformer)
    elif offload.strategy in ("model", "sequential"):  # accelerate's hooks
        assert any(hasattr(m, "_hf_hook") for m in pipe.transformer.modules())
    out = run(pipe, kind)
    assert np.isfinite(out).all()
    if "quantization" in fields:
        import bitsandbytes as bnb

        assert isinstance(a_linear(pipe, kind), (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    else:  # offloading moves weights, it does not change them
        plain = run(load(tiny[kind], OptimizationConfig(device="cuda")), kind)
        np.testing.assert_allclose(out, plain, atol=1e-2)


# --- the generated script -------------------------------------------------------------------------


def test_emitted_script_runs_and_gives_the_same_image(tiny_flux_dir, tmp_path):
    config = cpu(
        quantization=Quantization(backend="torchao", components=["transformer", "text_encoder_2"]),
        offload=Offload(strategy="group", offload_type="leaf_level"),
        compile=Compile(backend="eager", fullgraph=False, dynamo_config={"cache_size_limit": 1000}),
        vae=Vae(tiling=True),
        attention_backend="native",
    )
    script = emit.emit_python(str(tiny_flux_dir), config)
    assert script.startswith(f"# {run_steps.summary(config)}\n")
    for step in run_steps.plan(config, model=tiny_flux_dir):  # the script is made of the steps' code
        assert step.code in script
    assert script.index("torch._dynamo.config.cache_size_limit = 1000") < script.index("from_pretrained(")
    prompt, call = 'prompt = "a photo of a cat"\n', "image = pipe(prompt=prompt).images[0]\n"
    assert prompt in script and script.endswith(call + 'image.save("image.png")\n')
    # the tiny pipeline's prompt and call arguments; the script's own line saves the image
    script = script.replace(
        prompt, 'from advisor.testing import tiny_call_kwargs\nprompt = tiny_call_kwargs("image")["prompt"]\n'
    )
    script = script.replace(
        call,
        textwrap.dedent(f"""\
            import numpy as np
            job = {{k: v for k, v in tiny_call_kwargs("image", seed=0).items() if k != "prompt"}}
            np.save({str(tmp_path / "script.npy")!r}, pipe(prompt=prompt, **job).images)
            image = pipe(prompt=prompt, **{{**job, "output_type": "pil"}}).images[0]
        """),
    )
    (tmp_path / "generated.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "generated.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "image.png").stat().st_size > 0

    pipe = load(tiny_flux_dir, config)
    np.testing.assert_array_equal(np.load(tmp_path / "script.npy"), run(pipe, "image"))


def test_emitted_script_for_video_and_for_unknown_models(tiny_wan_dir):
    workload = {
        "kind": "video",
        "height": 480,
        "width": 832,
        "frames": 81,
        "steps": 50,
        "batch": 1,
    }  # Workload.to_dict()
    config = cpu(
        offload=Offload(strategy="group", components=["transformer"]), provenance=Provenance(workload=workload)
    )
    script = emit.emit_python(str(tiny_wan_dir), config)
    assert script.endswith(
        "video = pipe(prompt=prompt, height=480, width=832, num_inference_steps=50, num_frames=81).frames[0]\n"
        'export_to_video(video, "video.mp4", fps=16)\n'
    )
    assert 'pipe.text_encoder.to("cpu")' in script and 'pipe.vae.to("cpu")' in script
    compile(script, "generated.py", "exec")
    # a model the advisor cannot read: the other components are moved by a loop over pipe.components
    script = emit.emit_python(
        "someone/not-a-cached-model", config.replace(provenance=Provenance(workload={"kind": "video"}))
    )
    assert script.endswith('video = pipe(prompt=prompt).frames[0]\nexport_to_video(video, "video.mp4")\n')
    assert 'if name not in ["transformer"] and isinstance(component, torch.nn.Module):' in script
    compile(script, "generated.py", "exec")
    # the catalog knows FLUX.1-dev offline: its text encoders are transformers models
    script = emit.emit_python(
        "black-forest-labs/FLUX.1-dev",
        OptimizationConfig(quantization=Quantization(backend="torchao", components=["transformer", "text_encoder_2"])),
    )
    assert '"text_encoder_2": TransformersTorchAoConfig(Int8WeightOnlyConfig()),' in script
    assert script.endswith('image = pipe(prompt=prompt).images[0]\nimage.save("image.png")\n')


# --- config against pipeline ----------------------------------------------------------------------


def test_quantizing_a_missing_component_names_it_and_lists_the_real_ones(tiny_flux_dir, monkeypatch):
    config = cpu(quantization=Quantization(backend="torchao", components=["transformer_2"]))
    message = r"`quantization.components` names 'transformer_2'.*components are text_encoder, text_encoder_2, transformer, vae"
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tiny_flux_dir)
    with pytest.raises(ConfigError, match=message):
        apply.apply_config(loaded, config)
    with pytest.raises(ConfigError, match=message):
        emit.emit_python(str(tiny_flux_dir), config)
    _forbid_loading(monkeypatch)  # refused from model_index.json, before any weight is read
    with pytest.raises(ConfigError, match=message):
        load(tiny_flux_dir, config)


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"layerwise_casting": LayerwiseCasting(components=["unet"])}, "layerwise_casting.components"),
        ({"compile": Compile(components=["tokenizer"], backend="eager")}, "compile.components"),
        ({"offload": Offload(strategy="group", components=["image_encoder"])}, "offload.components"),
    ],
)
def test_other_missing_or_non_model_components(tiny_flux_dir, fields, key):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir)
    with pytest.raises(ConfigError, match=f"`{key}` names") as error:
        apply.apply_config(pipe, cpu(**fields))
    assert "transformer" in str(error.value)


def test_config_made_for_another_pipeline_warns(tiny_flux_dir):
    config = cpu(provenance=Provenance(pipeline_class="WanPipeline"))
    with pytest.warns(
        ConfigWarning, match="`provenance.pipeline_class` is WanPipeline but the pipeline is a FluxPipeline"
    ):
        pipe = load(tiny_flux_dir, config)
    assert np.isfinite(run(pipe, "image")).all()


def test_quantization_missing_from_an_already_loaded_pipeline_warns(tiny_flux_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir)
    with pytest.warns(ConfigWarning, match=r"\['transformer'\] are not quantized"):
        apply.apply_config(pipe, cpu(quantization=Quantization(backend="torchao", components=["transformer"])))


def test_gpu_provenance_warnings():
    config = OptimizationConfig(provenance=Provenance(gpu_name="NVIDIA H100 80GB HBM3", budget_bytes=80 * 2**30))
    with pytest.warns(ConfigWarning) as caught:
        checks.gpu_warnings(config, "NVIDIA GeForce RTX 4090", 24 * 2**30)
    messages = [str(w.message) for w in caught]
    assert any("`provenance.budget_bytes`" in m and "RTX 4090" in m for m in messages)
    assert any("`provenance.gpu_name` is 'NVIDIA H100 80GB HBM3'" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checks.gpu_warnings(config, "NVIDIA H100 80GB HBM3", 80 * 2**30)
        # Planned with `--gpu "RTX 4090"` (the datasheet's name), applied on that card as NVML names it.
        planned = OptimizationConfig(provenance=Provenance(gpu_name="RTX 4090", budget_bytes=20 * 2**30))
        checks.gpu_warnings(planned, "NVIDIA GeForce RTX 4090", 23.99 * 2**30)
    # The 8 GB RTX 4060 Ti is not the 16 GB card a config was planned for.
    with pytest.warns(ConfigWarning, match=r"`provenance.gpu_name` is 'RTX 4060 Ti'"):
        checks.gpu_warnings(
            OptimizationConfig(provenance=Provenance(gpu_name="RTX 4060 Ti")), "NVIDIA GeForce RTX 4060 Ti", 8 * 2**30
        )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"compile": Compile(dynamo_config={"no_such_flag": True})}, r"`compile.dynamo_config.no_such_flag`"),
        (
            {"compile": Compile(backend="nope")},
            r"`compile.backend: nope` is not a torch.compile backend.*aot_eager.*inductor",
        ),
    ],
)
def test_config_problems_are_refused_with_the_key(fields, message):
    config = cpu(**fields)
    with pytest.raises(ConfigError, match=message):
        checks.check_machine(config)
    with pytest.raises(ConfigError, match=message):
        emit.emit_python("black-forest-labs/FLUX.1-dev", config)


def test_load_pipeline_takes_a_config_file_and_keeps_the_dtype_to_the_config(tiny_flux_dir, tmp_path):
    path = cpu(dtype="float32").save(tmp_path / "advisor.json")
    pipe = apply.load_pipeline(tiny_flux_dir, path)
    assert pipe.transformer.dtype == torch.float32
    with pytest.raises(UsageError, match="`torch_dtype` comes from the config"):
        apply.load_pipeline(tiny_flux_dir, path, torch_dtype=torch.float16)


def test_the_public_api_loads_and_applies_a_pipeline_you_load_yourself(tiny_flux_dir):
    import advisor

    config = cpu(dtype="float32")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir, **advisor.pipeline_kwargs(config))
    assert advisor.apply_config(pipe, config) is pipe
    assert pipe.transformer.dtype == torch.float32


def test_load_pipeline_keeps_the_libraries_harmless_noise_off_the_terminal(tiny_flux_dir):
    """`tune` keeps its trials' output; a load in the user's process must not print torchao's
    "Failed to load <kernel>.so" for extensions built for other GPUs, nor torch's deprecation about
    torchao's Enums (`advisor.run.quiet`): they say nothing about the user's pipeline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bare = subprocess.run([sys.executable, "-c", "import torchao"], capture_output=True, text=True, env=env)
    if "Failed to load" not in bare.stderr:
        pytest.skip("this torchao build loads every extension: there is no noise to keep off")
    load = (
        "import advisor\n"
        f"advisor.load_pipeline({str(tiny_flux_dir)!r}, advisor.OptimizationConfig(device='cpu', dtype='float32'))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "Failed to load" not in loaded.stderr and "register_constant" not in loaded.stderr, loaded.stderr[-2000:]
