"""One planning question, built once at the edge (the CLI or code) and passed down unchanged.

A `Scenario` holds what every planner and tuner needs: the model's profile, the workload, the
target hardware, the installed packages (when planning for this machine), the budget in bytes and
where it came from, and notes on what was assumed. The engine, the tuner and the GPU kit read it;
none of them fills in defaults or re-decides whether the plan is for this machine.

>>> from advisor.probe.models import load_profile
>>> from advisor.probe.target import planned_target
>>> from advisor.probe.workload import make_workload
>>> profile = load_profile("flux-dev")
>>> s = make_scenario(profile, make_workload(profile), planned_target(machine=None, vram=24 * 2**30), budget_bytes=16 * 2**30)
>>> s.budget_bytes == 16 * 2**30
True
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from advisor.config import Provenance
from advisor.constraints import Platform
from advisor.errors import UsageError
from advisor.plan.compute import batches_samples, sequence_tokens
from advisor.probe import hardware
from advisor.probe.hardware import MachineProfile
from advisor.probe.models import ModelProfile, load_profile
from advisor.probe.target import TargetHardware, resolve_target
from advisor.probe.workload import Workload, make_workload
from advisor.units import GIB, format_size


# How much lossy storage or compute a plan may use (see `advisor.plan.recommend`):
# exact: none; balanced: only when nothing lossless fits or it is clearly faster; fast: whatever is fastest.
Quality = Literal["exact", "balanced", "fast"]
QUALITIES = ("exact", "balanced", "fast")


# A plan may take this share of the available host RAM (the budget on a CPU, the limit on the host
# RAM of a GPU plan); the rest is the OS's and other programs'.
RAM_USABLE = 0.9
# What a GPU budget keeps back by default: what `max_memory_allocated` does not count (the CUDA
# context, ~0.5 GiB) and the caching allocator's fragmentation.
RESERVE_BYTES = GIB
RESERVE_SHARE = 0.05  # of the card
# On Windows the desktop and the WDDM driver hold part of the card, and the NVIDIA driver spills
# memory past the card into shared system memory instead of failing (sysmem fallback, driver 536.40
# and later): an overshoot runs slowly rather than stopping, so the budget keeps this much more back
# (assumed: the desktop's share varies with the displays and programs).
WINDOWS_RESERVE_BYTES = GIB
SYSMEM_FALLBACK = "https://nvidia.custhelp.com/app/answers/detail/a_id/5490"

# Generations one process makes, where the user does not say: a session's worth (a notebook, a UI
# server, a batch script), over which a one-off warm-up such as torch.compile's is spread. Said as
# an assumption; a script that makes one image is `--generations 1`.
DEFAULT_GENERATIONS = 10


def _reserve_bytes(target: TargetHardware) -> int:
    """What a GPU budget keeps back beside `RESERVE_SHARE` of the card: more on Windows."""
    return RESERVE_BYTES + (WINDOWS_RESERVE_BYTES if target.os == "windows" else 0)


def default_budget(target: TargetHardware) -> int:
    """Free accelerator memory minus the reserve (1 GiB + 5% of the card); on a CPU, the usable
    share of the available RAM (`RAM_USABLE`)."""
    if target.device == "cpu":
        return int(target.ram_available_bytes * RAM_USABLE)
    return max(int(target.vram_free_bytes - _reserve_bytes(target) - RESERVE_SHARE * target.vram_total_bytes), 0)


def smallest_card_for(peak_bytes: int) -> int:
    """The smallest card whose default budget (all of it free) holds `peak_bytes`."""
    return math.ceil((peak_bytes + RESERVE_BYTES) / (1 - RESERVE_SHARE))


def default_budget_rule(target: TargetHardware) -> str:
    """`default_budget`'s rule in words, for messages: '90% of the available RAM' on a CPU."""
    if target.device == "cpu":
        return f"{RAM_USABLE:.0%} of the available RAM"
    return f"free GPU memory minus {_reserve_bytes(target) / GIB:g} GiB + {RESERVE_SHARE:.0%} of the card"


def limited_peak(device: str, *, vram_bytes: int | None, ram_bytes: int | None) -> int | None:
    """The peak that the budget limits: GPU memory, or RAM for CPU inference.

    One definition for predicted peaks (the estimate) and measured ones (a trial).
    """
    return ram_bytes if device == "cpu" else vram_bytes


@dataclass(frozen=True)
class Scenario:
    """Profile, workload, target, installed packages and budget: what a plan is for."""

    profile: ModelProfile
    workload: Workload
    target: TargetHardware
    packages: dict[str, str | None] | None  # installed versions; None when planning for another machine
    budget_bytes: int
    budget_source: str = "--budget"
    notes: tuple[str, ...] = ()
    quality: Quality = "balanced"
    assumed: tuple[str, ...] = ()  # assumed beyond the machine and the workload: the model, when none was given
    generations: int = DEFAULT_GENERATIONS  # one process makes: what a one-off warm-up is spread over
    images: int | None = None  # the job makes in all (--images): what one pipeline per card shares out

    # Computed once for this scenario (`advisor.plan.estimate`): config key -> its estimate; and in
    # `memo`, each phase's work by what it depends on and partial offload's fit per config.
    estimates: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def assumptions(self) -> tuple[str, ...]:
        """Every value assumed about the machine or the job rather than read or given."""
        return self.assumed + self.target.assumptions + self.workload.assumptions

    @property
    def batched_calls(self) -> bool:
        """Whether each denoiser call runs several samples (guidance batched in, or several images)."""
        return batches_samples(self.profile, self.workload)

    @property
    def sequence(self) -> tuple[int, int]:
        """(latent tokens, joint text tokens) of one denoiser call: what context parallelism splits."""
        return sequence_tokens(self.profile, self.workload)

    @property
    def platform(self) -> Platform:
        """What the constraints check candidates against."""
        target = self.target
        return Platform.of_target(target.device, target.compute_capability, self.packages, target.os)

    def provenance(self, made_by: str, **extra: Any) -> Provenance:
        """What a config made for this scenario records about it (`estimate=` or `measured=` in `extra`)."""
        from advisor import __version__

        target = self.target
        return Provenance(
            made_by=made_by,
            model=self.profile.model_id,
            pipeline_class=self.profile.pipeline_class,
            components=[c.name for c in self.profile.components],
            workload=self.workload.to_dict(),
            gpu_name=target.name if target.device == "cuda" else None,
            gpu_count=target.gpu_count if target.device == "cuda" else None,
            vram_bytes=target.vram_total_bytes or None,
            ram_bytes=target.ram_total_bytes or None,
            os=target.os,
            generations=self.generations,
            images=self.images,
            budget_bytes=self.budget_bytes,
            packages={"advisor": __version__, **(self.packages or {})},
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            assumptions=list(self.assumptions) or None,
            quality=self.quality,
            **extra,
        )


def make_scenario(
    profile: ModelProfile,
    workload: Workload,
    target: TargetHardware,
    *,
    packages: dict[str, str | None] | None = None,
    budget_bytes: int | None = None,
    notes: tuple[str, ...] = (),
    quality: Quality = "balanced",
    assumed: tuple[str, ...] = (),
    generations: int | None = None,
    images: int | None = None,
) -> Scenario:
    """The scenario, with the default budget when none is given (and the default generations, said as
    an assumption, unless the job's `images` say how many a process makes); a budget of nothing is
    an error here."""
    if images is not None and images < 1:
        raise UsageError(f"--images: {images} is not a count of images; give 1 or more")
    if generations is None and images is not None:
        generations = images  # each card's process compiles once, at the same time: the job waits once
    if generations is None:
        generations = DEFAULT_GENERATIONS
        assumed = (
            *assumed,
            f"generations: {DEFAULT_GENERATIONS} per process (torch.compile's warm-up is spread over them); "
            "pass --generations N",
        )
    elif generations < 1:
        raise UsageError(f"--generations: {generations} is not a count of generations; give 1 or more")
    if budget_bytes is None:
        budget, source = default_budget(target), "default: free memory minus a reserve"
        if budget <= 0:  # the user gave no --budget: say which memory left nothing
            cpu = target.device == "cpu"
            memory = format_size(target.ram_available_bytes if cpu else target.vram_free_bytes)
            raise UsageError(
                f"--budget: not given, and the default ({default_budget_rule(target)}) leaves nothing of {memory} on "
                f"{target.name}; give --budget SIZE or a larger {'--ram' if cpu else '--vram'}"
            )
    else:
        budget, source = budget_bytes, "--budget"
    if budget <= 0:
        raise UsageError("--budget: must be larger than 0 (nothing fits in no memory)")
    if quality not in QUALITIES:
        raise UsageError(f"--quality: {quality!r} is not a quality policy; use one of {', '.join(QUALITIES)}")
    if target.device == "cuda" and target.os == "windows":
        kept = (
            f"the default budget keeps {WINDOWS_RESERVE_BYTES / GIB:g} GiB more back" if budget_bytes is None else ""
        )
        notes = (
            *notes,
            "Windows: the NVIDIA driver spills memory past the card into shared system memory instead of failing "
            f"({SYSMEM_FALLBACK}), so a plan over its budget runs slowly rather than stopping"
            + (f"; {kept}" if kept else "; keep --budget under the card's free memory"),
        )
    if target.device == "cuda" and budget > target.vram_total_bytes:
        notes = (
            *notes,
            f"--budget {format_size(budget)} is more than the card's {format_size(target.vram_total_bytes)}; planning within the card",
        )
        budget = target.vram_total_bytes
    return Scenario(
        profile, workload, target, packages, budget, source, tuple(notes), quality, assumed, generations, images
    )


def on_one_gpu(scenario: Scenario) -> tuple[Scenario, str | None]:
    """`scenario` planned on one of its GPUs, and the note that says so: what `advisor tune` measures (a
    trial is one process; the multi-GPU levers' candidates are recommend's, not measured yet)."""
    target = scenario.target
    if target.gpu_count == 1:
        return scenario, None
    note = (
        f"tune measures one GPU of the {target.gpu_count}: plans over several (context parallel, one pipeline per "
        "GPU) are recommend's, not measured yet (docs/multi-gpu.md)"
    )
    return dataclasses.replace(scenario, target=dataclasses.replace(target, gpu_count=1, link=None)), note


@dataclass(frozen=True)
class Request:
    """One planning question as it was asked: the model, the workload, the machine, the budget and
    the quality policy, sizes in bytes, what was not given None. Built once at the edge (the command
    line, or code); `scenario_for` answers it with a `Scenario`, `advisor estimate` reads the same
    workload and target from it, and `advisor tune --workers` sends it to each worker as data."""

    model: str
    workload: str | None = None  # the workload kind of a pipeline the advisor does not know
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    batch: int | None = None
    guidance_scale: float | None = None
    loras: tuple[str, ...] = ()  # the user's LoRA files, PATH[:SCALE] (`advisor.probe.lora`)
    lora_rank: int | None = None  # stands in for the files: `lora_count` (default 1) LoRAs of this rank
    lora_count: int | None = None
    lora_swap: bool = False  # other LoRAs are loaded between calls
    generations: int | None = None  # one process makes (`Scenario.generations`)
    images: int | None = None  # the job makes in all (`Scenario.images`)
    vram: int | None = None  # a card of this much memory (not this machine's)
    ram: int | None = None
    gpu: str | None = None  # a datasheet card (not this machine's)
    os: str | None = None  # the other machine's operating system
    budget_bytes: int | None = None
    quality: Quality = "balanced"
    assumed: tuple[str, ...] = ()  # assumed beyond the machine and the workload: the model, when none was given

    JOB = (
        "height",
        "width",
        "frames",
        "steps",
        "batch",
        "guidance_scale",
        "loras",
        "lora_rank",
        "lora_count",
        "lora_swap",
    )

    @property
    def here(self) -> bool:
        """Whether the plan is for this machine: no flag describes another one."""
        return self.vram is None and self.gpu is None

    def job(self) -> dict[str, Any]:
        """The workload flags as given."""
        return {name: getattr(self, name) for name in self.JOB}

    def target(self, machine: MachineProfile | None) -> TargetHardware:
        """The machine the plan is for: this one (probed here when `machine` is None) or the one the
        flags describe."""
        if self.here and machine is None:
            machine = hardware.probe_machine()  # looked up at call time: tests stand in for it
        return resolve_target(machine, vram=self.vram, ram=self.ram, gpu=self.gpu, os=self.os)

    def workload_for(self, profile: ModelProfile) -> Workload:
        return make_workload(profile, **self.job())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "assumed": list(self.assumed), "loras": list(self.loras)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Request:
        return cls(**{**data, "assumed": tuple(data.get("assumed", ())), "loras": tuple(data.get("loras", ()))})


def scenario_for(
    request: Request, machine: MachineProfile | None = None, *, profile: ModelProfile | None = None
) -> Scenario:
    """The scenario that answers `request`; `profile` when the caller has loaded the model already
    (with its traces). A plan for this machine counts its installed packages (`machine`, probed here
    when None); one for a machine the flags describe needs no probe."""
    if request.here and machine is None:
        machine = hardware.probe_machine()  # looked up at call time: tests stand in for it
    target = request.target(machine)
    profile = profile or load_profile(request.model, workload=request.workload)
    if profile.workload not in ("image", "video"):
        raise UsageError(
            f"--workload: {profile.workload} pipelines are not planned (yet); the advisor plans image and video"
        )
    job = request.workload_for(profile)
    notes = []
    if profile.source == "folder" and profile.model_id != request.model:
        notes.append(f"model: the local folder {request.model}, recorded as {profile.model_id}")
    if request.here and not machine.gpus:
        notes.append(
            "no CUDA GPU found on this machine: planning CPU inference. To plan for a GPU, pass "
            "--vram 24GB or --gpu 'RTX 4090'"
        )
    packages = machine.software.packages if request.here else None
    return make_scenario(
        profile,
        job,
        target,
        packages=packages,
        budget_bytes=request.budget_bytes,
        notes=tuple(notes),
        quality=request.quality,
        assumed=request.assumed,
        generations=request.generations,
        images=request.images,
    )
