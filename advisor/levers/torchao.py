"""The torchao quantization backend: int8 / fp8 / int4 weights, with or without quantized activations.

diffusers' torchao guide: each component gets ``TorchAoConfig(<scheme config>)`` from the library
it belongs to (diffusers' or transformers'). torchao converts every linear layer, a transformers
model's fp32 modules too; loading first builds each shard at the compute dtype, then converts it.
Compiled, its kernels fuse the dequantisation into the matmul; eager, they expand each layer's
weight first, and the dynamic schemes (activations quantized too) are slower than not quantizing
(diffusers-torchao: Flux on H100, 130 s eager vs 3.4 s compiled).
"""

from __future__ import annotations

from typing import Any, Callable

from advisor.config import OptimizationConfig, Quantization
from advisor.levers.base import Loading
from advisor.levers.offload import blocks_move_with_module_to, group_offloaded
from advisor.levers.quantization import QuantBackend, import_backend, per_library_loading
from advisor.platform import Constraint, Platform, constraint, on_cuda


TORCHAO = "torchao"
GUIDE = "https://huggingface.co/docs/diffusers/main/en/quantization/torchao"
MEMORY = "https://huggingface.co/docs/diffusers/main/en/optimization/memory#group-offloading"
QUANT_BLOG = "https://huggingface.co/blog/diffusers-quantization"
DEFAULT_SCHEME = "int8_weight_only"

# scheme -> the AOBaseConfig class in torchao.quantization that implements it.
SCHEMES = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "float8_dynamic": "Float8DynamicActivationFloat8WeightConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
}
DYNAMIC = {"int8_dynamic", "float8_dynamic"}  # activations quantized too
FP8_COMPUTE = "float8_dynamic"  # fp8 matmuls
QUALITY_COSTS = {
    "int8_weight_only": ("int8 weights: near-identical images", QUANT_BLOG),
    "float8_weight_only": ("fp8 weights: near-identical images", QUANT_BLOG),
    "int8_dynamic": ("int8 weights and activations: close, slightly more drift than weight-only", QUANT_BLOG),
    "float8_dynamic": (
        "fp8 weights and activations: close to bf16, small detail changes",
        "https://github.com/pytorch/ao/tree/main/torchao/float8",
    ),
    "int4_weight_only": ("int4 weights: visible detail changes on some prompts", QUANT_BLOG),
}


def _torchao(config: OptimizationConfig) -> Quantization | None:
    q = config.quantization
    return q if q is not None and q.backend == TORCHAO else None


# --- constraints ---------------------------------------------------------------------------------

CONSTRAINTS: list[Constraint] = []


@constraint(
    "fp8-compute-needs-sm89",
    "quantization.scheme",
    "fp8 matmuls (torchao float8 dynamic) need compute capability 8.9 or newer (Ada, Hopper, Blackwell)",
    "https://github.com/pytorch/ao/tree/main/torchao/float8",
    into=CONSTRAINTS,
)
def fp8_compute_needs_sm89(config: OptimizationConfig, platform: Platform) -> str | None:
    q = _torchao(config)
    if q is None or q.kind != FP8_COMPUTE:
        return None
    if not on_cuda(config, platform):
        return (
            "`quantization.scheme: float8_dynamic` needs a CUDA GPU with compute capability >= 8.9; "
            "on CPU use int8_weight_only, int8_dynamic or float8_weight_only"
        )
    if platform.capability < 8.9:
        return (
            f"`quantization.scheme: float8_dynamic` needs compute capability >= 8.9, this GPU has "
            f"{platform.compute_capability or 'none'}; use int8_weight_only or int8_dynamic"
        )
    return None


@constraint(
    "int4-weight-only-needs-cuda",
    "quantization.scheme",
    "torchao int4 weight-only runs on CUDA int4 kernels only (the CPU path needs the CUDA-only mslk package)",
    "https://github.com/pytorch/ao/tree/main/torchao/quantization",
    into=CONSTRAINTS,
)
def int4_weight_only_needs_cuda(config: OptimizationConfig, platform: Platform) -> str | None:
    q = _torchao(config)
    if q is not None and q.kind == "int4_weight_only" and not on_cuda(config, platform):
        return "`quantization.scheme: int4_weight_only` needs CUDA int4 kernels; on CPU use int8_weight_only, int8_dynamic or float8_weight_only"
    return None


def _group_offloaded(config: OptimizationConfig) -> list[str]:
    q = _torchao(config)
    return [] if q is None else [name for name in q.components if group_offloaded(config, name)]


@constraint(
    "torchao-cannot-offload-to-disk",
    "offload.offload_to_disk_path",
    "group offloading to disk stores groups as safetensors files, which cannot hold torchao-quantized tensors",
    MEMORY,
    into=CONSTRAINTS,
)
def torchao_cannot_offload_to_disk(config: OptimizationConfig, platform: Platform) -> str | None:
    if not config.offload.offload_to_disk_path:
        return None
    for name in _group_offloaded(config):
        return (
            f"`offload.offload_to_disk_path` cannot hold `{name}`: safetensors cannot store torchao-quantized "
            f"tensors; remove `offload_to_disk_path` or leave `{name}` out of `offload.components`"
        )
    return None


@constraint(
    "compiled-torchao-needs-leaf-or-stream-offload",
    "offload.offload_type",
    "a compiled torchao model cannot be group-offloaded block by block without streams: diffusers then "
    "moves blocks with Module.to, which cannot swap torchao weights that the compiled graph references",
    MEMORY,
    into=CONSTRAINTS,
)
def compiled_torchao_needs_leaf_or_stream_offload(config: OptimizationConfig, platform: Platform) -> str | None:
    if config.compile is None or not blocks_move_with_module_to(config):
        return None
    for name in _group_offloaded(config):
        if name in config.compile.components:
            return (
                f"torchao-quantized, compiled `{name}` cannot be group-offloaded with `offload.offload_type: block_level` "
                "(without streams diffusers moves the block with Module.to, which cannot swap torchao weights that "
                "torch.compile references); use `offload.offload_type: leaf_level`"
            )
    return None


# --- the backend ---------------------------------------------------------------------------------


class Torchao(QuantBackend):
    backends = (TORCHAO,)
    package = TORCHAO
    names = frozenset({TORCHAO, *SCHEMES})
    constraints = tuple(CONSTRAINTS)
    materialises_at_compute_dtype = True
    converts_fp32_modules = True

    def choices(self, components: list[str], model: str | None = None) -> list[Quantization]:
        return [
            Quantization(backend=TORCHAO, components=components, scheme=DEFAULT_SCHEME),
            Quantization(backend=TORCHAO, components=components, scheme=FP8_COMPUTE),
        ]

    def linear_bytes(self, quantization: Quantization, k: dict[str, Any]) -> tuple[float, float]:
        return k["torchao_bytes_per_weight"][quantization.kind], k["torchao_bytes_per_row"][quantization.kind]

    def speed_key(self, quantization: Quantization) -> str:
        return f"{TORCHAO}:{quantization.kind}"

    def dequantises_per_layer(self, quantization: Quantization, compiled: bool) -> bool:
        return not compiled  # compiled, the dequantisation fuses into the matmul

    def quantizes_activations(self, quantization: Quantization) -> bool:
        return quantization.kind in DYNAMIC

    def eager_note(self, quantization: Quantization) -> str | None:
        if quantization.kind == "int8_dynamic":
            return "int8 dynamic quantization without torch.compile is ~40x slower (diffusers-torchao)"
        return None

    def lora_problem(self, quantization: Quantization, fuse: bool) -> tuple[str, str] | None:
        """int4 weights take no LoRA at all: peft's torchao LoRA layer checks the weight's type when it
        is built (``peft/tuners/lora/torchao.py``, ``_check_dtype_supported``: "only supports int8
        weights for now", raised for an ``Int4Tensor``, what Int4WeightOnlyConfig makes by default)."""
        if quantization.kind == "int4_weight_only":
            return (
                "peft's torchao LoRA layer refuses int4 weights when the LoRA loads ('only supports int8 weights')",
                "https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/torchao.py",
            )
        return super().lora_problem(quantization, fuse)

    def quality_cost(self, quantization: Quantization) -> tuple[str, str]:
        return QUALITY_COSTS[quantization.kind]

    def probe_rows(
        self, packages: dict[str, str | None]
    ) -> dict[str, tuple[Callable[[str], OptimizationConfig], str]]:
        def example(scheme: str | None) -> Callable[[str], OptimizationConfig]:
            def config(device: str) -> OptimizationConfig:
                q = Quantization(backend=TORCHAO, scheme=scheme, components=["transformer"])
                return OptimizationConfig(device="cuda" if scheme == FP8_COMPUTE else device, quantization=q)

            return config

        return {
            TORCHAO: (example(None), f"torchao {packages.get(TORCHAO)}: int8 weight-only runs on CPU and GPU"),
            "fp8_compute": (example(FP8_COMPUTE), "fp8 matmuls via torchao"),
        }

    def load(self, config: OptimizationConfig, components: Any) -> Loading:
        """Each component gets the TorchAoConfig of the library it belongs to (`per_library_loading`)."""
        scheme_class = SCHEMES[config.quantization.kind]

        def make(is_diffusers: bool) -> Any:
            import diffusers
            import transformers

            schemes = import_backend("torchao.quantization", "torchao", "torchao", "torchao")
            library = diffusers if is_diffusers else transformers
            return library.TorchAoConfig(getattr(schemes, scheme_class)())

        return per_library_loading(
            components,
            config.quantization.components,
            (f"TorchAoConfig({scheme_class}())", f"TransformersTorchAoConfig({scheme_class}())"),
            (
                "from diffusers import TorchAoConfig",
                "from transformers import TorchAoConfig as TransformersTorchAoConfig",
            ),
            make,
            extra_imports=(f"from torchao.quantization import {scheme_class}",),
        )


TORCHAO_BACKEND = Torchao()
