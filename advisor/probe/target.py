"""The machine a plan is for: this one (from the probe) or one described by flags (--vram/--gpu).

`TargetHardware` is what the estimate and the rules read: memory sizes, matmul throughput and the
host->device bandwidth, each with where it came from (probe, calibration, datasheet, default).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from itertools import takewhile
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorWarning, HardwareError, UsageError
from advisor.files import json_type, read_json
from advisor.paths import advisor_cache_dir
from advisor.platform import OPERATING_SYSTEMS, this_os
from advisor.probe import hardware
from advisor.probe.gpus import (
    gpu_table,
    lookup_gpu,
    memory_fits,
    memory_variants,
    near_gpu_names,
    other_maker,
    stated_memory_gib,
    why_not_this_card,
)
from advisor.probe.hardware import MachineProfile, pcie_bandwidth
from advisor.probe.interconnect import Link, datasheet_link, probed_link, split_gpu_count
from advisor.units import GIB, format_size, parse_capability, parse_size


# Planning defaults when neither the card nor a calibration is known: an RTX 4090-class GPU.
DEFAULT_GPU = "RTX 4090"
# `--vram SIZE` alone: a card of that size whose model we don't know. Its capabilities are the
# conservative common ground of the cards people own (Ampere, compute capability 8.6: bf16 yes,
# fp8 matmuls no) and its throughput an RTX 3090's (datasheet: 71 TFLOP/s dense bf16, PCIe 4 x16).
GENERIC_GPU = {
    "bf16_tflops": 71,
    "memory_bandwidth_gbs": 936,
    "pcie_generation": 4,
    "pcie_width": 16,
    "compute_capability": "8.6",
}
# Host RAM assumed for a machine the advisor can't see, when --ram is not given: twice the card's
# memory (what loading and pinned offload copies need for the models that fill it), at least 32 GB.
ASSUMED_RAM_PER_VRAM = 2
ASSUMED_RAM_MIN = 32 * 2**30
# Pinned host->device copies reach about 80% of the PCIe link's theoretical rate in practice.
PCIE_EFFICIENCY = 0.8
# The 2-core development VM measured 0.21 TFLOP/s fp32; used for CPU plans until calibrated.
DEFAULT_CPU_TFLOPS = 0.2
# Memory bandwidth of a CPU plan (two DDR4 channels, ~20 GB/s sustained), and of a GPU whose
# datasheet is unknown (an RTX 4090's, like DEFAULT_GPU).
DEFAULT_CPU_MEMORY_GBS = 20
# Architecture generation by compute capability (major, minor) -> name; used for efficiency tables.
GENERATIONS = ((10.0, "Blackwell"), (9.0, "Hopper"), (8.9, "Ada"), (8.0, "Ampere"), (7.5, "Turing"), (7.0, "Volta"))


def calibration_path() -> Path:
    return advisor_cache_dir() / "calibration.json"


_REMEASURE = "run `advisor probe --calibrate` to measure again"
CALIBRATED_RATES = ("matmul_flops", "h2d_bytes_per_s")  # what the estimate reads from an entry


def _calibration_problem(entry: Any) -> str | None:
    """Why a calibration entry can't be used, or None: it must be an object whose rates are
    finite numbers of operations or bytes per second above 0 (`matmul_flops` always)."""
    if not isinstance(entry, dict):
        return f"a JSON {json_type(entry)}, not an object"
    for key in CALIBRATED_RATES:
        if key not in entry and key != "matmul_flops":
            continue
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            return f"{key}: {json.dumps(value)[:40]} is not a finite number above 0"
    return None


def read_calibrations() -> dict[str, dict[str, Any]]:
    """Every usable entry of ``calibration.json`` (device name -> result); {} when there is none.

    The file is a cache: one that is not a JSON object of objects, or an entry with unusable
    rates, is ignored with an `AdvisorWarning` instead of failing every command on the machine.
    """
    path = calibration_path()
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError:
        pass  # read_json says what is wrong
    try:
        data = read_json(path, error=HardwareError)
    except HardwareError as exc:
        warnings.warn(f"{exc}; the calibration is ignored ({_REMEASURE})", AdvisorWarning, stacklevel=2)
        return {}
    if not isinstance(data, dict):
        warnings.warn(
            f"{path}: holds a JSON {json_type(data)}, not an object of device name -> calibration; ignored ({_REMEASURE})",
            AdvisorWarning,
            stacklevel=2,
        )
        return {}
    usable = {}
    for name, entry in data.items():
        problem = _calibration_problem(entry)
        if problem:
            warnings.warn(
                f"{path}: the calibration of {name!r} is unusable ({problem}); ignored ({_REMEASURE})",
                AdvisorWarning,
                stacklevel=2,
            )
        else:
            usable[name] = entry
    return usable


def load_calibration(device_name: str) -> dict[str, Any] | None:
    """The last `advisor probe --calibrate` result for this device name, if a usable one is stored."""
    return read_calibrations().get(device_name)


@dataclass(frozen=True)
class TargetHardware:
    """The machine to plan for. Throughput in FLOP/s, bandwidth in bytes/s, sizes in bytes."""

    device: str  # "cuda" or "cpu"
    name: str
    vram_total_bytes: int  # 0 for cpu
    vram_free_bytes: int
    ram_total_bytes: int
    ram_available_bytes: int
    compute_capability: str | None
    supports_bf16: bool
    matmul_flops: float
    h2d_bytes_per_s: float
    source: str  # how the figures were obtained
    assumptions: tuple[str, ...] = ()  # every value assumed rather than read or given (printed, recorded)
    memory_bytes_per_s: float = DEFAULT_CPU_MEMORY_GBS * 1e9  # device memory bandwidth (datasheet)
    ram_assumed: bool = False  # the host RAM is assumed (said in `assumptions`), neither read nor given
    os: str = "linux"  # its operating system (`advisor.platform.OPERATING_SYSTEMS`, or "darwin")
    gpu_count: int = 1  # cards of this model the plan may use (each with the memory above)
    link: Link | None = None  # what they send each other over (`advisor.probe.interconnect`); None for one

    @cached_property
    def generation(self) -> str:
        """'Ada', 'Hopper', ... from the compute capability; 'cpu' for a CPU plan."""
        if self.device == "cpu":
            return "cpu"
        capability = parse_capability(self.compute_capability)
        return next((name for floor, name in GENERATIONS if capability >= floor), "Volta")

    @property
    def cards(self) -> str:
        """The plan's cards as a user names them: 'RTX 4090', '2x RTX 4090'."""
        return self.name if self.gpu_count == 1 else f"{self.gpu_count}x {self.name}"

    def to_dict(self) -> dict[str, Any]:
        described = {k: v for k, v in asdict(self).items() if k != "ram_assumed"}  # `assumptions` says it
        return {**described, "generation": self.generation}


def target_from_probe(machine: MachineProfile, *, gpu_index: int = 0) -> TargetHardware:
    """Plan for this machine: its first (or chosen) GPU, or its CPU when it has none."""
    host = machine.host
    if not machine.gpus:
        calibration = load_calibration("cpu")
        return TargetHardware(
            device="cpu",
            name=host.cpu_model,
            vram_total_bytes=0,
            vram_free_bytes=0,
            ram_total_bytes=host.ram_total_bytes,
            ram_available_bytes=host.ram_available_bytes,
            compute_capability=None,
            supports_bf16=host.cpu_bf16,
            matmul_flops=(calibration or {}).get("matmul_flops", DEFAULT_CPU_TFLOPS * 1e12),
            h2d_bytes_per_s=float("inf"),
            source="probe; CPU "
            + ("calibrated" if calibration else f"throughput default {DEFAULT_CPU_TFLOPS} TFLOP/s"),
            os=this_os(),
        )
    if gpu_index >= len(machine.gpus):
        raise UsageError(f"--gpu-index: {gpu_index} is out of range; this machine has {len(machine.gpus)} GPU(s)")
    gpu = machine.gpus[gpu_index]
    # The cards like it from the first on: torchrun's LOCAL_RANK and device_map="balanced" take the
    # visible GPUs in order (CUDA_VISIBLE_DEVICES picks and orders them); a plan for a later card is one GPU's.
    alike = [gpu]
    if gpu_index == 0:
        alike = list(
            takewhile(lambda g: (g.name, g.memory_total_bytes) == (gpu.name, gpu.memory_total_bytes), machine.gpus)
        )
    calibration = load_calibration(gpu.name)
    memory = gpu.memory_total_bytes / GIB or None
    datasheet = lookup_gpu(gpu.name, memory_gib=memory)
    nearest = None if datasheet else lookup_gpu(gpu.name, memory_gib=memory, strict=False)
    flops, bandwidth, sources = _throughput(gpu.name, calibration, datasheet or nearest)
    if nearest and not calibration:
        sources[0] += f" (the nearest entry: {gpu.name!r} has none of its own)"
    sheet = (datasheet or nearest or (DEFAULT_GPU, gpu_table()[DEFAULT_GPU]))[1]
    if gpu.pcie_bandwidth_bytes_per_s and not (calibration and "h2d_bytes_per_s" in calibration):
        bandwidth = gpu.pcie_bandwidth_bytes_per_s * PCIE_EFFICIENCY
        sources.append("PCIe link from NVML")
    return TargetHardware(
        device="cuda",
        name=gpu.name,
        vram_total_bytes=gpu.memory_total_bytes,
        vram_free_bytes=gpu.memory_free_bytes,
        ram_total_bytes=host.ram_total_bytes,
        ram_available_bytes=host.ram_available_bytes,
        compute_capability=gpu.compute_capability,
        supports_bf16=_bf16_capable(gpu.compute_capability),
        matmul_flops=flops,
        h2d_bytes_per_s=bandwidth,
        source="probe; " + ", ".join(sources),
        memory_bytes_per_s=sheet["memory_bandwidth_gbs"] * 1e9,
        os=this_os(),
        gpu_count=len(alike),
        link=probed_link(alike, sheet) if len(alike) > 1 else None,
    )


def host_link_bytes_per_s(sheet: dict[str, Any]) -> float:
    """What pinned host->device copies reach on the card's link: its PCIe link, or the link that
    replaces it (a GH200's NVLink-C2C), at the efficiency copies reach in practice."""
    if sheet.get("host_link_gbs"):
        return sheet["host_link_gbs"] * 1e9 * PCIE_EFFICIENCY
    return pcie_bandwidth(sheet["pcie_generation"], sheet["pcie_width"]) * PCIE_EFFICIENCY


def _bf16_capable(compute_capability: str | None) -> bool:
    """bf16 tensor cores arrived with Ampere (compute capability 8.0)."""
    return parse_capability(compute_capability) >= 8.0


def _throughput(name, calibration, datasheet) -> tuple[float, float, list[str]]:
    key, sheet = datasheet if datasheet else (DEFAULT_GPU, gpu_table()[DEFAULT_GPU])
    flops = sheet["bf16_tflops"] * 1e12
    bandwidth = host_link_bytes_per_s(sheet)
    sources = [f"datasheet {key}" if datasheet else f"no datasheet for {name!r}; {DEFAULT_GPU} figures"]
    if calibration:
        flops = calibration.get("matmul_flops", flops)
        bandwidth = calibration.get("h2d_bytes_per_s", bandwidth)
        sources = ["calibrated"]
    return flops, bandwidth, sources


def size_text(num_bytes: float) -> str:
    """`format_size` with the fewest decimals that still read back as this size: '24 GB', '1.5 GB', '512 MB'
    (never '2 GB' for 1.5 GB, or '0 GB' for 512 MB)."""
    for precision in (0, 1, 2):
        text = format_size(num_bytes, precision=precision)
        if abs(parse_size(text) - num_bytes) <= num_bytes * 1e-3:
            return text
    return format_size(num_bytes)


def assumed_ram(vram_bytes: int) -> int:
    """Host RAM assumed for a machine with a card of `vram_bytes` (see ASSUMED_RAM_PER_VRAM)."""
    return max(ASSUMED_RAM_MIN, ASSUMED_RAM_PER_VRAM * vram_bytes)


def planned_target(
    *,
    machine: MachineProfile | None,
    vram: int | None = None,
    ram: int | None = None,
    gpu: str | None = None,
    os: str | None = None,
) -> TargetHardware:
    """A machine described by flags (`--vram`, `--ram`, `--gpu`, `--os`), not this one.

    `--gpu NAME` picks the datasheet entry (memory, throughput, PCIe, capability; `lookup_gpu`) and
    names the plan after it; a memory NAME states that no entry has ('RTX 4090 48GB'), or `--vram`,
    overrides the entry's memory, said in ``assumptions``. `--vram` alone plans for a generic card of
    that size (`GENERIC_GPU`).
    Host RAM is `--ram`, else assumed (`assumed_ram`): never this machine's, which plans for another
    machine have no reason to share; so is the operating system (`--os`, else Linux). Every assumed
    value is listed in ``assumptions``.
    """
    assumptions = []
    if os is not None and os not in OPERATING_SYSTEMS:
        raise UsageError(f"--os: {os!r} is not planned for; use one of {', '.join(OPERATING_SYSTEMS)}")
    count = 1
    if gpu is not None:
        count, gpu = split_gpu_count(gpu)
        found = lookup_gpu(gpu)
        maker = other_maker(gpu) if found is None else None
        if maker is not None:
            raise UsageError(
                f"--gpu: {gpu!r} is {maker}; the advisor plans NVIDIA CUDA GPUs and CPU inference, not its kernels, "
                "quantizers and offloading (--vram would plan CUDA-only kernels for it)"
            )
        if found is None:
            near = near_gpu_names(gpu)
            known = list(gpu_table())
            hint = (
                f"did you mean {', '.join(repr(n) for n in near)}?"
                if near
                else f"known: {', '.join(known[:6])} and {len(known) - 6} more (docs/gpus.md)"
            )
            raise UsageError(
                f"--gpu: {gpu!r} is not a known GPU{why_not_this_card(gpu)}; {hint} (or give --vram for a card of that size)"
            )
        key, sheet = found
        source = f"--gpu {key} (datasheet)"
        entry_bytes, stated = int(sheet["memory_gib"] * GIB), stated_memory_gib(gpu)
        if stated is not None and stated == sheet.get("host_memory_gib"):  # 'GH200 480GB': Grace's memory
            stated = None
        if vram is not None:
            name = f"{key} with {size_text(vram)}"
            if not memory_fits(sheet["memory_gib"], vram / GIB):  # a MIG slice, a capped card: allowed, and said
                assumptions.append(
                    f"memory: --vram {size_text(vram)} overrides the {key}'s {size_text(entry_bytes)} (its other figures are kept)"
                )
        elif stated is not None and not memory_fits(sheet["memory_gib"], stated):
            vram = int(stated * GIB)
            name = f"{key} with {size_text(vram)}"
            assumptions.append(
                f"memory: {size_text(vram)} as {gpu!r} says, with the {key}'s compute and bandwidth figures "
                f"(its datasheet entry has {size_text(entry_bytes)}); pass --vram for the exact size"
            )
        else:  # the entry's name, with the memory the name states when the entry's name has none ('RTX 3060 12GB')
            name = key if stated is None or stated_memory_gib(key) is not None else f"{key} {stated:g}GB"
            variants = memory_variants(key) if stated is None else []
            if variants:  # 'RTX 4060 Ti' alone: the 16 GB card is a guess the user should see
                assumptions.append(
                    f"memory: the {math.ceil(sheet['memory_gib'])} GB {key} (it is also sold with "
                    f"{', '.join(f'{gib:g} GB' for gib, _ in variants)}: --gpu {variants[0][1]!r} plans that one)"
                )
    else:
        key, sheet = "generic", GENERIC_GPU
        source = "--vram (a generic card of that size)"
        name = f"GPU with {size_text(vram or 0)}"
        entry_bytes = 0
        assumptions.append(
            f"card: a generic GPU (compute capability {sheet['compute_capability']}: bf16 but no fp8 matmuls; "
            f"{sheet['bf16_tflops']} TFLOP/s; PCIe {sheet['pcie_generation']} x{sheet['pcie_width']}); pass --gpu NAME for yours"
        )
    vram_bytes = vram if vram is not None else entry_bytes
    if vram_bytes <= 0:
        raise UsageError("--vram: must be larger than 0")
    if ram is not None:
        if ram <= 0:
            raise UsageError("--ram: must be larger than 0")
        host = ram
    elif sheet.get("host_memory_gib"):  # a superchip's own
        host = int(sheet["host_memory_gib"] * GIB)
        assumptions.append(f"host RAM: the {key}'s own {size_text(host)}; pass --ram for what it leaves free")
    else:
        host = assumed_ram(vram_bytes * count)
        cards = "the card's memory" if count == 1 else f"the {count} cards' memory"
        assumptions.append(f"host RAM: {format_size(host)} (2x {cards}, at least 32 GB); pass --ram for yours")
    if os is None:
        os = "linux"
        assumptions.append("operating system: Linux; pass --os windows for a Windows machine")
    link = None
    if count > 1:
        link, assumed = datasheet_link(key, sheet)
        assumptions.append(assumed or f"link: {link.describe()}")
    return TargetHardware(
        device="cuda",
        name=name,
        vram_total_bytes=vram_bytes,
        vram_free_bytes=vram_bytes,
        ram_total_bytes=host,
        ram_available_bytes=host,
        compute_capability=sheet["compute_capability"],
        supports_bf16=_bf16_capable(sheet["compute_capability"]),
        matmul_flops=sheet["bf16_tflops"] * 1e12,
        h2d_bytes_per_s=host_link_bytes_per_s(sheet),
        source=source + ("" if ram is None else ", --ram"),
        assumptions=tuple(assumptions),
        memory_bytes_per_s=sheet["memory_bandwidth_gbs"] * 1e9,
        ram_assumed=ram is None,
        os=os,
        gpu_count=count,
        link=link,
    )


def resolve_target(
    machine: MachineProfile | None,
    *,
    vram: int | None = None,
    ram: int | None = None,
    gpu: str | None = None,
    os: str | None = None,
) -> TargetHardware:
    """This machine (`machine`, probed here when None), or the one that --vram/--ram/--gpu
    describe (sizes in bytes).

    Only --vram and --gpu make the plan one for another machine, which needs nothing of this one;
    --ram alone overrides this machine's RAM; --os needs --vram or --gpu.
    """
    if os is not None and vram is None and gpu is None:
        raise UsageError(
            f"--os: describes another machine; give it with --gpu NAME or --vram SIZE (this is {this_os()})"
        )
    if ram is not None and ram <= 0:
        raise UsageError(f"--ram: {ram} bytes must be larger than 0; give the host's RAM, e.g. --ram 64GB")
    if vram is None and gpu is None:
        target = target_from_probe(machine or hardware.probe_machine())
        if ram is not None:
            target = replace(target, ram_total_bytes=ram, ram_available_bytes=ram, source=target.source + ", --ram")
        return target
    return planned_target(machine=machine, vram=vram, ram=ram, gpu=gpu, os=os)
