"""OptimizationConfig: the one schema that `recommend` and `tune` emit and code applies.

A config is plain data: frozen dataclasses plus provenance. A config file is checked against the
schema when it is loaded (pydantic, strict: unknown keys and wrong types are refused with the key's
path); a config built in Python has its choices and combinations checked when it is built. Either
way impossible combinations are refused before a pipeline is half set up. pydantic is imported only
to load a file: building, comparing and writing configs (all that `probe` and `recommend` do) stays
at stdlib cost, which is what keeps those commands instant. This module is pure data: no torch,
nothing of the run tier. Applying a config is `advisor.apply_config(pipe, config)` or
`advisor.load_pipeline(model, config)` (`advisor.run.apply`). The sections are
`advisor.config.sections`, imported here with the config they make up.

>>> config = OptimizationConfig(quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"]))
>>> config.summary()
'bf16, nf4(transformer), no offload'
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from advisor.config.sections import (
    CACHE_SETTINGS,
    DTYPE_BYTES,
    Cache,
    Compile,
    ContextParallel,
    Dtype,
    LayerwiseCasting,
    Lora,
    LoraAdapter,
    Offload,
    Provenance,
    Quantization,
    Replicas,
    Vae,
)
from advisor.errors import ConfigError
from advisor.files import json_type, read_json, write_text_atomic
from advisor.migrations import FIRST_VERSION, upgrade
from advisor.paths import diffusers_tables
from advisor.schema import Section


__all__ = [
    "CACHE_SETTINGS",
    "DTYPE_BYTES",
    "SCHEMA_VERSION",
    "VALID_DEVICES",
    "Cache",
    "Compile",
    "ContextParallel",
    "LayerwiseCasting",
    "Lora",
    "LoraAdapter",
    "Offload",
    "OptimizationConfig",
    "Provenance",
    "Quantization",
    "Replicas",
    "Vae",
    "config_from_dict",
    "load_config",
]

# The config file's format: a change a file can show is a new version and a step in `advisor.migrations`.
SCHEMA_VERSION = 7


_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# The devices a config can name: what the planner and `apply` know how to place a pipeline on.
_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")
VALID_DEVICES = "cpu, cuda or cuda:N (N the CUDA device index, e.g. cuda:1)"


@dataclass(frozen=True)
class OptimizationConfig(Section):
    """Everything that decides how a pipeline is loaded and run. See docs/config.md."""

    schema_version: Literal[SCHEMA_VERSION] = SCHEMA_VERSION
    dtype: Dtype = "bfloat16"
    device: str = "cuda"
    quantization: Quantization | None = None
    layerwise_casting: LayerwiseCasting | None = None
    offload: Offload = field(default_factory=Offload)
    compile: Compile | None = None
    vae: Vae = field(default_factory=Vae)
    attention_backend: str | None = None
    cache: Cache | None = None
    lora: Lora | None = None  # the user's LoRAs and how they run (schema version 5)
    context_parallel: ContextParallel | None = None  # one generation over several GPUs (schema version 6)
    replicas: Replicas | None = None  # one pipeline per GPU (schema version 6)
    channels_last: bool = False
    expandable_segments: bool = False  # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (advisor/levers/allocator.py)
    provenance: Provenance = field(default_factory=Provenance)

    def _check(self) -> None:
        if not _DEVICE.match(self.device):
            raise ValueError(
                f"`device: {self.device!r}` is not a device the advisor places pipelines on; use {VALID_DEVICES}"
            )
        if self.quantization and self.layerwise_casting:
            both = set(self.quantization.components) & set(self.layerwise_casting.components)
            if both:
                raise ValueError(
                    f"components {sorted(both)} are both quantized and layerwise-cast; "
                    "`layerwise_casting.components` must not overlap `quantization.components`"
                )
        if self.device == "cpu" and self.offload.strategy in {"model", "sequential"}:
            raise ValueError(
                f"`offload.strategy: {self.offload.strategy}` moves weights to a GPU; it needs `device: cuda`"
            )
        names = diffusers_tables()["attention_backends"] if self.attention_backend is not None else ()
        if (
            self.attention_backend is not None and self.attention_backend.lower() not in names
        ):  # diffusers reads it case-insensitively
            raise ValueError(
                f"`attention_backend: {self.attention_backend!r}` is not one of diffusers' attention backends "
                f"(diffusers {diffusers_tables()['diffusers_version']}); use native, or one of {', '.join(names)}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizationConfig:
        """A config from plain data (what `to_dict` wrote), checked against the schema; raises
        pydantic's ValidationError (a ValueError). For a file, `load_config` says what is wrong."""
        # Checked as the JSON it is (strict JSON mode takes objects for sections, integers for floats).
        return _schema().validate_json(json.dumps(data))

    @cached_property
    def key(self) -> str:
        """What tells two configs apart (provenance included), for caches and de-duplication: the
        dataclass repr names every field, recursively, in a fixed order."""
        return repr(self)

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
        if self.lora is not None:
            parts.append(self.lora.label())
        parts += [section.label() for section in (self.context_parallel, self.replicas) if section is not None]
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
        adapters = self.lora.adapters if self.lora else []
        named += [("lora.adapters.layers", name) for name in dict.fromkeys(n for a in adapters for n in a.layers)]
        return named

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

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
        raise ConfigError(
            f"{source}: schema_version {shown} is not a version number; this advisor writes {SCHEMA_VERSION}"
        )
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema_version {version} is newer than this advisor understands; upgrade advisor"
        )
    if version < FIRST_VERSION:
        raise ConfigError(f"{source}: schema_version {version} is not supported (the first is {FIRST_VERSION})")
    from pydantic import ValidationError

    try:
        return OptimizationConfig.from_dict(upgrade(data, to=SCHEMA_VERSION))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_problem(exc)}") from None


@functools.cache
def _schema() -> Any:
    """pydantic's validator of the whole config, built at the first file loaded."""
    from pydantic import TypeAdapter

    return TypeAdapter(OptimizationConfig)


def _first_problem(exc: Any) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if "`" in message:  # our own checks already name the keys
        return message
    if error["type"] == "unexpected_keyword_argument":  # a dataclass's unknown key
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
