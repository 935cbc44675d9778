"""The quality policy: which choices are lossy and what each costs in quality (each lever says:
`Lever.lossy`, `Lever.quality_cost`), and when a lossy one may be picked.

`--quality exact` never proposes a lossy choice; `balanced` (the default) only when nothing lossless
fits or when it is predicted at least `CLEAR_WIN` faster than the best lossless candidate; `fast`
takes the fastest whatever it costs.
"""

from __future__ import annotations

from advisor.config import OptimizationConfig
from advisor.levers import LEVERS


# A lossy pick must be predicted at least this much faster than the best lossless one (balanced).
CLEAR_WIN = 0.20


def is_lossy(config: OptimizationConfig) -> bool:
    """Whether the config changes the model's output (quantized or fp8-stored weights, or a lossy lever:
    quantized attention, a step cache)."""
    return any(lever.lossy(config) for lever in LEVERS)


def quality_cost(config: OptimizationConfig) -> tuple[str, str] | None:
    """(expected quality cost, source) of the config's lossy choice, or None for a lossless one."""
    return next((cost for lever in LEVERS if (cost := lever.quality_cost(config))), None)


# What float16 does to classes trained in bf16, for GPUs without bf16 (compute capability < 8.0):
# class -> (what happens, its source).
_T5_SOURCE = "https://github.com/huggingface/transformers/blob/main/src/transformers/models/t5/modeling_t5.py"
FP16_RISKS = {
    "FluxTransformer2DModel": (
        "it runs (diffusers clips its activations to the fp16 range) but its images differ from bf16's; diffusers' Flux "
        "docs run the text encoders in fp32 for fp16 inference, which a config can't set per component yet",
        "https://huggingface.co/docs/diffusers/main/en/api/pipelines/flux#running-fp16-inference",
    ),
    "T5EncoderModel": (
        "T5 overflows in fp16, which is why transformers keeps its `wo` layers in fp32 (`_keep_in_fp32_modules`)",
        _T5_SOURCE,
    ),
    "UMT5EncoderModel": ("UMT5 (T5 family) overflows in fp16; transformers keeps its `wo` layers in fp32", _T5_SOURCE),
}


def fp16_warnings(config: OptimizationConfig, class_names: dict[str, str]) -> list[str]:
    """Warnings for components float16 is known to change or overflow, when the config computes in it."""
    if config.dtype != "float16":
        return []
    return [
        f"warning: fp16 (this GPU has no bf16) on {name} ({cls}): {FP16_RISKS[cls][0]} ({FP16_RISKS[cls][1]})"
        for name, cls in class_names.items()
        if cls in FP16_RISKS
    ]
