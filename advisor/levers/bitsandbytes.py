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
from advisor.levers.offload.strategies import GROUP, LEAF_LEVEL, MODEL, group_offloaded
from advisor.levers.quantization import KEYWORD, VARIABLE, QuantBackend, transformer_example
from advisor.platform import Constraint, Platform, constraint, version_tuple


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


# Found by rehearsing every offload strategy on each backend (`advisor.rehearse`, tests/test_rehearse.py)
# with these versions; read in their code: diffusers' group offloading moves a weight by assigning
# ``param.data`` (``ModuleGroup._transfer_tensor_to_device``, diffusers/hooks/group_offloading.py),
# while bitsandbytes keeps a 4-bit weight's scales in ``Params4bit.quant_state`` and an 8-bit layer's in
# ``Linear8bitLt.state``, which only ``.to()`` moves (bitsandbytes/nn/modules.py). Group offloading
# first moves each module to the CPU with ``.to()`` (scales included), then brings back only
# ``.data``: the matmul gets its scales from the CPU. Its stream path never moves the module: the
# scales stay where bitsandbytes quantized them, on the card, and only a leaf-level offload streams
# every group (a block-level one onloads the modules outside the blocks without its stream). Offloading
# to disk is not rehearsed (the rehearsal writes no files), so it is not refused here.
REHEARSED_WITH = {"diffusers": "0.42.1", "bitsandbytes": "0.50.2"}


@constraint(
    "bitsandbytes-group-offload-needs-leaf-streams",
    "offload.strategy",
    "group offloading moves a bitsandbytes weight's data but not its scales (quant_state), so its matmul "
    "mixes devices; only leaf-level offloading with streams leaves the scales on the card (rehearsed)",
    "https://github.com/huggingface/diffusers/issues/10797",
    into=CONSTRAINTS,
)
def bitsandbytes_group_offload_needs_leaf_streams(config: OptimizationConfig, platform: Platform) -> str | None:
    q, offload = config.quantization, config.offload
    if q is None or q.backend not in (FOUR_BIT, EIGHT_BIT) or offload.offload_to_disk_path:
        return None
    if offload.offload_type == LEAF_LEVEL and offload.use_stream:
        return None
    offloaded = [name for name in q.components if group_offloaded(config, name)]
    installed = (platform.packages or {}).get("diffusers")
    if not offloaded or (installed and version_tuple(installed) > version_tuple(REHEARSED_WITH["diffusers"])):
        return None  # a later diffusers may move the scales too: `advisor check` rehearses it there
    return (
        f"group offloading of {', '.join(offloaded)} quantized with {q.backend} leaves its scales on the CPU "
        f"(rehearsed with diffusers {REHEARSED_WITH['diffusers']}, bitsandbytes {REHEARSED_WITH['bitsandbytes']}); "
        "use `offload.offload_type: leaf_level` with `offload.use_stream: true`, or model offload"
    )


@constraint(
    "bitsandbytes-8bit-stays-on-the-card",
    "offload.strategy",
    "an 8-bit bitsandbytes weight keeps its int8 data as CB beside the parameter, which model offload's "
    "Module.to and group offloading's data swap leave on the card: offloading frees none of it, and each "
    "onload adds a second copy (rehearsed; sequential offload moves it)",
    "https://github.com/bitsandbytes-foundation/bitsandbytes/issues/1332",
    into=CONSTRAINTS,
)
def bitsandbytes_8bit_stays_on_the_card(config: OptimizationConfig, platform: Platform) -> str | None:
    # Int8Params._quantize sets `self.CB = CB` of its data; nn.Module._apply and group offloading swap
    # only `param.data` (torch/nn/modules/module.py, diffusers/hooks/group_offloading.py), and
    # Linear8bitLt.forward copies CB into its `state` (bitsandbytes/nn/modules.py). Rehearsed: after a
    # model-offloaded run every 8-bit byte is still on the card (tests/test_rehearse.py).
    q, offload = config.quantization, config.offload
    if q is None or q.backend != EIGHT_BIT or offload.strategy not in (MODEL, GROUP):
        return None
    offloaded = [name for name in q.components if offload.strategy == MODEL or group_offloaded(config, name)]
    installed = (platform.packages or {}).get("bitsandbytes")
    if not offloaded or (installed and version_tuple(installed) > version_tuple(REHEARSED_WITH["bitsandbytes"])):
        return None  # a later bitsandbytes may move it: `advisor check` rehearses it there
    return (
        f"{offload.strategy} offloading can't move {', '.join(offloaded)} off the GPU: its 8-bit weights stay there "
        f"as bitsandbytes' CB (rehearsed with bitsandbytes {REHEARSED_WITH['bitsandbytes']}); use 4-bit, "
        "sequential offload, or keep the 8-bit model on the GPU"
    )


class Bitsandbytes(QuantBackend):
    backends = (FOUR_BIT, EIGHT_BIT)
    package = "bitsandbytes"
    # The config spells the 8-bit kind as its backend ("int8" is also a dtype's name, not a choice).
    names = frozenset({FOUR_BIT, EIGHT_BIT, "nf4", "fp4"})
    constraints = tuple(CONSTRAINTS)
    loads_onto_device = True
    needs_dynamic_output_shapes = True

    def left_on_device_by_group_offload(self, quantization: Quantization, k: dict[str, Any]) -> tuple[float, float]:
        """A 4-bit weight's scales live in its ``quant_state``, beside the parameter's data, so they
        stay on the card: the absmax, all but the 4 bits per weight. An 8-bit weight keeps its int8
        data referenced as ``CB`` as well (``Int8Params._quantize`` sets ``self.CB = CB`` of the
        data; bitsandbytes/nn/modules.py), so swapping ``data`` frees none of it. Rehearsed: a
        group-offloaded nf4 transformer leaves its absmax on the card, an 8-bit one all of it
        (tests/test_rehearse.py)."""
        per_weight, per_row = self.linear_bytes(quantization, k)
        return (per_weight - 0.5, per_row) if quantization.backend == FOUR_BIT else (per_weight, per_row)

    def scales_move_with_module(self, quantization: Quantization) -> bool:
        """4-bit: ``Params4bit.to`` moves its ``quant_state`` in place. 8-bit: ``Int8Params.to`` returns
        a new parameter with its ``CB``/``SCB``, but ``nn.Module._apply`` keeps the old parameter
        object and only swaps its data, so the old scales stay where they were, and ``Linear8bitLt.to``
        moves the layer's ``state`` only when called on the layer itself (bitsandbytes/nn/modules.py,
        torch/nn/modules/module.py). Rehearsed: a model loaded in 8 bits on the CPU and moved to the
        card computes with ``state.CB`` on the CPU (tests/test_rehearse.py)."""
        return quantization.backend == FOUR_BIT

    def choices(self, components: list[str], model: str | None = None) -> list[Quantization]:
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

    def lora_adapter_bytes(self, quantization: Quantization, compute_bytes: int) -> int:
        """LLM.int8 layers hold int8 weights and no ``compute_dtype``, so peft leaves their adapters at
        the float32 it creates them in (``peft/tuners/tuners_utils.py``, read, not run: bitsandbytes
        needs CUDA); 4-bit layers have a ``compute_dtype``, which the adapters take."""
        return 4 if quantization.backend == EIGHT_BIT else compute_bytes

    def quality_cost(self, quantization: Quantization) -> tuple[str, str]:
        return QUALITY_COSTS[quantization.kind]

    def probe_rows(
        self, packages: dict[str, str | None]
    ) -> dict[str, tuple[Callable[[str], OptimizationConfig], str]]:
        return {
            self.package: (
                transformer_example(FOUR_BIT, device="cuda"),
                f"bitsandbytes {packages.get(self.package)} with a CUDA GPU",
            )
        }

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
