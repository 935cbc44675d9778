"""The LoRA lever: the user's LoRAs loaded, and run fused, unfused or hotswappable (config section ``lora``).

A LoRA is the user's, not the planner's: its files come with the workload (`advisor.probe.lora`
reads their headers), and the adjust rule below records them in every candidate and decides how
they run, from diffusers' LoRA guide and what the installed diffusers and peft do (read in their
code, each combination run here on a tiny pipeline, ``tests/test_lora.py``):

- **fused** (``fuse_lora``, then ``unload_lora_weights``, which keeps the fused weights and drops
  the adapters, ``diffusers/loaders/lora_base.py``): no cost per step, no adapter bytes; only for a
  fixed set of LoRAs, and only into weights stored at the compute dtype (`QuantBackend.lora_problem`:
  fusing into quantized weights rounds the LoRA's change to their grid or fails; into fp8 storage
  it fails: "Promotion for Float8 Types is not supported").
- **unfused**: each targeted Linear runs its two low-rank matmuls beside the weight's and adds the
  result: the adapters' bytes sit with their component (an offloaded block carries its LoRA), and
  each call reads and writes the layer's output again (`call_work`).
- **hotswappable** (``enable_lora_hotswap(target_rank=R)`` before the first load): every adapter is
  padded to rank R (the zeros are computed too) and its scale becomes a tensor, so that a compiled
  model takes another LoRA of rank <= R in place without recompiling (``peft/utils/hotswap.py``);
  without it, each LoRA loaded into a compiled model recompiles it (dynamo's guards see new
  modules). It is also what lets a LoRA be swapped after layerwise casting: a LoRA loaded after
  ``enable_layerwise_casting`` gets fp8 adapters and fails (peft gives new adapters the base
  layer's dtype; run here), while a hotswap writes into the adapters loaded before the casting,
  which diffusers' casting skips (``diffusers/models/modeling_utils.py``). diffusers refuses to
  hotswap text-encoder LoRAs (``diffusers/loaders/lora_base.py``: "hotswapping is not supported for
  text encoders").

The LoRAs load before every other post-load step: before layerwise casting (see above), before
offloading (a LoRA loaded into a group-offloaded component removes and re-applies group offloading
on the whole component, ``diffusers/hooks/group_offloading.py``) and before compiling.

Pure Python at import: torch and diffusers only inside a step's ``run``.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any, Callable

from advisor.config import Lora, LoraAdapter, OptimizationConfig
from advisor.errors import ConfigError
from advisor.levers.base import ActivationShape, Adjust, Filter, Lever, Pick
from advisor.levers.code import Step, call_source, method_step
from advisor.levers.layerwise_casting import casts
from advisor.levers.quantization import PEFT_QUANTIZED_LORA, backend_of, quantized
from advisor.platform import Constraint, Platform, constraint


GUIDE = "https://huggingface.co/docs/diffusers/main/en/tutorials/using_peft_for_inference"
HOTSWAP = "https://huggingface.co/docs/diffusers/main/en/tutorials/using_peft_for_inference#hotswapping"
LORA_BASE = "https://github.com/huggingface/diffusers/blob/main/src/diffusers/loaders/lora_base.py"
PEFT_TUNERS = "https://github.com/huggingface/peft/blob/main/src/peft/tuners/tuners_utils.py"
GROUP_REAPPLY = "https://github.com/huggingface/diffusers/blob/main/src/diffusers/hooks/group_offloading.py"
FP8_MERGE = "https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/layer.py"


# --- the file the plan was made for ---------------------------------------------------------------


def header_digest(path: str | Path) -> str:
    """sha256 of a safetensors file's header, its first 64 KiB of tensor data and its size: what
    tells two LoRA files apart without reading all of them (two LoRAs of one layout share a header)."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        prefix = handle.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        digest.update(prefix + handle.read(length))
        digest.update(handle.read(1 << 16))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def adapter_name(index: int) -> str:
    return f"lora_{index}"


def load_order(lora: Lora) -> list[tuple[int, LoraAdapter]]:
    """The adapters in the order they load: with hotswapping, the one targeting the most layers first
    (a hotswap takes the first LoRA's layers or fewer: peft refuses new ones, "unexpected keys")."""
    indexed = list(enumerate(lora.adapters))
    if lora.hotswap_rank:
        indexed.sort(key=lambda item: -sum(item[1].layers.values()))
    return indexed


# --- what the LoRAs cost --------------------------------------------------------------------------


def _active(lora: Lora) -> tuple[LoraAdapter, ...]:
    """The adapters loaded at once: all of them; where they are swapped one at a time, the one loaded
    first with hotswapping (the others are written into its padded layers), else the largest."""
    if lora.hotswap_rank:
        return (load_order(lora)[0][1],)
    if lora.swap:
        return (max(lora.adapters, key=lambda a: sum(a.parameters.values())),)
    return tuple(lora.adapters)


def _padded(adapter: LoraAdapter, lora: Lora) -> float:
    """How much larger hotswapping's padding makes `adapter` (its layers padded to the target rank)."""
    return lora.hotswap_rank / adapter.rank if lora.hotswap_rank else 1.0


def adapter_parameters(lora: Lora, component: str) -> float:
    return sum(a.parameters.get(component, 0) * _padded(a, lora) for a in _active(lora))


# --- the rules ------------------------------------------------------------------------------------


def _targets(config: OptimizationConfig) -> set[str]:
    return {name for adapter in config.lora.adapters for name in adapter.layers} if config.lora else set()


def _stored_plain(config: OptimizationConfig, name: str) -> bool:
    """Whether component `name`'s weights are stored at the compute dtype (neither quantized nor cast)."""
    return quantized(config, name) is None and not casts(config, name)


def as_planned(
    config: OptimizationConfig, scenario: Any, predict: Callable[[OptimizationConfig], Any]
) -> OptimizationConfig:
    """The workload's LoRAs, fused where they stay fixed and every weight they target is stored at the
    compute dtype; hotswappable where they are swapped into a compiled or fp8-stored denoiser."""
    adapters = scenario.workload.loras
    if not adapters:
        return config
    swap = scenario.workload.lora_swap
    targets = {name for adapter in adapters for name in adapter.layers}
    fuse = not swap and all(_stored_plain(config, name) for name in targets)
    compiled = config.compile is not None and bool(targets & set(config.compile.components))
    cast = any(casts(config, name) for name in targets)
    # A hotswap sets each layer's scale from the new file (peft/utils/hotswap.py): only unscaled LoRAs
    # take it; scaled ones swap unhotswapped, into a denoiser neither compiled nor fp8-stored (the
    # filter and the constraint below).
    unscaled = all(adapter.scale == 1 for adapter in adapters)
    can = unscaled and scenario.workload.lora_hotswappable  # nested targets (`advisor.probe.lora.hotswappable`)
    hotswap = max(adapter.rank for adapter in adapters) if swap and (compiled or cast) and can else None
    return config.replace(lora=Lora(adapters=list(adapters), swap=swap, fuse=fuse, hotswap_rank=hotswap))


CONSTRAINTS: list[Constraint] = []


@constraint(
    "lora-on-quantized-weights",
    "lora",
    "a LoRA runs unfused on weights bitsandbytes, torchao (int8, fp8) or GGUF store; some backends take none, and "
    "fusing into quantized weights rounds or fails",
    PEFT_QUANTIZED_LORA,
    into=CONSTRAINTS,
)
def lora_on_quantized_weights(config: OptimizationConfig, platform: Platform) -> str | None:
    for name in sorted(_targets(config)):
        q = quantized(config, name)
        problem = q and backend_of(q).lora_problem(q, config.lora.fuse)
        if problem:
            why, source = problem
            return f"`lora` on {name}, stored as {q.kind}: {why} ({source})"
    return None


@constraint(
    "lora-fuse-into-fp8-storage",
    "lora.fuse",
    "fusing a LoRA into weights layerwise casting stores in fp8 fails (torch cannot promote float8 with bfloat16)",
    FP8_MERGE,
    into=CONSTRAINTS,
)
def lora_fuse_into_fp8_storage(config: OptimizationConfig, platform: Platform) -> str | None:
    if config.lora and config.lora.fuse:
        for name in sorted(_targets(config)):
            if casts(config, name):
                return (
                    f'`lora.fuse` into {name}, stored in fp8 (layerwise casting): fusing fails ("Promotion for Float8 '
                    'Types is not supported"); run the LoRA unfused, or store it at the compute dtype'
                )
    return None


@constraint(
    "lora-swap-after-fp8-storage-needs-hotswap",
    "lora.hotswap_rank",
    "a LoRA loaded after layerwise casting gets fp8 adapters (peft gives them the base layer's dtype) and fails; "
    "a hotswap writes into the adapters loaded before the casting",
    PEFT_TUNERS,
    into=CONSTRAINTS,
)
def lora_swap_after_casting(config: OptimizationConfig, platform: Platform) -> str | None:
    lora = config.lora
    if lora and lora.swap and not lora.hotswap_rank:
        for name in sorted(_targets(config)):
            if casts(config, name):
                return (
                    f"`lora.swap` into {name}, stored in fp8 (layerwise casting): a LoRA loaded after the casting gets fp8 "
                    "adapters and fails; set `lora.hotswap_rank` (the swaps then write into the first LoRA's adapters)"
                )
    return None


@constraint(
    "lora-hotswap-not-for-text-encoders",
    "lora.hotswap_rank",
    "diffusers refuses to hotswap a LoRA with text-encoder layers",
    LORA_BASE,
    into=CONSTRAINTS,
)
def lora_hotswap_not_for_text_encoders(config: OptimizationConfig, platform: Platform) -> str | None:
    lora = config.lora
    if lora and lora.hotswap_rank:
        # diffusers' own test: any key naming a text encoder (`text_encoder_name in key`)
        encoders = sorted(name for name in _targets(config) if "text_encoder" in name)
        if encoders:
            return (
                f"`lora.hotswap_rank`: the LoRAs have layers in {', '.join(encoders)}, and diffusers refuses to hotswap "
                "text-encoder LoRAs ('hotswapping is not supported for text encoders'); swap them unhotswapped, with "
                "the denoiser neither compiled nor stored in fp8"
            )
    return None


def recompiles_at_every_swap(config: OptimizationConfig, scenario: Any) -> str | None:
    lora = config.lora
    if lora and lora.swap and not lora.hotswap_rank and config.compile is not None:
        if _targets(config) & set(config.compile.components):
            return "each LoRA loaded into a compiled model recompiles it (new modules for dynamo's guards)"
    return None


def swap_undoes_partial_offload(config: OptimizationConfig, scenario: Any) -> str | None:
    lora = config.lora
    if (
        lora
        and lora.swap
        and config.offload.resident_blocks
        and _targets(config) & set(config.offload.resident_blocks)
    ):
        return (
            "loading a LoRA re-applies group offloading to the whole component, so a swap offloads its resident blocks"
        )
    return None


class LoraLever(Lever):
    """The user's LoRAs (config section ``lora``)."""

    name = key = "lora"
    order = 5  # after loading and compile's flags; before layerwise casting (10), offloading (30) and compiling
    searched = False  # the user's; the adjust rule records them and decides how they run
    constraints = tuple(CONSTRAINTS)
    adjusts = (
        Adjust(
            "lora-as-planned",
            "the user's LoRAs: fused where they stay fixed and their weights are stored at the compute dtype (no cost "
            "per step), else unfused; hotswappable where they are swapped into a compiled or fp8-stored denoiser",
            GUIDE,
            as_planned,
        ),
    )
    filters = (
        Filter(
            "lora-swap-without-hotswap-recompiles",
            "swapping LoRAs in a compiled model without hotswapping recompiles it at every swap",
            HOTSWAP,
            recompiles_at_every_swap,
        ),
        Filter(
            "lora-swap-undoes-partial-offload",
            "loading (or swapping) a LoRA into a group-offloaded component removes its hooks and re-applies the first "
            "one's group offloading to the whole component: the blocks a partial offload keeps resident are offloaded "
            "from the first swap on (run here)",
            GROUP_REAPPLY,
            swap_undoes_partial_offload,
        ),
    )

    def work_key(self, config: OptimizationConfig) -> Any:
        lora = config.lora
        if lora is None or lora.fuse:
            return None
        return (
            lora.swap,
            lora.hotswap_rank,
            tuple((a.rank, tuple(sorted(a.parameters.items()))) for a in lora.adapters),
        )

    def adapter_bytes(self, config: OptimizationConfig, component: Any, compute_bytes: int) -> float:
        """The adapters unfused in `component`, at the compute dtype (peft gives a new adapter its base
        layer's float dtype: ``peft/tuners/tuners_utils.py``; run here, bf16 and fp16 pipelines), or
        as the backend storing the component says (`QuantBackend.lora_adapter_bytes`); nothing once
        fused (``unload_lora_weights`` drops them)."""
        lora = config.lora
        if lora is None or lora.fuse:
            return 0.0
        q = quantized(config, component.name)
        per_parameter = backend_of(q).lora_adapter_bytes(q, compute_bytes) if q else compute_bytes
        return adapter_parameters(lora, component.name) * per_parameter

    def call_work(self, config: OptimizationConfig, component: Any, shape: ActivationShape) -> tuple[float, float]:
        """(matmul FLOPs, bytes written) unfused adapters add to one call of `component`: per targeted
        layer, x @ A (tokens x rank) and that @ B (tokens x out), scaled and added to the layer's
        output (peft's ``Linear.forward``: ``result + lora_B(lora_A(x)) * scaling``), on the tokens a
        Linear layer sees weighted by its weights (`ActivationShape.linear_tokens`: a UNet's widest
        layers run at its lowest resolutions), as if the LoRA targeted layers in proportion to them."""
        lora = config.lora
        if lora is None or lora.fuse:
            return 0.0, 0.0
        flops = written = 0.0
        for adapter in _active(lora):
            padded = _padded(adapter, lora)
            flops += 2 * adapter.parameters.get(component.name, 0) * padded
            rank_width = adapter.layers.get(component.name, 0) * adapter.rank * padded
            written += rank_width + 3 * adapter.outputs.get(component.name, 0)
        tokens = shape.batch * (shape.linear_tokens or shape.tokens)
        return flops * tokens, written * tokens * shape.dtype_bytes

    def warmup_note(self, config: OptimizationConfig) -> str | None:
        """A swap into a compiled model without hotswapping recompiles it: the compile warm-up again at
        every swap, which the one-off warm-up leaves out (the planner never proposes it)."""
        if recompiles_at_every_swap(config, None):
            return (
                "lora.swap without lora.hotswap_rank in a compiled model: each swap recompiles it, the warm-up again"
            )
        return None

    def reason(self, pick: Pick) -> str | None:
        lora = pick.config.lora
        if lora is None:
            return None
        count = len(lora.adapters)
        what = f"{count} LoRA{'s' * (count > 1)} (rank {lora.rank})"
        if lora.fuse:
            them = "them" if count > 1 else "it"
            return f"{what}: fused into the weights once loaded, so no cost per step; to change or swap {them}, reload"
        why = []
        if lora.swap:
            why.append("LoRAs are swapped between calls")
            if not lora.hotswap_rank and any(adapter.scale != 1 for adapter in lora.adapters):
                why.append(
                    "a scale other than 1 does not survive a hotswap (peft sets each layer's scale from the new file), "
                    "so the denoiser is neither compiled nor stored in fp8"
                )
            if not lora.hotswap_rank and not pick.scenario.workload.lora_hotswappable:
                why.append(
                    "they target different layers, and a hotswap takes the first LoRA's layers or fewer, so the "
                    "denoiser is neither compiled nor stored in fp8"
                )
        stored = sorted(name for name in _targets(pick.config) if not _stored_plain(pick.config, name))
        if stored:
            why.append(f"{', '.join(stored)} {'is' if len(stored) == 1 else 'are'} not stored at the compute dtype")
        fused = pick.predict(pick.config.replace(lora=lora.replace(swap=False, fuse=True, hotswap_rank=None)))
        cost = pick.latency_s - fused.latency_s
        line = f"{what}: unfused ({'; '.join(why)}): +{cost:.1f} s per generation against fused"
        if lora.hotswap_rank:
            line += (
                f"; hotswap enabled before the first load, so a LoRA of rank <= {lora.hotswap_rank} targeting the same "
                "layers swaps in without recompiling (load it with hotswap=True and the same adapter name; keep its "
                "scale: a new scale recompiles)"
            )
        return line

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        lora = config.lora
        if lora is None:
            return []
        steps = []
        if lora.hotswap_rank:
            steps.append(
                _pipe_step(
                    f"prepare hotswapping to rank {lora.hotswap_rank} (before the first LoRA loads and before compiling)",
                    "enable_lora_hotswap",
                    {"target_rank": lora.hotswap_rank},
                )
            )
        names, scales = [], []
        for index, adapter in load_order(lora):
            names.append(adapter_name(index))
            scales.append(adapter.scale)
            steps.append(_load_step(adapter, adapter_name(index)))
            if lora.swap:
                break  # one at a time: the others are swapped in by the caller
        if len(names) > 1 or any(scale != 1 for scale in scales):  # never with a hotswap (the config refuses it)
            steps.append(
                _pipe_step(
                    f"weigh the LoRAs {', '.join(f'{s:g}' for s in scales)}",
                    "set_adapters",
                    {"adapter_names": names, "adapter_weights": scales},
                )
            )
        if lora.fuse:
            # every component they hold layers in: Flux's and Wan's fuse_lora fuse the transformer alone by
            # default, and the unload after it would drop a text encoder's adapters unfused
            targets = sorted({name for adapter in lora.adapters for name in adapter.layers})
            steps.append(
                _pipe_step(
                    "fuse the LoRAs into the weights", "fuse_lora", {"components": targets, "adapter_names": names}
                )
            )
            steps.append(
                _pipe_step("drop the fused LoRAs' adapters (the fused weights stay)", "unload_lora_weights", {})
            )
        return steps


def _pipe_step(description: str, method: str, kwargs: dict[str, Any]) -> Step:
    return method_step("lora", description, None, method, (), kwargs)


def _load_step(adapter: LoraAdapter, name: str) -> Step:
    """``pipe.load_lora_weights(folder_or_repo, weight_name=file, adapter_name=...)``, after checking
    that the file is the one the plan was made for (its header's digest). A local file is recorded by
    its absolute path; any other source is a Hub file, ``repo/name/file.safetensors``
    (`advisor.probe.lora.resolve_file`)."""
    if adapter.format == "assumed":
        return Step(
            "lora",
            f"load your LoRA ({adapter.source})",
            f'pipe.load_lora_weights("path/to/your_lora.safetensors", adapter_name="{name}")  # planned for: {adapter.source}',
            _assumed(adapter),
            stand_in=_stand_in(adapter, name),
        )
    path = Path(adapter.source)
    local = path.is_absolute()  # a local file is recorded by its absolute path; a Hub file as repo/name/file
    if local:
        where, file = str(path.parent), path.name
    else:
        parts = adapter.source.split("/")
        where, file = "/".join(parts[:2]), "/".join(parts[2:])
    kwargs = {"weight_name": file, "adapter_name": name}

    def run(pipe: Any) -> None:
        if local and not path.is_file():
            raise ConfigError(f"`lora.adapters`: {adapter.source} is not a file here; the plan was made for it")
        found = path if local else _hub_file(where, file, adapter.source)
        if adapter.digest and header_digest(found) != adapter.digest:
            raise ConfigError(
                f"`lora.adapters`: {adapter.source} differs from the file the plan was made for (its header's digest); "
                "plan again with it (advisor recommend --lora ...)"
            )
        pipe.load_lora_weights(where, **kwargs)

    return Step("lora", f"load the LoRA {file} as {name}", call_source("pipe.load_lora_weights", [where], kwargs), run)


def _hub_file(repo: str, file: str, source: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, file))
    except Exception as exc:  # not cached offline, no such repo or file
        raise ConfigError(
            f"`lora.adapters`: {source} is neither a local file nor a Hub file it can fetch ({exc})"
        ) from None


def _stand_in(adapter: LoraAdapter, name: str) -> Callable[[Any], None]:
    """A LoRA of the assumed rank on every Linear layer of the component it names, of zeros: the
    shapes the plan assumed, loaded as a file's would be."""

    def run(pipe: Any) -> None:
        import torch

        state = {}
        for component in adapter.layers:
            model = getattr(pipe, component)
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            for module_name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear):
                    key = f"{component}.{module_name}"
                    state[f"{key}.lora_A.weight"] = torch.zeros(adapter.rank, module.in_features, dtype=dtype)
                    state[f"{key}.lora_B.weight"] = torch.zeros(module.out_features, adapter.rank, dtype=dtype)
        pipe.load_lora_weights(state, adapter_name=name)

    return run


def _assumed(adapter: LoraAdapter) -> Callable[[Any], None]:
    def run(pipe: Any) -> None:
        raise ConfigError(
            f"`lora.adapters`: the plan assumed a LoRA ({adapter.source}) and names no file; plan with the file "
            "(advisor recommend --lora FILE) to load it"
        )

    return run


LORA = LoraLever()
