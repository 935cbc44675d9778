"""advisor: find, and prove by measurement, the fastest way to run a diffusers pipeline in your memory.

Importing this package is cheap: torch, diffusers and optuna are imported only by the functions
that measure or apply.
"""

from advisor.apply import load_pipeline
from advisor.config import OptimizationConfig, load_config
from advisor.errors import (
    AdvisorError,
    ConfigError,
    EstimateError,
    HardwareError,
    ModelError,
    TuneError,
    UsageError,
)
from advisor.hardware import MachineProfile, probe_machine
from advisor.units import format_size, parse_size

__version__ = "0.1.0"

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
    "format_size",
    "load_config",
    "load_pipeline",
    "parse_size",
    "probe_machine",
]
