"""The sections of a config: one frozen dataclass per part of `advisor.config.OptimizationConfig`.

Each checks its own choices and combinations when built (`advisor.schema.Section`); the config
itself, the file format's version and loading a file are `advisor.config`.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from advisor.schema import STRICT, Section, at_least_one


Dtype = Literal["bfloat16", "float16", "float32"]
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}  # bytes per parameter at each compute dtype
QuantBackend = Literal["bitsandbytes_4bit", "bitsandbytes_8bit", "torchao", "gguf", "quanto", "sdnq"]
QuantoWeights = Literal["int8", "int4", "int2", "float8"]
# The weight dtypes sdnq's SDNQConfig recommends (sdnq 0.2.8, sdnq/quantizer.py).
SdnqWeights = Literal[
    "int8",
    "int7",
    "int6",
    "uint5",
    "uint4",
    "uint3",
    "uint2",
    "float8_e4m3fn",
    "float7_e3m3fn",
    "float6_e3m2fn",
    "float5_e2m2fn",
    "float4_e2m1fn",
    "float3_e1m1fn",
    "float2_e1m0fn",
]
WEIGHTS_OF = {"quanto": typing.get_args(QuantoWeights), "sdnq": typing.get_args(SdnqWeights)}
TorchaoScheme = Literal["int8_weight_only", "int8_dynamic", "float8_weight_only", "float8_dynamic", "int4_weight_only"]
OffloadStrategy = Literal["none", "model", "group", "sequential"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass(frozen=True)
class Quantization(Section):
    """Quantized weights: converted at load time (diffusers' ``PipelineQuantizationConfig``), or a
    pre-quantized checkpoint loaded in place of a component's weights.

    ``bitsandbytes_4bit`` uses nf4 (or fp4) with ``compute_dtype``; ``torchao`` uses ``scheme``;
    ``gguf`` loads ``file`` (a local path or a Hub file URL; its type, Q8_0 or Q4_K_S, is in its name)
    as the one component named; ``quanto`` (optimum-quanto, deprecated in diffusers) and ``sdnq``
    (SD.Next's quantizer) use ``weights``, each from its own list.
    """

    _key = "quantization."

    backend: QuantBackend
    components: list[str]
    quant_type: Literal["nf4", "fp4"] | None = None  # bitsandbytes_4bit only; default nf4
    double_quant: bool = False  # bitsandbytes_4bit only: quantize the block scales too
    scheme: TorchaoScheme | None = None  # torchao only; default int8_weight_only
    file: str | None = None  # gguf only: the checkpoint, a local path or a Hub file URL
    weights: QuantoWeights | SdnqWeights | None = None  # quanto or sdnq only; default int8

    def _check(self) -> None:
        at_least_one("quantization.components", self.components)
        if self.backend == "gguf" and (not self.file or len(self.components) != 1):
            raise ValueError("`quantization.backend: gguf` needs `quantization.file` and exactly one component")
        if self.file is not None and self.backend != "gguf":
            raise ValueError(f"`quantization.file` is for gguf, not {self.backend}")
        if self.weights is not None and self.backend not in WEIGHTS_OF:
            raise ValueError(f"`quantization.weights` is for quanto or sdnq, not {self.backend}")
        if self.weights is not None and self.weights not in WEIGHTS_OF[self.backend]:
            valid = ", ".join(WEIGHTS_OF[self.backend])
            raise ValueError(f"`quantization.weights: {self.weights}` is not one of {self.backend}'s: {valid}")
        if self.quant_type is not None and self.backend != "bitsandbytes_4bit":
            raise ValueError(f"`quantization.quant_type` is for bitsandbytes_4bit, not {self.backend}")
        if self.double_quant and self.backend != "bitsandbytes_4bit":
            raise ValueError(f"`quantization.double_quant` is for bitsandbytes_4bit, not {self.backend}")
        if self.scheme is not None and self.backend != "torchao":
            raise ValueError(f"`quantization.scheme` is for torchao, not {self.backend}")

    @property
    def kind(self) -> str:
        """What the weights become: nf4, fp4, int8, or the torchao scheme."""
        if self.backend == "bitsandbytes_4bit":
            return self.quant_type or "nf4"
        if self.backend == "bitsandbytes_8bit":
            return "int8"
        if self.backend in WEIGHTS_OF:
            return f"{self.backend} {self.weights or 'int8'}"
        if self.backend == "gguf":
            named = self.gguf_type_in_name
            return f"GGUF {named}" if named else "GGUF"
        return self.scheme or "int8_weight_only"

    @property
    def gguf_type_in_name(self) -> str | None:
        """The type a GGUF file's name says (``flux1-dev-Q4_K_S.gguf`` -> Q4_K_S), as city96's files
        and llama.cpp's name them; None where it says none."""
        words = re.split(r"[-.]", Path(self.file or "").stem)
        named = [w.upper() for w in words if re.fullmatch(r"(?i)I?Q\d(_[a-z0-9]+)*|BF16|F16|F32", w)]
        return named[-1] if named else None

    def label(self) -> str:
        return f"{self.kind}({', '.join(self.components)})"


@dataclass(frozen=True)
class LayerwiseCasting(Section):
    """Store weights in fp8 and upcast per layer at compute time (``enable_layerwise_casting``)."""

    _key = "layerwise_casting."

    components: list[str]
    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2"] = "float8_e4m3fn"

    def _check(self) -> None:
        at_least_one("layerwise_casting.components", self.components)


@dataclass(frozen=True)
class Offload(Section):
    """Where weights live between uses.

    - ``model``: whole components move to the GPU one at a time (``enable_model_cpu_offload``).
    - ``group``: groups of blocks (``block_level``) or single layers (``leaf_level``) move just in
      time (``enable_group_offload``); ``use_stream`` prefetches the next group on a CUDA stream.
    - ``sequential``: every layer moves at every use (``enable_sequential_cpu_offload``).

    Partial offload is group offload with ``resident_blocks``: of each component named there, that
    many repeated blocks (the largest first) stay on the device; only the other blocks (and the
    small modules outside the block lists) are group-offloaded, so only they cross PCIe.

    ``device_map: balanced`` (no offload only): the components spread over the machine's GPUs, each
    whole on one (``from_pretrained(device_map="balanced")``; since schema version 6).
    """

    _key = "offload."

    strategy: OffloadStrategy = "none"
    offload_type: Literal["block_level", "leaf_level"] = "block_level"
    num_blocks_per_group: int = 1
    use_stream: bool = False
    record_stream: bool = False
    non_blocking: bool = False
    low_cpu_mem_usage: bool = False
    offload_to_disk_path: str | None = None
    components: list[str] | None = None  # group offload: which components (None = every one)
    resident_blocks: dict[str, int] | None = None  # group offload: component -> blocks kept on the device
    device_map: Literal["balanced"] | None = None  # no offload: components spread over the GPUs

    @property
    def hooks_blocks(self) -> bool:
        """Whether hooks on the blocks themselves move their weights in (group and sequential
        offload), so that a block that is not called is not onloaded either."""
        return self.strategy in ("group", "sequential")

    def _check(self) -> None:
        if self.num_blocks_per_group < 1:
            raise ValueError(f"`offload.num_blocks_per_group: {self.num_blocks_per_group}` must be at least 1")
        if self.record_stream and not self.use_stream:
            raise ValueError("`offload.record_stream` needs `offload.use_stream: true`")
        group_only = {
            "use_stream": self.use_stream,
            "low_cpu_mem_usage": self.low_cpu_mem_usage,
            "offload_to_disk_path": self.offload_to_disk_path,
        }
        if self.components is not None and self.strategy != "group":
            raise ValueError(f"`offload.components` applies to `strategy: group` only, not {self.strategy!r}")
        if self.strategy != "group":
            for key, value in {**group_only, "resident_blocks": self.resident_blocks}.items():
                if value:
                    raise ValueError(f"`offload.{key}` applies to `strategy: group` only, not {self.strategy!r}")
        if self.resident_blocks:
            self._check_resident_blocks(self.resident_blocks)
        if self.device_map and self.strategy != "none":
            raise ValueError(
                f"`offload.device_map: {self.device_map}` places whole components on GPUs: it goes with "
                f"`strategy: none`, not {self.strategy!r} (diffusers refuses model and sequential offload on a "
                "device-mapped pipeline)"
            )

    def _check_resident_blocks(self, resident: dict[str, int]) -> None:
        if self.offload_type != "block_level":
            raise ValueError(
                "`offload.resident_blocks` keeps whole blocks resident; it needs `offload.offload_type: block_level`"
            )
        for name, count in resident.items():
            if isinstance(count, bool) or count < 1:
                raise ValueError(f"`offload.resident_blocks.{name}: {count}` must be a whole number of blocks >= 1")
            if self.components is not None and name not in self.components:
                raise ValueError(
                    f"`offload.resident_blocks` names {name!r}, which `offload.components` does not offload"
                )

    def label(self) -> str:
        if self.strategy == "none":
            return "no offload, components over the GPUs" if self.device_map else "no offload"
        if self.strategy != "group":
            return f"{self.strategy} offload"
        level = f"block x{self.num_blocks_per_group}" if self.offload_type == "block_level" else "leaf"
        extras = [name for name, on in (("stream", self.use_stream), ("low-RAM", self.low_cpu_mem_usage)) if on]
        extras += ["disk"] if self.offload_to_disk_path else []
        if self.resident_blocks:
            resident = ", ".join(f"{count} {name} blocks" for name, count in self.resident_blocks.items())
            return f"partial offload ({resident} resident, the rest {', '.join([level, *extras])})"
        return f"group offload ({', '.join([level, *extras])})"


@dataclass(frozen=True)
class Compile(Section):
    """``torch.compile`` on components, with the dynamo flags the combination needs."""

    _key = "compile."

    components: list[str] = field(default_factory=lambda: ["transformer"])
    regional: bool = True  # compile_repeated_blocks: much shorter compile, similar speed-up
    mode: CompileMode | None = None
    fullgraph: bool = True
    dynamic: bool | None = None
    backend: str = "inductor"
    # torch._dynamo.config values; e.g. capture_dynamic_output_shape_ops for bitsandbytes,
    # cache_size_limit=1000 with offloading.
    dynamo_config: dict[str, int | bool] = field(default_factory=dict)

    def _check(self) -> None:
        at_least_one("compile.components", self.components)


@dataclass(frozen=True)
class Vae(Section):
    _key = "vae."

    tiling: bool = False
    slicing: bool = False


# What a config's `cache` takes for each kind, with the default it gets when it gives none (None:
# required). First Block Cache: 0.08, the milder published threshold; MagCache: MagCacheConfig's
# defaults, over the steps the pipeline runs; TaylorSeer: the diffusers cache guide's example
# (`advisor.levers.step_cache`).
CACHE_SETTINGS = {
    "first_block": {"threshold": 0.08},
    "mag": {"threshold": 0.06, "steps": None, "max_skip_steps": 3, "retention_ratio": 0.2},
    "taylorseer": {"interval": 5, "warmup_steps": 10},
}


@dataclass(frozen=True)
class Cache(Section):
    """Step caching of the denoiser(s) (``enable_cache``); lossy; see `advisor.levers.step_cache`.

    - ``first_block``: First Block Cache runs the first block at every step and skips the rest while
      its output changed by less than ``threshold`` (relative) since the last full step.
    - ``mag``: MagCache skips whole steps while the model's calibrated magnitude ratios have drifted
      by less than ``threshold`` in total (at most ``max_skip_steps`` in a row, none in the first
      ``retention_ratio`` of the steps); ``steps``: the denoising steps the pipeline runs, which the
      ratios are laid over (required).
    - ``taylorseer``: TaylorSeer (lite mode) computes the first ``warmup_steps`` steps, then every
      ``interval``-th, and predicts the denoiser's output on the others.
    """

    _key = "cache."

    kind: Literal["first_block", "mag", "taylorseer"] = "first_block"
    threshold: float | None = None  # first_block (default 0.08) and mag (default 0.06, MagCache's)
    steps: int | None = None  # mag, required
    max_skip_steps: int | None = None  # mag; default 3
    retention_ratio: float | None = None  # mag; default 0.2
    interval: int | None = None  # taylorseer; default 5
    warmup_steps: int | None = None  # taylorseer; default 10

    def _check(self) -> None:
        """Each setting belongs to some kinds (`CACHE_SETTINGS`); a kind's own settings
        left out take their defaults, written out, so the config says what runs."""
        own = CACHE_SETTINGS[self.kind]
        for key in ("threshold", "steps", "max_skip_steps", "retention_ratio", "interval", "warmup_steps"):
            value = getattr(self, key)
            if key not in own:
                if value is not None:
                    kinds = [kind for kind, settings in CACHE_SETTINGS.items() if key in settings]
                    raise ValueError(
                        f"`cache.{key}` is for kind{'s' * (len(kinds) > 1)} {' and '.join(kinds)}, not {self.kind}"
                    )
            elif value is None:
                if own[key] is None:  # only MagCache's steps
                    raise ValueError(
                        f"`cache.{key}` is required for kind {self.kind}: the denoising steps the pipeline "
                        "runs (its ratios are laid over them)"
                    )
                object.__setattr__(self, key, own[key])
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"`cache.threshold: {self.threshold}` must be above 0 and at most 1")
        for key in (
            "steps",
            "max_skip_steps",
            "interval",
            "warmup_steps",
        ):  # warmup: TaylorSeer predicts from computed steps
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"`cache.{key}: {getattr(self, key)}` must be at least 1")
        if self.retention_ratio is not None and not 0 <= self.retention_ratio <= 1:
            raise ValueError(f"`cache.retention_ratio: {self.retention_ratio}` must be between 0 and 1")

    def label(self) -> str:
        if self.kind == "mag":
            return f"MagCache {self.threshold:g}"
        if self.kind == "taylorseer":
            return f"TaylorSeer lite (every {self.interval} after {self.warmup_steps})"
        return f"first-block cache {self.threshold:g}"


# How a LoRA file lays out its keys, as `advisor.probe.lora` reads them; "assumed": no file, the
# rank the user gave (--lora-rank) on every Linear of the denoiser.
LoraFormat = Literal["diffusers", "kohya", "xlabs", "original", "assumed"]


@dataclass(frozen=True)
class LoraAdapter(Section):
    """One LoRA the plan was made for, as its file's header describes it (`advisor.probe.lora`):
    per component (as the pipeline names it), the layers it targets, its parameters and the output
    features of those layers (what an unfused adapter adds to each call)."""

    _key = "lora.adapters."

    source: str  # a local file (its absolute path), a Hub file ("repo/name/file.safetensors"), or the rank assumed
    rank: int  # the largest rank among its layers
    layers: dict[str, int]
    parameters: dict[str, int]
    outputs: dict[str, int]
    format: LoraFormat = "diffusers"
    scale: float = 1.0
    file_bytes: int | None = None
    # sha256 of the file's header, first 64 KiB and size: a file that differs from the planned one is refused
    digest: str | None = None

    def _check(self) -> None:
        if self.rank < 1:
            raise ValueError(f"`lora.adapters.rank: {self.rank}` must be at least 1")
        if not self.layers or set(self.layers) != set(self.parameters) or set(self.layers) != set(self.outputs):
            raise ValueError("`lora.adapters` must name the same components in `layers`, `parameters` and `outputs`")


@dataclass(frozen=True)
class Lora(Section):
    """The user's LoRAs and how they are run (`advisor.levers.lora`).

    ``fuse``: merged into the weights once loaded (``fuse_lora``, then the adapters unloaded): no
    cost per step, but neither swappable nor re-scalable. ``hotswap_rank``: ``enable_lora_hotswap
    (target_rank=...)`` before the first load, so that a compiled model takes another LoRA of at
    most that rank without recompiling. ``swap``: the user loads other LoRAs between calls.
    """

    _key = "lora."

    adapters: list[LoraAdapter]
    swap: bool = False
    fuse: bool = False
    hotswap_rank: int | None = None

    def _check(self) -> None:
        at_least_one("lora.adapters", self.adapters)
        if self.fuse and self.swap:
            raise ValueError("`lora.fuse` merges the adapters into the weights; it cannot go with `lora.swap`")
        if self.hotswap_rank is not None:
            largest = max(adapter.rank for adapter in self.adapters)
            if self.hotswap_rank < largest:
                raise ValueError(
                    f"`lora.hotswap_rank: {self.hotswap_rank}` is below the largest adapter rank ({largest}); "
                    "hotswapping pads every adapter to it"
                )
            if self.fuse:
                raise ValueError("`lora.hotswap_rank` keeps the adapters swappable; it cannot go with `lora.fuse`")
            scaled = [adapter.source for adapter in self.adapters if adapter.scale != 1]
            if scaled:
                raise ValueError(
                    f"`lora.hotswap_rank` with a scale other than 1 ({scaled[0]}): a hotswap sets each layer's scale "
                    "from the new LoRA's alpha and rank (peft/utils/hotswap.py), so the scale would not survive it"
                )

    @property
    def rank(self) -> int:
        return max(adapter.rank for adapter in self.adapters)

    def label(self) -> str:
        count = len(self.adapters)
        what = f"{count} LoRA{'s' * (count > 1)} (rank {self.rank})"
        if self.fuse:
            return f"{what} fused"
        return f"{what} hotswappable to rank {self.hotswap_rank}" if self.hotswap_rank else f"{what} unfused"


@dataclass(frozen=True)
class ContextParallel(Section):
    """One generation's denoiser split over `degree` GPUs by its sequence, one process per GPU under
    ``torchrun`` (diffusers' ``ContextParallelConfig``; `advisor.levers.multi_gpu.context_parallel`).

    ``ulysses``: each attention swaps sequence shards for head shards (all-to-all), so the heads must
    divide by the degree; ``ring``: each GPU gathers the others' keys and values, which needs an
    attention backend that returns the log-sum-exp (not ``native``).
    """

    _key = "context_parallel."

    degree: int
    kind: Literal["ulysses", "ring"] = "ulysses"

    def _check(self) -> None:
        if self.degree < 2:
            raise ValueError(f"`context_parallel.degree: {self.degree}` must be at least 2 (the GPUs it splits over)")

    def label(self) -> str:
        return f"context parallel ({self.kind}) over {self.degree} GPUs"


@dataclass(frozen=True)
class Replicas(Section):
    """One pipeline per GPU, each making its share of the job's images (`advisor.levers.multi_gpu.replicas`)."""

    _key = "replicas."

    count: int

    def _check(self) -> None:
        if self.count < 2:
            raise ValueError(f"`replicas.count: {self.count}` must be at least 2 (one pipeline per GPU)")

    def label(self) -> str:
        return f"one pipeline per GPU on {self.count} GPUs"


@dataclass(frozen=True)
class Provenance(Section):
    """Where a config came from: what it was made for, by what, and (from tune) what it measured."""

    _key = "provenance."
    __pydantic_config__ = {**STRICT, "strict": False}

    made_by: Literal["recommend", "tune", "user"] = "user"
    model: str | None = None
    pipeline_class: str | None = None
    components: list[str] | None = None
    workload: dict[str, Any] | None = None
    gpu_name: str | None = None
    gpu_count: int | None = None  # cards of gpu_name it was planned for (since schema version 6)
    vram_bytes: int | None = None
    ram_bytes: int | None = None  # the host RAM it was planned for (since schema version 2)
    os: str | None = None  # the operating system it was planned for (since 2)
    generations: int | None = None  # per process, that compile's warm-up was weighed over (since 2)
    images: int | None = None  # the job it was planned for, shared out over one pipeline per GPU (since 6)
    budget_bytes: int | None = None
    packages: dict[str, str | None] | None = None
    created: str | None = None
    estimate: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None  # latency_s, peak_vram_bytes, ... from tune
    assumptions: list[str] | None = None  # values assumed about a machine the advisor could not see
    quality: Literal["exact", "balanced", "fast"] | None = None  # the quality policy it was chosen under
