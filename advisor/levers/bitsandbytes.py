"""The bitsandbytes quantization backend: nf4 / fp4 (``bitsandbytes_4bit``) and LLM.int8 (``bitsandbytes_8bit``).

diffusers' bitsandbytes guide: ``PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit",
quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": ...})``.
It quantizes each linear layer straight onto the GPU while loading (so it needs CUDA, and the
weights never sit in RAM), dequantizes a layer's weight to the compute dtype before each matmul,
and compiles only with ``torch._dynamo.config.capture_dynamic_output_shape_ops`` (the seed page).
"""

from __future__ import annotations

from typing import Any, Callable

from advisor.config import OptimizationConfig, Quantization
from advisor.levers.base import Loading
from advisor.levers.code import call_source, dtype_expr, runtime_value
from advisor.levers.quantization import KEYWORD, VARIABLE, QuantBackend
from advisor.platform import Constraint, Platform, constraint


GUIDE = "https://huggingface.co/docs/diffusers/main/en/quantization/bitsandbytes"
QUANT_BLOG = "https://huggingface.co/blog/diffusers-quantization"
FOUR_BIT, EIGHT_BIT = "bitsandbytes_4bit", "bitsandbytes_8bit"

QUALITY_COSTS = {
    "nf4": ("4-bit NormalFloat weights: small changes in fine detail, the composition stays", QUANT_BLOG),
    "fp4": ("4-bit float weights: small changes in fine detail", QUANT_BLOG),
    "int8": ("8-bit weights (LLM.int8): near-identical images", QUANT_BLOG),
}

CONSTRAINTS: list[Constraint] = []


@constraint(
    "bitsandbytes-needs-cuda",
    "quantization.backend",
    "bitsandbytes quantization needs a CUDA GPU; diffusers refuses to load it on CPU",
    GUIDE,
    into=CONSTRAINTS,
)
def bitsandbytes_needs_cuda(config: OptimizationConfig, platform: Platform) -> str | None:
    q = config.quantization
    if q is None or q.backend not in (FOUR_BIT, EIGHT_BIT):
        return None
    if platform.accelerator != "cuda":
        return (
            f"`quantization.backend: {q.backend}` needs CUDA and {platform.no_cuda}; "
            "on CPU use `quantization.backend: torchao` or `layerwise_casting`"
        )
    if not config.device.startswith("cuda"):
        return f"`quantization.backend: {q.backend}` needs `device: cuda`, not `device: {config.device}`"
    return None


class Bitsandbytes(QuantBackend):
    backends = (FOUR_BIT, EIGHT_BIT)
    package = "bitsandbytes"
    # The config spells the 8-bit kind as its backend ("int8" is also a dtype's name, not a choice).
    names = frozenset({FOUR_BIT, EIGHT_BIT, "nf4", "fp4"})
    constraints = tuple(CONSTRAINTS)
    loads_onto_device = True
    needs_dynamic_output_shapes = True

    def choices(self, components: list[str]) -> list[Quantization]:
        return [
            Quantization(backend=FOUR_BIT, components=components),
            Quantization(backend=EIGHT_BIT, components=components),
        ]

    def linear_bytes(self, quantization: Quantization, k: dict[str, Any]) -> tuple[float, float]:
        if quantization.backend == FOUR_BIT:
            key = (
                "bnb_4bit_double_quant_bytes_per_weight" if quantization.double_quant else "bnb_4bit_bytes_per_weight"
            )
            return k[key], 0
        return k["bnb_8bit_bytes_per_weight"], k["bnb_8bit_bytes_per_row"]

    def speed_key(self, quantization: Quantization) -> str:
        return quantization.backend

    def quality_cost(self, quantization: Quantization) -> tuple[str, str]:
        return QUALITY_COSTS[quantization.kind]

    def probe_rows(
        self, packages: dict[str, str | None]
    ) -> dict[str, tuple[Callable[[str], OptimizationConfig], str]]:
        def example(device: str) -> OptimizationConfig:
            return OptimizationConfig(
                device="cuda", quantization=Quantization(backend=FOUR_BIT, components=["transformer"])
            )

        return {self.package: (example, f"bitsandbytes {packages.get(self.package)} with a CUDA GPU")}

    def load(self, config: OptimizationConfig, components: Any) -> Loading:
        q = config.quantization
        if q.backend == FOUR_BIT:
            quant_kwargs: dict[str, Any] = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": q.kind,
                "bnb_4bit_compute_dtype": dtype_expr(config.dtype),
            }
            if q.double_quant:
                quant_kwargs["bnb_4bit_use_double_quant"] = True
        else:
            quant_kwargs = {"load_in_8bit": True}
        kwargs = {
            "quant_backend": q.backend,
            "quant_kwargs": quant_kwargs,
            "components_to_quantize": list(q.components),
        }

        def build() -> Any:
            from diffusers.quantizers import PipelineQuantizationConfig

            return PipelineQuantizationConfig(**runtime_value(kwargs))

        imports = ("from diffusers.quantizers import PipelineQuantizationConfig",)
        code = f"{VARIABLE} = " + call_source("PipelineQuantizationConfig", (), kwargs)
        return Loading(KEYWORD, VARIABLE, imports, code, build)


BITSANDBYTES = Bitsandbytes()
