"""Probe the machine: GPUs, host memory and disk, and the installed inference libraries.

Fast by design: GPUs are read through NVML (``nvidia-ml-py``), host facts through ``psutil`` and
package versions from installed metadata, so the default path imports neither torch nor diffusers.
``torch.cuda`` is the fallback only when NVML is missing or fails *and* the machine shows signs of an
NVIDIA GPU (device nodes or a loaded driver); a machine without one answers "no GPU" at once.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from advisor.config import OptimizationConfig
from advisor.constraints import Platform, first_violation
from advisor.levers import quantization
from advisor.levers.attention import BACKENDS
from advisor.levers.attention import PACKAGES as ATTENTION_PACKAGES
from advisor.levers.torch_compile import COMPILER_PACKAGES
from advisor.packages import installed_version, installed_versions
from advisor.paths import hub_offline
from advisor.platform import this_os
from advisor.probe.hub_cache import hub_cache_dir
from advisor.units import parse_capability


# Per-lane, per-direction payload bandwidth of each PCIe generation in bytes/s, after line coding
# (8b/10b for gen 1-2, 128b/130b for gen 3-5, FLIT for gen 6).
PCIE_LANE_BYTES_PER_S = {
    1: 250_000_000,
    2: 500_000_000,
    3: 984_615_384,
    4: 1_969_230_769,
    5: 3_938_461_538,
    6: 7_563_000_000,
}

# The libraries whose versions decide which optimizations can run; read from metadata only.
TRACKED_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    *quantization.packages(),
    "optuna",
    "nvidia-ml-py",
    "psutil",
    *ATTENTION_PACKAGES,
    *COMPILER_PACKAGES,
)


@dataclass
class GpuInfo:
    """One GPU as the probe saw it. Sizes in bytes; bandwidth per direction in bytes/s."""

    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    memory_used_bytes: int
    compute_capability: str | None = None
    pcie_generation: int | None = None
    pcie_width: int | None = None
    pcie_generation_current: int | None = None
    pcie_width_current: int | None = None
    pcie_bandwidth_bytes_per_s: int | None = None
    uuid: str | None = None
    nvlinks_active: int | None = None  # NVLinks up (0: it has links, none up; None: no NVLink, or NVML can't say)
    peers: list[int] | None = None  # the indices of the GPUs it has peer-to-peer access to

    def links(self, *, several: bool) -> str:
        """Its links in words: to the host (PCIe), and where the machine has `several` GPUs, to the
        others (what a plan over them sends its traffic over, docs/multi-gpu.md)."""
        said = f"PCIe gen{self.pcie_generation} x{self.pcie_width}" if self.pcie_generation else "PCIe link unknown"
        if self.pcie_bandwidth_bytes_per_s:
            said += f" ({self.pcie_bandwidth_bytes_per_s / 1e9:.1f} GB/s host<->GPU)"
        if several and self.nvlinks_active:
            said += f", {self.nvlinks_active} NVLinks up"
        if several and self.peers is not None:
            said += f", peer access to {', '.join(map(str, self.peers)) or 'none'}"
        return said


@dataclass
class HostInfo:
    """The host side: RAM and swap, CPU, and free disk where the Hugging Face cache lives."""

    ram_total_bytes: int
    ram_available_bytes: int
    swap_total_bytes: int
    swap_free_bytes: int
    cpu_model: str
    cpu_cores_physical: int | None
    cpu_cores_logical: int | None
    cpu_bf16: bool  # native bf16 matmuls (AVX512-BF16 or AMX): else bf16 on CPU is emulated and slow
    os: str
    python: str
    hf_cache_dir: str
    hf_cache_free_bytes: int | None


@dataclass
class BackendStatus:
    """Whether one quantization backend or attention kernel can be used on this machine, and why (not)."""

    usable: bool
    reason: str


@dataclass
class SoftwareInfo:
    """Installed package versions (None when absent), the usable quantization backends and attention kernels."""

    packages: dict[str, str | None]
    quantization_backends: dict[str, BackendStatus]
    attention_backends: dict[str, BackendStatus] = field(default_factory=dict)


@dataclass
class MachineProfile:
    """Everything `advisor probe` reports. ``gpu_source`` is ``nvml``, ``torch`` or ``none``."""

    gpus: list[GpuInfo]
    gpu_source: str
    gpu_note: str
    host: HostInfo
    software: SoftwareInfo
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    schema_version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the documented ``advisor probe --json`` schema)."""
        data = asdict(self)
        if not data["extra"]:
            del data["extra"]
        return data


def pcie_bandwidth(generation: int | None, width: int | None) -> int | None:
    """Theoretical host<->device bandwidth per direction in bytes/s for a PCIe link."""
    if not generation or not width or generation not in PCIE_LANE_BYTES_PER_S:
        return None
    return PCIE_LANE_BYTES_PER_S[generation] * width


# --- GPUs ------------------------------------------------------------------------------------


def gpu_from_nvml_readings(index: int, readings: dict[str, Any]) -> GpuInfo:
    """Turn raw NVML readings of one device into a `GpuInfo`.

    `readings` holds what the NVML calls returned (see `_read_nvml_device`); any entry may be
    missing or None when the call is not supported by the device or driver.
    """
    name = readings.get("name") or "unknown NVIDIA GPU"
    if isinstance(name, bytes):  # older nvidia-ml-py returns bytes
        name = name.decode()
    capability = readings.get("cuda_compute_capability")
    generation = readings.get("max_pcie_link_generation")
    width = readings.get("max_pcie_link_width")
    return GpuInfo(
        index=index,
        name=name,
        memory_total_bytes=int(readings["memory_total"]),
        memory_free_bytes=int(readings["memory_free"]),
        memory_used_bytes=int(readings["memory_used"]),
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        pcie_generation=generation,
        pcie_width=width,
        pcie_generation_current=readings.get("curr_pcie_link_generation"),
        pcie_width_current=readings.get("curr_pcie_link_width"),
        pcie_bandwidth_bytes_per_s=pcie_bandwidth(generation, width),
        uuid=readings.get("uuid"),
        nvlinks_active=readings.get("nvlinks_active"),
        peers=readings.get("peers"),
    )


def format_cuda_driver_version(version: int | None) -> str | None:
    """NVML reports the CUDA driver version as 1000*major + 10*minor (12040 -> '12.4')."""
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def _optional_call(func, *args):
    """Call an NVML getter; None where the device or driver does not support it."""
    try:
        return func(*args)
    except Exception:  # pynvml raises NVMLError subclasses per code; all mean "not available"
        return None


def _read_nvml_device(pynvml, handle) -> dict[str, Any]:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return {
        "name": pynvml.nvmlDeviceGetName(handle),
        "uuid": _optional_call(pynvml.nvmlDeviceGetUUID, handle),
        "memory_total": memory.total,
        "memory_free": memory.free,
        "memory_used": memory.used,
        "cuda_compute_capability": _optional_call(pynvml.nvmlDeviceGetCudaComputeCapability, handle),
        "max_pcie_link_generation": _optional_call(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        "max_pcie_link_width": _optional_call(pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
        "curr_pcie_link_generation": _optional_call(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        "curr_pcie_link_width": _optional_call(pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        "nvlinks_active": _active_nvlinks(pynvml, handle),
    }


def _active_nvlinks(pynvml, handle) -> int | None:
    """How many of the device's NVLinks are up; None where NVML answers for none (no NVLink)."""
    states = [
        _optional_call(pynvml.nvmlDeviceGetNvLinkState, handle, link) for link in range(pynvml.NVML_NVLINK_MAX_LINKS)
    ]
    known = [state for state in states if state is not None]
    return sum(state == pynvml.NVML_FEATURE_ENABLED for state in known) if known else None


def _peers(pynvml, handles: list) -> list[list[int]]:
    """For each device, the indices of the others it can read from peer-to-peer. The caps index is
    given as 0 (NVML_P2P_CAPS_INDEX_READ), which nvidia-ml-py defines as the tuple `(0,)`."""
    return [
        [
            j
            for j, other in enumerate(handles)
            if j != i and _optional_call(pynvml.nvmlDeviceGetP2PStatus, handle, other, 0) == pynvml.NVML_P2P_STATUS_OK
        ]
        for i, handle in enumerate(handles)
    ]


def _probe_nvml() -> tuple[list[GpuInfo], str | None, str | None]:
    """GPUs, driver version and CUDA driver version through NVML; raises when NVML is unusable."""
    import pynvml

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        if isinstance(driver, bytes):
            driver = driver.decode()
        cuda = format_cuda_driver_version(_optional_call(pynvml.nvmlSystemGetCudaDriverVersion_v2))
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        peers = _peers(pynvml, handles)
        gpus = [
            gpu_from_nvml_readings(i, {**_read_nvml_device(pynvml, handle), "peers": peers[i]})
            for i, handle in enumerate(handles)
        ]
        return _visible_only(gpus), driver, cuda
    finally:
        _optional_call(pynvml.nvmlShutdown)


def _visible_only(gpus: list[GpuInfo]) -> list[GpuInfo]:
    """NVML sees every GPU; honour CUDA_VISIBLE_DEVICES (indices or UUIDs) like CUDA does."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    chosen = []
    for item in (part.strip() for part in visible.split(",")):
        if not item:
            break
        match = [g for g in gpus if str(g.index) == item or (g.uuid and g.uuid.startswith(item))]
        if not match:
            break  # CUDA stops at the first invalid entry
        chosen.extend(match)
    return chosen


def nvidia_gpu_signs() -> bool:
    """True when the machine shows an NVIDIA GPU without asking NVML: device nodes, the driver, or
    WSL2's GPU paravirtualization device (/dev/dxg, where NVML works through /usr/lib/wsl/lib)."""
    return (
        bool(glob.glob("/dev/nvidia[0-9]*"))
        or os.path.exists("/proc/driver/nvidia/version")
        or os.path.exists("/dev/dxg")
    )


def _probe_torch() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(
            GpuInfo(
                index=i,
                name=props.name,
                memory_total_bytes=int(total),
                memory_free_bytes=int(free),
                memory_used_bytes=int(total - free),
                compute_capability=f"{props.major}.{props.minor}",
            )
        )
    return gpus


def probe_gpus() -> tuple[list[GpuInfo], str, str, str | None, str | None]:
    """(gpus, source, note, driver version, CUDA driver version); source is nvml, torch or none."""
    if (
        sys.platform.startswith("linux") and not nvidia_gpu_signs()
    ):  # NVML would find nothing (its import costs ~25 ms)
        return [], "none", "no CUDA GPU found: no NVIDIA driver or device nodes, so NVML was not asked", None, None
    try:
        gpus, driver, cuda = _probe_nvml()
        note = f"{len(gpus)} GPU(s) read through NVML" if gpus else "NVML found no visible GPU"
        return gpus, "nvml", note, driver, cuda
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver mismatch, ...
        nvml_problem = f"NVML unavailable ({str(exc) or type(exc).__name__})"
    if nvidia_gpu_signs() and installed_version("torch"):
        try:
            gpus = _probe_torch()
        except Exception as exc:
            return [], "none", f"{nvml_problem}; torch.cuda failed too ({exc})", None, None
        if gpus:
            return gpus, "torch", f"{nvml_problem}; read {len(gpus)} GPU(s) through torch.cuda", None, None
    return [], "none", f"no CUDA GPU found: {nvml_problem}, and no NVIDIA device nodes", None, None


# --- host ------------------------------------------------------------------------------------


def _free_disk(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or would, once created)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def probe_host() -> HostInfo:
    """RAM, swap, CPU and free disk at the Hugging Face cache."""
    import psutil

    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    cache = hub_cache_dir()
    return HostInfo(
        ram_total_bytes=int(memory.total),
        ram_available_bytes=int(memory.available),
        swap_total_bytes=int(swap.total),
        swap_free_bytes=int(swap.free),
        cpu_model=_cpu_model(),
        cpu_cores_physical=psutil.cpu_count(logical=False),
        cpu_cores_logical=psutil.cpu_count(logical=True),
        cpu_bf16=bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"}) or platform.machine() in {"arm64", "aarch64"},
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        hf_cache_dir=str(cache),
        hf_cache_free_bytes=_free_disk(cache),
    )


# --- software --------------------------------------------------------------------------------


def _platform(packages: dict[str, str | None], gpus: list[GpuInfo]) -> Platform:
    """This machine as the constraints see it: its most capable GPU, its packages."""
    best = max(gpus, key=lambda g: parse_capability(g.compute_capability), default=None)
    return Platform(
        accelerator="cuda" if gpus else None,
        compute_capability=best.compute_capability if best else None,
        packages=packages,
        cuda_devices=len(gpus),
        no_cuda="this machine has no CUDA GPU",
        offline=hub_offline(),
        os=this_os(),
    )


def attention_backends(packages: dict[str, str | None], gpus: list[GpuInfo]) -> dict[str, BackendStatus]:
    """Which of diffusers' attention kernels run here (`advisor.levers.attention`), judged by the
    constraints on a bf16 config with that backend, as the planner judges it."""
    platform = _platform(packages, gpus)
    device = "cuda" if gpus else "cpu"
    table = {}
    for name, backend in BACKENDS.items():
        violation = first_violation(OptimizationConfig(device=device, attention_backend=name), platform)
        if violation is not None:
            table[name] = BackendStatus(False, violation.message)
        else:
            version = f", {backend.package} {packages.get(backend.package)}" if backend.package else ""
            table[name] = BackendStatus(
                True, f"{backend.kernel}{version}" + (" (lossy: int8 q/k)" if backend.lossy else "")
            )
    return table


def quantization_backends(packages: dict[str, str | None], gpus: list[GpuInfo]) -> dict[str, BackendStatus]:
    """Which quantization backends diffusers can use here, from versions and GPUs alone.

    The quantizers the config schema knows are judged by `advisor.constraints` (one example config
    each, on this machine's most capable GPU), so the table and the planner never disagree.
    """
    platform = _platform(packages, gpus)
    device = "cuda" if gpus else "cpu"

    def judged(example: Callable[[str], OptimizationConfig], usable: str) -> BackendStatus:
        violation = first_violation(example(device), platform)
        return BackendStatus(False, violation.message) if violation else BackendStatus(True, usable)

    def installed(package: str, usable: str) -> BackendStatus:
        return (
            BackendStatus(True, usable)
            if packages.get(package)
            else BackendStatus(False, f"{package} is not installed")
        )

    rows = {name: row for backend in quantization.BACKENDS for name, row in backend.probe_rows(packages).items()}
    return {
        **{name: judged(*row) for name, row in rows.items()},
        # Layerwise casting stores weights in float8 and computes in bf16: any device, torch only.
        "layerwise_fp8": installed("torch", "storage-only fp8 casting, any device"),
    }


def probe_software(gpus: list[GpuInfo]) -> SoftwareInfo:
    """Installed versions (metadata only, nothing imported), usable quantization backends and attention kernels."""
    packages = installed_versions(TRACKED_PACKAGES)
    return SoftwareInfo(packages, quantization_backends(packages, gpus), attention_backends(packages, gpus))


def probe_machine() -> MachineProfile:
    """Probe GPUs, host and software in one go (milliseconds; no torch import without a GPU).

    >>> profile = probe_machine()
    >>> profile.gpu_source in {"nvml", "torch", "none"}
    True
    """
    gpus, source, note, driver, cuda = probe_gpus()
    return MachineProfile(
        gpus=gpus,
        gpu_source=source,
        gpu_note=note,
        host=probe_host(),
        software=probe_software(gpus),
        driver_version=driver,
        cuda_driver_version=cuda,
    )
