"""OptimizationConfig: the one schema that `recommend` and `tune` emit and code applies.

A config is plain data (pydantic, strict: unknown keys and wrong types are refused with the key's
path) plus provenance. Impossible combinations are refused at load time, not when a pipeline is
half set up. This module is pure data: no torch, nothing of the run tier. Applying a config is
`advisor.apply_config(pipe, config)` or `advisor.load_pipeline(model, config)` (`advisor.run.apply`).

>>> config = OptimizationConfig(quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"]))
>>> config.summary()
'bf16, nf4(transformer), no offload'
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advisor.errors import ConfigError
from advisor.files import json_type, read_json, write_text_atomic

SCHEMA_VERSION = 1

Dtype = Literal["bfloat16", "float16", "float32"]
QuantBackend = Literal["bitsandbytes_4bit", "bitsandbytes_8bit", "torchao"]
TorchaoScheme = Literal["int8_weight_only", "int8_dynamic", "float8_weight_only", "float8_dynamic", "int4_weight_only"]
OffloadStrategy = Literal["none", "model", "group", "sequential"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# The devices a config can name: what the planner and `apply` know how to place a pipeline on.
_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")
VALID_DEVICES = "cpu, cuda or cuda:N (N the CUDA device index, e.g. cuda:1)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Quantization(_Strict):
    """Weight quantization at load time (diffusers' ``PipelineQuantizationConfig``).

    ``bitsandbytes_4bit`` uses nf4 (or fp4) with ``compute_dtype``; ``torchao`` uses ``scheme``.
    """

    backend: QuantBackend
    components: list[str] = Field(min_length=1)
    quant_type: Literal["nf4", "fp4"] | None = None  # bitsandbytes_4bit only; default nf4
    double_quant: bool = False  # bitsandbytes_4bit only: quantize the block scales too
    scheme: TorchaoScheme | None = None  # torchao only; default int8_weight_only

    @model_validator(mode="after")
    def _check(self) -> Quantization:
        if self.quant_type is not None and self.backend != "bitsandbytes_4bit":
            raise ValueError(f"`quantization.quant_type` is for bitsandbytes_4bit, not {self.backend}")
        if self.double_quant and self.backend != "bitsandbytes_4bit":
            raise ValueError(f"`quantization.double_quant` is for bitsandbytes_4bit, not {self.backend}")
        if self.scheme is not None and self.backend != "torchao":
            raise ValueError(f"`quantization.scheme` is for torchao, not {self.backend}")
        return self

    @property
    def kind(self) -> str:
        """What the weights become: nf4, fp4, int8, or the torchao scheme."""
        if self.backend == "bitsandbytes_4bit":
            return self.quant_type or "nf4"
        if self.backend == "bitsandbytes_8bit":
            return "int8"
        return self.scheme or "int8_weight_only"

    def label(self) -> str:
        return f"{self.kind}({', '.join(self.components)})"


class LayerwiseCasting(_Strict):
    """Store weights in fp8 and upcast per layer at compute time (``enable_layerwise_casting``)."""

    components: list[str] = Field(min_length=1)
    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2"] = "float8_e4m3fn"


class Offload(_Strict):
    """Where weights live between uses.

    - ``model``: whole components move to the GPU one at a time (``enable_model_cpu_offload``).
    - ``group``: groups of blocks (``block_level``) or single layers (``leaf_level``) move just in
      time (``enable_group_offload``); ``use_stream`` prefetches the next group on a CUDA stream.
    - ``sequential``: every layer moves at every use (``enable_sequential_cpu_offload``).

    Partial offload is group offload with ``resident_blocks``: of each component named there, that
    many repeated blocks (the largest first) stay on the device; only the other blocks (and the
    small modules outside the block lists) are group-offloaded, so only they cross PCIe.
    """

    strategy: OffloadStrategy = "none"
    offload_type: Literal["block_level", "leaf_level"] = "block_level"
    num_blocks_per_group: int = Field(default=1, ge=1)
    use_stream: bool = False
    record_stream: bool = False
    non_blocking: bool = False
    low_cpu_mem_usage: bool = False
    offload_to_disk_path: str | None = None
    components: list[str] | None = None  # group offload: which components (None = every one)
    resident_blocks: dict[str, int] | None = None  # group offload: component -> blocks kept on the device

    @model_validator(mode="after")
    def _check(self) -> Offload:
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
        return self

    def _check_resident_blocks(self, resident: dict[str, int]) -> None:
        if self.offload_type != "block_level":
            raise ValueError("`offload.resident_blocks` keeps whole blocks resident; it needs `offload.offload_type: block_level`")
        for name, count in resident.items():
            if isinstance(count, bool) or count < 1:
                raise ValueError(f"`offload.resident_blocks.{name}: {count}` must be a whole number of blocks >= 1")
            if self.components is not None and name not in self.components:
                raise ValueError(f"`offload.resident_blocks` names {name!r}, which `offload.components` does not offload")

    def label(self) -> str:
        if self.strategy == "none":
            return "no offload"
        if self.strategy != "group":
            return f"{self.strategy} offload"
        level = f"block x{self.num_blocks_per_group}" if self.offload_type == "block_level" else "leaf"
        extras = [name for name, on in (("stream", self.use_stream), ("low-RAM", self.low_cpu_mem_usage)) if on]
        extras += ["disk"] if self.offload_to_disk_path else []
        if self.resident_blocks:
            resident = ", ".join(f"{count} {name} blocks" for name, count in self.resident_blocks.items())
            return f"partial offload ({resident} resident, the rest {', '.join([level, *extras])})"
        return f"group offload ({', '.join([level, *extras])})"


class Compile(_Strict):
    """``torch.compile`` on components, with the dynamo flags the combination needs."""

    components: list[str] = Field(default_factory=lambda: ["transformer"], min_length=1)
    regional: bool = True  # compile_repeated_blocks: much shorter compile, similar speed-up
    mode: CompileMode | None = None
    fullgraph: bool = True
    dynamic: bool | None = None
    backend: str = "inductor"
    # torch._dynamo.config values; e.g. capture_dynamic_output_shape_ops for bitsandbytes,
    # cache_size_limit=1000 with offloading.
    dynamo_config: dict[str, int | bool] = Field(default_factory=dict)


class Vae(_Strict):
    tiling: bool = False
    slicing: bool = False


class Cache(_Strict):
    """Step caching of the denoiser(s) (``enable_cache``): First Block Cache runs the first block at
    every step and skips the rest while its output barely changes (``threshold``: the relative
    change below which a step is skipped). Lossy; see `advisor.caching`."""

    kind: Literal["first_block"] = "first_block"
    threshold: float = Field(default=0.08, gt=0, le=1)

    def label(self) -> str:
        return f"first-block cache {self.threshold:g}"


class Provenance(_Strict):
    """Where a config came from: what it was made for, by what, and (from tune) what it measured."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    made_by: Literal["recommend", "tune", "user"] = "user"
    model: str | None = None
    pipeline_class: str | None = None
    components: list[str] | None = None
    workload: dict[str, Any] | None = None
    gpu_name: str | None = None
    vram_bytes: int | None = None
    budget_bytes: int | None = None
    packages: dict[str, str | None] | None = None
    created: str | None = None
    estimate: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None  # latency_s, peak_vram_bytes, ... from tune
    assumptions: list[str] | None = None  # values assumed about a machine the advisor could not see
    quality: Literal["exact", "balanced", "fast"] | None = None  # the quality policy it was chosen under


class OptimizationConfig(_Strict):
    """Everything that decides how a pipeline is loaded and run. See docs/config.md."""

    schema_version: Literal[1] = SCHEMA_VERSION
    dtype: Dtype = "bfloat16"
    device: str = "cuda"
    quantization: Quantization | None = None
    layerwise_casting: LayerwiseCasting | None = None
    offload: Offload = Field(default_factory=Offload)
    compile: Compile | None = None
    vae: Vae = Field(default_factory=Vae)
    attention_backend: str | None = None
    cache: Cache | None = None
    channels_last: bool = False
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.match(device):
            raise ValueError(f"`device: {device!r}` is not a device the advisor places pipelines on; use {VALID_DEVICES}")
        return device

    @model_validator(mode="after")
    def _check(self) -> OptimizationConfig:
        if self.quantization and self.layerwise_casting:
            both = set(self.quantization.components) & set(self.layerwise_casting.components)
            if both:
                raise ValueError(
                    f"components {sorted(both)} are both quantized and layerwise-cast; "
                    "`layerwise_casting.components` must not overlap `quantization.components`"
                )
        if self.device == "cpu" and self.offload.strategy in {"model", "sequential"}:
            raise ValueError(f"`offload.strategy: {self.offload.strategy}` moves weights to a GPU; it needs `device: cuda`")
        return self

    def summary(self) -> str:
        """One line for tables: 'bf16, nf4(transformer, text_encoder_2), compiled, model offload'."""
        parts = [_DTYPE_SHORT[self.dtype]]
        if self.quantization:
            parts.append(self.quantization.label())
        if self.layerwise_casting:
            parts.append(f"fp8 storage({', '.join(self.layerwise_casting.components)})")
        if self.compile:
            parts.append("compiled (regional)" if self.compile.regional else "compiled")
        parts.append(self.offload.label())
        parts += [name for name, on in (("VAE tiling", self.vae.tiling), ("VAE slicing", self.vae.slicing)) if on]
        if self.attention_backend is not None:
            parts.append(f"{self.attention_backend} attention")
        if self.cache is not None:
            parts.append(self.cache.label())
        return ", ".join(parts)

    def named_components(self) -> list[tuple[str, str]]:
        """(key, component) for every component the config names, e.g. ("quantization.components", "transformer")."""
        named = []
        for key, section in (
            ("quantization.components", self.quantization),
            ("layerwise_casting.components", self.layerwise_casting),
            ("compile.components", self.compile),
            ("offload.components", self.offload),
        ):
            named += [(key, name) for name in (getattr(section, "components", None) or [])]
        named += [("offload.resident_blocks", name) for name in self.offload.resident_blocks or {}]
        return named

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the config atomically (a crash never leaves half a file), as a plain file write
        would otherwise: the umask's mode, an existing file's mode kept, a symlink followed.

        Raises `OSError` when it can't be written (`advisor.files.write_text_atomic`).
        """
        return write_text_atomic(path, self.to_json())


def config_from_dict(data: Any, *, source: str = "config") -> OptimizationConfig:
    """Validate plain data as a config; errors name the key path and what is valid."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got a JSON {json_type(data)}")
    version = data.get("schema_version")
    if version is None:
        raise ConfigError(f"{source}: missing 'schema_version' (this advisor writes {SCHEMA_VERSION})")
    if isinstance(version, bool) or not isinstance(version, int):  # True == 1 in Python, not in a schema
        shown = json.dumps(version)[:40]
        raise ConfigError(f"{source}: schema_version {shown} is not a version number; this advisor writes {SCHEMA_VERSION}")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise ConfigError(
            f"{source}: schema_version {version!r} is "
            + ("newer than this advisor understands; upgrade advisor" if newer else f"not supported (expected {SCHEMA_VERSION})")
        )
    try:
        return OptimizationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_problem(exc)}") from None


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if "`" in message:  # our own validators already name the keys
        return message
    if error["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    if error["type"] == "literal_error":
        return f"{where}: {message}"
    return f"{where}: {message}" if where else message


def load_config(path: str | Path, *, flag: str | None = None) -> OptimizationConfig:
    """Read a config file written by `advisor recommend -o` or `advisor tune -o`.

    Every problem is one `ConfigError` line naming the file (and `flag`, e.g. ``--config``, when
    given): missing, a folder, unreadable, not JSON, nested absurdly deep, or not a valid config.

    >>> config = load_config("advisor.json")  # doctest: +SKIP
    >>> pipe = DiffusionPipeline.from_pretrained(model, **config.pipeline_kwargs())  # doctest: +SKIP
    """
    source = f"{flag} {path}" if flag else str(path)
    data = read_json(path, error=ConfigError, label=source, missing="no such config file")
    return config_from_dict(data, source=source)
