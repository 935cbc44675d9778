"""The user's LoRAs, read from their safetensors headers without loading them (`--lora`), or assumed
from a rank (`--lora-rank`) when the files are not at hand.

A LoRA replaces none of a layer's weights: it adds two small matrices per targeted layer, ``A``
(rank x in) and ``B`` (out x rank), whose product, scaled, is added to the layer's output. Its
header says everything a plan needs: which layers of which component it targets, its rank, and
its parameters (a DoRA's magnitude vectors aside, which diffusers drops for most pipelines). The formats people have, as diffusers reads them
(``diffusers/loaders/lora_conversion_utils.py`` converts the others on load):

- diffusers/peft: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (``unet.``,
  ``text_encoder.``, ``text_encoder_2.`` for the others; peft's own files have no prefix);
- kohya (sd-scripts, and most files on civitai): ``lora_unet_<module_with_underscores>.lora_down
  .weight`` / ``lora_up.weight`` / ``alpha``, ``lora_te1_`` / ``lora_te2_`` for text encoders;
- original module names (ComfyUI, BFL, Wan's own trainers, ai-toolkit's ComfyUI exports):
  ``diffusion_model.<module>.lora_A.weight``;
- XLabs: ``double_blocks.0.processor.proj_lora1.down.weight`` / ``up.weight``.

The scale goes after the path, ``PATH:0.8``: a Windows path (``C:\\loras\\x.safetensors``) keeps its
drive's colon, since only a number after the last colon is a scale, and an existing file of the
whole name wins.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from advisor.config import LoraAdapter
from advisor.errors import ModelError, UsageError
from advisor.levers.lora import header_digest
from advisor.probe.hub_cache import cached_file
from advisor.probe.models import ModelProfile
from advisor.probe.safetensors_header import TensorInfo, read_header


# (the down tensor's suffix, the up tensor's): A is rank x in, B out x rank.
_PAIRS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".down.weight", ".up.weight"),  # XLabs
)
# A key's prefix -> the component it loads into ("denoiser": the pipeline's transformer or UNet).
_PREFIXES = (
    ("transformer.", "denoiser"),
    ("unet.", "denoiser"),
    ("model.diffusion_model.", "denoiser"),
    ("diffusion_model.", "denoiser"),
    ("lora_unet_", "denoiser"),
    ("lora_transformer_", "denoiser"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
    ("text_encoder.", "text_encoder"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
)
MAX_RANK = 4096  # past any LoRA's rank (a full fine-tune's difference is not a LoRA)
MAX_COUNT = 16


def split_spec(spec: str) -> tuple[str, float]:
    """(`spec`'s path or repo, its scale): ``x.safetensors:0.8`` -> ('x.safetensors', 0.8); a scale
    is a number after the last colon, so ``C:\\loras\\x.safetensors`` keeps its drive."""
    if Path(spec).is_file():
        return spec, 1.0
    head, colon, tail = spec.rpartition(":")
    if colon and head and re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", tail):
        scale = float(tail)
        if not math.isfinite(scale) or abs(scale) > 100:
            raise UsageError(f"--lora {spec}: scale {tail} must be a number from -100 to 100")
        return head, scale
    return spec, 1.0


def resolve_file(source: str) -> Path:
    """The local file `source` names: a path, or ``repo/name/file.safetensors`` in the Hugging Face
    cache (a LoRA is never downloaded to plan)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    parts = source.split("/")
    if len(parts) >= 3 and not path.is_absolute():
        found = cached_file("/".join(parts[:2]), "/".join(parts[2:]))
        if found:
            return Path(found)
    if path.is_dir():
        raise UsageError(
            f"--lora {source}: is a folder; name the LoRA's .safetensors file in it "
            "(diffusers saves pytorch_lora_weights.safetensors)"
        )
    raise UsageError(
        f"--lora {source}: no such file, nor a Hub file (repo/name/file.safetensors) in the Hugging Face "
        "cache; give a local .safetensors file, or --lora-rank N when the file is not at hand"
    )


def _component(name: str) -> tuple[str, str]:
    """(the component a layer's key loads into, the key without its component prefix)."""
    for prefix, component in _PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix) :]
    return "denoiser", name  # peft's own files, XLabs: the denoiser's modules, unprefixed


def _format(names: list[str]) -> str:
    if any(n.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for n in names):
        return "kohya"
    if any(".processor." in n and n.endswith((".down.weight", ".up.weight")) for n in names):
        return "xlabs"
    if any(n.startswith(("diffusion_model.", "model.diffusion_model.")) for n in names):
        return "original"
    return "diffusers"


def _pairs(tensors: dict[str, TensorInfo]) -> Iterator[tuple[str, TensorInfo, TensorInfo]]:
    """(the down tensor's name, A, B) of every LoRA layer in a header's tensors."""
    for name, down in tensors.items():
        pair = next((p for p in _PAIRS if name.endswith(p[0])), None)
        up = tensors.get(name[: -len(pair[0])] + pair[1]) if pair else None
        if up is not None and len(down.shape) >= 2 and len(up.shape) >= 2:
            yield name, down, up


def read_lora(spec: str, profile: ModelProfile) -> LoraAdapter:
    """The LoRA `spec` names (``PATH[:SCALE]``), read from its header, for `profile`'s pipeline."""
    source, scale = split_spec(spec)
    path = resolve_file(source)
    try:
        tensors = {t.name: t for t in read_header(path)}
    except ModelError as exc:
        raise UsageError(f"--lora {source}: {exc}") from None
    layers: dict[str, int] = defaultdict(int)
    parameters: dict[str, int] = defaultdict(int)
    outputs: dict[str, int] = defaultdict(int)
    rank = 0
    denoiser_paths = []  # diffusers-layout module paths in the denoiser: checked against its blocks below
    for name, down, up in _pairs(tensors):
        component, module = _component(name)
        if name.startswith(("transformer.", "unet.")):
            denoiser_paths.append(module)
        layers[component] += 1
        parameters[component] += down.numel + up.numel
        outputs[component] += up.shape[0]
        rank = max(rank, down.shape[0])
    if not layers:
        raise UsageError(
            f"--lora {source}: no LoRA layers in its header (no lora_A/lora_B, lora_down/lora_up or down/up "
            "pairs); is it a LoRA?"
        )
    local = Path(source).expanduser().is_file()
    _check_blocks(denoiser_paths, profile, source)
    return LoraAdapter(
        # absolute (a config loads from anywhere), not resolved: a link (the Hub's cache) keeps its name
        source=os.path.abspath(path) if local else source,
        rank=rank,
        layers=_named(dict(layers), profile, source),
        parameters=_named(dict(parameters), profile, source),
        outputs=_named(dict(outputs), profile, source),
        format=_format(list(tensors)),
        scale=scale,
        file_bytes=path.stat().st_size,
        digest=header_digest(path),
    )


def _check_blocks(paths: list[str], profile: ModelProfile, source: str) -> None:
    """A diffusers-layout LoRA names the denoiser's own modules: one whose layers sit in none of its
    block lists (``down_blocks`` on a Flux transformer) is for another model, and diffusers would load
    none of it, with a warning only ("No LoRA keys associated to ... found")."""
    denoisers = profile.by_role("denoiser")
    blocks = [group.name for group in denoisers[0].blocks] if denoisers else []
    if paths and blocks and not any(path.startswith(f"{block}.") for path in paths for block in blocks):
        example = paths[0].split(".lora")[0]
        raise UsageError(
            f"--lora {source}: its layers ({example}, ...) are in none of {denoisers[0].class_name}'s blocks "
            f"({', '.join(blocks)}); is it a LoRA for another model?"
        )


def _named(per_component: dict[str, int], profile: ModelProfile, source: str) -> dict[str, int]:
    """`per_component` keyed by the pipeline's component names (the denoiser's is its own)."""
    denoisers = profile.by_role("denoiser")
    names = {c.name for c in profile.components}
    named = {}
    for component, value in per_component.items():
        name = denoisers[0].name if component == "denoiser" and denoisers else component
        if name not in names:
            raise UsageError(
                f"--lora {source}: has layers for {name}, which {profile.pipeline_class} does not have "
                f"(its components: {', '.join(sorted(names))}); is it a LoRA for another model?"
            )
        named[name] = value
    return named


def assumed_lora(rank: int, profile: ModelProfile) -> LoraAdapter:
    """A LoRA of `rank` on every Linear layer of the denoiser (what ai-toolkit and kohya's Flux
    trainers target; the most a LoRA of that rank can add): the plan's stand-in for a file."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise UsageError(f"--lora-rank: {rank!r} must be a whole number from 1 to {MAX_RANK} (typical: 4 to 128)")
    denoiser = profile.by_role("denoiser")[0]
    # A layer of in x out weights takes rank x (in + out) adapter parameters.
    return LoraAdapter(
        source=f"rank {rank}, assumed on every Linear layer of the {denoiser.name}",
        rank=rank,
        layers={denoiser.name: denoiser.linear_layers},
        parameters={denoiser.name: rank * (denoiser.linear_columns + denoiser.linear_rows)},
        outputs={denoiser.name: denoiser.linear_rows},
        format="assumed",
    )


def _targeted_layers(path: Path) -> set[str]:
    return {name for name, _, _ in _pairs({t.name: t for t in read_header(path)})}


def hotswappable(adapters: tuple[LoraAdapter, ...]) -> bool:
    """Whether swapped LoRAs can be hotswapped: each targets the layers of the one loaded first (the
    most layers, `advisor.levers.lora.load_order`) or fewer, as peft requires ("Hot swapping the
    adapter did not succeed, unexpected keys found", ``peft/utils/hotswap.py``; diffusers then
    deletes the loaded adapter). LoRAs assumed from a rank target the same layers."""
    files = [adapter for adapter in adapters if adapter.format != "assumed"]
    if len(files) < 2:
        return True
    targets = [_targeted_layers(resolve_file(adapter.source)) for adapter in files]
    first = max(range(len(files)), key=lambda i: sum(files[i].layers.values()))
    return all(layers <= targets[first] for layers in targets)


def user_loras(
    profile: ModelProfile, specs: tuple[str, ...] = (), rank: int | None = None, count: int | None = None
) -> tuple[LoraAdapter, ...]:
    """The LoRAs the user named (`specs`), else `count` (default 1) assumed of `rank`; none without either."""
    if specs and (rank is not None or count is not None):
        raise UsageError("--lora-rank/--lora-count: stand in for LoRA files; give them or --lora, not both")
    if count is not None and rank is None:
        raise UsageError("--lora-count: needs --lora-rank N (the rank of the LoRAs it counts)")
    if specs:
        if len(specs) > MAX_COUNT:
            raise UsageError(f"--lora: {len(specs)} given; at most {MAX_COUNT}")
        return tuple(read_lora(spec, profile) for spec in specs)
    if rank is None:
        return ()
    if isinstance(count, bool) or not isinstance(count or 1, int) or not 1 <= (count or 1) <= MAX_COUNT:
        raise UsageError(f"--lora-count: {count!r} must be a whole number from 1 to {MAX_COUNT}")
    return (assumed_lora(rank, profile),) * (count or 1)
