"""Model inspection from folders, the HF cache and headers; checked against the real loaded tensors."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from advisor.errors import ModelError
from advisor.probe.models import classify_workload, load_profile, profile_from_folder, vae_compression
from advisor.probe.safetensors_header import read_header
from advisor.probe.weights import weight_files

ROOT = Path(__file__).resolve().parent.parent


def _load_component(folder: Path, name: str):
    import diffusers
    import transformers

    library, class_name = json.loads((folder / "model_index.json").read_text())[name]
    module = diffusers if library == "diffusers" else transformers
    return getattr(module, class_name).from_pretrained(folder / name)


@pytest.fixture(scope="module", params=["flux", "wan"])
def fixture_and_profile(request, tiny_flux_dir, tiny_wan_dir):
    folder = tiny_flux_dir if request.param == "flux" else tiny_wan_dir
    return folder, profile_from_folder(folder)


def test_parameter_counts_equal_the_real_tensors(fixture_and_profile):
    folder, profile = fixture_and_profile
    for component in profile.components:
        model = _load_component(folder, component.name)
        assert component.parameters == sum(p.numel() for p in model.parameters()), component.name
        # Tied weights (T5's shared embedding) appear twice in the state dict but are stored once.
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
        stored = sum(unique.values())
        assert component.bytes == pytest.approx(stored, rel=0.01), component.name
        assert component.largest_file_bytes == component.bytes  # one safetensors file each


def _quantizable_linears(model, library):
    """The nn.Linear layers the library's quantizers convert, decided by the libraries' own code."""
    import torch

    if library == "transformers":
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = list(set(get_keys_to_not_convert(model)) | set(model._keep_in_fp32_modules or []))
        keep = lambda name: should_convert_module(name, skip)  # noqa: E731
    else:
        skip = model._keep_in_fp32_modules or []
        keep = lambda name: not any(k in name.split(".") for k in skip)  # noqa: E731
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and keep(name)]


def test_linear_parameters_are_the_real_quantizable_linear_weights(fixture_and_profile):
    folder, profile = fixture_and_profile
    for component in profile.components:
        model = _load_component(folder, component.name)
        linears = _quantizable_linears(model, component.library)
        assert component.linear_layers == len(linears), component.name
        assert component.linear_parameters == sum(m.weight.numel() for m in linears), component.name
        assert component.linear_rows == sum(m.out_features for m in linears), component.name


def test_casting_skips_match_what_diffusers_leaves_uncast(fixture_and_profile):
    import torch
    from diffusers.hooks import apply_layerwise_casting

    folder, profile = fixture_and_profile
    for component in profile.components:
        model = _load_component(folder, component.name)
        if component.library == "diffusers":
            model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        else:  # how advisor.run.apply casts text encoders: embeddings and fp32 modules stay
            from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

            from advisor.probe.weights import ENCODER_CASTING_SKIP_PATTERNS

            patterns = DEFAULT_SKIP_MODULES_PATTERN + ENCODER_CASTING_SKIP_PATTERNS + tuple(model._keep_in_fp32_modules or ())
            apply_layerwise_casting(model, torch.float8_e4m3fn, torch.float32, skip_modules_pattern=patterns)
        uncast = sum(p.numel() for p in model.parameters() if p.dtype != torch.float8_e4m3fn)
        assert component.casting_skipped_parameters == uncast, component.name


def test_blocks_are_the_repeated_module_lists(tiny_flux_dir):
    profile = profile_from_folder(tiny_flux_dir)
    transformer = _load_component(tiny_flux_dir, "transformer")
    blocks = {b.name: b for b in profile.component("transformer").blocks}
    assert blocks["transformer_blocks"].count == len(transformer.transformer_blocks)
    assert blocks["single_transformer_blocks"].count == len(transformer.single_transformer_blocks)
    assert blocks["transformer_blocks"].parameters_per_block == sum(
        p.numel() for p in transformer.transformer_blocks[0].parameters()
    )


def test_workload_and_roles(tiny_flux_dir, tiny_wan_dir):
    flux, wan = profile_from_folder(tiny_flux_dir), profile_from_folder(tiny_wan_dir)
    assert (flux.pipeline_class, flux.workload) == ("FluxPipeline", "image")
    assert (wan.pipeline_class, wan.workload) == ("WanPipeline", "video")
    assert [c.name for c in wan.by_role("denoiser")] == ["transformer"]
    assert wan.component("vae").facts["temporal_compression"] == 4
    assert flux.offload_sequence == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert set(flux.other_components) == {"scheduler", "tokenizer", "tokenizer_2"}
    assert profile_from_folder(tiny_flux_dir, workload="video").workload == "video"


def test_workload_table_and_fallbacks():
    assert classify_workload("HunyuanVideoPipeline")[0] == "video"
    assert classify_workload("StableDiffusionXLPipeline")[0] == "image"
    assert classify_workload("MyCoolT2VPipeline") == ("video", "MyCoolT2VPipeline is not in the table; its name says video")
    kind, reason = classify_workload("MyCustomPipeline")
    assert kind == "image" and "--workload" in reason
    with pytest.raises(ModelError, match="--workload: 'movie' is not a workload; use one of image, video, audio"):
        classify_workload("FluxPipeline", "movie")


@pytest.mark.parametrize(
    ("class_name", "config", "expected"),
    [
        ("AutoencoderKL", {"block_out_channels": [128, 256, 512, 512]}, (8, 1)),
        ("AutoencoderKLWan", {"temperal_downsample": [False, True, True]}, (8, 4)),
        ("AutoencoderKLHunyuanVideo", {"spatial_compression_ratio": 8, "temporal_compression_ratio": 4}, (8, 4)),
        ("AutoencoderKLLTXVideo", {"patch_size": 4, "patch_size_t": 1, "spatio_temporal_scaling": [True, True, True, False]}, (32, 8)),
        ("AutoencoderKLCogVideoX", {"block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4}, (8, 4)),
    ],
)
def test_vae_compression(class_name, config, expected):
    assert vae_compression(class_name, config) == expected


def test_hf_cache_layout_is_found_offline(tiny_flux_dir, tmp_path, monkeypatch):
    # The real cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "hub" / "models--acme--tiny-flux"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_flux_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    profile = load_profile("acme/tiny-flux")
    assert profile.source == "cache" and profile.model_id == "acme/tiny-flux"
    assert profile.parameters == profile_from_folder(tiny_flux_dir).parameters


def test_variants_prefer_the_plain_files(tmp_path):
    for name in ("model.safetensors", "model.fp16.safetensors", "model-00001-of-00002.bf16.safetensors"):
        (tmp_path / name).write_bytes(b"")
    files, variant = weight_files(tmp_path)
    assert [f.name for f in files] == ["model.safetensors"] and variant is None
    (tmp_path / "model.safetensors").unlink()
    files, variant = weight_files(tmp_path)
    assert variant == "bf16" and [f.name for f in files] == ["model-00001-of-00002.bf16.safetensors"]


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "pipe"
    shutil.copytree(folder, target)
    return target


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelError, match="no model_index.json"):
        load_profile(str(tmp_path))


def test_corrupt_model_index_names_the_file(tiny_flux_dir, tmp_path):
    folder = _copy(tiny_flux_dir, tmp_path)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"model_index.json: not valid JSON"):
        load_profile(str(folder))


def test_truncated_safetensors_header_names_the_file(tiny_flux_dir, tmp_path):
    folder = _copy(tiny_flux_dir, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model.safetensors: truncated"):
        load_profile(str(folder))


def test_pickled_weights_are_refused_with_advice(tiny_flux_dir, tmp_path):
    folder = _copy(tiny_flux_dir, tmp_path)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelError, match="convert them to safetensors"):
        load_profile(str(folder))


def test_unknown_model_offline_lists_the_catalog_and_the_folder_hint():
    with pytest.raises(ModelError) as excinfo:
        load_profile("nobody/nothing-here")
    message = str(excinfo.value)
    assert "not in the catalog" in message and "black-forest-labs/FLUX.1-dev" in message
    assert "./my-pipeline" in message and "\n" not in message


def test_missing_local_path_says_no_such_folder(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_profile(str(tmp_path / "missing"))


def test_header_reading_ignores_the_data_size(tmp_path):
    # A sparse 8 GiB file: reading it must touch only the header.
    header = json.dumps({"w": {"dtype": "BF16", "shape": [65536, 65536], "data_offsets": [0, 2 * 65536**2]}}).encode()
    path = tmp_path / "big.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + 2 * 65536**2)
    (tensor,) = read_header(path)
    assert tensor.numel == 65536**2 and tensor.nbytes == 8 * 2**30 and tensor.dtype == "bfloat16"


def test_inspect_imports_no_torch_for_a_folder(tiny_flux_dir):
    code = (
        "import sys; from advisor.probe.models import load_profile; "
        f"load_profile({str(tiny_flux_dir)!r}); print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_diffusers_tables_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_diffusers_tables.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-500:]


def test_hub_path_profiles_from_header_metadata_like_the_folder_path(tiny_flux_dir, tmp_path):
    """Everything of the hub path but the network: a snapshot holding only the JSON files, plus the
    headers as huggingface_hub's own metadata objects, gives the same profile as the full folder."""
    from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo

    from advisor.probe.models import tensors_from_hub_metadata
    from advisor.probe.weights import choose_weight_files

    snapshot = tmp_path / "snapshot"
    for path in tiny_flux_dir.rglob("*.json"):
        target = snapshot / path.relative_to(tiny_flux_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())

    def tensors_of(component):
        names, _ = choose_weight_files([p.name for p in (tiny_flux_dir / component).iterdir()])
        if not names:
            return None
        shards = []
        for name in names:
            raw = (tiny_flux_dir / component / name).read_bytes()
            header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
            header.pop("__metadata__", None)
            shards.append(SafetensorsFileMetadata(metadata={}, tensors={
                k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"])) for k, v in header.items()
            }))
        return tensors_from_hub_metadata(shards)

    hub = profile_from_folder(snapshot, model_id="acme/tiny", source="hub", tensors_of=tensors_of)
    folder = profile_from_folder(tiny_flux_dir)
    assert hub.source == "hub" and hub.model_id == "acme/tiny"
    assert [c.name for c in hub.components] == [c.name for c in folder.components]
    for mine, theirs in zip(hub.components, folder.components):
        assert (mine.parameters, mine.bytes, mine.largest_file_bytes, mine.linear_parameters, mine.blocks) == (
            theirs.parameters, theirs.bytes, theirs.largest_file_bytes, theirs.linear_parameters, theirs.blocks
        )


def test_weight_file_choice_on_hub_style_names():
    from advisor.probe.weights import choose_weight_files

    names = ["config.json", "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "model.fp16.safetensors", "model.safetensors.index.json"]
    assert choose_weight_files(names) == (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], None)
