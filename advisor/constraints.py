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

from advisor.config import OptimizationConfig, Quantization
from advisor.levers import LEVERS
from advisor.levers.attention import PACKAGES as ATTENTION_PACKAGES
from advisor.levers.offload import blocks_move_with_module_to, group_offloaded, uses_group_offload
from advisor.packages import installed_versions
from advisor.paths import hub_offline
from advisor.platform import Constraint, Platform, Violation, on_cuda, version_tuple
from advisor.platform import constraint as _constraint


DOCS = "https://huggingface.co/docs/diffusers/main/en/optimization"


def platform_here(device: str = "cuda") -> Platform:
    """This machine as torch sees it, for the GPU `device` names (imports torch)."""
    import torch

    packages = installed_versions(CHECKED_HERE)
    offline = hub_offline()
    if not torch.cuda.is_available():
        return Platform(None, None, packages, 0, f"this machine has no CUDA GPU (torch {torch.__version__})", offline)
    index = _device_index(device)
    count = torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability(index if index < count else 0)
    return Platform("cuda", f"{major}.{minor}", packages, count, offline=offline)


# The packages a constraint asks about: the quantizers', diffusers and the attention kernels'.
CHECKED_HERE = ("bitsandbytes", "torchao", "diffusers", *ATTENTION_PACKAGES)


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


# --- quantization -------------------------------------------------------------------------------


@constraint(
    "bitsandbytes-needs-cuda",
    "quantization.backend",
    "bitsandbytes quantization needs a CUDA GPU; diffusers refuses to load it on CPU",
    "https://huggingface.co/docs/diffusers/main/en/quantization/bitsandbytes",
)
def bitsandbytes_needs_cuda(config: OptimizationConfig, platform: Platform) -> str | None:
    q = config.quantization
    if q is None or not q.backend.startswith("bitsandbytes"):
        return None
    if platform.accelerator != "cuda":
        return (
            f"`quantization.backend: {q.backend}` needs CUDA and {platform.no_cuda}; "
            "on CPU use `quantization.backend: torchao` or `layerwise_casting`"
        )
    if not config.device.startswith("cuda"):
        return f"`quantization.backend: {q.backend}` needs `device: cuda`, not `device: {config.device}`"
    return None


@constraint(
    "quantization-backend-installed",
    "quantization.backend",
    "a quantization backend needs its package: bitsandbytes, or torchao (pip install 'diffusers-advisor[torchao]')",
    "https://huggingface.co/docs/diffusers/main/en/quantization/overview",
)
def quantization_backend_installed(config: OptimizationConfig, platform: Platform) -> str | None:
    q = config.quantization
    if q is None:
        return None
    package = "torchao" if q.backend == "torchao" else "bitsandbytes"
    if platform.missing(package):
        return f"`quantization.backend: {q.backend}` needs `pip install {package}`, which is not installed here"
    return None


@constraint(
    "fp8-compute-needs-sm89",
    "quantization.scheme",
    "fp8 matmuls (torchao float8 dynamic) need compute capability 8.9 or newer (Ada, Hopper, Blackwell)",
    "https://github.com/pytorch/ao/tree/main/torchao/float8",
)
def fp8_compute_needs_sm89(config: OptimizationConfig, platform: Platform) -> str | None:
    q = config.quantization
    if q is None or q.kind != "float8_dynamic":
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
)
def int4_weight_only_needs_cuda(config: OptimizationConfig, platform: Platform) -> str | None:
    q = config.quantization
    if q is not None and q.kind == "int4_weight_only" and not on_cuda(config, platform):
        return "`quantization.scheme: int4_weight_only` needs CUDA int4 kernels; on CPU use int8_weight_only, int8_dynamic or float8_weight_only"
    return None


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


# --- combinations that diffusers or torch reject ------------------------------------------------------


def _torchao_group_offloaded(config: OptimizationConfig) -> list[str]:
    q = config.quantization
    if q is None or q.backend != "torchao":
        return []
    return [name for name in q.components if group_offloaded(config, name)]


@constraint(
    "torchao-cannot-offload-to-disk",
    "offload.offload_to_disk_path",
    "group offloading to disk stores groups as safetensors files, which cannot hold torchao-quantized tensors",
    f"{DOCS}/memory#group-offloading",
)
def torchao_cannot_offload_to_disk(config: OptimizationConfig, platform: Platform) -> str | None:
    if not config.offload.offload_to_disk_path:
        return None
    for name in _torchao_group_offloaded(config):
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
    f"{DOCS}/memory#group-offloading",
)
def compiled_torchao_needs_leaf_or_stream_offload(config: OptimizationConfig, platform: Platform) -> str | None:
    if config.compile is None or not blocks_move_with_module_to(config):
        return None
    for name in _torchao_group_offloaded(config):
        if name in config.compile.components:
            return (
                f"torchao-quantized, compiled `{name}` cannot be group-offloaded with `offload.offload_type: block_level` "
                "(without streams diffusers moves the block with Module.to, which cannot swap torchao weights that "
                "torch.compile references); use `offload.offload_type: leaf_level`"
            )
    return None


# --- what the probe reports ---------------------------------------------------------------------------

# One representative config per quantization backend the probe's table lists: the backend is
# usable where its example violates no constraint.
BACKEND_EXAMPLES: dict[str, Callable[[str], OptimizationConfig]] = {
    "bitsandbytes": lambda device: OptimizationConfig(
        device="cuda", quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer"])
    ),
    "torchao": lambda device: OptimizationConfig(
        device=device, quantization=Quantization(backend="torchao", components=["transformer"])
    ),
    "fp8_compute": lambda device: OptimizationConfig(
        device="cuda",
        quantization=Quantization(backend="torchao", scheme="float8_dynamic", components=["transformer"]),
    ),
}
