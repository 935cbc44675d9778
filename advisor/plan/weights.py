"""Weight bytes of a component as the config stores it.

Exact from the profile (parameter counts per layer type) and the config's storage format: the
dtype, load-time quantization, layerwise casting, the modules kept in fp32. How many of them are on
the device in each phase is the offload lever's (`advisor.levers.offload.resident_bytes`).
"""

from __future__ import annotations

import math

from advisor.config import OptimizationConfig
from advisor.levers.quantization import backend_of, quantized
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
    k = constants()
    compute = dtype_size(config.dtype)
    upcast = _kept_in_fp32(component, config) * (4 - compute)
    quantization = quantized(config, component.name)
    if quantization is not None:
        backend = backend_of(quantization)
        linear, rows = component.linear_parameters, component.linear_rows
        if backend.converts_fp32_modules:
            linear += component.fp32_linear_parameters
            rows += component.fp32_linear_rows
        per_weight, per_row = backend.linear_bytes(quantization, k)
        rest = component.parameters - linear
        return math.ceil(linear * per_weight + rows * per_row + rest * compute + upcast)
    casting = config.layerwise_casting
    if casting and component.name in casting.components:
        cast = component.parameters - component.casting_skipped_parameters
        return math.ceil(
            cast * k["fp8_storage_bytes_per_weight"] + component.casting_skipped_parameters * compute + upcast
        )
    return component.parameters * compute + upcast
