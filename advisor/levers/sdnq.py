"""The SDNQ backend (SD.Next Quantization, the ``sdnq`` package): 8- to 2-bit integer or float weights
(``quantization.backend: sdnq`` with ``quantization.weights``).

diffusers 0.42's ``SDNQConfig`` and ``SDNQQuantizer`` are thin factories that defer to the ``sdnq``
package (diffusers/quantizers/sdnq/sdnq_quantizer.py); a transformers component takes ``sdnq``'s own
``SDNQConfig``, which registers itself with transformers when ``sdnq`` is imported. Pure torch: it
runs on the CPU too. What a weight becomes (sdnq 0.2.8, ``sdnq/quantizer.py``, ``sdnq_quantize_layer``):
its bits, packed (int6: three bytes per four weights), and per group of a linear layer's input
columns a float32 scale, and a float32 zero point for the unsigned types; with the defaults
(``group_size=0``, no quantized matmul, no SVD) a linear layer's group is ``2 ** (bits + 2)``
columns (1024 for 8-bit, 64 for 4-bit), or the whole row where that is wider. So uint3 costs as
much as uint4 (0.625 bytes a weight) and uint2 more (0.75); the float types keep no zero point.

Left out of the bytes: the layers sdnq leaves at the compute dtype by name
(``module_skip_keys_dict``, sdnq/common.py) or for their size (``minimum_allowed_numel``), which
the estimate converts with the rest: FLUX.1-dev's transformer keeps 92 M of its 11.9 B linear
weights in bf16, 1.7% more than estimated in uint4.

Importing ``sdnq`` compiles its dequantization functions with torch.compile, eager pipeline or not,
and raises dynamo's cache and recompile limits for the whole process. Without quantized matmul each
layer's weight is dequantized before its matmul, as torchao's weight-only schemes do; its speed is
assumed from theirs (no published measurement in diffusers' terms is known here), and the planner
does not propose it.
"""

from __future__ import annotations

import re
from typing import Any

from advisor.config import OptimizationConfig, Quantization
from advisor.levers.base import Loading
from advisor.levers.code import source
from advisor.levers.quantization import QuantBackend, import_backend, per_library_loading, transformer_example


SDNQ = "sdnq"
DOCS = "https://vladmandic.github.io/sdnext-docs/SDNQ-Quantization"
DEFAULT_WEIGHTS = "int8"
SCALE_BYTES = 4  # float32 (``dequantize_fp32=True``, the default)
# SD.Next's SDNQ page: "INT8 for its fast speed and almost no loss in quality", "INT6 with little quality
# loss", "UINT4 to save even more memory", "FP8 has slightly lower quality ... than INT8"; the page
# rates no other width, so 7, 5 and 4 bits are extrapolated from those and from 4-bit quantization
# elsewhere (the HF quantization blog's int4 rows).
QUALITY_COSTS = {
    8: "8-bit weights: almost no loss against bf16",
    7: "7-bit weights: little loss (extrapolated between int8 and int6)",
    6: "6-bit weights: little loss",
    5: "5-bit weights: some loss (extrapolated)",
    4: "4-bit weights: visible detail changes on some prompts",
}


def bits(weights: str) -> int:
    """The bits a weight dtype stores: int8 -> 8, uint4 -> 4, float6_e3m2fn -> 6."""
    return int(re.match(r"u?(?:int|float)(\d+)", weights).group(1))


def group_size(weights: str, columns: int) -> int:
    """The input columns sharing one scale in a linear layer of `columns` inputs, as sdnq's
    quantizer picks them: ``2 ** (bits + 2)``, else the largest size that divides the columns into
    fewer groups, else (or where that is wider) the whole row."""
    size = 2 ** (bits(weights) + 2)
    if size >= columns:
        return columns
    groups = columns // size
    while groups * size != columns:
        groups -= 1
        if groups <= 1:
            return columns
        size = columns // groups
    return size


def bytes_per_weight(weights: str, columns: int) -> float:
    """A converted linear weight's bytes: its packed bits, and its group's scale (and zero point for
    unsigned types) shared with the group."""
    per_group = SCALE_BYTES * (2 if weights.startswith("uint") else 1)
    return bits(weights) / 8 + per_group / group_size(weights, columns)


class Sdnq(QuantBackend):
    backends = (SDNQ,)
    package = "sdnq"
    names = frozenset({SDNQ})

    def probe_rows(self, packages: dict[str, str | None]) -> dict[str, tuple[Any, str]]:
        note = f"sdnq {packages.get(self.package)} (pure torch: CUDA, ROCm, XPU, CPU)"
        return {SDNQ: (transformer_example(SDNQ), note)}

    def linear_bytes(self, quantization: Quantization, k: dict[str, Any]) -> tuple[float, float]:
        # Groups of a wide layer's full size (3072, 4096, 5120, 12288 columns divide by every group
        # size; a width that doesn't, such as 13824 for int8, has slightly larger groups: fewer scales).
        return bytes_per_weight(quantization.weights or DEFAULT_WEIGHTS, 2**14), 0.0

    def speed_key(self, quantization: Quantization) -> str:
        return f"{SDNQ}:dequantized"

    def lora_problem(self, quantization: Quantization, fuse: bool) -> tuple[str, str] | None:
        """sdnq keeps a packed or grouped weight (1-D for the packed widths, rows x groups x columns
        for the others), which Flux's ``load_lora_weights`` shape check reads as the layer's shape:
        a ValueError (run here with uint4); fusing casts the bf16 change into the integer weight, a
        RuntimeError (run here with int8)."""
        return (
            "load_lora_weights reads sdnq's packed weights as the layers' shapes (a ValueError), and fusing "
            "into them fails (a RuntimeError casting bf16 into the integer weight)",
            "https://github.com/huggingface/diffusers/blob/main/src/diffusers/loaders/lora_pipeline.py",
        )

    def quality_cost(self, quantization: Quantization) -> tuple[str, str]:
        weights = quantization.weights or DEFAULT_WEIGHTS
        if weights.startswith("float8"):
            return "fp8 weights: close to bf16, slightly below int8", DOCS
        width = bits(weights)
        return QUALITY_COSTS.get(width, f"{width}-bit weights: strongly degraded images"), DOCS

    def load(self, config: OptimizationConfig, components: Any) -> Loading:
        """diffusers' SDNQConfig for its models, sdnq's own for a transformers model (importing sdnq
        registers it with transformers)."""
        weights = config.quantization.weights or DEFAULT_WEIGHTS

        def make(is_diffusers: bool) -> Any:
            sdnq = import_backend("sdnq", SDNQ, "sdnq", SDNQ)
            if is_diffusers:
                import diffusers

                return diffusers.SDNQConfig(weights_dtype=weights)
            return sdnq.SDNQConfig(weights_dtype=weights)

        return per_library_loading(
            components,
            config.quantization.components,
            (
                f"SDNQConfig(weights_dtype={source(weights)})",
                f"TransformersSDNQConfig(weights_dtype={source(weights)})",
            ),
            ("from diffusers import SDNQConfig", "from sdnq import SDNQConfig as TransformersSDNQConfig"),
            make,
        )


SDNQ_BACKEND = Sdnq()
