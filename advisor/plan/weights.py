"""Weight bytes of a component as the config stores it.

Exact from the profile (parameter counts per layer type) and the config's storage format: the
dtype, the modules kept in fp32, and the lever that stores the component (load-time quantization,
layerwise casting: `Lever.stored_bytes`), with what a lever adds beside them (a LoRA's adapters:
`Lever.adapter_bytes`). How many of them are on
the device in each phase is the offload lever's (`advisor.levers.offload.resident_bytes`).
"""

from __future__ import annotations

import math

from advisor.config import OptimizationConfig
from advisor.levers import LEVERS
from advisor.plan.compute import constants
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
    compute = dtype_size(config.dtype)
    upcast = _kept_in_fp32(component, config) * (4 - compute)
    k = constants()
    stored = next(
        (b for lever in LEVERS if (b := lever.stored_bytes(config, component, compute, k)) is not None),
        component.parameters * compute,
    )
    added = sum(lever.adapter_bytes(config, component, compute) for lever in LEVERS)  # a LoRA's adapters
    return math.ceil(stored + upcast + added)
