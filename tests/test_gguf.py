"""GGUF checkpoints (issue 30): sized from their header alone, loaded and run through `load_pipeline`.

The files are written here from a tiny pipeline's transformer (`advisor.testing.gguf`), so the header
reader is checked against the bytes a real writer laid out and against llama.cpp's own reader (the
`gguf` package, which diffusers loads the files with).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from advisor.config import OptimizationConfig, Quantization
from advisor.errors import ModelError
from advisor.levers.gguf.header import GGML_TYPES, read_gguf_header
from advisor.testing.gguf import write_gguf


def test_the_type_table_is_ggmls():
    """Weights per block and bytes per block of every type, as gguf-py transcribes ggml's type traits."""
    for type_id, (name, block, size) in GGML_TYPES.items():
        kind = gguf.GGMLQuantizationType(type_id)
        assert kind.name == name
        assert gguf.GGML_QUANT_SIZES[kind] == (block, size), name
    known = {t for t in gguf.GGMLQuantizationType if t in gguf.GGML_QUANT_SIZES}
    assert {t.value for t in known} <= set(GGML_TYPES)


@pytest.fixture(scope="module")
def k_quant_file(tmp_path_factory):
    """K-quant and other tensors of the right byte size: the package can't quantize K-quants, and a
    header is all the reader reads."""
    path = tmp_path_factory.mktemp("gguf") / "mixed-Q4_K_S.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_string("general.name", "made here")
    writer.add_array("an.array", [1, 2, 3])
    writer.add_tensor("a.weight", np.zeros((64, 2 * 144), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.add_tensor("b.weight", np.zeros((32, 210), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    writer.add_tensor("c.weight", np.zeros((8, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("d.weight", gguf.quants.quantize(np.ones((16, 64), np.float32), q8), raw_dtype=q8)
    writer.add_tensor("e.bias", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_header_gives_every_tensor_its_shape_type_and_bytes(k_quant_file):
    header = read_gguf_header(k_quant_file)
    reader = gguf.GGUFReader(k_quant_file)
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(header.tensors, reader.tensors):
        assert mine.type == theirs.tensor_type.name
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape))  # GGUF lists the fastest dimension first
        assert mine.nbytes == theirs.n_bytes == theirs.data.nbytes  # the bytes the file holds for it
    assert header.tensors[0].shape == (64, 512) and header.tensors[0].nbytes == 64 * 2 * 144
    assert header.metadata["general.name"] == "made here" and "an.array" not in header.metadata
    assert header.main_type == "Q4_K"
    # The tensors' bytes are the file's data section: what follows the header, up to alignment padding.
    data_start = min(int(t.data_offset) for t in reader.tensors)
    assert header.tensor_bytes <= k_quant_file.stat().st_size - data_start < header.tensor_bytes + 5 * 32


@pytest.mark.parametrize("damage", ["not gguf", "truncated"])
def test_a_damaged_file_is_one_clear_error(k_quant_file, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = k_quant_file.read_bytes()
    bad.write_bytes(b"PK\x03\x04" + data[4:] if damage == "not gguf" else data[:60])
    with pytest.raises(ModelError, match=str(bad).replace("\\", "\\\\") + ": "):
        read_gguf_header(bad)


def test_the_type_is_read_from_the_file_name():
    def kind(file: str) -> str:
        return Quantization(backend="gguf", components=["transformer"], file=file).kind

    assert kind("https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-Q4_K_S.gguf") == "GGUF Q4_K_S"
    assert kind("wan2.1-t2v-14b-Q5_K_M.gguf") == "GGUF Q5_K_M"
    assert kind("/models/flux1-dev-Q8_0.gguf") == "GGUF Q8_0"
    assert kind("model.gguf") == "GGUF"
    with pytest.raises(ValueError, match="quantization.file"):
        Quantization(backend="gguf", components=["transformer"])
    with pytest.raises(ValueError, match="quantization.file"):
        Quantization(backend="torchao", components=["transformer"], file="x.gguf")


@pytest.fixture(scope="module", params=["Q8_0", "Q4_0"])
def tiny_gguf(request, tiny_flux_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"tiny-flux-{request.param}.gguf"
    return write_gguf(tiny_flux_dir / "transformer", path, request.param)


def gguf_config(file) -> OptimizationConfig:
    return OptimizationConfig(
        device="cpu",
        dtype="float32",
        quantization=Quantization(backend="gguf", components=["transformer"], file=str(file)),
    )


def test_the_estimate_sizes_the_transformer_from_its_header_exactly(tiny_gguf, tiny_flux_dir):
    from advisor.plan.estimate import estimate
    from advisor.probe.models import profile_from_folder
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    header = read_gguf_header(tiny_gguf)
    packed = sum(t.nbytes for t in header.tensors if t.packed)
    plain = sum(t.elements for t in header.tensors if not t.packed) * 4  # float32, the pipeline's dtype
    profile = profile_from_folder(tiny_flux_dir)
    target = planned_target(machine=None, gpu="RTX 4090", ram=64 * 2**30, os="linux")
    config = gguf_config(tiny_gguf).replace(device="cuda")
    result = estimate(profile, make_workload(profile, height=32, width=32), config, target)
    assert result.weight_bytes["transformer"] == packed + plain
    assert packed < sum(t.elements for t in header.tensors if t.packed) * 4 / 3  # 8 or 4.5 bits, not 32
    # diffusers copies every tensor out of the file while it loads (load_gguf_checkpoint), even onto the card
    assert result.ram_breakdown.get("loading", 0) >= packed


def test_load_pipeline_loads_the_file_as_the_transformer_and_runs(tiny_gguf, tiny_flux_dir):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    import advisor
    from advisor.testing import tiny_call_kwargs

    pipe = advisor.load_pipeline(tiny_flux_dir, gguf_config(tiny_gguf))
    linear = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(linear, GGUFLinear) and isinstance(linear.weight, GGUFParameter)
    assert linear.weight.quant_type.name == tiny_gguf.stem.rsplit("-", 1)[1]
    image = pipe(**tiny_call_kwargs("image", seed=0)).images[0]
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_the_script_loads_the_file_as_the_component_with_the_models_config(tiny_gguf, tiny_flux_dir):
    from advisor.run.emit import emit_python

    script = emit_python(str(tiny_flux_dir), gguf_config(tiny_gguf))
    assert "transformer = FluxTransformer2DModel.from_single_file(" in script
    assert f'"{tiny_gguf}"' in script and f'config="{tiny_flux_dir}"' in script and 'subfolder="transformer"' in script
    assert "GGUFQuantizationConfig(compute_dtype=torch.float32)" in script
    assert "transformer=transformer" in script.split("DiffusionPipeline.from_pretrained(", 1)[1]


def test_sequential_offload_of_a_gguf_transformer_fails_as_the_constraint_says(tiny_gguf, tiny_flux_dir):
    """diffusers issue #14691: accelerate rebuilds each parameter without its quant_type. Reproduced
    here, so that the refusal keeps its evidence; a diffusers that fixes it fails this test."""
    import diffusers
    import torch
    from diffusers import DiffusionPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

    from advisor.config import Offload
    from advisor.constraints import Platform, first_violation
    from advisor.platform import version_tuple
    from advisor.testing import tiny_call_kwargs

    transformer = FluxTransformer2DModel.from_single_file(
        str(tiny_gguf),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(tiny_flux_dir),
        subfolder="transformer",
    )
    pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir, transformer=transformer)
    with pytest.raises(KeyError):  # as the hooks move the weights off, or at the first call
        pipe.enable_sequential_cpu_offload(device="cpu")
        pipe(**tiny_call_kwargs("image", seed=0))
    sequential = gguf_config(tiny_gguf).replace(device="cuda", offload=Offload(strategy="sequential"))
    violation = first_violation(sequential, Platform.anywhere())
    assert violation is not None and "14691" in violation.message
    assert version_tuple(diffusers.__version__) <= (0, 42, 1)


def test_an_8gb_card_gets_a_4_to_6_bit_transformer_and_the_reasons_weigh_gguf_against_it():
    """Issue 30: FLUX.1-dev on an 8 GB RTX 4060 Ti, --quality fast. The quantization overview's advice
    for small cards is 4-bit weights; city96's GGUF files are the other way people fit it. Either is
    a 4- to 6-bit transformer; the reasons name the other's best time (GGUF dequantises in torch, the
    HF blog's Q4_1 ran at 0.52x bf16's speed where bitsandbytes' nf4 kept it)."""
    from advisor.plan.recommend import recommend
    from advisor.plan.scenario import Request, scenario_for

    scenario = scenario_for(Request(model="flux-dev", gpu="RTX 4060 Ti 8GB", ram=32 * 2**30, quality="fast"))
    result = recommend(scenario)
    best = result.best.config
    q = best.quantization
    # The transformer is stored in at most 8 bits: 4-6 bit weights, or fp8 storage. Loading with no
    # device_map puts bitsandbytes' nf4 transformer and T5 on the card together (10.3 GB) before group
    # offloading starts, and model offload holds the 6.2 GB transformer beside its activations: on
    # 6.2 GB of budget nf4 fits neither way.
    casting = best.layerwise_casting
    assert (q is not None and "transformer" in q.components) or (casting and "transformer" in casting.components)
    if q is not None:
        assert q.kind in ("nf4", "fp4") or q.kind.split()[-1][:2] in ("Q4", "Q5", "Q6")
    if q is not None and q.backend == "gguf":
        assert any(line.startswith(f"download {q.file}") for line in result.reasons)
    elif q is not None:
        (line,) = [r for r in result.reasons if r.startswith("the other quantization backends' best")]
        assert "GGUF Q" in line
    # GGUF's 4-bit transformer loads into RAM and streams from there: that fits this card.
    from advisor.config import Offload, OptimizationConfig
    from advisor.plan.estimate import estimate

    q4 = Quantization(
        backend="gguf",
        components=["transformer"],
        file="https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-Q4_K_S.gguf",
    )
    streamed = Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True)
    config = OptimizationConfig(quantization=q4, offload=streamed)
    assert (
        estimate(scenario.profile, scenario.workload, config, scenario.target).peak_vram_bytes <= scenario.budget_bytes
    )
    exact = recommend(scenario_for(Request(model="flux-dev", gpu="RTX 4060 Ti 8GB", ram=32 * 2**30, quality="exact")))
    assert exact.best is None or exact.best.config.quantization is None


def test_a_hub_file_says_what_to_download_and_about_how_big_it_is():
    from advisor.levers.gguf import GGUF_BACKEND

    q = Quantization(
        backend="gguf", components=["transformer"], file="https://huggingface.co/r/blob/main/m-Q4_K_S.gguf"
    )
    note = GGUF_BACKEND.download_note(q, int(6.70 * 2**30))
    assert note.startswith(
        "download https://huggingface.co/r/blob/main/m-Q4_K_S.gguf (about 6.70 GB: Q4_K_S at 4.5 bits"
    )


def test_inspect_sizes_a_folder_holding_a_gguf_file_from_its_header(tiny_gguf, tmp_path, capsys):
    import json
    import shutil

    from advisor.cli import main

    folder = tmp_path / "downloads"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder)
    header = read_gguf_header(tiny_gguf)
    assert main(["inspect", str(folder), "--json"]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert found["bytes"] == header.tensor_bytes and found["main_type"] == tiny_gguf.stem.rsplit("-", 1)[1]
    assert sum(t["bytes"] for t in found["types"]) == found["bytes"]
    assert found["parameters"] == sum(t.elements for t in header.tensors)
    assert main(["inspect", str(folder / tiny_gguf.name)]) == 0
    text = capsys.readouterr().out
    assert f"GGUF v3: {len(header.tensors)} tensors" in text and "F32" in text


def test_tune_searches_only_the_gguf_files_already_here(tmp_path, monkeypatch):
    """A plan names the file to download; a study would download gigabytes per candidate before
    measuring it, so tune's space keeps a Hub file only once it is in the Hub's cache."""
    import huggingface_hub.constants

    from advisor.plan.scenario import Request, scenario_for
    from advisor.plan.space import SearchSpace

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    scenario = scenario_for(Request(model="flux-dev", gpu="RTX 4090", ram=64 * 2**30, quality="fast"))
    space = SearchSpace.for_scenario(scenario)
    offered = [name for name in space.quantization if name.startswith("GGUF")]
    assert len(offered) == 5  # recommend weighs every published type
    assert not [name for name in space.usable(scenario).quantization if name.startswith("GGUF")]
    # The Hub's cache layout (huggingface_hub's file_download): refs/main names the snapshot holding the file.
    repo = tmp_path / "models--city96--FLUX.1-dev-gguf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "flux1-dev-Q4_K_S.gguf").write_bytes(b"GGUF")
    assert [name for name in space.usable(scenario).quantization if name.startswith("GGUF")] == [
        "GGUF Q4_K_S[transformer]"
    ]


@pytest.mark.parametrize("placement", ["none", "model", "group-leaf-stream", "group-block"])
def test_a_gguf_transformer_rehearses_on_the_virtual_gpu_and_is_never_on_it_at_full_size(tiny_flux_dir, placement):
    """The rehearsal lays the file's packed weights out (a GGUFParameter per Linear weight) and runs the
    real GGUFLinear and the offload hooks on the virtual card: a weight or its quant_type left on the
    wrong device fails there. Loading reads what it converts on the host, so the card never holds
    the bf16 transformer (it used to, in the rehearsal's loading phase)."""
    from advisor.config import Offload
    from advisor.probe.models import profile_from_folder
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload
    from advisor.rehearse.build import rehearse_planned

    offload = {
        "none": Offload(),
        "model": Offload(strategy="model"),
        "group-leaf-stream": Offload(strategy="group", offload_type="leaf_level", use_stream=True),
        "group-block": Offload(strategy="group", offload_type="block_level"),
    }[placement]
    profile = profile_from_folder(tiny_flux_dir)
    target = planned_target(machine=None, gpu="H100", ram=64 * 2**30, os="linux")
    file = "https://huggingface.co/r/blob/main/m-Q4_K_S.gguf"
    config = gguf_config(file).replace(device="cuda", offload=offload)
    found = rehearse_planned(profile, make_workload(profile, height=32, width=32), config, target, 2**34)
    assert found.failure is None and found.not_rehearsed is None, (found.failure, found.not_rehearsed)
    # Every component loads onto the card unless offloaded, but the transformer only packed: the card
    # holds less than the whole pipeline at float32 (it held all of it, then converted).
    assert found.device_peak("loading") < profile.bytes


def test_estimate_says_host_ram_while_loading_apart_from_while_running(tiny_gguf, tiny_flux_dir, tmp_path, capsys):
    """Issue 27's host RAM per phase: a GGUF file is read whole into RAM as it loads (diffusers'
    load_gguf_checkpoint copies every tensor), even for a component that then lives on the card."""
    from advisor.cli import main

    config = tmp_path / "gguf.json"
    gguf_config(tiny_gguf).replace(device="cuda").save(str(config))
    args = ["estimate", str(tiny_flux_dir), "--config", str(config), "--gpu", "RTX 4090", "--ram", "64GB"]
    assert main([*args, "--height", "32", "--width", "32"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("peak host RAM"))
    assert "(while running: process" in line and "; loading holds" in line


def test_every_ggml_type_a_file_name_can_say_has_its_own_size():
    """A name that is a ggml type itself keeps its ending (IQ3_S is not IQ3), K-quant mixes are
    their main type (Q4_K_S is mostly Q4_K), and a name ggml has no type for is an error, never a
    guess (ggml's type_traits: IQ3_S 110 bytes per 256 weights, Q4_K 144, F16 2 per weight)."""
    from advisor.errors import ConfigError
    from advisor.levers.gguf import bits_per_weight

    assert bits_per_weight("IQ3_S") == 110 * 8 / 256
    assert bits_per_weight("IQ1_M") == 56 * 8 / 256
    assert bits_per_weight("Q4_K_S") == bits_per_weight("Q4_K_M") == 144 * 8 / 256
    assert bits_per_weight("F16") == 16
    with pytest.raises(ConfigError, match="quantization.file"):
        bits_per_weight("Q7_X")
