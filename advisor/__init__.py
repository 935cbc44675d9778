"""advisor: find, and prove by measurement, the fastest way to run a diffusers pipeline in your memory.

>>> import advisor
>>> pipe = advisor.load_pipeline(model, advisor.load_config("advisor.json"))  # doctest: +SKIP

Importing this package is cheap: the public names below are imported on first use, and torch,
diffusers and optuna only by the functions that measure or apply.
"""

from importlib import import_module
from typing import Any

from advisor.errors import (
    AdvisorError,
    ConfigError,
    EstimateError,
    HardwareError,
    ModelError,
    TuneError,
    UsageError,
)
from advisor.units import format_size, parse_size


__version__ = "0.1.0"

# name -> module it lives in, imported when the name is first used
_LAZY = {
    "MachineProfile": "advisor.probe.hardware",
    "apply_config": "advisor.run.apply",
    "pipeline_kwargs": "advisor.run.quantize",
    "OptimizationConfig": "advisor.config",
    "load_config": "advisor.config",
    "load_pipeline": "advisor.run.apply",
    "probe_machine": "advisor.probe.hardware",
}

__all__ = [
    "AdvisorError",
    "ConfigError",
    "EstimateError",
    "HardwareError",
    "MachineProfile",
    "ModelError",
    "OptimizationConfig",
    "TuneError",
    "UsageError",
    "apply_config",
    "format_size",
    "load_config",
    "load_pipeline",
    "parse_size",
    "pipeline_kwargs",
    "probe_machine",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'advisor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
