"""Tiny random-weight diffusers pipelines for tests, benchmarks and dry runs.

The builders write a regular diffusers folder (``model_index.json``, one
sub-folder per component, float32 safetensors weights) that loads offline with
the real ``DiffusionPipeline.from_pretrained`` and runs on CPU in about a
second. Nothing is downloaded: the tokenizers are built in memory from a small
word-level vocabulary.

There is one builder per pipeline class of the catalog, with the catalog
model's component names and component classes; `build_tiny_for` picks it from
a catalog model id or alias, and `tiny_call_kwargs` gives the smallest call
that runs it. Measured (all components, float32; one 2-step call on 2 idle cores):

=========================  ==========  =======  ==================  ========
builder                    parameters  on disk  call output         one call
=========================  ==========  =======  ==================  ========
build_tiny_flux            0.19 M      0.8 MB   32x32               ~0.07 s
build_tiny_sd3             0.23 M      1.0 MB   16x16               ~0.06 s
build_tiny_sdxl            0.22 M      0.9 MB   16x16               ~0.08 s
build_tiny_qwen_image      0.23 M      0.9 MB   16x16               ~0.05 s
build_tiny_flux2           0.09 M      0.4 MB   16x16               ~0.01 s
build_tiny_flux2_klein     0.07 M      0.3 MB   16x16               ~0.01 s
build_tiny_z_image         0.37 M      1.5 MB   16x16               ~0.02 s
build_tiny_wan             0.09 M      0.4 MB   5 frames of 32x32   ~0.08 s
build_tiny_wan22           0.12 M      0.5 MB   5 frames of 32x32   ~0.08 s
build_tiny_wan22_ti2v      0.10 M      0.4 MB   5 frames of 32x32   ~0.05 s
build_tiny_cogvideox       0.13 M      0.5 MB   9 frames of 16x16   ~0.06 s
build_tiny_hunyuan_video   0.15 M      0.7 MB   5 frames of 16x16   ~0.05 s
build_tiny_ltx             0.15 M      0.6 MB   5 frames of 32x32   ~0.05 s
=========================  ==========  =======  ==================  ========

Building takes 0.1-0.7 s and loading 0.1-0.3 s.

Example::

    >>> from diffusers import DiffusionPipeline
    >>> from advisor.testing import build_tiny_flux, tiny_call_kwargs
    >>> folder = build_tiny_flux("/tmp/tiny-flux")
    >>> pipe = DiffusionPipeline.from_pretrained(folder)
    >>> image = pipe(**tiny_call_kwargs("image", seed=0)).images[0]
    >>> image.shape
    (32, 32, 3)

    >>> folder = build_tiny_for("sd3.5-large", "/tmp/tiny-sd3")
    >>> pipe = DiffusionPipeline.from_pretrained(folder)  # a StableDiffusion3Pipeline
    >>> pipe(**tiny_call_kwargs("StableDiffusion3Pipeline")).images.shape
    (1, 16, 16, 3)

Heavy libraries (torch, diffusers, transformers, tokenizers) are imported
inside the functions so that importing this package stays cheap.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

from advisor.testing._common import offline_tokenizer
from advisor.testing.image import (
    build_tiny_chroma,
    build_tiny_flux,
    build_tiny_flux2,
    build_tiny_flux2_klein,
    build_tiny_qwen_image,
    build_tiny_sd3,
    build_tiny_sdxl,
    build_tiny_z_image,
)
from advisor.testing.video import (
    build_tiny_cogvideox,
    build_tiny_hunyuan_video,
    build_tiny_ltx,
    build_tiny_wan,
    build_tiny_wan22,
    build_tiny_wan22_ti2v,
)


__all__ = [
    "TINY_BUILDERS",
    "build_tiny_chroma",
    "build_tiny_cogvideox",
    "build_tiny_flux",
    "build_tiny_flux2",
    "build_tiny_flux2_klein",
    "build_tiny_for",
    "build_tiny_hunyuan_video",
    "build_tiny_ltx",
    "build_tiny_qwen_image",
    "build_tiny_sd3",
    "build_tiny_sdxl",
    "build_tiny_wan",
    "build_tiny_wan22",
    "build_tiny_wan22_ti2v",
    "build_tiny_z_image",
    "offline_tokenizer",
    "tiny_call_kwargs",
]

_IMAGE_PROMPT = "a photo of a cat sitting on a mat"
_VIDEO_PROMPT = "a dog running on the beach at sunset"

# (pipeline class, a component or a pipeline setting only that variant has) -> builder. Wan 2.1 and
# 2.2 are all a WanPipeline: A14B is the one with a second expert, transformer_2; TI2V-5B the one
# with expand_timesteps.
TINY_BUILDERS: dict[tuple[str, str | None], Callable[..., pathlib.Path]] = {
    ("FluxPipeline", None): build_tiny_flux,
    ("ChromaPipeline", None): build_tiny_chroma,
    ("Flux2Pipeline", None): build_tiny_flux2,
    ("Flux2KleinPipeline", None): build_tiny_flux2_klein,
    ("StableDiffusion3Pipeline", None): build_tiny_sd3,
    ("StableDiffusionXLPipeline", None): build_tiny_sdxl,
    ("QwenImagePipeline", None): build_tiny_qwen_image,
    ("ZImagePipeline", None): build_tiny_z_image,
    ("WanPipeline", None): build_tiny_wan,
    ("WanPipeline", "transformer_2"): build_tiny_wan22,
    ("WanPipeline", "expand_timesteps"): build_tiny_wan22_ti2v,
    ("CogVideoXPipeline", None): build_tiny_cogvideox,
    ("HunyuanVideoPipeline", None): build_tiny_hunyuan_video,
    ("LTXPipeline", None): build_tiny_ltx,
}


def build_tiny_for(
    model: str, path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False
) -> pathlib.Path:
    """Build the tiny pipeline of a catalog model (hub id or alias) into ``path``: same pipeline class,
    component names and component classes as the catalog entry, random weights.

    Example::

        >>> build_tiny_for("Wan-AI/Wan2.2-T2V-A14B-Diffusers", tmp_path / "wan22")  # has transformer_2
    """
    from advisor.probe.layout import catalog_entry, catalog_names

    entry = catalog_entry(model)
    if entry is None:
        raise ValueError(f"{model!r} is not in the catalog; it has {', '.join(catalog_names())}")
    names = {item["name"] for item in entry["components"]} | variant_settings(entry)
    pipeline_class = entry["pipeline_class"]
    for (cls, marker), builder in TINY_BUILDERS.items():
        if cls == pipeline_class and marker in names:
            return builder(path, seed=seed, overwrite=overwrite)
    builder = TINY_BUILDERS.get((pipeline_class, None))
    if builder is None:
        raise ValueError(f"no tiny builder for {pipeline_class} ({model}); add one to advisor.testing")
    return builder(path, seed=seed, overwrite=overwrite)


def variant_settings(entry: dict[str, Any]) -> set[str]:
    """The pipeline settings a catalog entry turns on (`TINY_BUILDERS`' markers besides component names)."""
    return {name for name, value in entry.get("pipeline_config", {}).items() if value is True}


# Per pipeline class: kind, height, width, frames and the extra call arguments of the smallest
# call that runs. Sizes follow from each builder's VAE compression and the pipeline's checks.
_CALLS: dict[str, tuple[str, int, int, int, dict[str, Any]]] = {
    "FluxPipeline": ("image", 32, 32, 1, {"guidance_scale": 3.5, "max_sequence_length": 16}),
    # Real CFG (a second transformer call with the negative prompt) on, as its default 5.0.
    "ChromaPipeline": ("image", 32, 32, 1, {"guidance_scale": 5.0, "max_sequence_length": 16}),
    # 2x VAE, 2x2 packing: a multiple of 4; three hidden states of the 3-layer text encoder.
    "Flux2Pipeline": (
        "image",
        16,
        16,
        1,
        {"guidance_scale": 4.0, "max_sequence_length": 16, "text_encoder_out_layers": (1, 2, 3)},
    ),
    # VAE without downsampling, patch 2: 16x16 -> 64 tokens.
    "StableDiffusion3Pipeline": ("image", 16, 16, 1, {"guidance_scale": 5.0, "max_sequence_length": 16}),
    "StableDiffusionXLPipeline": ("image", 16, 16, 1, {"guidance_scale": 5.0}),
    # 2x VAE, 2x2 packing: a multiple of 4; true CFG (negative prompt, true_cfg_scale > 1) as Qwen-Image's default.
    "QwenImagePipeline": (
        "image",
        16,
        16,
        1,
        {"negative_prompt": " ", "true_cfg_scale": 4.0, "max_sequence_length": 16},
    ),
    # As FLUX.2 [dev]; step-distilled, so no guidance whatever the scale (its card runs 1.0).
    "Flux2KleinPipeline": (
        "image",
        16,
        16,
        1,
        {"guidance_scale": 1.0, "max_sequence_length": 16, "text_encoder_out_layers": (1, 2, 3)},
    ),
    # VAE without downsampling, patch 2; CFG on (any guidance_scale > 0), as the pipeline's default.
    "ZImagePipeline": ("image", 16, 16, 1, {"guidance_scale": 5.0, "max_sequence_length": 16}),
    # Wan: height/width divisible by 16, (num_frames - 1) % 4 == 0; 32x32 for the TI2V kind's 16x VAE.
    "WanPipeline": ("video", 32, 32, 5, {"negative_prompt": "", "guidance_scale": 5.0, "max_sequence_length": 16}),
    # CogVideoX: the transformer's sample size (2x2 latents = 16x16) and max_text_seq_length (16) fix
    # these; 9 frames, as 5 (2 latent frames) would decode to 8.
    "CogVideoXPipeline": (
        "video",
        16,
        16,
        9,
        {"negative_prompt": "", "guidance_scale": 6.0, "max_sequence_length": 16},
    ),
    "HunyuanVideoPipeline": ("video", 16, 16, 5, {"guidance_scale": 6.0, "max_sequence_length": 16}),
    # LTX: height and width divisible by 32 (the pipeline checks); 4x spatial and temporal VAE here.
    "LTXPipeline": ("video", 32, 32, 5, {"negative_prompt": "", "guidance_scale": 3.0, "max_sequence_length": 16}),
}
_KINDS = {"image": "FluxPipeline", "video": "WanPipeline"}


def tiny_call_kwargs(kind: str, *, seed: int | None = None) -> dict[str, Any]:
    """Smallest call arguments that make a tiny pipeline run fast on CPU.

    ``kind`` is a pipeline class name (``"StableDiffusion3Pipeline"``, ``"WanPipeline"``, ...; one
    of those the builders make), or ``"image"`` (Flux: one 32x32 image) or ``"video"`` (Wan: 5
    frames of 32x32; Wan needs height/width divisible by 16 and ``(num_frames - 1) % 4 == 0``).
    Output is ``output_type="np"`` so the VAE decode runs too. With ``seed`` a
    ``torch.Generator`` seeded with it is added (a fresh dict each call, so a generator is never
    shared); without it the result depends on the global torch RNG.

    Example::

        >>> pipe(**tiny_call_kwargs("video", seed=0)).frames.shape
        (1, 5, 32, 32, 3)
    """
    from advisor.probe.workload import Workload

    pipeline_class = _KINDS.get(kind, kind)
    if pipeline_class not in _CALLS:
        raise ValueError(f"kind must be 'image', 'video' or one of {', '.join(sorted(_CALLS))}; got {kind!r}")
    workload, height, width, frames, extra = _CALLS[pipeline_class]
    job = Workload(workload, height=height, width=width, frames=frames, steps=2).call_kwargs()
    prompt = _VIDEO_PROMPT if workload == "video" else _IMAGE_PROMPT
    kwargs: dict[str, Any] = {"prompt": prompt, **job, **extra, "output_type": "np"}
    if seed is not None:
        import torch

        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs
