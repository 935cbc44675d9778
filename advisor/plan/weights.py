"""Weight bytes of a component as the config stores it, and how many of them are on the device.

Exact from the profile (parameter counts per layer type) and the config's storage format: the
dtype, load-time quantization, layerwise casting, the modules kept in fp32; then what the offload
strategy leaves resident (whole, streamed in groups, or a partial offload's resident blocks).
"""

from __future__ import annotations

import math
from functools import lru_cache

from advisor.config import OptimizationConfig
from advisor.plan.compute import constants, largest_layer_parameters
from advisor.probe.models import ComponentProfile
from advisor.probe.safetensors_header import dtype_size


def _kept_in_fp32(component: ComponentProfile, config: OptimizationConfig) -> int:
    """Parameters loaded as float32 despite a half-precision dtype (`_keep_in_fp32_modules`).

    diffusers applies the list for float16 and bfloat16; transformers 5 only for float16.
    """
    if config.dtype == "float32" or (component.library != "diffusers" and config.dtype != "float16"):
        return 0
    return component.keep_in_fp32_parameters


def weight_bytes(component: ComponentProfile, config: OptimizationConfig) -> int:
    """Bytes of a component's weights once loaded with `config` (quantized, cast or plain)."""
    k = constants()
    compute = dtype_size(config.dtype)
    upcast = _kept_in_fp32(component, config) * (4 - compute)
    quantization = config.quantization
    if quantization and component.name in quantization.components:
        per_row = 0
        linear, rows = component.linear_parameters, component.linear_rows
        if quantization.backend == "torchao":  # torchao also converts a transformers model's fp32 modules
            linear += component.fp32_linear_parameters
            rows += component.fp32_linear_rows
        if quantization.backend == "bitsandbytes_4bit":
            per_weight = k[
                "bnb_4bit_double_quant_bytes_per_weight" if quantization.double_quant else "bnb_4bit_bytes_per_weight"
            ]
        elif quantization.backend == "bitsandbytes_8bit":
            per_weight, per_row = k["bnb_8bit_bytes_per_weight"], k["bnb_8bit_bytes_per_row"]
        else:
            per_weight = k["torchao_bytes_per_weight"][quantization.kind]
            per_row = k["torchao_bytes_per_row"][quantization.kind]
        rest = component.parameters - linear
        return math.ceil(linear * per_weight + rows * per_row + rest * compute + upcast)
    casting = config.layerwise_casting
    if casting and component.name in casting.components:
        cast = component.parameters - component.casting_skipped_parameters
        return math.ceil(
            cast * k["fp8_storage_bytes_per_weight"] + component.casting_skipped_parameters * compute + upcast
        )
    return component.parameters * compute + upcast


def bytes_per_parameter(component: ComponentProfile, weights: int) -> float:
    return weights / component.parameters if component.parameters else 0.0


def bnb_quantized(config: OptimizationConfig) -> set[str]:
    quantization = config.quantization
    return set(quantization.components) if quantization and quantization.backend.startswith("bitsandbytes") else set()


def group_offloaded(component: ComponentProfile, config: OptimizationConfig) -> bool:
    offload = config.offload
    return offload.strategy == "group" and (offload.components is None or component.name in offload.components)


def block_split(
    component: ComponentProfile, config: OptimizationConfig, count: int | None = None
) -> tuple[int, list[int]]:
    """(parameters of the blocks that never leave the device, parameters of each block that is
    streamed, largest first) of a group-offloaded component. Plain group offload streams every
    block; partial offload (``offload.resident_blocks``) keeps its largest N, as `advisor.run.steps`
    applies it (`count`, when given, instead of the config's). The modules outside the block lists
    are neither: diffusers onloads them as one group of their own whenever the component runs."""
    sizes = _block_sizes(tuple((b.total, b.count) for b in component.blocks))
    if count is None:
        count = (config.offload.resident_blocks or {}).get(component.name, 0)
    return sum(sizes[:count]), list(sizes[count:])


@lru_cache(maxsize=64)
def _block_sizes(groups: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """Parameters of every block, largest first, from (total, count) per block list. A list whose
    blocks differ (UNets) counts each at the list's mean: their own sizes aren't recorded."""
    return tuple(sorted((total // count for total, count in groups for _ in range(count)), reverse=True))


def resident_bytes(
    component: ComponentProfile, weights: int, config: OptimizationConfig, active: bool, count: int | None = None
) -> int:
    """Device bytes of a component's weights during a phase where it is `active` (or not); `count`
    resident blocks of a partially offloaded component instead of the config's."""
    offload = config.offload
    if offload.strategy == "none" or (offload.strategy == "group" and not group_offloaded(component, config)):
        return weights
    per_param = bytes_per_parameter(component, weights)
    partial = offload.strategy == "group" and component.name in (offload.resident_blocks or {})
    kept, streamed = block_split(component, config, count) if partial else (0, [])
    if not active:
        return math.ceil(kept * per_param)
    if offload.strategy == "model":
        return weights
    in_flight = 2 if offload.use_stream else 1  # the stream prefetches the next group
    if offload.strategy == "sequential" or offload.offload_type == "leaf_level":
        return math.ceil(in_flight * largest_layer_parameters(component) * per_param)
    # block_level: groups of k blocks, plus the modules outside any block list (embedders,
    # final norms), which diffusers onloads as one group of their own; partial offload's kept blocks.
    if partial:
        largest_block = streamed[0] if streamed else 0
    else:
        largest_block = max((b.parameters_per_block for b in component.blocks), default=component.parameters)
    outside = max(component.parameters - component.block_parameters, 0)
    group = (
        1 if offload.use_stream else offload.num_blocks_per_group
    ) * largest_block  # diffusers: streams move one block at a time
    return math.ceil((in_flight * group + outside + kept) * per_param)
