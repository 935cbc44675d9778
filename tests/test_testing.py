"""advisor.testing: tiny pipelines load offline, run on CPU, are seeded, cached and scalable."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"

from advisor.testing import build_tiny_flux, build_tiny_wan, tiny_call_kwargs  # noqa: E402


def _weights(folder, component):
    from safetensors.torch import load_file

    files = sorted((folder / component).glob("*.safetensors"))
    assert files, f"no safetensors weights in {folder / component}"
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def _num_params(folder):
    from safetensors import safe_open

    total = 0
    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_dir):
    return _load(tiny_flux_dir)


@pytest.fixture(scope="module")
def wan_pipe(tiny_wan_dir):
    return _load(tiny_wan_dir)


def test_importing_the_module_does_not_import_heavy_libraries():
    code = (
        "import sys, advisor.testing; "
        "heavy = {'torch', 'diffusers', 'transformers', 'tokenizers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize(
    ("folder_fixture", "components"),
    [
        ("tiny_flux_dir", ["transformer", "vae", "text_encoder", "text_encoder_2"]),
        ("tiny_wan_dir", ["transformer", "vae", "text_encoder"]),
    ],
)
def test_folder_has_diffusers_layout_with_float32_safetensors(request, folder_fixture, components):
    import torch

    folder = request.getfixturevalue(folder_fixture)
    index = json.loads((folder / "model_index.json").read_text())
    for component in components:
        assert component in index
        tensors = _weights(folder, component)
        assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert not list(folder.parent.glob(f".{folder.name}.*")), "staging folder left behind"


def test_flux_loads_offline_as_flux_pipeline(flux_pipe):
    from diffusers import FluxPipeline

    assert type(flux_pipe) is FluxPipeline
    # Flux pads CLIP input to model_max_length; it must survive save/load.
    assert flux_pipe.tokenizer.model_max_length == 77
    assert flux_pipe.tokenizer.pad_token is not None and flux_pipe.tokenizer_2.pad_token is not None


def test_wan_loads_offline_as_wan_pipeline(wan_pipe):
    from diffusers import WanPipeline

    assert type(wan_pipe) is WanPipeline


def test_flux_runs_on_cpu_and_gives_a_finite_image(flux_pipe):
    import numpy as np

    kwargs = tiny_call_kwargs("image", seed=0)
    images = flux_pipe(**kwargs).images
    assert images.shape == (1, kwargs["height"], kwargs["width"], 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0  # not a constant image

    again = flux_pipe(**tiny_call_kwargs("image", seed=0)).images
    np.testing.assert_array_equal(images, again)
    other = flux_pipe(**tiny_call_kwargs("image", seed=1)).images
    assert not np.array_equal(images, other)


def test_wan_runs_on_cpu_and_gives_finite_frames(wan_pipe):
    import numpy as np

    kwargs = tiny_call_kwargs("video", seed=0)
    frames = wan_pipe(**kwargs).frames
    assert frames.shape == (1, kwargs["num_frames"], kwargs["height"], kwargs["width"], 3)
    assert np.isfinite(frames).all()
    assert frames.min() >= 0.0 and frames.max() <= 1.0

    again = wan_pipe(**tiny_call_kwargs("video", seed=0)).frames
    np.testing.assert_array_equal(frames, again)


@pytest.mark.parametrize("builder", [build_tiny_flux, build_tiny_wan], ids=["flux", "wan"])
def test_same_seed_gives_identical_weights(tmp_path, builder):
    import torch

    first = builder(tmp_path / "a", seed=3)
    second = builder(tmp_path / "b", seed=3)
    other = builder(tmp_path / "c", seed=4)
    for component in ("transformer", "text_encoder"):
        a, b, c = (_weights(folder, component) for folder in (first, second, other))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert any(not torch.equal(a[key], c[key]) for key in a)


def test_building_into_an_existing_folder_is_a_no_op_unless_overwrite(tmp_path):
    import torch

    folder = build_tiny_flux(tmp_path / "flux", seed=0)
    weights = sorted(folder.rglob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in weights]
    original = _weights(folder, "transformer")

    # A different seed would give different weights: they stay, nothing is rewritten.
    assert build_tiny_flux(folder, seed=1) == folder
    assert [p.stat().st_mtime_ns for p in weights] == stamps
    kept = _weights(folder, "transformer")
    assert all(torch.equal(original[k], kept[k]) for k in original)

    assert build_tiny_flux(folder, seed=1, overwrite=True) == folder
    rebuilt = _weights(folder, "transformer")
    assert any(not torch.equal(original[k], rebuilt[k]) for k in original)
    assert _load(folder).__class__.__name__ == "FluxPipeline"


def test_larger_scale_gives_more_parameters(tmp_path, tiny_flux_dir):
    from diffusers import FluxPipeline

    small = _num_params(tiny_flux_dir)
    bigger_dir = build_tiny_flux(tmp_path / "flux-2", scale=2)
    bigger = _num_params(bigger_dir)
    assert bigger > 2 * small
    assert small < 1_000_000  # scale=1 stays tiny

    pipe = FluxPipeline.from_pretrained(bigger_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_attention_heads == 4
    images = pipe(**tiny_call_kwargs("image", seed=0)).images
    assert images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("scale", [0, -1, 1.5])
def test_invalid_scale_is_rejected(tmp_path, scale):
    with pytest.raises(ValueError, match="scale"):
        build_tiny_flux(tmp_path / "flux", scale=scale)
    assert not (tmp_path / "flux").exists()


def test_tiny_call_kwargs():
    video = tiny_call_kwargs("video")
    assert (video["num_frames"] - 1) % 4 == 0
    assert video["height"] % 16 == 0 and video["width"] % 16 == 0
    assert "generator" not in video
    # Each call builds its own generator, so two calls never share RNG state.
    a, b = tiny_call_kwargs("image", seed=0), tiny_call_kwargs("image", seed=0)
    assert a["generator"] is not b["generator"]
    assert a["generator"].initial_seed() == 0
    with pytest.raises(ValueError, match="kind"):
        tiny_call_kwargs("audio")
