"""LoRAs: read from their headers, planned so that they keep working, and run through load_pipeline.

Tiny LoRAs are made here with peft on the tiny Flux pipeline (`advisor.testing.lora`), saved with
diffusers' ``save_lora_weights`` and in kohya's layout. Every combination the planner refuses is
run here where the CPU runs it, to show it really fails with the installed diffusers and peft.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import advisor
from advisor.cli import main
from advisor.config import Compile, LayerwiseCasting, Lora, Offload, OptimizationConfig, Quantization
from advisor.errors import ConfigError, UsageError
from advisor.platform import Platform
from advisor.probe.lora import assumed_lora, read_lora, split_spec
from advisor.probe.models import load_profile, profile_from_folder
from advisor.testing import tiny_call_kwargs
from advisor.testing.gguf import write_gguf
from advisor.testing.lora import write_kohya_flux_lora, write_tiny_lora


@pytest.fixture(scope="module")
def loras(tiny_flux_dir, tmp_path_factory):
    """Two rank-4 LoRAs, a rank-2 one, one with text-encoder layers, and the first in kohya's layout."""
    root = tmp_path_factory.mktemp("loras")
    made = {
        "a": write_tiny_lora(tiny_flux_dir, root / "a", rank=4, seed=1),
        "b": write_tiny_lora(tiny_flux_dir, root / "b", rank=4, seed=2),
        "small": write_tiny_lora(tiny_flux_dir, root / "small", rank=2, seed=3),
        "with_encoder": write_tiny_lora(tiny_flux_dir, root / "te", rank=4, seed=4, text_encoder=True),
        "mlp": write_tiny_lora(tiny_flux_dir, root / "mlp", rank=4, seed=5, targets=("proj_mlp",)),
    }
    made["kohya"] = write_kohya_flux_lora(made["a"], root / "kohya" / "a_kohya.safetensors")
    return made


@pytest.fixture(scope="module")
def profile(tiny_flux_dir):
    return profile_from_folder(tiny_flux_dir)


def tensors_of(path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# --- reading LoRAs --------------------------------------------------------------------------------


def test_a_diffusers_lora_is_read_from_its_header(loras, profile):
    adapter = read_lora(f"{loras['with_encoder']}:0.7", profile)
    tensors = tensors_of(loras["with_encoder"])
    for component, prefix in (("transformer", "transformer."), ("text_encoder", "text_encoder.")):
        a = {k: v for k, v in tensors.items() if k.startswith(prefix) and k.endswith("lora_A.weight")}
        b = {k: v for k, v in tensors.items() if k.startswith(prefix) and k.endswith("lora_B.weight")}
        assert adapter.layers[component] == len(a) == len(b)
        assert adapter.parameters[component] == sum(v.numel() for v in (*a.values(), *b.values()))
        assert adapter.outputs[component] == sum(v.shape[0] for v in b.values())
    assert adapter.rank == 4 and adapter.scale == 0.7 and adapter.format == "diffusers"
    assert adapter.file_bytes == loras["with_encoder"].stat().st_size
    assert adapter.digest == read_lora(str(loras["with_encoder"]), profile).digest  # the scale is not the file


def test_a_kohya_lora_is_read_from_its_header(loras, profile):
    adapter = read_lora(str(loras["kohya"]), profile)
    assert adapter.format == "kohya"
    assert adapter.layers == {"transformer": 2}  # the fused qkv and the output projection
    # A stacked (3 x rank) x in and B (3 x out) x (3 x rank) for qkv: its stored rank is 12
    assert adapter.rank == 12
    assert adapter.parameters["transformer"] == sum(
        v.numel() for k, v in tensors_of(loras["kohya"]).items() if not k.endswith(".alpha")
    )


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("x.safetensors:0.8", ("x.safetensors", 0.8)),
        ("x.safetensors", ("x.safetensors", 1.0)),
        (r"C:\loras\x.safetensors", (r"C:\loras\x.safetensors", 1.0)),  # the drive's colon stays
        (r"C:\loras\x.safetensors:1.5", (r"C:\loras\x.safetensors", 1.5)),
        ("user/repo/style.safetensors:-0.5", ("user/repo/style.safetensors", -0.5)),
    ],
)
def test_the_scale_is_a_number_after_the_last_colon(spec, expected):
    assert split_spec(spec) == expected


def test_a_file_whose_name_ends_in_a_colon_and_a_number_is_a_file(tmp_path):
    odd = tmp_path / "odd:2"
    odd.write_bytes(b"")
    assert split_spec(str(odd)) == (str(odd), 1.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora", "/no/such/lora.safetensors"], "--lora /no/such/lora.safetensors: no such file"),
        (["--lora-count", "2"], "--lora-count: needs --lora-rank"),
        (["--lora-swap"], "--lora-swap: says the LoRAs are swapped"),
        (["--lora-rank", "0"], "--lora-rank: 0 must be a whole number from 1"),
        (["--lora-rank", "99999"], "--lora-rank: 99999 must be a whole number from 1 to 4096"),
        (["--lora-rank", "16", "--lora-count", "17"], "--lora-count: 17 must be a whole number from 1 to 16"),
    ],
)
def test_bad_lora_input_is_one_line_naming_the_flag(flags, message, capsys):
    assert main(["recommend", "flux-dev", "--gpu", "RTX 4090", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_file_that_is_not_a_lora_or_a_folder_is_refused(loras, tiny_flux_dir, capsys):
    weights = next((tiny_flux_dir / "vae").glob("*.safetensors"))
    assert main(["recommend", str(tiny_flux_dir), "--vram", "8GB", "--lora", str(weights)]) == 2
    assert "no LoRA layers in its header" in capsys.readouterr().err
    assert main(["recommend", str(tiny_flux_dir), "--vram", "8GB", "--lora", str(loras["a"].parent)]) == 2
    assert "is a folder; name the LoRA's .safetensors file" in capsys.readouterr().err


def test_a_lora_for_another_models_blocks_is_refused(loras, tiny_wan_dir, capsys):
    """A Flux LoRA's layers sit in transformer_blocks; Wan's transformer has `blocks`: diffusers would
    load none of it (a warning only), so the plan refuses it."""
    assert main(["recommend", str(tiny_wan_dir), "--vram", "8GB", "--lora", str(loras["a"])]) == 2
    err = capsys.readouterr().err
    assert "are in none of WanTransformer3DModel's blocks (blocks); is it a LoRA for another model?" in err


def test_an_assumed_lora_is_its_rank_on_every_linear_layer():
    """A layer of in x out weights takes rank x (in + out) adapter parameters: for Flux's d x d
    attention projections (d = 3072) that is 2 x rank / d of the layer, for its 3072 x 12288 MLP
    layers rank x 15360 / 37.7M; so a rank-16 LoRA on every Linear is 0.65% to 1.04% of them."""
    flux = load_profile("flux-dev")
    transformer = flux.by_role("denoiser")[0]
    adapter = assumed_lora(16, flux)
    share = adapter.parameters["transformer"] / transformer.linear_parameters
    assert 16 * 15360 / (3072 * 12288) < share < 2 * 16 / 3072
    assert adapter.format == "assumed" and adapter.layers["transformer"] == transformer.linear_layers


# --- planning with LoRAs --------------------------------------------------------------------------


def recommend_json(*flags) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["recommend", "flux-dev", "--gpu", "RTX 4090", "--ram", "64GB", *flags, "--json"]) == 0
    return json.loads(out.getvalue())


def test_swapped_and_fixed_loras_get_different_explained_plans():
    """diffusers' LoRA guide: fuse a LoRA that stays (no extra work per step), keep swapped ones
    unfused and, in a compiled model, hotswappable (enable_lora_hotswap before the first load: the
    lora-fast blog's recipe)."""
    fixed = recommend_json("--lora-rank", "32")
    swapped = recommend_json("--lora-rank", "32", "--lora-swap")
    assert swapped["config"]["lora"]["swap"] and not swapped["config"]["lora"]["fuse"]
    # hotswap exactly where a swapped LoRA meets a compiled (or fp8-stored) transformer
    compiled = "transformer" in (swapped["config"].get("compile") or {}).get("components", [])
    cast = "transformer" in (swapped["config"].get("layerwise_casting") or {}).get("components", [])
    assert (swapped["config"]["lora"].get("hotswap_rank") == 32) == (compiled or cast)
    if compiled or cast:
        assert any("hotswap enabled before the first load" in r for r in swapped["reasons"])
    assert not fixed["config"]["lora"]["swap"] and fixed["config"]["lora"].get("hotswap_rank") is None
    # a fixed LoRA is fused unless the transformer's weights are quantized or cast, and the plan says which
    stored = fixed["config"].get("quantization") or fixed["config"].get("layerwise_casting")
    assert fixed["config"]["lora"]["fuse"] == (stored is None or "transformer" not in stored["components"])
    assert [r for r in fixed["reasons"] if r.startswith("1 LoRA (rank 32): ")]
    exact = recommend_json("--lora-rank", "32", "--quality", "exact")
    assert exact["config"]["lora"]["fuse"]  # bf16 weights, a fixed LoRA: fused
    assert any("fused into the weights" in r for r in exact["reasons"])


def test_loras_that_target_other_layers_are_never_planned_to_hotswap(loras, profile):
    """peft hotswaps a LoRA only into the first one's layers or fewer ("unexpected keys found"), and
    diffusers then deletes the loaded adapter: swapped LoRAs with other targets are swapped by
    unloading and loading, so their denoiser is not compiled (each load would recompile it)."""
    from advisor.probe.workload import make_workload

    nested = make_workload(profile, loras=(str(loras["a"]), str(loras["small"])), lora_swap=True)
    apart = make_workload(profile, loras=(str(loras["a"]), str(loras["mlp"])), lora_swap=True)
    assert nested.lora_hotswappable and not apart.lora_hotswappable

    # On FLUX.1-dev (these tiny files name its blocks), where compiling pays: nested LoRAs are compiled
    # and hotswapped, the others neither.
    def planned(first, second):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            flags = ["--gpu", "RTX 4090", "--ram", "64GB", "--lora-swap", "--generations", "100", "--json"]
            assert (
                main(["recommend", "flux-dev", "--lora", str(loras[first]), "--lora", str(loras[second]), *flags]) == 0
            )
        return json.loads(out.getvalue())["config"]

    swapped_in_place = planned("a", "small")
    assert swapped_in_place["lora"]["hotswap_rank"] == 4 and swapped_in_place["compile"]
    reloaded = planned("a", "mlp")
    assert reloaded["lora"].get("hotswap_rank") is None and not reloaded.get("compile")


def estimate_of(config: OptimizationConfig, adapters=()):
    from advisor.plan.estimate import estimate
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    flux = load_profile("flux-dev")
    target = planned_target(machine=None, gpu="H100", ram=256 * 2**30, os="linux")
    return estimate(flux, make_workload(flux), config, target)


def test_unfused_adapters_cost_their_bytes_and_work_and_fused_ones_nothing():
    flux = load_profile("flux-dev")
    adapter = assumed_lora(16, flux)
    plain = estimate_of(OptimizationConfig())
    unfused = estimate_of(OptimizationConfig(lora=Lora(adapters=[adapter])))
    fused = estimate_of(OptimizationConfig(lora=Lora(adapters=[adapter], fuse=True)))
    # bf16 adapters beside the weights, as peft gives them the base layer's dtype
    assert (
        unfused.weight_bytes["transformer"] - plain.weight_bytes["transformer"]
        == adapter.parameters["transformer"] * 2
    )
    assert fused.weight_bytes == plain.weight_bytes and fused.latency_s == plain.latency_s
    assert unfused.latency_s > plain.latency_s
    # hotswapping pads every layer to the target rank: four times the adapter at 64
    padded = estimate_of(OptimizationConfig(lora=Lora(adapters=[adapter], swap=True, hotswap_rank=64)))
    extra = padded.weight_bytes["transformer"] - plain.weight_bytes["transformer"]
    assert extra == pytest.approx(4 * adapter.parameters["transformer"] * 2, rel=1e-6)
    assert padded.latency_s > unfused.latency_s
    # LLM.int8 layers have no float dtype for peft to give the adapters: they stay float32
    int8 = OptimizationConfig(quantization=Quantization(backend="bitsandbytes_8bit", components=["transformer"]))
    extra = (
        estimate_of(int8.replace(lora=Lora(adapters=[adapter]))).weight_bytes["transformer"]
        - estimate_of(int8).weight_bytes["transformer"]
    )
    assert extra == adapter.parameters["transformer"] * 4


def adapters_on(*components):
    from advisor.config import LoraAdapter

    return [
        LoraAdapter(source="x", rank=4, **{k: {c: 1 for c in components} for k in ("layers", "parameters", "outputs")})
    ]


@pytest.mark.parametrize(
    "config, refused_by",
    [
        (
            OptimizationConfig(
                quantization=Quantization(backend="torchao", scheme="int4_weight_only", components=["transformer"]),
                lora=Lora(adapters=adapters_on("transformer")),
            ),
            "lora-on-quantized-weights",
        ),
        (
            OptimizationConfig(
                quantization=Quantization(backend="quanto", components=["transformer"]),
                lora=Lora(adapters=adapters_on("transformer")),
            ),
            "lora-on-quantized-weights",
        ),
        (
            OptimizationConfig(
                quantization=Quantization(backend="gguf", components=["transformer"], file="x-Q8_0.gguf"),
                lora=Lora(adapters=adapters_on("transformer"), fuse=True),
            ),
            "lora-on-quantized-weights",
        ),
        (
            OptimizationConfig(
                quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"]),
                lora=Lora(adapters=adapters_on("transformer"), fuse=True),
            ),
            "lora-on-quantized-weights",
        ),
        (
            OptimizationConfig(
                layerwise_casting=LayerwiseCasting(components=["transformer"]),
                lora=Lora(adapters=adapters_on("transformer"), fuse=True),
            ),
            "lora-fuse-into-fp8-storage",
        ),
        (
            OptimizationConfig(
                layerwise_casting=LayerwiseCasting(components=["transformer"]),
                lora=Lora(adapters=adapters_on("transformer"), swap=True),
            ),
            "lora-swap-after-fp8-storage-needs-hotswap",
        ),
        (
            OptimizationConfig(
                lora=Lora(adapters=adapters_on("transformer", "text_encoder"), swap=True, hotswap_rank=8)
            ),
            "lora-hotswap-not-for-text-encoders",
        ),
    ],
)
def test_what_a_lora_cannot_run_is_refused_naming_why(config, refused_by):
    names = [v.constraint.name for v in _violations(config)]
    assert refused_by in names


def _violations(config):
    from advisor.constraints import violations

    return violations(config, Platform(accelerator="cuda", compute_capability="9.0", packages=None))


def test_what_a_lora_runs_on_is_not_refused():
    unfused_on_quantized = OptimizationConfig(
        quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"]),
        lora=Lora(adapters=adapters_on("transformer")),
    )
    hotswap_after_casting = OptimizationConfig(
        layerwise_casting=LayerwiseCasting(components=["transformer"]),
        lora=Lora(adapters=adapters_on("transformer"), swap=True, hotswap_rank=4),
    )
    for config in (unfused_on_quantized, hotswap_after_casting):
        assert [v.constraint.name for v in _violations(config) if v.constraint.name.startswith("lora")] == []


def test_no_candidate_the_planner_keeps_fuses_into_stored_weights_or_loses_a_lora():
    from advisor.plan.scenario import Request, scenario_for
    from advisor.plan.space import SearchSpace

    request = Request("flux-dev", gpu="RTX 4090", ram=64 * 2**30, lora_rank=16, quality="fast")
    scenario = scenario_for(request)
    space = SearchSpace.for_scenario(scenario)
    kept = [c for c in map(lambda p: space.candidate(p, scenario), space.points()) if c.rejected_by is None]
    assert kept
    for candidate in kept:
        lora = candidate.config.lora
        assert lora is not None and lora.adapters[0].rank == 16
        if lora.fuse:
            assert candidate.config.quantization is None and candidate.config.layerwise_casting is None


# --- running LoRAs: load_pipeline on the tiny pipeline --------------------------------------------


def latents(pipe) -> np.ndarray:
    kwargs = {**tiny_call_kwargs("image", seed=0), "output_type": "latent"}
    return pipe(**kwargs).images.float().numpy()


def with_lora(config: OptimizationConfig, profile, *specs, swap=False, fuse=False, hotswap_rank=None):
    adapters = [read_lora(str(spec), profile) for spec in specs]
    return config.replace(lora=Lora(adapters=adapters, swap=swap, fuse=fuse, hotswap_rank=hotswap_rank))


@pytest.fixture(scope="module")
def reference(tiny_flux_dir, loras):
    """The tiny pipeline's output in fp32, without a LoRA and with LoRA a loaded by diffusers itself."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
    plain = latents(pipe)
    pipe.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name)
    return plain, latents(pipe)


def cpu_config(**fields) -> OptimizationConfig:
    return OptimizationConfig(device="cpu", dtype="float32", **fields)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_load_pipeline_runs_the_lora_fused_or_not(tiny_flux_dir, loras, profile, reference, fuse):
    plain, expected = reference
    pipe = advisor.load_pipeline(tiny_flux_dir, with_lora(cpu_config(), profile, loras["a"], fuse=fuse))
    out = latents(pipe)
    effect = np.abs(expected - plain).max()
    assert effect > 0.02  # the LoRA changes the output (the latents are of order 1)
    assert np.abs(out - expected).max() < 1e-3 * max(1.0, effect)  # by exactly its change
    lora_parameters = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
    assert bool(lora_parameters) != fuse  # fused: the adapters are gone, their change is in the weights


@pytest.fixture(scope="module")
def tiny_q8(tiny_flux_dir, tmp_path_factory):
    return write_gguf(tiny_flux_dir / "transformer", tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf", "Q8_0")


STORAGES = {
    "torchao int8": lambda q8: cpu_config(quantization=Quantization(backend="torchao", components=["transformer"])),
    "gguf Q8_0": lambda q8: cpu_config(
        quantization=Quantization(backend="gguf", components=["transformer"], file=str(q8))
    ),
    "fp8 storage": lambda q8: cpu_config(layerwise_casting=LayerwiseCasting(components=["transformer"])),
    "group offload, blocks": lambda q8: cpu_config(offload=Offload(strategy="group")),
    "group offload, leaves": lambda q8: cpu_config(offload=Offload(strategy="group", offload_type="leaf_level")),
    "partial offload": lambda q8: cpu_config(offload=Offload(strategy="group", resident_blocks={"transformer": 1})),
    "torchao fp8 weights": lambda q8: cpu_config(
        quantization=Quantization(backend="torchao", scheme="float8_weight_only", components=["transformer"])
    ),
}


@pytest.mark.parametrize("storage", list(STORAGES))
def test_load_pipeline_runs_the_lora_unfused_under_each_storage_and_offload_the_cpu_runs(
    tiny_flux_dir, loras, profile, reference, tiny_q8, storage
):
    """Quantized or cast weights and offloaded blocks: the LoRA runs unfused (the planner's choice
    there) and changes the output as it does on plain weights, up to the storage's own error."""
    plain, expected = reference
    base = STORAGES[storage](tiny_q8)
    without = latents(advisor.load_pipeline(tiny_flux_dir, base))
    out = latents(advisor.load_pipeline(tiny_flux_dir, with_lora(base, profile, loras["a"])))
    effect = expected - plain
    change = out - without
    # the adapter ran: the change it makes is the LoRA's, not the storage's rounding
    assert np.abs(change - effect).max() < 0.25 * np.abs(effect).max()


def test_a_kohya_lora_runs_as_its_diffusers_twin(tiny_flux_dir, loras, profile):
    """The kohya file holds the diffusers file's first double block; diffusers converts it on load."""
    from diffusers import FluxPipeline

    twin = FluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
    state = {k: v for k, v in tensors_of(loras["a"]).items() if k.startswith("transformer.transformer_blocks.0.")}
    twin.load_lora_weights(state)
    out = latents(advisor.load_pipeline(tiny_flux_dir, with_lora(cpu_config(), profile, loras["kohya"])))
    assert np.abs(out - latents(twin)).max() < 1e-4


def test_load_pipeline_refuses_a_file_that_changed_since_the_plan(tiny_flux_dir, loras, profile, tmp_path):
    import shutil

    copy = tmp_path / "a.safetensors"
    shutil.copy(loras["a"], copy)
    config = with_lora(cpu_config(), profile, copy)
    shutil.copy(loras["b"], copy)  # same layout, other weights
    with pytest.raises(ConfigError, match="differs from the file the plan was made for"):
        advisor.load_pipeline(tiny_flux_dir, config)


def test_hotswapping_into_a_compiled_pipeline_does_not_recompile(tiny_flux_dir, loras, profile):
    """enable_lora_hotswap before the first load, then compile: a LoRA of the same rank, and one of a
    smaller rank (padded to the target), swap in without a new graph, and each really runs."""
    from diffusers import FluxPipeline
    from torch._dynamo.utils import counters

    config = with_lora(
        cpu_config(compile=Compile(backend="eager")), profile, loras["a"], loras["b"], swap=True, hotswap_rank=4
    )
    before = counters["stats"]["unique_graphs"]
    pipe = advisor.load_pipeline(tiny_flux_dir, config)
    first = latents(pipe)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # compiled: dynamo traced the blocks
    outputs = []
    for name in ("b", "small"):
        pipe.load_lora_weights(
            str(loras[name].parent), weight_name=loras[name].name, adapter_name="lora_0", hotswap=True
        )
        outputs.append(latents(pipe))
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    for name, out in zip(("b", "small"), outputs):
        fresh = FluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
        fresh.load_lora_weights(str(loras[name].parent), weight_name=loras[name].name)
        assert np.abs(out - latents(fresh)).max() < 1e-4  # the swapped-in LoRA is what runs
        assert np.abs(out - first).max() > 0.02


# --- what the planner refuses, run --------------------------------------------------------------


def test_swapping_without_hotswap_recompiles_a_compiled_pipeline(tiny_flux_dir, loras, profile):
    from torch._dynamo.utils import counters

    config = with_lora(cpu_config(compile=Compile(backend="eager")), profile, loras["a"], swap=True)
    pipe = advisor.load_pipeline(tiny_flux_dir, config)
    latents(pipe)
    graphs = counters["stats"]["unique_graphs"]
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(loras["b"].parent), weight_name=loras["b"].name, adapter_name="other")
    latents(pipe)
    assert counters["stats"]["unique_graphs"] > graphs


def test_fusing_into_gguf_weights_fails(tiny_flux_dir, loras, tiny_q8):
    pipe = advisor.load_pipeline(
        tiny_flux_dir,
        cpu_config(quantization=Quantization(backend="gguf", components=["transformer"], file=str(tiny_q8))),
    )
    pipe.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name)
    with pytest.raises(RuntimeError, match="must match the size of tensor"):
        pipe.fuse_lora()


def test_fusing_into_torchao_int8_weights_rounds_the_loras_change_away(tiny_flux_dir, loras, profile):
    """torchao re-quantizes the fused weight (peft/tuners/lora/torchao.py: dequantize, add, quantize_):
    a LoRA's change, small beside the weights, is rounded to int8's grid."""
    config = cpu_config(quantization=Quantization(backend="torchao", components=["transformer"]))
    without = latents(advisor.load_pipeline(tiny_flux_dir, config))
    pipe = advisor.load_pipeline(tiny_flux_dir, with_lora(config, profile, loras["a"]))
    unfused = latents(pipe)
    pipe.fuse_lora()
    fused = latents(pipe)
    effect = np.abs(unfused - without).max()
    assert np.abs(fused - unfused).max() > 0.01 * effect  # more than float noise: part of the change is lost


def test_fusing_into_fp8_storage_fails(tiny_flux_dir, loras):
    pipe = advisor.load_pipeline(tiny_flux_dir, cpu_config())
    pipe.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="Promotion for Float8 Types is not supported"):
        pipe.fuse_lora()


def test_a_lora_loaded_after_fp8_storage_gets_fp8_adapters_and_fails(tiny_flux_dir, loras):
    pipe = advisor.load_pipeline(
        tiny_flux_dir, cpu_config(layerwise_casting=LayerwiseCasting(components=["transformer"]))
    )
    pipe.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name)
    dtypes = {p.dtype for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float8_e4m3fn}
    with pytest.raises((NotImplementedError, RuntimeError)):
        latents(pipe)


def test_quanto_weights_take_no_flux_lora_and_fusing_into_them_drops_it(tiny_flux_dir, loras):
    pytest.importorskip("optimum.quanto")
    config = cpu_config(quantization=Quantization(backend="quanto", weights="float8", components=["transformer"]))
    pipe = advisor.load_pipeline(tiny_flux_dir, config)
    without = latents(pipe)
    with pytest.raises(KeyError, match=r"\.weight"):
        pipe.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name)
    pipe = advisor.load_pipeline(tiny_flux_dir, config)
    pipe.transformer.load_lora_adapter(str(loras["a"].parent), weight_name=loras["a"].name, prefix="transformer")
    assert np.abs(latents(pipe) - without).max() > 0.02  # unfused, it runs
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert np.abs(latents(pipe) - without).max() < 1e-6  # fused, the change is gone


def test_text_encoder_loras_cannot_be_hotswapped(tiny_flux_dir, loras):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
    pipe.enable_lora_hotswap(target_rank=4)
    spec = loras["with_encoder"]
    pipe.load_lora_weights(str(spec.parent), weight_name=spec.name, adapter_name="lora_0")
    with pytest.raises(ValueError, match="hotswapping is not supported for text encoders"):
        pipe.load_lora_weights(str(spec.parent), weight_name=spec.name, adapter_name="lora_0", hotswap=True)


def test_loading_a_lora_offloads_the_blocks_a_partial_offload_keeps_resident(tiny_flux_dir, loras, profile):
    from diffusers.hooks import HookRegistry

    config = cpu_config(offload=Offload(strategy="group", resident_blocks={"transformer": 1}))
    pipe = advisor.load_pipeline(tiny_flux_dir, config)
    resident = pipe.transformer.transformer_blocks[0]

    def hooked(module) -> bool:
        registry = getattr(module, "_diffusers_hook", None)
        return isinstance(registry, HookRegistry) and bool(registry.hooks)

    assert not hooked(resident)
    pipe.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name)
    assert hooked(resident)  # group offloading re-applied to the whole transformer


@pytest.mark.cuda
def test_bitsandbytes_weights_take_a_lora_unfused_and_fusing_rounds_it(tiny_flux_dir, loras):
    """On a GPU only: bitsandbytes quantizes nothing without CUDA."""
    config = OptimizationConfig(quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"]))
    pipe = advisor.load_pipeline(tiny_flux_dir, config)
    pipe.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name)
    with pytest.warns(UserWarning, match="rounding errors"):
        pipe.fuse_lora()


def test_peft_injects_no_lora_into_torchao_int4_weights():
    """torchao's default int4 weight-only layout is an Int4Tensor (Int4WeightOnlyConfig, plain packing);
    quantizing into it needs the CUDA-only mslk, so its tensors are laid out by hand here, and peft's
    own injection, the path diffusers' load_lora_adapter takes, refuses the layer."""
    from peft import LoraConfig, inject_adapter_in_model
    from torchao.quantization import Int4Tensor

    rows, columns, group = 64, 128, 128
    scales = torch.ones(columns // group, rows, dtype=torch.bfloat16)
    weight = Int4Tensor(
        torch.zeros(rows, columns // 2, dtype=torch.uint8),
        scales,
        torch.zeros_like(scales),
        [1, group],
        (rows, columns),
    )
    model = torch.nn.Sequential()
    model.proj = torch.nn.Linear(columns, rows, bias=False, dtype=torch.bfloat16)
    model.proj.weight = torch.nn.Parameter(weight, requires_grad=False)
    with pytest.raises(TypeError, match="only supports int8 weights"):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj"]), model)


def test_recommend_plans_with_the_users_lora_and_load_pipeline_runs_it_at_its_scale(
    tiny_flux_dir, loras, tmp_path, capsys
):
    """This CPU machine: the plan records the file (its absolute path) and its scale, and the config
    it writes loads the LoRA at that scale, as diffusers' own set_adapters weighs it."""
    from diffusers import FluxPipeline

    output = tmp_path / "planned.json"
    spec = f"{loras['a']}:0.5"
    assert (
        main(["recommend", str(tiny_flux_dir), "--lora", spec, "--height", "32", "--width", "32", "-o", str(output)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "1 LoRA (rank 4)" in printed
    planned = advisor.load_config(output)
    (adapter,) = planned.lora.adapters
    assert adapter.source == str(loras["a"].resolve()) and adapter.scale == 0.5 and adapter.rank == 4
    out = latents(advisor.load_pipeline(tiny_flux_dir, planned.replace(dtype="float32")))
    own = FluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
    own.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name, adapter_name="mine")
    own.set_adapters(["mine"], adapter_weights=[0.5])
    assert np.abs(out - latents(own)).max() < 1e-3


def test_the_emitted_script_loads_the_file_before_offloading_and_compiling(tiny_flux_dir, loras, profile):
    from advisor.run.emit import emit_python

    config = with_lora(
        OptimizationConfig(compile=Compile(), offload=Offload(strategy="model")),
        profile,
        loras["a"],
        loras["b"],
        swap=True,
        hotswap_rank=4,
    )
    script = emit_python(str(tiny_flux_dir), config)
    planned = Path(config.lora.adapters[0].source)  # absolute: the config loads from any folder
    load = script.index("pipe.load_lora_weights(")
    call = script[load : script.index(")", load)]  # on one line or one argument per line (a long path)
    assert (
        f'"{planned.parent}"' in call and f'weight_name="{planned.name}"' in call and 'adapter_name="lora_0"' in call
    )
    order = [
        script.index("pipe.enable_lora_hotswap(target_rank=4)"),
        load,
        script.index("pipe.enable_model_cpu_offload()"),
        script.index("compile_repeated_blocks"),
    ]
    assert order == sorted(order)
    assert script.count("load_lora_weights") == 1  # swapped LoRAs load one at a time, the others by the caller


# --- rehearsed at full size on a virtual GPU -----------------------------------------------------


def full_size_flux_lora(folder) -> Path:
    """A rank-2 LoRA on two attention projections of FLUX.1-dev's real shapes (3072 wide): a few
    hundred kB, for rehearsals of the full-size pipeline."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = {}
    for layer in ("transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_k"):
        state[f"{layer}.lora_A.weight"] = (torch.randn(2, 3072) * 0.01).to(torch.bfloat16)
        state[f"{layer}.lora_B.weight"] = (torch.randn(3072, 2) * 0.01).to(torch.bfloat16)
    path = Path(folder) / "flux_lora.safetensors"
    save_file(state, str(path))
    return path


def rehearsed(config: OptimizationConfig, gpu: str, **workload):
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload
    from advisor.rehearse.build import rehearse_planned

    flux = load_profile("flux-dev")
    target = planned_target(machine=None, gpu=gpu, ram=256 * 2**30, os="linux")
    return rehearse_planned(flux, make_workload(flux, **workload), config, target, target.vram_total_bytes)


@pytest.mark.slow
def test_a_rehearsal_puts_an_assumed_loras_adapters_on_the_card_as_the_estimate_does():
    """--lora-rank names no file: the rehearsal loads zeros of its shapes on every Linear layer of the
    transformer; unfused, bf16, no offload, they are on the card beside the weights."""
    adapter = assumed_lora(16, load_profile("flux-dev"))
    plain = OptimizationConfig()
    with_adapter = plain.replace(lora=Lora(adapters=[adapter]))
    without, with_it = rehearsed(plain, "H100"), rehearsed(with_adapter, "H100")
    assert without.passed and with_it.passed, with_it.failure or with_it.not_rehearsed
    added = with_it.device_peak("denoising") - without.device_peak("denoising")
    assert added == pytest.approx(adapter.parameters["transformer"] * 2, rel=0.02)  # bf16 adapters
    estimated = estimate_of(with_adapter).weight_bytes["transformer"] - estimate_of(plain).weight_bytes["transformer"]
    assert estimated == pytest.approx(added, rel=0.02)


@pytest.mark.slow
def test_a_rehearsal_runs_a_lora_on_nf4_weights_and_fusing_into_them_rounds(tmp_path):
    """bitsandbytes needs a GPU: on the virtual one, peft wraps the 4-bit layers and the LoRA runs
    unfused with every op on the card; fusing warns as peft does on a real card."""
    profile = load_profile("flux-dev")
    adapter = read_lora(str(full_size_flux_lora(tmp_path)), profile)
    nf4 = OptimizationConfig(
        quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"]),
        offload=Offload(strategy="model"),
    )
    unfused = rehearsed(nf4.replace(lora=Lora(adapters=[adapter])), "RTX 4090")
    assert unfused.passed, unfused.failure or unfused.not_rehearsed
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear may get different generations"):
        rehearsed(nf4.replace(lora=Lora(adapters=[adapter], fuse=True)), "RTX 4090")


def test_a_scale_past_any_lora_strength_is_refused():
    with pytest.raises(UsageError, match="scale 1e999 must be a number from -100 to 100"):
        split_spec("x.safetensors:1e999")


def test_tune_makes_up_loras_of_the_stated_rank_once(tiny_flux_dir, profile, tmp_path, monkeypatch):
    """`tune --lora-rank` runs its trials with real files of that shape: the rank on every Linear layer
    of the denoiser, the same values for every candidate (made once, then reused)."""
    from advisor.run.stand_in import stand_in_loras

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first, second = stand_in_loras(profile, 8, 2)
    again = stand_in_loras(profile, 8, 2)
    assert again == [first, second] and first.stat().st_mtime_ns == again[0].stat().st_mtime_ns
    adapter = read_lora(str(first), profile)
    transformer = pipe_transformer_linears(tiny_flux_dir)
    assert adapter.rank == 8 and adapter.layers == {"transformer": len(transformer)}
    assert adapter.parameters["transformer"] == sum(8 * (i + o) for i, o in transformer)
    assert read_lora(str(second), profile).digest != adapter.digest  # two LoRAs, not one twice


def pipe_transformer_linears(folder) -> list[tuple[int, int]]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.slow
def test_tune_measures_candidates_with_made_up_loras(tiny_flux_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    output = tmp_path / "tuned.json"
    flags = ["--budget", "8GB", "--lora-rank", "4", "--trials", "1", "--height", "32", "--width", "32"]
    assert main(["tune", str(tiny_flux_dir), *flags, "--steps", "2", "-o", str(output)]) == 0
    assert "trials run made-up LoRAs of that rank" in capsys.readouterr().err
    (adapter,) = advisor.load_config(output).lora.adapters
    assert adapter.rank == 4 and "rank4" in Path(adapter.source).name and Path(adapter.source).is_file()


def test_a_fused_lora_keeps_its_text_encoder_layers(tiny_flux_dir, loras, profile):
    """fuse_lora fuses the transformer alone by default (Flux's mixin); the plan names every component
    the LoRA holds layers in, so the unload after it drops no adapter unfused."""
    spec = loras["with_encoder"]
    unfused = latents(advisor.load_pipeline(tiny_flux_dir, with_lora(cpu_config(), profile, spec)))
    fused = latents(advisor.load_pipeline(tiny_flux_dir, with_lora(cpu_config(), profile, spec, fuse=True)))
    plain = latents(advisor.load_pipeline(tiny_flux_dir, cpu_config()))
    assert np.abs(unfused - plain).max() > 0.02
    assert np.abs(fused - unfused).max() < 1e-4


def test_a_linked_lora_file_keeps_its_name(tiny_flux_dir, loras, profile, tmp_path):
    """The Hub's cache holds files as links to extensionless blobs: the plan records the link, whose
    .safetensors name tells diffusers how to read it."""
    import shutil

    blob = tmp_path / "blobs" / "9f86d081884c7d65"  # as the cache names a file's content
    blob.parent.mkdir()
    shutil.copy(loras["a"], blob)
    link = tmp_path / "style.safetensors"
    link.symlink_to(blob)
    adapter = read_lora(str(link), profile)
    assert adapter.source == str(link)
    latents(advisor.load_pipeline(tiny_flux_dir, with_lora(cpu_config(), profile, link)))


def test_the_estimate_says_a_swap_into_a_compiled_model_recompiles():
    adapter = assumed_lora(16, load_profile("flux-dev"))
    config = OptimizationConfig(compile=Compile(), lora=Lora(adapters=[adapter], swap=True))
    assert any("each swap recompiles it" in note for note in estimate_of(config).notes)
    hotswapped = config.replace(lora=Lora(adapters=[adapter], swap=True, hotswap_rank=16))
    assert not any("recompiles" in note for note in estimate_of(hotswapped).notes)


def test_a_hotswap_does_not_keep_the_scale_set_before_it(tiny_flux_dir, loras):
    """Why the config refuses `hotswap_rank` with a scale other than 1: after a hotswap each layer's
    scale is the new file's alpha over rank again, not the 0.5 set with set_adapters before it."""
    from diffusers import FluxPipeline

    def at(scale, name):
        pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
        pipe.load_lora_weights(str(loras[name].parent), weight_name=loras[name].name, adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[scale])
        return latents(pipe)

    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
    pipe.enable_lora_hotswap(target_rank=4)
    pipe.load_lora_weights(str(loras["a"].parent), weight_name=loras["a"].name, adapter_name="lora_0")
    pipe.set_adapters(["lora_0"], adapter_weights=[0.5])
    assert np.abs(latents(pipe) - at(0.5, "a")).max() < 1e-4  # the scale holds until the swap
    pipe.load_lora_weights(str(loras["b"].parent), weight_name=loras["b"].name, adapter_name="lora_0", hotswap=True)
    swapped = latents(pipe)
    assert np.abs(swapped - at(1.0, "b")).max() < 1e-4  # b runs at 1, its own alpha over rank
    assert np.abs(swapped - at(0.5, "b")).max() > 0.01
