"""The machine a config would run on, and the shape of a limit of it: the base of every constraint.

`Platform` says what the constraints care about (accelerator, compute capability, installed
packages); a `Constraint` is one limit, a function ``(config, platform) -> message | None`` with its
name, config key, reason and source. Constraints live with what they limit: a lever's in its module
(`advisor.levers`), the rest in `advisor.constraints`, which checks a config against them all.
Pure Python: no torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Mapping

from advisor.config import OptimizationConfig
from advisor.units import parse_capability


# The operating systems a CUDA plan is made for (macOS has no CUDA: a plan for it is a CPU plan).
OPERATING_SYSTEMS = ("linux", "windows")


def this_os() -> str:
    """This machine's operating system, as plans name it: "windows", "darwin" or "linux"."""
    if sys.platform.startswith("win"):
        return "windows"
    return "darwin" if sys.platform == "darwin" else "linux"


@dataclass(frozen=True)
class Platform:
    """The machine a config would run on, as far as the constraints care.

    ``packages`` are installed versions (distribution name -> version or None); ``None`` as a whole
    means unknown, as when planning for another machine: package checks then pass.
    """

    accelerator: str | None  # "cuda", or None for a CPU-only machine
    compute_capability: str | None  # of the GPU the config targets, e.g. "8.9"
    packages: Mapping[str, str | None] | None
    cuda_devices: int = 1
    no_cuda: str = "the target has no CUDA GPU"  # how messages say there is none
    offline: bool = False  # HF_HUB_OFFLINE: nothing can be downloaded (the attention hub kernels)
    os: str = "linux"  # `OPERATING_SYSTEMS`, or "darwin"

    @property
    def capability(self) -> float:
        return parse_capability(self.compute_capability)

    def missing(self, package: str) -> bool:
        """True only when the installed packages are known and `package` is not among them."""
        return self.packages is not None and not self.packages.get(package)

    @classmethod
    def of_target(
        cls,
        device: str,
        compute_capability: str | None,
        packages: Mapping[str, str | None] | None,
        os: str = "linux",
    ) -> Platform:
        """The platform of a planning target (`advisor.probe.target.TargetHardware`)."""
        return cls("cuda" if device == "cuda" else None, compute_capability, packages, os=os)

    @classmethod
    def anywhere(cls) -> Platform:
        """A machine that has everything: only what no machine can run violates a constraint here."""
        return cls("cuda", "99.0", None, cuda_devices=2**31)


@dataclass(frozen=True)
class Constraint:
    """A limit of the hardware or the libraries: its name, the config key it is about, why, and the source."""

    name: str
    key: str
    reason: str
    source: str
    check: Callable[[OptimizationConfig, Platform], str | None]


@dataclass(frozen=True)
class Violation:
    constraint: Constraint
    message: str  # one line naming the key and the way out


def constraint(name: str, key: str, reason: str, source: str, *, into: list[Constraint]) -> Callable:
    """Register a constraint in `into`; the decorated function keeps working on its own (for tests)."""

    def register(fn: Callable[[OptimizationConfig, Platform], str | None]) -> Callable:
        into.append(Constraint(name, key, reason, source, fn))
        return fn

    return register


def on_cuda(config: OptimizationConfig, platform: Platform) -> bool:
    """Whether `config` runs on the platform's CUDA GPU."""
    return platform.accelerator == "cuda" and config.device.startswith("cuda")


def version_tuple(text: str | None) -> tuple[int, ...]:
    """A version as numbers to compare ("2.6.3.post1+cu124" -> (2, 6, 3))."""
    parts = []
    for piece in (text or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
