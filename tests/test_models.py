"""Model inspection from folders, the HF cache and headers; checked against the real loaded tensors."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from advisor.errors import ModelError
from advisor.probe.facts import classify_workload, vae_compression
from advisor.probe.models import load_profile, profile_from_folder
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

            from advisor.levers.layerwise_casting import ENCODER_CASTING_SKIP_PATTERNS

            patterns = (
                DEFAULT_SKIP_MODULES_PATTERN + ENCODER_CASTING_SKIP_PATTERNS + tuple(model._keep_in_fp32_modules or ())
            )
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
    assert classify_workload("MyCoolT2VPipeline") == (
        "video",
        "MyCoolT2VPipeline is not in the table; its name says video",
    )
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
        (
            "AutoencoderKLLTXVideo",
            {"patch_size": 4, "patch_size_t": 1, "spatio_temporal_scaling": [True, True, True, False]},
            (32, 8),
        ),
        (
            "AutoencoderKLCogVideoX",
            {"block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4},
            (8, 4),
        ),
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
    assert "or in the catalog" in message and "flux-dev" in message and "docs/models.md" in message
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
        [sys.executable, str(ROOT / "scripts" / "build_diffusers_tables.py"), "--check"],
        capture_output=True,
        text=True,
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
            shards.append(
                SafetensorsFileMetadata(
                    metadata={},
                    tensors={
                        k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                        for k, v in header.items()
                    },
                )
            )
        return tensors_from_hub_metadata(shards)

    hub = profile_from_folder(snapshot, model_id="acme/tiny", source="hub", tensors_of=tensors_of)
    folder = profile_from_folder(tiny_flux_dir)
    assert hub.source == "hub" and hub.model_id == "acme/tiny"
    assert [c.name for c in hub.components] == [c.name for c in folder.components]
    for mine, theirs in zip(hub.components, folder.components):
        assert (mine.parameters, mine.bytes, mine.largest_file_bytes, mine.linear_parameters, mine.blocks) == (
            theirs.parameters,
            theirs.bytes,
            theirs.largest_file_bytes,
            theirs.linear_parameters,
            theirs.blocks,
        )


def test_weight_file_choice_on_hub_style_names():
    from advisor.probe.weights import choose_weight_files

    names = [
        "config.json",
        "model-00002-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "model.fp16.safetensors",
        "model.safetensors.index.json",
    ]
    assert choose_weight_files(names) == (
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
        None,
    )


# --- corrupt but readable inputs: one ModelError naming the file and the field -------------------


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def _set(key, value):
    def change(data):
        data[key] = value
        return data

    return change


@pytest.mark.parametrize(
    ("component", "key", "value", "expected"),
    [
        ("transformer", "num_layers", "nineteen", "a whole number >= 0"),
        ("transformer", "num_layers", [19], "a whole number >= 0"),
        ("transformer", "num_attention_heads", "2", "a whole number >= 1"),
        ("transformer", "patch_size", 0, "a whole number >= 1"),
        ("transformer", "guidance_embeds", "no", "true or false"),
        ("vae", "block_out_channels", 5, "a non-empty list of whole numbers >= 1"),
        ("vae", "latent_channels", -1, "a whole number >= 1"),
        ("text_encoder_2", "d_model", 32.5, "a whole number >= 1"),
    ],
)
def test_config_fields_of_the_wrong_type_name_the_file_and_field(
    tiny_flux_dir, tmp_path, component, key, value, expected
):
    folder = _copy(tiny_flux_dir, tmp_path)
    config = folder / component / "config.json"
    _edit_json(config, _set(key, value))
    with pytest.raises(ModelError) as excinfo:
        load_profile(str(folder))
    message = str(excinfo.value)
    assert message.startswith(f"{config}: '{key}' is {json.dumps(value)}") and expected in message


def test_every_catalog_config_passes_the_field_check():
    """The published configs the catalog was built from are what a real folder holds."""
    from advisor.probe.config_fields import check_component_config
    from advisor.probe.layout import catalog_index, role_of

    for path in sorted(set(catalog_index().values())):
        for item in json.loads(path.read_text())["components"]:
            check_component_config(path, role_of(item["name"], item["class_name"]), item.get("config", {}))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda index: [], "expected a JSON object (the pipeline's index), got a JSON array"),
        (_set("vae", "AutoencoderKL"), "'vae' is \"AutoencoderKL\"; a component entry is a [library, class] pair"),
        (
            _set("vae", ["diffusers", "AutoencoderKL", "extra"]),
            '\'vae\' is ["diffusers", "AutoencoderKL", "extra"]; a component entry is a [library, class] pair',
        ),
        (
            _set("transformer", [None, "FluxTransformer2DModel"]),
            "'transformer' is [null, \"FluxTransformer2DModel\"]; a component with weights names its library",
        ),
        (_set("_class_name", 5), "'_class_name' is 5; it must name the pipeline class"),
        (
            lambda index: {k: v for k, v in index.items() if k != "vae"},
            "has no 'vae' entry, but FluxPipeline decodes its latents with a VAE",
        ),
        (
            _set("vae", [None, None]),
            "'vae' is [null, null] (saved without a VAE), but FluxPipeline decodes its latents with a VAE",
        ),
    ],
)
def test_corrupt_model_index_entries_name_the_file_and_entry(tiny_flux_dir, tmp_path, change, expected):
    folder = _copy(tiny_flux_dir, tmp_path)
    _edit_json(folder / "model_index.json", change)
    with pytest.raises(ModelError) as excinfo:
        load_profile(str(folder))
    assert str(excinfo.value).startswith(f"{folder / 'model_index.json'}: ") and expected in str(excinfo.value)


def test_pipeline_settings_in_model_index_are_not_components(tiny_flux_dir, tmp_path):
    # SDXL's model_index.json carries "force_zeros_for_empty_prompt": true, Wan 2.2's "boundary_ratio".
    folder = _copy(tiny_flux_dir, tmp_path)
    _edit_json(
        folder / "model_index.json",
        lambda index: {**index, "force_zeros_for_empty_prompt": True, "boundary_ratio": 0.875},
    )
    assert load_profile(str(folder)).pipeline_class == "FluxPipeline"


def test_a_vae_without_weights_is_refused_for_a_pipeline_that_decodes_with_one(tiny_flux_dir, tmp_path):
    folder = _copy(tiny_flux_dir, tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(
        ModelError, match=r"/vae: no safetensors weights, but FluxPipeline decodes its latents with a VAE"
    ):
        load_profile(str(folder))


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000, '{"num_layers": ' + "9" * 5000 + "}"],
    ids=["deep-array", "deep-object", "5000-digits"],
)
def test_absurd_model_json_is_one_error_naming_the_file(tiny_flux_dir, tmp_path, text):
    folder = _copy(tiny_flux_dir, tmp_path)
    for path in (folder / "transformer" / "config.json", folder / "model_index.json"):
        original = path.read_text()
        path.write_text(text)
        with pytest.raises(ModelError) as excinfo:
            load_profile(str(folder))
        assert str(excinfo.value).startswith(f"{path}: ") and (
            "nested more than" in str(excinfo.value) or "digits" in str(excinfo.value)
        )
        path.write_text(original)


def test_a_corrupt_model_index_does_not_break_the_lenient_layout_reader(tiny_flux_dir, tmp_path):
    from advisor.probe.layout import read_layout

    folder = _copy(tiny_flux_dir, tmp_path)
    for text in ("[]", "[" * 100_000):
        (folder / "model_index.json").write_text(text)
        assert read_layout(str(folder)).known is False  # the loader reports it; planning falls back


def _write_safetensors(path: Path, header: dict, data_bytes: int) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)
    return path


@pytest.mark.parametrize(
    ("header", "data_bytes", "expected"),
    [
        (
            {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
            16,
            "tensor 'w' has shape [-4]; a shape is a list of whole numbers >= 0",
        ),
        ({"w": {"dtype": "F32", "shape": [4.5], "data_offsets": [0, 16]}}, 16, "tensor 'w' has shape [4.5]"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "tensor 'w' has shape [true]"),
        (
            {"w": {"dtype": "F32", "shape": [400], "data_offsets": [0, 16]}},
            16,
            "tensor 'w' is [400] float32 (1600 bytes) but its data_offsets [0, 16] hold 16 bytes",
        ),
        (
            {"w": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 16]}},
            16,
            "but its data_offsets [0, 16] hold 16 bytes",
        ),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, 16, "tensor 'w' has data_offsets [16, 0]"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            },
            16,
            "overlaps the tensor before it; safetensors refuses such a file",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            12,
            "tensor 'b' leaves bytes 4-8 unused",
        ),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 20, "4 bytes after the last tensor"),
    ],
)
def test_safetensors_headers_that_contradict_themselves_name_the_file_and_tensor(
    tmp_path, header, data_bytes, expected
):
    # What safetensors itself refuses to load (its Metadata::validate), found from the header alone.
    path = _write_safetensors(tmp_path / "model.safetensors", header, data_bytes)
    with pytest.raises(ModelError) as excinfo:
        read_header(path)
    assert str(excinfo.value).startswith(f"{path}: ") and expected in str(excinfo.value)


def test_a_valid_header_with_scalars_and_empty_tensors_still_reads(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "scalar": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        "empty": {"dtype": "BF16", "shape": [0, 8], "data_offsets": [4, 4]},
        "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [4, 16]},
    }
    tensors = read_header(_write_safetensors(tmp_path / "model.safetensors", header, 16))
    assert [(t.name, t.shape, t.nbytes) for t in tensors] == [
        ("scalar", (), 4),
        ("empty", (0, 8), 0),
        ("w", (2, 3), 12),
    ]


def test_hub_metadata_with_a_negative_shape_is_refused():
    from types import SimpleNamespace

    from advisor.probe.models import tensors_from_hub_metadata

    shard = SimpleNamespace(tensors={"w": SimpleNamespace(dtype="F32", shape=[-1, 4])})
    with pytest.raises(ModelError, match=r"tensor 'w' has shape \[-1, 4\]"):
        tensors_from_hub_metadata([shard])


def test_a_model_path_too_long_for_the_file_system_is_one_error():
    with pytest.raises(ModelError, match="file name too long"):
        load_profile("./" + "a" * 300)


def test_the_light_hub_cache_lookup_agrees_with_huggingface_hub(tmp_path, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    from advisor.probe.hub_cache import cached_file, hub_cache_dir

    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--name"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (repo / ".no_exist" / sha).mkdir(parents=True)
    (repo / ".no_exist" / sha / "absent.json").write_text("")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hub_cache_dir() == cache
    for repo_id, filename, revision in [
        ("org/name", "model_index.json", "main"),  # through refs/main
        ("org/name", "model_index.json", sha),  # a commit directly
        ("org/name", "absent.json", "main"),  # known to be absent
        ("org/name", "other.json", "main"),  # never fetched
        ("org/name", "model_index.json", "v2"),  # a revision not cached
        ("org/other", "model_index.json", "main"),  # a repo not cached
    ]:
        theirs = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
        assert cached_file(repo_id, filename, revision) == (theirs if isinstance(theirs, str) else None), (
            repo_id,
            filename,
            revision,
        )


def test_the_hub_cache_folder_follows_huggingface_hubs_variables(tmp_path, monkeypatch):
    from advisor.probe.hub_cache import hub_cache_dir

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub_cache_dir() == tmp_path / "new"
