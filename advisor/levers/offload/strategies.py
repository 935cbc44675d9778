"""The offload strategies: their names, which weights they keep where, what they move, and the space's choices.

The cost terms the estimate asks for (device bytes per phase `resident_bytes`, transfer seconds
`streaming_seconds` and `swap_seconds`, their overlap `overlapped`, host RAM and disk
`host_bytes`) and the search space's choices (`whole_choices`, `partial_choices`, partial offload's
fitted counts `partial_offset`). The lever itself is `advisor.levers.offload`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from advisor.config import Offload, OptimizationConfig
from advisor.levers.quantization import left_on_device_by_group_offload, loaded_onto_device, movable_after_loading


# The strategies, as the config spells them (`advisor.config.OffloadStrategy`).
NONE, MODEL, GROUP, SEQUENTIAL = "none", "model", "group", "sequential"
BLOCK_LEVEL, LEAF_LEVEL = "block_level", "leaf_level"
# No offload with the components spread over several GPUs (`advisor.levers.offload.balanced`): the
# device map diffusers takes for it, and the choice's name in the search space.
BALANCED, SPREAD = "balanced", "over-gpus"

# Partial offload (``offload.resident_blocks``): the most resident blocks that the estimate fits to
# the budget (`advisor.plan.estimate.resident_blocks_that_fit`), and a step of a tenth of the blocks
# either side of it, which tune measures too: the estimate's error decides which is truly fastest.
PARTIAL = "partial"
PARTIAL_OFFSETS = {PARTIAL: 0, "partial-fewer": -1, "partial-more": 1}
PARTIAL_STEP = 0.10


# --- which weights go where ----------------------------------------------------------------------


def group_offloaded(config: OptimizationConfig, name: str) -> bool:
    """Whether component `name` is group-offloaded (in whole or in part)."""
    offload = config.offload
    return offload.strategy == GROUP and (offload.components is None or name in offload.components)


def uses_group_offload(config: OptimizationConfig) -> bool:
    return config.offload.strategy == GROUP


def blocks_move_with_module_to(config: OptimizationConfig) -> bool:
    """Whether group offload moves whole blocks with ``Module.to`` (block level without streams;
    streams copy each tensor's data into place instead)."""
    return config.offload.offload_type == BLOCK_LEVEL and not config.offload.use_stream


def block_split(component: Any, config: OptimizationConfig, count: int | None = None) -> tuple[int, list[int]]:
    """(parameters of the blocks that never leave the device, parameters of each block that is
    streamed, largest first) of a group-offloaded `component` (`advisor.probe.models.ComponentProfile`).
    Plain group offload streams every block; partial offload (``offload.resident_blocks``) keeps its
    largest N, as the steps apply it (`count`, when given, instead of the config's). The modules
    outside the block lists are neither: diffusers onloads them as one group of their own whenever
    the component runs."""
    sizes = _block_sizes(tuple((b.total, b.count) for b in top_level_blocks(component)))
    if count is None:
        count = (config.offload.resident_blocks or {}).get(component.name, 0)
    return sum(sizes[:count]), list(sizes[count:])


@lru_cache(maxsize=64)
def _block_sizes(groups: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """Parameters of every block, largest first, from (total, count) per block list. A list whose
    blocks differ (UNets) counts each at the list's mean: their own sizes aren't recorded."""
    return tuple(sorted((total // count for total, count in groups for _ in range(count)), reverse=True))


def top_level_blocks(component: Any) -> list[Any]:
    """The block lists block-level group offloading splits: a module's own children that are
    ModuleLists (``_apply_group_offloading_block_level`` walks ``named_children()``). A transformers
    text encoder's layers sit deeper (T5's ``encoder.block``, CLIP's ``text_model.encoder.layers``),
    so it is onloaded whole: rehearsed, UMT5-XXL's 10.7 GB are all on the card while it encodes."""
    return [b for b in component.blocks if "." not in b.name]


def _partly_resident(component: Any, config: OptimizationConfig) -> bool:
    return config.offload.strategy == GROUP and component.name in (config.offload.resident_blocks or {})


def resident_bytes(
    component: Any,
    weights: int,
    config: OptimizationConfig,
    active: bool,
    count: int | None = None,
    activation: float = 0.0,
    *,
    k: dict[str, Any],
) -> int:
    """Device bytes of a component's `weights` during a phase where it is `active` (or not), whose
    activations peak at `activation` bytes; `count` resident blocks of a partially offloaded
    component instead of the config's. What group offloading can't move (a quantization backend's
    state beside the weights' data) stays on the device in every phase."""
    offload = config.offload
    if offload.strategy == NONE or (offload.strategy == GROUP and not group_offloaded(config, component.name)):
        return weights
    if offload.strategy == GROUP:
        left = left_on_device_by_group_offload(config, component, k)
        moved = _moved_resident_bytes(component, weights, config, active, count, activation)
        return min(weights, moved + left)
    return _moved_resident_bytes(component, weights, config, active, count, activation)


def _moved_resident_bytes(
    component: Any, weights: int, config: OptimizationConfig, active: bool, count: int | None, activation: float
) -> int:
    """`resident_bytes` of what the offloading moves."""
    offload = config.offload
    per_parameter = weights / component.parameters if component.parameters else 0.0
    partial = _partly_resident(component, config)
    kept, streamed = block_split(component, config, count) if partial else (0, [])
    if not active:
        return math.ceil(kept * per_parameter)
    if offload.strategy == MODEL:
        return weights
    in_flight = 2 if offload.use_stream else 1  # the stream prefetches the next group
    if offload.offload_type == LEAF_LEVEL and offload.strategy == GROUP:
        traced = _leaf_layers_in_flight(component, per_parameter, offload.use_stream, activation)
        if traced is not None:
            return traced
    if offload.strategy == SEQUENTIAL or offload.offload_type == LEAF_LEVEL:
        return math.ceil(in_flight * component.largest_layer_parameters * per_parameter)
    # block_level: groups of k blocks, plus the modules outside any top-level block list (embedders,
    # final norms; a transformers text encoder whole), which diffusers onloads as one group of their
    # own; partial offload's kept blocks.
    blocks = top_level_blocks(component)
    if partial:
        largest_block = streamed[0] if streamed else 0
    else:
        largest_block = max((b.parameters_per_block for b in blocks), default=0)
    outside = max(component.parameters - sum(b.total for b in blocks), 0)
    # diffusers: streams move one block at a time
    group = (1 if offload.use_stream else offload.num_blocks_per_group) * largest_block
    return math.ceil((in_flight * group + outside + kept) * per_parameter)


def _leaf_layers_in_flight(component: Any, per_parameter: float, use_stream: bool, activation: float) -> int | None:
    """The weights leaf-level group offloading holds where its sum with the live activations peaks:
    diffusers' leaf-level groups onload each layer before it runs (and, on a stream, the next one
    too) and offload it after. The trace records, over the layers a call runs, the activations live
    while each ran (as a share of the call's peak) beside its weights and beside its own and the
    next one's (`advisor.trace.tracer.layers_in_flight`); at the plan's `activation` peak, the
    largest sum less that peak. Two of the largest layer beside the peak bound it from above (what
    is held without a trace); FLUX.1-dev's transformer holds about one, as the rehearsal with
    diffusers' hooks does. None where the trace has no such record."""
    trace = component.trace if isinstance(component.trace, dict) else {}
    frontier = (trace.get("layers_in_flight") or {}).get("with_next" if use_stream else "layer")
    if not frontier:
        return None
    combined = max(share * activation + params * per_parameter for share, params in frontier)
    return max(math.ceil(combined - activation), 0)


def only_one_denoiser_resident(config: OptimizationConfig) -> bool:
    """Whether denoisers that take turns (Wan2.2's experts) are on the device one at a time."""
    return config.offload.strategy == MODEL


def encoders_resident_at_once(
    config: OptimizationConfig, order: list[str], weights: dict[str, int], passes: int
) -> set[str]:
    """The text encoders on the device together at the heaviest moment of text encoding, calling
    the encoders named in `order` (the pipeline's ``model_cpu_offload_seq`` order, the order its
    ``encode_prompt`` calls them) `passes` times (2 where a negative prompt is encoded too).
    Without model offload every one is resident. Under it, each model's hook offloads the one
    before it in the sequence as it runs (``CpuOffload.pre_forward`` calls
    ``prev_module_hook.offload()``, accelerate/hooks.py), so one encoder runs at a time; the first
    has no predecessor, so a second pass brings it back beside the last (SD3's negative prompt:
    CLIP-L beside T5, then CLIP-G beside T5); nothing is there from loading (`load_device_map`).
    Group offloading onloads a
    transformers encoder as one group when it is called and offloads it when its forward returns
    (the group whose leader is the module itself: ``GroupOffloadingHook.post_forward`` calls
    ``offload_()``, diffusers/hooks/group_offloading.py), so its encoders too run one at a time,
    beside any it leaves resident (rehearsed: SD3.5's T5 alone, 8.95 GB)."""
    if config.offload.strategy == GROUP:
        streamed = [n for n in order if group_offloaded(config, n)]
        kept = {n for n in order if n not in streamed}
        return kept | ({max(streamed, key=lambda n: weights[n])} if streamed else set())
    if config.offload.strategy != MODEL:
        return set(order)
    resident: set[str] = set()
    heaviest: set[str] = set()
    for _ in range(passes):
        for before, name in zip([None, *order], order):
            resident.discard(before)
            resident.add(name)
            if sum(weights[n] for n in resident) > sum(weights[n] for n in heaviest):
                heaviest = set(resident)
    return heaviest


def unused_components_resident(config: OptimizationConfig) -> bool:
    """Whether components that no phase runs stay on the device (only when nothing is offloaded)."""
    return config.offload.strategy == NONE


def empties_cache_between_models(config: OptimizationConfig) -> bool:
    """Whether the caching allocator gives its cache back when the pipeline moves on to the next
    model: accelerate's model-offload hook calls ``clear_device_cache()`` after it offloads the
    previous model (``CpuOffload.pre_forward``, accelerate/hooks.py); group, sequential and partial
    offloading's hooks never call ``empty_cache`` (diffusers/hooks/group_offloading.py)."""
    return config.offload.strategy == MODEL


def load_device_map(config: OptimizationConfig) -> str | None:
    """The ``device_map`` the pipeline loads with, or None.

    ``"cuda"`` where nothing is offloaded (`loads_onto_device`). ``"cpu"`` under model or group
    offload where a quantization backend would otherwise quantize straight onto the GPU: with no map,
    diffusers' and transformers' bitsandbytes quantizers load onto the current CUDA device
    (``update_device_map``), so every such component would sit on the card at once until the
    offload hooks first move them (FLUX.2 [dev] nf4: 31 GB on a 24 GB card). diffusers says so
    beside ``_is_pipeline_device_mapped`` ("users want to pass `device_map="cpu"` ... in limited
    VRAM environments because quantized models often initialize directly on the accelerator"), and
    the FLUX.2 release post's 24 GB recipe loads its 4-bit models with ``device_map="cpu"`` before
    ``enable_model_cpu_offload()`` (https://huggingface.co/blog/flux-2): accelerate's hooks move
    whole modules with ``.to``, which carries bitsandbytes' quantization state along. Group
    offloading's hooks move parameter data only, so a model quantized on the CPU would compute with
    its quantization state left there (rehearsed: ``gemm_4bit mixes cpu and cuda:0``): each such
    model is first moved onto the GPU whole (`moved_whole_before_offloading`). Only where a model's
    ``.to`` carries the scales along (`quantization.movable_after_loading`: 4-bit, not LLM.int8, whose
    int8 data and scales ``.to`` leaves behind); 8-bit models load with no map, onto the GPU (where
    model and group offloading can't move them off: `bitsandbytes-8bit-stays-on-the-card`). bitsandbytes then quantizes on the CPU
    (``Params4bit.to("cpu")``): a slower load (about 10 s per GB of bf16 weights on 2 cores), the
    same weights."""
    if config.offload.device_map:
        return config.offload.device_map
    if loads_onto_device(config):
        return config.device
    if config.offload.strategy == MODEL and config.device == "cuda" and movable_after_loading(config):
        return "cpu"
    if moved_whole_before_offloading(config):
        return "cpu"
    return None


def moved_whole_before_offloading(config: OptimizationConfig) -> set[str]:
    """The group-offloaded components a quantization backend would quantize straight onto the GPU.

    They load onto the host (`load_device_map`), and each moves onto the GPU whole right before its
    group offloading is applied: ``.to`` carries bitsandbytes' quantization state with the weights
    (``Params4bit.to`` moves its ``quant_state`` in place; bitsandbytes/nn/modules.py), and the
    offloading, on a stream (the only way bitsandbytes models are group-offloaded:
    `bitsandbytes-group-offload-needs-leaf-streams`), then moves only the weights' data back to the
    host, leaving the scales on the card, as where the model had loaded onto it (rehearsed,
    tests/test_rehearse.py). One such model is whole on the card at a time, not all of them at once,
    as loading them there with no map would leave them (FLUX.2 [dev] nf4: 31 GB). Not when
    offloading to disk, the way for a host short of RAM: loading onto the host would stage every
    converted weight there, so those load onto the GPU with no map."""
    if config.offload.strategy != GROUP or config.device != "cuda" or config.offload.offload_to_disk_path:
        return set()
    return {name for name in movable_after_loading(config) if group_offloaded(config, name)}


def on_device_after_loading(config: OptimizationConfig, components: list[str]) -> set[str]:
    """Of `components`, those on the GPU once the pipeline has loaded (`load_device_map`): all of
    them with ``"cuda"``; with no map, those a quantization backend puts there; none with ``"cpu"``."""
    device_map = load_device_map(config)
    if device_map is None:
        return loaded_onto_device(config) & set(components)
    return set(components) if device_map in ("cuda", BALANCED) else set()


def loads_onto_device(config: OptimizationConfig) -> bool:
    """Whether the pipeline loads straight onto the GPU (``from_pretrained(..., device_map="cuda")``):
    where nothing is offloaded, nothing needs to be staged in host RAM. diffusers reads each shard
    memory-mapped and moves it tensor by tensor to the map's device (``_load_shard_file`` ->
    ``load_model_dict_into_meta`` in ``diffusers/models/model_loading_utils.py``), passing the map on
    to transformers' text encoders; a device-type map (``"cuda"``) still allows ``pipe.to`` and the
    offload calls (``_is_pipeline_device_mapped`` in ``pipeline_utils.py``). Only ``"cuda"`` itself:
    diffusers accepts ``"balanced"``, ``get_device()`` and ``"cpu"`` (``SUPPORTED_DEVICE_MAP``), not
    ``"cuda:1"``. Not with offloading (it would put on the card what it keeps off), nor with layerwise
    casting, which casts a loaded model: on the card, its weights would first be there at the compute
    dtype (on the host they are cast before they move)."""
    return config.offload.strategy == NONE and config.device == "cuda" and config.layerwise_casting is None


def host_bytes(
    components: list[Any], config: OptimizationConfig, weights: dict[str, int], k: dict[str, Any]
) -> tuple[int, int]:
    """(weight bytes kept in host RAM, bytes spilled to disk) on a GPU machine once loaded: every
    component's under model and sequential offload, the offloaded part of each group-offloaded one
    (a pinned copy besides with streams), none without offloading."""
    offload = config.offload
    if offload.strategy in (MODEL, SEQUENTIAL):
        return sum(weights.values()), 0
    if offload.strategy != GROUP:
        return 0, 0
    offloaded = sum(  # partial offload keeps some of it on the device, not in RAM
        weights[c.name] - resident_bytes(c, weights[c.name], config, active=False, k=k)
        for c in components
        if group_offloaded(config, c.name)
    )
    if offload.offload_to_disk_path:
        return 0, offloaded
    if offload.use_stream and not offload.low_cpu_mem_usage:
        return int(offloaded * k["pinned_copy_factor"]), 0
    return offloaded, 0


# --- transfers -----------------------------------------------------------------------------------


def streaming_seconds(
    component: Any, config: OptimizationConfig, weight: int, calls: int, h2d_bytes_per_s: float, k: dict[str, Any]
) -> float:
    """Seconds `calls` runs of a group- or sequentially-offloaded `component` spend moving its weights
    in (and in the hooks that move them); 0 where it stays put."""
    offload = config.offload
    if not (offload.strategy == SEQUENTIAL or group_offloaded(config, component.name)):
        return 0.0
    bandwidth = h2d_bytes_per_s * k["group_offload_bandwidth_factor"]
    if offload.strategy == SEQUENTIAL:
        bandwidth = h2d_bytes_per_s * k["unpinned_bandwidth_factor"]
    if offload.low_cpu_mem_usage:
        bandwidth *= k["low_cpu_mem_usage_bandwidth_factor"][offload.offload_type]
    moved = weight * calls
    layers = sum(b.count for b in component.blocks) or 1
    if _partly_resident(component, config):  # partial offload: the kept blocks stay
        kept, streamed = block_split(component, config)
        per_parameter = weight / component.parameters if component.parameters else 0.0
        moved = (component.parameters - kept) * per_parameter * calls
        layers = len(streamed)
    seconds = moved / bandwidth + (moved / k["disk_bytes_per_s"] if offload.offload_to_disk_path else 0.0)
    if offload.strategy == SEQUENTIAL:
        # accelerate's hooks move each weight tensor in (`set_module_tensor_to_device`, a new
        # Parameter each time) and out to meta on every call (`sequential_offload_host_s_per_tensor`)
        tensors = component.parameter_tensors or layers * 8
        return seconds + tensors * calls * k["sequential_offload_host_s_per_tensor"]
    units = layers * 8 if offload.offload_type == LEAF_LEVEL else layers / offload.num_blocks_per_group
    return seconds + units * calls * k["offload_hook_overhead_s"][offload.offload_type]


def overlapped(compute: float, transfer: float, config: OptimizationConfig, k: dict[str, Any]) -> float:
    """Compute and transfers together: group offload's stream hides most, not all, of the shorter one."""
    if config.offload.strategy == GROUP and config.offload.use_stream:
        return max(compute, transfer) + (1 - k["stream_overlap"]) * min(compute, transfer)
    return compute + transfer


def swap_seconds(config: OptimizationConfig, weights: list[int], h2d_bytes_per_s: float) -> float:
    """Model offload's moves: each component's weights come in once per generation."""
    return sum(weights) / h2d_bytes_per_s if config.offload.strategy == MODEL else 0.0


# --- the search space ----------------------------------------------------------------------------


def choice_name(offload: Offload) -> str:
    if offload.device_map:
        return SPREAD
    if offload.strategy != GROUP:
        return offload.strategy
    parts = [GROUP, "leaf" if offload.offload_type == LEAF_LEVEL else f"block{offload.num_blocks_per_group}"]
    flags = (
        ("stream", offload.use_stream),
        ("lowram", offload.low_cpu_mem_usage),
        ("disk", bool(offload.offload_to_disk_path)),
    )
    return "-".join(parts + [name for name, on in flags if on])


def whole_choices(device: str, gpus: int = 1) -> list[Offload]:
    if device != "cuda":
        return [Offload()]
    return [
        Offload(),
        *([Offload(device_map=BALANCED)] if gpus > 1 else []),
        Offload(strategy=MODEL),
        Offload(strategy=GROUP, use_stream=True, record_stream=True),
        Offload(strategy=GROUP, offload_type=LEAF_LEVEL, use_stream=True, record_stream=True),
        Offload(strategy=GROUP, num_blocks_per_group=2),
        Offload(strategy=GROUP, use_stream=True, low_cpu_mem_usage=True),
        Offload(strategy=GROUP, offload_to_disk_path="advisor-offload"),
        Offload(strategy=SEQUENTIAL),
    ]


# Block-level group offloading hooks a module's forward (and its top-level block lists); a VAE's
# ``decode`` is not its forward, so the VAE's other modules are onloaded only where its class names
# them in ``_group_offload_block_modules`` (diffusers/hooks/group_offloading.py). In diffusers
# 0.42.1 these VAE classes do (diffusers/models/autoencoders/); rehearsing the others
# (AutoencoderKLLTXVideo, AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo, AutoencoderKLQwenImage)
# fails at the first decode convolution with its weight on the CPU, the class of diffusers #11086
# (fixed for Wan's VAE by that attribute). Leaf-level offloading hooks every layer and is unaffected.
DECODE_ONLOADING_VAES = frozenset(
    {"AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLQwenImage21", "AutoencoderRFD4Proteina"}
)


def without_stranded_vaes(offload: Offload, profile: Any) -> Offload:
    """`offload` with block-level group offloading kept off the VAEs whose decode it would strand on
    the CPU (`DECODE_ONLOADING_VAES`): they stay on the device, a few hundred MB at most."""
    if offload.strategy != GROUP or offload.offload_type != BLOCK_LEVEL:
        return offload
    stranded = {c.name for c in profile.by_role("vae") if c.class_name not in DECODE_ONLOADING_VAES}
    named = offload.components or [c.name for c in profile.components]
    if not stranded & set(named):
        return offload
    return offload.replace(components=[name for name in named if name not in stranded])


def partial_choices(profile: Any) -> dict[str, Offload]:
    """Partial offload of the denoiser, where there is one denoiser with repeated blocks of one size
    per list, as transformers have (Wan2.2's two experts would each keep their blocks resident, and
    the sizes of a UNet's down and up blocks aren't recorded: neither is offered). The count 1
    stands in until `partial_offset` has the space fit it to the scenario."""
    denoisers = profile.by_role("denoiser")
    if (
        len(denoisers) != 1
        or sum(b.count for b in denoisers[0].blocks) < 2
        or not all(b.uniform for b in denoisers[0].blocks)
    ):
        return {}
    partial = Offload(strategy=GROUP, use_stream=True, record_stream=True, resident_blocks={denoisers[0].name: 1})
    return dict.fromkeys(PARTIAL_OFFSETS, partial)


def partial_offset(choice: str) -> int | None:
    """For a partial-offload choice, how many steps of `PARTIAL_STEP` from the count that fits it keeps;
    None for the others."""
    return PARTIAL_OFFSETS.get(choice)


def fitted_choice(config: OptimizationConfig) -> str | None:
    """The choice a config with fitted resident blocks comes from (partial offload's own count), or None."""
    return PARTIAL if config.offload.resident_blocks else None
