"""A component's weights from its safetensors headers: parameters, storage, quantizable layers, blocks.

Never reads tensor data. The layer facts follow what each library does when it loads or converts a
model: which Linear layers bitsandbytes and torchao convert, which modules layerwise casting keeps
at the compute dtype, which ones half-precision loading keeps in float32, and the runs of repeated
blocks that block-level group offloading moves.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advisor.errors import ModelError
from advisor.levers.layerwise_casting import (
    DEFAULT_CASTING_SKIP_PATTERNS,
    ENCODER_CASTING_SKIP_PATTERNS,
    casting_skipped,
)
from advisor.paths import diffusers_tables
from advisor.probe.safetensors_header import TensorInfo, read_header


# 2-D ``weight`` tensors that belong to nn.Embedding, not nn.Linear (quantizers leave them alone).
_EMBEDDING_NAMES = {
    "shared",
    "embed_tokens",
    "token_embedding",
    "position_embedding",
    "relative_attention_bias",
    "wte",
    "wpe",
}
_SHARD = re.compile(r"^(?P<base>[^.]+?)(?:-\d{5}-of-\d{5})?(?:\.(?P<variant>[A-Za-z0-9_]+))?\.safetensors$")


@dataclass
class BlockGroup:
    """A run of repeated blocks (a ModuleList), the unit block-level group offloading moves."""

    name: str
    count: int
    parameters_per_block: int  # the largest block's
    class_name: str | None = None
    parameters_total: int | None = None  # all of them (UNets' down/up blocks differ); None: count x per block

    @property
    def total(self) -> int:
        return self.parameters_total if self.parameters_total is not None else self.count * self.parameters_per_block

    @property
    def uniform(self) -> bool:
        return self.total == self.count * self.parameters_per_block


def _module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else ""


def _quantization_skips(module: str, class_name: str, library: str, *, keep_in_fp32: bool = True) -> bool:
    """Whether quantizers leave this Linear alone (kept in full precision), as each library decides.

    `keep_in_fp32=False` leaves the `_keep_in_fp32_modules` out of the skips (torchao on transformers).
    """
    if library == "diffusers":
        keep = diffusers_tables()["models"].get(class_name, {}).get("keep_in_fp32_modules", [])
        return any(module.rsplit(".", 1)[-1] == k or f"{k}." in module or module == k for k in keep)
    facts = diffusers_tables()["transformers_models"].get(class_name, {})
    skips = set(facts.get("quantization_skip_modules", []))
    if not keep_in_fp32:
        skips -= set(facts.get("keep_in_fp32_modules", []))
    # transformers' should_convert_module: a prefix up to a module boundary, or a suffix.
    return any(module == k or module.startswith(k + ".") or module.endswith(k) for k in skips)


def _keep_in_fp32(module: str, class_name: str, library: str) -> bool:
    """Whether loading in half precision keeps this module in float32 (`_keep_in_fp32_modules`)."""
    table = diffusers_tables()["models" if library == "diffusers" else "transformers_models"]
    keep = table.get(class_name, {}).get("keep_in_fp32_modules", [])
    return any(k in module.split(".") for k in keep)  # diffusers' rule: a dotted segment equals a key


def summarize_tensors(tensors: list[TensorInfo], *, class_name: str, library: str) -> dict[str, Any]:
    """Parameter counts, storage and layer facts of one component from its tensors' headers.

    Integer tensors are buffers (position ids), not parameters. A module whose ``weight`` has two or
    more dimensions is a Linear, Embedding or Conv layer: the layers diffusers' layerwise casting
    casts; 2-D weights are Linear unless named like an embedding.
    """
    params = [t for t in tensors if t.is_float]
    weights = {_module_of(t.name): t for t in params if t.name.endswith(".weight")}
    castable = {m for m, t in weights.items() if len(t.shape) >= 2}
    matrices = {m for m in castable if len(weights[m].shape) == 2 and m.rsplit(".", 1)[-1] not in _EMBEDDING_NAMES}
    linear = {m for m in matrices if not _quantization_skips(m, class_name, library)}
    fp32_linear = {
        m
        for m in matrices - linear
        if library != "diffusers" and not _quantization_skips(m, class_name, library, keep_in_fp32=False)
    }

    if library == "diffusers":
        model_facts = diffusers_tables()["models"].get(class_name, {})
        own = tuple(model_facts.get("skip_layerwise_casting_patterns", [])) + tuple(
            model_facts.get("keep_in_fp32_modules", [])
        )
    else:
        own = ENCODER_CASTING_SKIP_PATTERNS + tuple(
            diffusers_tables()["transformers_models"].get(class_name, {}).get("keep_in_fp32_modules", [])
        )
    patterns = DEFAULT_CASTING_SKIP_PATTERNS + own
    skipped = sum(
        t.numel for t in params if _module_of(t.name) not in castable or casting_skipped(_module_of(t.name), patterns)
    )
    cast_layers = sum(not casting_skipped(m, patterns) for m in castable)

    bytes_by_dtype: dict[str, int] = defaultdict(int)
    for tensor in tensors:
        bytes_by_dtype[tensor.dtype] += tensor.nbytes
    per_block: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for tensor in params:
        parts = tensor.name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index:
            per_block[".".join(parts[:index])][int(parts[index])] += tensor.numel
    blocks = [
        BlockGroup(
            name=name, count=len(sizes), parameters_per_block=max(sizes.values()), parameters_total=sum(sizes.values())
        )
        for name, sizes in sorted(per_block.items())
    ]
    return {
        "parameters": sum(t.numel for t in params),
        "parameter_tensors": len(params),
        "dtype": max(bytes_by_dtype, key=bytes_by_dtype.get) if bytes_by_dtype else "float32",
        "bytes": sum(bytes_by_dtype.values()),
        "linear_parameters": sum(weights[m].numel for m in linear),
        "linear_layers": len(linear),
        "linear_rows": sum(weights[m].shape[0] for m in linear),
        "linear_columns": sum(weights[m].shape[1] for m in linear),
        "fp32_linear_parameters": sum(weights[m].numel for m in fp32_linear),
        "fp32_linear_rows": sum(weights[m].shape[0] for m in fp32_linear),
        "casting_skipped_parameters": skipped,
        "cast_layers": cast_layers,
        "keep_in_fp32_parameters": sum(t.numel for t in params if _keep_in_fp32(t.name, class_name, library)),
        "blocks": blocks,
    }


def choose_weight_files(names: list[str]) -> tuple[list[str], str | None]:
    """Of a component's file names, the safetensors files `from_pretrained` would read (all shards),
    and their variant. The plain files win over variants (``.fp16.safetensors``), as in diffusers
    without ``variant=``."""
    by_variant: dict[str | None, list[str]] = defaultdict(list)
    for name in sorted(names):
        match = _SHARD.match(name)
        if match:
            by_variant[match.group("variant")].append(name)
    if not by_variant:
        return [], None
    variant = None if None in by_variant else sorted(by_variant, key=str)[0]
    return by_variant[variant], variant


def weight_files(component_dir: Path) -> tuple[list[Path], str | None]:
    """`choose_weight_files` for a component folder on disk."""
    names, variant = choose_weight_files([path.name for path in component_dir.glob("*.safetensors")])
    return [component_dir / name for name in names], variant


def header_tensors(component_dir: Path) -> list[list[TensorInfo]] | None:
    """The tensors of a component folder, per shard, from the safetensors headers; None without weights."""
    files, _variant = weight_files(component_dir)
    if files:
        return [read_header(path) for path in files]
    if list(component_dir.glob("*.bin")) or list(component_dir.glob("*.pt")):
        raise ModelError(
            f"{component_dir}: only pickled (.bin) weights, which can't be inspected without loading; "
            "convert them to safetensors"
        )
    return None  # tokenizer, scheduler, feature extractor
