"""The fields of a component's ``config.json`` that the advisor reads, and the type each must hold.

diffusers and transformers write these fields as numbers, lists and flags; a field of another type
is a corrupt (or hand-edited) file. `check_component_config` says so with the file and the field,
instead of a TypeError deep in the estimate (``"num_layers": "nineteen"`` multiplied by a float).
Pure Python; read by `advisor.probe.models` for every component with weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from advisor.errors import ModelError


# The fields of a component's config.json that the profile and the estimate read, and what each
# must hold (diffusers and transformers write them so; null means unset). A field of the wrong type
# is a corrupt file, said here with its name, not a TypeError deep in the estimate.
_COUNT, _LAYERS, _COUNTS, _COUNT_OR_COUNTS = "count", "layers", "counts", "count_or_counts"
_RATIO, _FLAG, _FLAGS, _OBJECT = "ratio", "flag", "flags", "object"
CONFIG_FIELD_KINDS = {
    "num_attention_heads": _COUNT_OR_COUNTS,  # a list per UNet block in SDXL's attention_head_dim
    "attention_head_dim": _COUNT_OR_COUNTS,
    "hidden_size": _COUNT,
    "inner_dim": _COUNT,
    "in_channels": _COUNT,
    "out_channels": _COUNT,
    "joint_attention_dim": _COUNT,
    "text_dim": _COUNT,
    "cross_attention_dim": _COUNT_OR_COUNTS,
    "text_embed_dim": _COUNT,
    "pooled_projection_dim": _COUNT,
    "latent_channels": _COUNT,
    "z_dim": _COUNT,
    "patch_size": _COUNT_OR_COUNTS,  # (t, h, w) in Wan's transformer
    "patch_size_t": _COUNT,
    "spatial_compression_ratio": _RATIO,
    "temporal_compression_ratio": _RATIO,
    "d_model": _COUNT,
    "projection_dim": _COUNT,
    "max_position_embeddings": _COUNT,
    "num_hidden_layers": _LAYERS,
    "num_layers": _LAYERS,
    "num_single_layers": _LAYERS,
    "block_out_channels": _COUNTS,
    "temperal_downsample": _FLAGS,
    "spatio_temporal_scaling": _FLAGS,
    "guidance_embeds": _FLAG,
    "text_config": _OBJECT,
}
# A VAE's patch size multiplies its compression factor (one number), except FLUX.2's (h, w): that is
# the pipeline's 2x2 packing of latents into channels, which the transformer's in_channels counts.
_ROLE_FIELD_KINDS = {"vae": {"patch_size": _COUNT_OR_COUNTS}}
_EXPECTED = {
    _COUNT: "a whole number >= 1",
    _LAYERS: "a whole number >= 0",
    _COUNTS: "a non-empty list of whole numbers >= 1",
    _COUNT_OR_COUNTS: "a whole number >= 1 or a list of them",
    _RATIO: "a number >= 1",
    _FLAG: "true or false",
    _FLAGS: "a list of true/false",
    _OBJECT: "an object",
}


def _is_whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _fits(kind: str, value: Any) -> bool:
    if kind == _COUNT:
        return _is_whole(value, 1)
    if kind == _LAYERS:
        return _is_whole(value, 0)
    if kind == _COUNTS:
        return isinstance(value, list) and bool(value) and all(_is_whole(v, 1) for v in value)
    if kind == _COUNT_OR_COUNTS:
        return _is_whole(value, 1) or _fits(_COUNTS, value)
    if kind == _RATIO:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 1
    if kind == _FLAG:
        return isinstance(value, bool)
    if kind == _FLAGS:
        return isinstance(value, list) and all(isinstance(v, bool) for v in value)
    return isinstance(value, dict)


def check_component_config(path: Path, role: str, config: dict[str, Any]) -> None:
    """A `ModelError` naming `path` and the field when a field the advisor reads has the wrong type."""
    kinds = {**CONFIG_FIELD_KINDS, **_ROLE_FIELD_KINDS.get(role, {})}
    nested = config.get("text_config")
    for where, section in (("", config), ("text_config.", nested if isinstance(nested, dict) else {})):
        for key, kind in kinds.items():
            value = section.get(key)
            if value is not None and not _fits(kind, value):
                text = json.dumps(value)
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise ModelError(f"{path}: '{where}{key}' is {shown}; it must be {_EXPECTED[kind]} (or null)")
