"""What a pipeline's class and a component's config say: the workload kind, and the shape facts
the estimates need (hidden size, patch size, a VAE's compression, a text encoder's length).

Read from the class table (``advisor/data/diffusers.json``, `advisor.probe.layout.pipeline_facts`)
and each component's ``config.json``; no torch, no diffusers.
"""

from __future__ import annotations

import re
from typing import Any

from advisor.errors import ModelError
from advisor.paths import diffusers_tables
from advisor.probe.layout import pipeline_facts


WORKLOADS = ("image", "video", "audio")


def classify_workload(pipeline_class: str, override: str | None = None) -> tuple[str, str]:
    """(workload, why) for a pipeline class: image, video or audio.

    Known classes use the table (video when ``__call__`` takes ``num_frames``); unknown ones fall
    back to the class name (``Video``, ``T2V``, ``I2V``, ``Wan``, ``Animate`` mean video) and
    otherwise image. ``override`` wins.
    """
    if override is not None:
        if str(override).lower() not in WORKLOADS:
            raise ModelError(f"--workload: {override!r} is not a workload; use one of {', '.join(WORKLOADS)}")
        return str(override).lower(), "set by the user"
    facts = pipeline_facts(pipeline_class)
    if facts is not None:
        return facts["workload"], f"{pipeline_class} is a known {facts['workload']} pipeline"
    if re.search(r"Video|T2V|I2V|V2V|Wan|Animate", pipeline_class):
        return "video", f"{pipeline_class} is not in the table; its name says video"
    return "image", f"{pipeline_class} is not in the table; assumed image (override with --workload)"


def known_workload(pipeline_class: str) -> str | None:
    """The workload kind the class table says `pipeline_class` is; None for a class it does not know."""
    return (pipeline_facts(pipeline_class) or {}).get("workload")


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal encoders (Qwen2.5-VL, Llava) keep the language model's shape under text_config.
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def component_facts(role: str, class_name: str, config: dict[str, Any], pipeline_class: str) -> dict[str, Any]:
    """The shape facts later estimates need, derived from a component's config.json."""
    if role == "denoiser":
        # Z-Image names its width `dim`, its heads `n_heads` and its patch sizes `all_patch_size`.
        heads = _first(config, "num_attention_heads", "n_heads")
        width = _first(config, "hidden_size", "inner_dim", "dim")
        head_dim = config.get("attention_head_dim") or (width // heads if isinstance(width, int) and heads else None)
        hidden = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
        patches = config.get("all_patch_size")
        facts = {
            "hidden_size": hidden or width,
            "num_attention_heads": heads,
            "attention_head_dim": head_dim,
            "patch_size": config.get("patch_size") or (patches[0] if isinstance(patches, list) and patches else None),
            "patch_size_t": config.get("patch_size_t"),
            "in_channels": config.get("in_channels"),
            "text_dim": _first(
                config, "joint_attention_dim", "text_dim", "cross_attention_dim", "text_embed_dim", "cap_feat_dim"
            ),
            "block_out_channels": config.get("block_out_channels"),
        }
    elif role == "vae":
        spatial, temporal = vae_compression(class_name, config)
        model_facts = diffusers_tables()["models"].get(class_name, {})
        facts = {
            "spatial_compression": spatial,
            "temporal_compression": temporal,
            "latent_channels": _first(config, "latent_channels", "z_dim"),
            "block_out_channels": config.get("block_out_channels"),
            "supports_tiling": model_facts.get("tiling"),
            "supports_slicing": model_facts.get("slicing"),
        }
    elif role == "text_encoder":
        text = _text_config(config)
        pipeline = pipeline_facts(pipeline_class) or {}
        # CLIP-style encoders have a hard position limit; T5/LLM encoders take the pipeline's default.
        max_length = text.get("max_position_embeddings") if class_name.startswith("CLIP") else None
        facts = {
            "hidden_size": _first(text, "d_model", "hidden_size", "projection_dim"),
            "num_layers": _first(text, "num_hidden_layers", "num_layers"),
            "max_sequence_length": max_length
            or pipeline.get("max_sequence_length")
            or text.get("max_position_embeddings"),
        }
    else:
        facts = {}
    return {key: value for key, value in facts.items() if value is not None}


def vae_compression(class_name: str, config: dict[str, Any]) -> tuple[int, int]:
    """(spatial, temporal) downsampling factor of a VAE, from its config."""
    patch = config.get("patch_size") or 1
    if isinstance(patch, list):  # FLUX.2: the pipeline's latent packing, not the VAE's compression
        patch = 1
    if config.get("spatial_compression_ratio"):
        return int(config["spatial_compression_ratio"]), int(config.get("temporal_compression_ratio") or 1)
    if "temperal_downsample" in config:  # Wan / Qwen-Image VAEs (the typo is diffusers' own)
        steps = config["temperal_downsample"]
        return patch * 2 ** len(steps), 2 ** sum(bool(s) for s in steps)
    if "spatio_temporal_scaling" in config:  # LTX-Video
        scaling = sum(bool(s) for s in config["spatio_temporal_scaling"])
        return patch * 2**scaling, (config.get("patch_size_t") or 1) * 2**scaling
    channels = config.get("block_out_channels") or [0]
    return 2 ** (len(channels) - 1), int(config.get("temporal_compression_ratio") or 1)
