"""The GGUF backend: a pre-quantized checkpoint loaded in place of a component (``quantization.backend: gguf``).

diffusers' GGUF guide (https://huggingface.co/docs/diffusers/main/en/quantization/gguf) loads the file
with the component's class and hands the model to the pipeline:
``Model.from_single_file(file, quantization_config=GGUFQuantizationConfig(compute_dtype=...))``. A
tensor of a packed type stays in its ggml blocks (a ``GGUFParameter``), and each ``GGUFLinear``
dequantises its weight in torch before its matmul (``forward_native``,
diffusers/quantizers/gguf/utils.py). Its CUDA kernels run only with ``DIFFUSERS_GGUF_CUDA_KERNELS`` set
and the ``kernels`` package fetching them from the Hub: remote code the advisor never turns on.
Loading reads every tensor out of the file into RAM (``tensor.data.copy()`` in
``load_gguf_checkpoint``, diffusers/models/model_loading_utils.py) before placing it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from advisor.config import OptimizationConfig, Quantization
from advisor.errors import ConfigError
from advisor.levers.base import Loading
from advisor.levers.code import Expr, call_source, dtype_expr, runtime_value
from advisor.levers.gguf.header import GGML_LAYOUT, GgufHeader, read_gguf_header
from advisor.levers.offload.strategies import SEQUENTIAL, loads_onto_device
from advisor.levers.quantization import QuantBackend, transformer_example
from advisor.platform import Constraint, Platform, constraint
from advisor.units import format_size


QUANT_BLOG = "https://huggingface.co/blog/diffusers-quantization"
GGUF = "gguf"

# Quality by bits per weight; the HF blog 'Exploring Quantization Backends in Diffusers' shows FLUX.1-dev
# at Q8_0, Q4_1 and Q2_K beside bf16.
TIERS = (  # (at least this many bits per weight, speed key, expected quality cost)
    (8.0, "gguf:8-bit", "8-bit blocks: near-identical images"),
    (4.0, "gguf:4-6-bit", "4- to 6-bit blocks: small changes in fine detail, the composition stays"),
    (0.0, "gguf:2-3-bit", "2- to 3-bit blocks: visibly softer detail and text"),
)

# Published GGUF files of the catalog's models: model -> (Hub repo, file name for a type). city96's
# conversions are the ones diffusers' GGUF guide and the HF quantization blog load.
PUBLISHED = {
    "black-forest-labs/FLUX.1-dev": ("city96/FLUX.1-dev-gguf", "flux1-dev-{}.gguf"),
    "black-forest-labs/FLUX.1-schnell": ("city96/FLUX.1-schnell-gguf", "flux1-schnell-{}.gguf"),
}
# The types the search offers: the largest of each quality tier, and the smaller ones a small card needs.
OFFERED = ("Q8_0", "Q6_K", "Q4_K_S", "Q3_K_S", "Q2_K")

CONSTRAINTS: list[Constraint] = []


@constraint(
    "gguf-no-sequential-offload",
    "offload.strategy",
    "sequential offload rebuilds each parameter without its GGUF type (accelerate's set_module_tensor_to_device), "
    "which GGUFParameter can't take: KeyError: None (reproduced with diffusers 0.42.1, tests/test_gguf.py)",
    "https://github.com/huggingface/diffusers/issues/14691",
    into=CONSTRAINTS,
)
def gguf_no_sequential_offload(config: OptimizationConfig, platform: Platform) -> str | None:
    q = config.quantization
    if q is None or q.backend != GGUF or config.offload.strategy != SEQUENTIAL:
        return None
    return "sequential offload fails on a GGUF component in diffusers <= 0.42 (issue #14691); use group offload"


def file_type(quantization: Quantization) -> str:
    """The type the file's name says (Q4_K_S), or the type most of a local file's bytes have; else
    Q8_0, the largest quantized type (the safe guess for memory)."""
    if quantization.gguf_type_in_name:
        return quantization.gguf_type_in_name
    header = local_header(quantization)
    return header.main_type if header is not None else "Q8_0"


def tensor_type(type_name: str) -> str:
    """The ggml type a file type stores most weights in: Q4_K_S and Q4_K_M mix in some larger blocks
    but are mostly Q4_K; a name that is a ggml type itself (IQ3_S, IQ1_M, Q8_0, F16) is that type."""
    return type_name if type_name in GGML_LAYOUT else re.sub(r"_[SML]$", "", type_name)


def bits_per_weight(type_name: str) -> float:
    """Of a file type's main tensor type (`tensor_type`): Q4_K_S 4.5, Q8_0 8.5, F16 16."""
    layout = GGML_LAYOUT.get(tensor_type(type_name))
    if layout is None:
        raise ConfigError(
            f"quantization.file: GGUF type {type_name} is not one ggml stores; a file type names one of "
            f"{', '.join(sorted(GGML_LAYOUT))} (or one with an _S/_M/_L ending, such as Q4_K_S)"
        )
    block, size = layout
    return size * 8 / block


def hub_file(repo: str, name: str) -> str:
    """The URL diffusers' from_single_file takes for a file of a Hub repo."""
    return f"https://huggingface.co/{repo}/blob/main/{name}"


def local_file(quantization: Quantization) -> Path | None:
    """The config's file when it is on this machine (a Hub file is not)."""
    path = Path(quantization.file or "").expanduser()
    return path if quantization.file and path.is_file() else None


def local_header(quantization: Quantization) -> GgufHeader | None:
    """The header of the config's file when it is on this machine, read once per version of the file
    (the estimate asks for it per component and candidate)."""
    path = local_file(quantization)
    if path is None:
        return None
    stat = path.stat()
    return _header(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _header(path: str, _mtime_ns: int, _size: int) -> GgufHeader:
    return read_gguf_header(path)


class Gguf(QuantBackend):
    backends = (GGUF,)
    package = "gguf"
    names = frozenset({GGUF})
    constraints = tuple(CONSTRAINTS)
    reads_into_ram = True
    built_apart = True  # from_single_file, passed to the pipeline's from_pretrained

    def choices(self, components: list[str], model: str | None = None) -> list[Quantization]:
        """The published files of `model`'s one denoiser, where the advisor knows them."""
        if model not in PUBLISHED or len(components) != 1:
            return []
        repo, name = PUBLISHED[model]
        return [
            Quantization(backend=GGUF, components=components, file=hub_file(repo, name.format(kind)))
            for kind in OFFERED
        ]

    def download_note(self, quantization: Quantization, weight_bytes: int) -> str | None:
        if local_header(quantization) is not None:
            return None
        kind = file_type(quantization)
        return (
            f"download {quantization.file} (about {format_size(weight_bytes)}: {kind} at "
            f"{bits_per_weight(kind):g} bits per weight, its F32 tensors at the compute dtype; from_single_file "
            "fetches it at the first load); the pipeline's other components come from the model itself"
        )

    def needs_download(self, quantization: Quantization) -> bool:
        """A Hub file (``https://huggingface.co/REPO/blob/REVISION/FILE``) not in the Hub's cache."""
        hub = re.fullmatch(
            r"https://huggingface\.co/([^/]+/[^/]+)/(?:blob|resolve)/([^/]+)/(.+)", quantization.file or ""
        )
        if hub is None:
            return False
        from huggingface_hub import try_to_load_from_cache

        return not isinstance(try_to_load_from_cache(hub[1], hub[3], revision=hub[2]), str)

    def linear_bytes(self, quantization: Quantization, k: dict[str, Any]) -> tuple[float, float]:
        return bits_per_weight(file_type(quantization)) / 8, 0

    def stored_bytes(self, quantization: Quantization, component: Any, compute_bytes: int) -> float | None:
        """Exact from a local file's header: packed tensors at their bytes, the F32/F16 ones at the
        pipeline's dtype (diffusers casts them as it loads them)."""
        header = local_header(quantization)
        if header is None:
            return None
        return sum(t.nbytes if t.packed else t.elements * compute_bytes for t in header.tensors)

    def speed_key(self, quantization: Quantization) -> str:
        bits = bits_per_weight(file_type(quantization))
        return next(key for floor, key, _ in TIERS if bits >= floor)

    def lora_problem(self, quantization: Quantization, fuse: bool) -> tuple[str, str] | None:
        """A GGUF layer is a Linear whose weight holds the file's blocks as bytes: peft wraps it in a plain
        LoRA Linear, which runs unfused, but fusing adds a (out x in) change to a (out x bytes) tensor
        (run here, Q8_0 and Q4_0: "The size of tensor a (272) must match the size of tensor b (256)")."""
        if fuse:
            return (
                "a GGUF weight is stored as its file's bytes; fusing a LoRA into it fails on the shapes "
                "(peft adds an out x in change to an out x bytes tensor)",
                "https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/layer.py",
            )
        return None

    def quality_cost(self, quantization: Quantization) -> tuple[str, str]:
        bits = bits_per_weight(file_type(quantization))
        return next(cost for floor, _, cost in TIERS if bits >= floor), QUANT_BLOG

    def probe_rows(
        self, packages: dict[str, str | None]
    ) -> dict[str, tuple[Callable[[str], OptimizationConfig], str]]:
        example = transformer_example(GGUF, file="flux1-dev-Q8_0.gguf")
        return {GGUF: (example, f"gguf {packages.get(self.package)}: GGUF checkpoints load through from_single_file")}

    def load(self, config: OptimizationConfig, components: Any) -> Loading:
        q = config.quantization
        (name,) = q.components
        class_name = components.layout.class_name(name)
        kwargs: dict[str, Any] = {
            "quantization_config": Expr(
                f"GGUFQuantizationConfig(compute_dtype={dtype_expr(config.dtype).code})", None
            ),
        }
        if components.model:  # its config from the model it belongs to, not guessed from the file's keys
            kwargs.update(config=components.model, subfolder=name)
        kwargs["torch_dtype"] = dtype_expr(config.dtype)
        if loads_onto_device(config):  # the pipeline loads onto the card; a component handed to it stays where it is
            kwargs["device"] = config.device
        file = str(local_file(q) or q.file)

        def build() -> Any:
            from diffusers import GGUFQuantizationConfig

            arguments = runtime_value({k: v for k, v in kwargs.items() if k != "quantization_config"})
            quantizing = GGUFQuantizationConfig(compute_dtype=dtype_expr(config.dtype).evaluate())
            return components.cls(name).from_single_file(file, quantization_config=quantizing, **arguments)

        imports = (f"from diffusers import {class_name}", "from diffusers import GGUFQuantizationConfig")
        code = f"{name} = " + call_source(f"{class_name}.from_single_file", (file,), kwargs)
        return Loading(name, name, imports, code, build)


GGUF_BACKEND = Gguf()
