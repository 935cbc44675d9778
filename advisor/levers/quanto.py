"""The quanto backend (optimum-quanto): int8, int4, int2 or fp8 weights (``quantization.backend: quanto``).

diffusers' quanto guide: each component gets its library's ``QuantoConfig`` (diffusers' takes
``weights_dtype``, transformers' ``weights``, so ``quant_backend="quanto"`` is refused as for torchao:
``quant_mapping``). 8-bit weights keep a scale per output row at the compute dtype; int4 and int2 pack
two or four weights a byte with a scale and a shift per group of 128 (``QModuleMixin``,
optimum/quanto/nn/qmodule.py). diffusers 0.42 deprecates ``QuantoConfig`` ("will be removed in version
1.0.0", diffusers/quantizers/quantization_config.py), so the planner never proposes it; a config that
names it is estimated, loaded and rehearsed like the others.
"""

from __future__ import annotations

from typing import Any

from advisor.config import OptimizationConfig, Quantization
from advisor.levers.base import Loading
from advisor.levers.code import source
from advisor.levers.quantization import QuantBackend, import_backend, per_library_loading, transformer_example
from advisor.platform import Constraint, Platform, constraint


QUANTO = "quanto"
QUANT_BLOG = "https://huggingface.co/blog/diffusers-quantization"
DEFAULT_WEIGHTS = "int8"
QUALITY_COSTS = {
    "int8": "int8 weights: near-identical images",
    "float8": "fp8 weights: near-identical images",
    "int4": "int4 weights: visible detail changes on some prompts",
    "int2": "int2 weights: strongly degraded images",
}


CONSTRAINTS: list[Constraint] = []


@constraint(
    "quanto-int8-bf16-not-on-cpu",
    "quantization.weights",
    "optimum-quanto's int8 matmul on the CPU (qbytes_mm_impl_cpu) crashes the process with a segmentation fault on "
    "bf16 activations; float32 and float16 run (reproduced with optimum-quanto 0.2.7 and torch 2.13 on the tiny FLUX "
    "pipeline, tests/test_quanto.py)",
    "https://github.com/huggingface/optimum-quanto/blob/main/optimum/quanto/library/qbytes_mm.py",
    into=CONSTRAINTS,
)
def quanto_int8_bf16_not_on_cpu(config: OptimizationConfig, platform: Platform) -> str | None:
    q = config.quantization
    if q is None or q.backend != QUANTO or (q.weights or DEFAULT_WEIGHTS) != "int8":
        return None
    if config.device.startswith("cuda") or config.dtype != "bfloat16":
        return None
    return "quanto int8 weights with bf16 crash on the CPU (a segfault in its int8 matmul); use dtype float32"


class Quanto(QuantBackend):
    backends = (QUANTO,)
    package = "optimum-quanto"
    names = frozenset({QUANTO})
    constraints = tuple(CONSTRAINTS)

    def probe_rows(self, packages: dict[str, str | None]) -> dict[str, tuple[Any, str]]:
        return {
            QUANTO: (
                transformer_example(QUANTO),
                f"optimum-quanto {packages.get(self.package)} (deprecated in diffusers 0.42)",
            )
        }

    def linear_bytes(self, quantization: Quantization, k: dict[str, Any]) -> tuple[float, float]:
        weights = quantization.weights or DEFAULT_WEIGHTS
        return k["quanto_bytes_per_weight"][weights], k["quanto_bytes_per_row"][weights]

    def speed_key(self, quantization: Quantization) -> str:
        return f"{QUANTO}:{quantization.weights or DEFAULT_WEIGHTS}"

    def lora_problem(self, quantization: Quantization, fuse: bool) -> tuple[str, str] | None:
        """Flux's ``load_lora_weights`` reads each targeted layer's ``.weight`` from the transformer's
        state dict to check the LoRA's shapes (``diffusers/loaders/lora_pipeline.py``,
        ``_maybe_expand_lora_state_dict``), where quanto keeps ``weight._data`` and ``weight._scale``: a
        KeyError (run here); and fusing into quanto weights reports success and changes nothing (run
        here: the LoRA's effect is silently lost)."""
        return (
            "Flux's load_lora_weights fails on quanto weights (KeyError on '<layer>.weight': quanto stores "
            "_data and _scale), and fusing into them silently drops the LoRA",
            "https://github.com/huggingface/diffusers/blob/main/src/diffusers/loaders/lora_pipeline.py",
        )

    def quality_cost(self, quantization: Quantization) -> tuple[str, str]:
        return QUALITY_COSTS[quantization.weights or DEFAULT_WEIGHTS], QUANT_BLOG

    def load(self, config: OptimizationConfig, components: Any) -> Loading:
        """Each component gets the QuantoConfig of the library it belongs to (`per_library_loading`)."""
        weights = config.quantization.weights or DEFAULT_WEIGHTS

        def make(is_diffusers: bool) -> Any:
            import diffusers
            import transformers

            import_backend("optimum.quanto", "quanto", "optimum-quanto", "quanto")
            if is_diffusers:
                return diffusers.QuantoConfig(weights_dtype=weights)
            return transformers.QuantoConfig(weights=weights)

        return per_library_loading(
            components,
            config.quantization.components,
            (f"QuantoConfig(weights_dtype={source(weights)})", f"TransformersQuantoConfig(weights={source(weights)})"),
            (
                "from diffusers import QuantoConfig",
                "from transformers import QuantoConfig as TransformersQuantoConfig",
            ),
            make,
        )


QUANTO_BACKEND = Quanto()
