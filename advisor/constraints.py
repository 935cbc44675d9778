"""What can run where: every hardware and library limit of a configuration, written once.

A constraint is a small function ``(config, platform) -> message | None`` registered with the config
key it is about. The message is the one line a user reads: it names the key, what is wrong here and
the way out. Everyone who needs to know asks this module:

- the rule engine drops candidates that violate one (`advisor.plan.space`);
- `advisor.run.checks.check_machine` refuses a config before any weight loads;
- the probe's backend table (`advisor.probe.hardware.quantization_backends`) says what is usable;
- the GPU kit decides which of its items this GPU can run.

A lever's limits live in its module (`advisor.levers`) and are checked here with these, once. This
module sits above the levers and below the three tiers, so that the probe, the planner and the
runner can all import it. Pure Python: no torch; `platform_here()` reads this machine through torch
only when a config is about to be applied.

>>> platform = Platform(accelerator=None, compute_capability=None, packages=None)
>>> config = OptimizationConfig(quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"]))
>>> first_violation(config, platform).constraint.name
'bitsandbytes-needs-cuda'
"""

from __future__ import annotations

from typing import Callable, Iterator

from advisor.config import OptimizationConfig
from advisor.levers import LEVERS, quantization
from advisor.levers.attention import PACKAGES as ATTENTION_PACKAGES
from advisor.levers.offload import uses_group_offload
from advisor.levers.torch_compile import COMPILER_PACKAGES
from advisor.packages import installed_versions
from advisor.paths import hub_offline
from advisor.platform import Constraint, Platform, Violation, this_os, version_tuple
from advisor.platform import constraint as _constraint


DOCS = "https://huggingface.co/docs/diffusers/main/en/optimization"


def platform_here(device: str = "cuda") -> Platform:
    """This machine as torch sees it, for the GPU `device` names (imports torch)."""
    import torch

    packages = installed_versions(CHECKED_HERE)
    offline = hub_offline()
    if not torch.cuda.is_available():
        no_cuda = f"this machine has no CUDA GPU (torch {torch.__version__})"
        return Platform(None, None, packages, 0, no_cuda, offline, this_os())
    index = _device_index(device)
    count = torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability(index if index < count else 0)
    return Platform("cuda", f"{major}.{minor}", packages, count, offline=offline, os=this_os())


# The packages a constraint asks about: the quantizers', diffusers and the attention kernels'.
CHECKED_HERE = (*quantization.packages(), "diffusers", *ATTENTION_PACKAGES, *COMPILER_PACKAGES)


def _device_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


# The constraints written here, in the order they are checked; each lever's follow (`every_constraint`).
CONSTRAINTS: list[Constraint] = []
# Checked after every other: whether the device exists. One about an option says more on a machine
# without a GPU (`offload.strategy: model` names the option and the way out, not only `device`).
LAST: list[Constraint] = []


def constraint(name: str, key: str, reason: str, source: str) -> Callable:
    """Register a constraint; the decorated function keeps working on its own (for tests)."""
    return _constraint(name, key, reason, source, into=CONSTRAINTS)


def every_constraint() -> list[Constraint]:
    """Every constraint, in the order they are checked: those written here, then each lever's, then
    whether the device exists (`LAST`)."""
    return [*CONSTRAINTS, *(item for lever in LEVERS for item in lever.constraints), *LAST]


def named(name: str) -> Constraint:
    """The registered constraint called `name`."""
    return next(item for item in every_constraint() if item.name == name)


def _violations(config: OptimizationConfig, platform: Platform) -> Iterator[Violation]:
    for item in every_constraint():
        message = item.check(config, platform)
        if message:
            yield Violation(item, message)


def violations(config: OptimizationConfig, platform: Platform) -> list[Violation]:
    """Every constraint `config` breaks on `platform`, in registration order."""
    return list(_violations(config, platform))


def first_violation(config: OptimizationConfig, platform: Platform) -> Violation | None:
    """The first constraint `config` breaks on `platform` (the rest are not evaluated)."""
    return next(_violations(config, platform), None)


# --- placement ----------------------------------------------------------------------------------


@_constraint(
    "device-is-available",
    "device",
    "the device a config names must exist on the machine that applies it",
    "https://pytorch.org/docs/stable/tensor_attributes.html#torch-device",
    into=LAST,
)
def device_is_available(config: OptimizationConfig, platform: Platform) -> str | None:
    if not config.device.startswith("cuda"):
        return None
    if platform.accelerator != "cuda":
        return f"`device: {config.device}` but {platform.no_cuda}; use `device: cpu`"
    if _device_index(config.device) >= platform.cuda_devices:
        return f"`device: {config.device}` but this machine has {platform.cuda_devices} CUDA device(s)"
    return None


@constraint(
    "installed-diffusers-supports-it",
    "compile.regional",
    "the installed diffusers must have the API a config uses (regional compile and group offload "
    "with streams need diffusers >= 0.33; the advisor is tested with 0.42)",
    "https://github.com/huggingface/diffusers/releases",
)
def installed_diffusers_supports_it(config: OptimizationConfig, platform: Platform) -> str | None:
    installed = (platform.packages or {}).get("diffusers")
    if installed is None or version_tuple(installed) >= (0, 33):
        return None  # unknown (another machine) or new enough
    if config.compile and config.compile.regional:
        return f"`compile.regional: true` needs diffusers >= 0.33 (compile_repeated_blocks), {installed} is installed; upgrade diffusers"
    if uses_group_offload(config):
        return f"`offload.strategy: group` needs diffusers >= 0.33 (enable_group_offload), {installed} is installed; upgrade diffusers"
    return None
