"""Peak accelerator memory, peak host RAM and latency of one configuration, before running it.

``estimate(profile, workload, config, target)`` is pure arithmetic over the model profile (no torch)
and costs well under a millisecond, so the rule engine can score hundreds of candidates.

The model, per phase of a generation (text encoding, denoising, VAE decode):

    device bytes = weights resident in that phase (by offload strategy) + activations of the phase
    host bytes   = process baseline + weights kept in RAM (pinned copies count twice) + load peak
    latency      = text encoding + steps x max/sum(step compute, step transfers) + VAE decode
                   + model-offload transfers
    warm-up      = one-off work at the first call (torch.compile's), beside the latency

Weights are exact from the profile (parameter counts per layer type) and the storage format of the
config. Activations and throughput use the constants in ``advisor/data/estimate_constants.json``,
each recorded with its source (physical, fitted to published measurements, or assumed). The
estimate only has to rank candidates; `advisor tune` measures the truth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from advisor import levers
from advisor.config import OptimizationConfig
from advisor.errors import EstimateError
from advisor.levers import LEVERS, offload, quantization
from advisor.plan.compute import Work, constants, phase_work
from advisor.plan.compute import trace_of as _traced
from advisor.plan.latency import latency
from advisor.plan.scenario import Scenario, limited_peak
from advisor.plan.weights import weight_bytes
from advisor.probe.models import ModelProfile
from advisor.probe.safetensors_header import dtype_size
from advisor.probe.target import TargetHardware
from advisor.probe.workload import Workload, encoding_order, encoding_passes


PHASES = ("text_encoding", "denoising", "vae_decode")
# A phase of its own only where loading (placement included) leaves more on the card than a run holds.
LOADING = "loading"
ROLE_OF_PHASE = {"text_encoding": "text_encoder", "denoising": "denoiser", "vae_decode": "vae"}


@dataclass
class PhaseEstimate:
    """Device memory of one phase: resident weights per component plus activations."""

    name: str
    weights_bytes: dict[str, int]
    activation_bytes: int  # traced activations plus the kernel workspaces a run can't do without
    # The caching allocator (advisor/plan/allocator.py, replaying the traced allocation pattern):
    reserve_bytes: int = 0  # what stays stranded in split segments when the card is full
    cached_bytes: int = 0  # what it keeps cached beyond the allocated peak when the card has room
    # cuDNN's convolution workspace, taken only where the card has room: when allocating it fails,
    # PyTorch tries the next engine, down to ones with none (`_device_activation`)
    workspace_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        """Allocated bytes at the phase's peak (comparable with torch.cuda.max_memory_allocated)."""
        return sum(self.weights_bytes.values()) + self.activation_bytes + self.workspace_bytes

    @property
    def tensor_bytes(self) -> int:
        """The allocated peak without cuDNN's workspace: the tensors, what a rehearsal sees."""
        return self.device_bytes - self.workspace_bytes

    @property
    def reserved_bytes(self) -> int:
        """What the phase needs of the card: the least the caching allocator runs it in, giving
        cached blocks back and cuDNN settling for less workspace when the card is full (what a
        budget must hold)."""
        return self.tensor_bytes + self.reserve_bytes

    @property
    def cached_peak_bytes(self) -> int:
        """What torch.cuda.max_memory_reserved shows for the phase on a card with room to spare."""
        return self.device_bytes + max(self.cached_bytes, self.reserve_bytes)


@dataclass
class Estimate:
    """Predicted peaks (bytes) and latency (seconds) of one configuration on one target."""

    peak_vram_bytes: int  # what must fit on the card: the least the caching allocator runs it in
    peak_vram_allocated_bytes: int  # the allocated peak (torch.cuda.max_memory_allocated)
    peak_vram_reserved_bytes: int  # max_memory_reserved on a card with room (the allocator keeps its cache)
    peak_ram_bytes: int
    peak_phase: str
    phases: list[PhaseEstimate]
    weight_bytes: dict[str, int]  # each component's weights in the config's storage format
    ram_breakdown: dict[str, int]
    steady_ram_weight_bytes: int  # weights that stay in RAM once loaded (offloaded or pinned copies)
    disk_bytes: int
    latency_s: float
    step_latency_s: float
    latency_breakdown: dict[str, float]
    notes: list[str] = field(default_factory=list)
    warmup_s: float = 0.0  # one-off work at the first call (torch.compile's, cold caches): not in latency_s
    # Where the components are spread over several GPUs: each GPU's peak (what must fit it), by index;
    # `phases` are then the fullest GPU's.
    gpu_peaks_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for phase, obj in zip(data["phases"], self.phases):
            phase["device_bytes"] = obj.device_bytes
        return data

    def summary(self) -> dict[str, Any]:
        """The headline numbers, as `recommend --json` and a config's provenance carry them."""
        return {
            "peak_vram_bytes": self.peak_vram_bytes,
            "peak_vram_allocated_bytes": self.peak_vram_allocated_bytes,
            "peak_vram_reserved_bytes": self.peak_vram_reserved_bytes,
            "peak_ram_bytes": self.peak_ram_bytes,
            "peak_phase": self.peak_phase,
            "disk_bytes": self.disk_bytes,
            "latency_s": round(self.latency_s, 3),
            "step_latency_s": round(self.step_latency_s, 4),
            "warmup_s": round(self.warmup_s, 1),
        }

    def limited_peak(self, device: str) -> int:
        """The predicted peak the budget limits on `device` (see `advisor.plan.scenario.limited_peak`)."""
        return limited_peak(device, vram_bytes=self.peak_vram_bytes, ram_bytes=self.peak_ram_bytes)


# --- work and activations -----------------------------------------------------------------------


def _device_activation(
    profile: ModelProfile, config: OptimizationConfig, phase: str, work: Work, target: TargetHardware, on_cpu: bool
) -> tuple[int, int, int, int]:
    """(allocated activation bytes incl. the workspaces a run needs, what the allocator strands when
    the card is full, what it keeps cached when it has room, the convolution workspace cuDNN takes
    where there is room) of one phase."""
    if on_cpu:
        return int(work.activation_bytes), 0, 0, 0
    k = constants()
    cublas = k["cublas_workspace_bytes"]
    allocated = work.activation_bytes + cublas.get(target.generation, cublas["default"])
    q = config.quantization
    if phase == "denoising" and q and quantization.backend_of(q).dequantises_per_layer(q, bool(config.compile)):
        # Kernels that expand a layer's weight to the compute dtype before the matmul hold one
        # layer's worth at a time (`QuantBackend.dequantises_per_layer`).
        denoisers = [d for d in profile.by_role("denoiser") if d.name in q.components]
        allocated += max((d.largest_layer_parameters * dtype_size(config.dtype) for d in denoisers), default=0)
    # cuDNN's convolution workspace, as a multiple of the decode's largest tensor (a convolution's
    # workspace grows with its input). PyTorch allocates it through the caching allocator and, when
    # that fails, tries the next engine the heuristics rank, down to fallback engines (Conv_v8.cpp
    # `try_configs`: `catch (c10::OutOfMemoryError&)` moves on; Conv_v7.cpp `try_all` likewise),
    # so it shows in max_memory_allocated where the card has room but a run never needs it.
    # A formula without a trace knows no largest tensor: a tenth of the peak stands in for it.
    largest = work.largest_bytes if work.traced else work.activation_bytes / 10
    workspace = largest * k["vae_decode_workspace_factor"] if phase == "vae_decode" else 0
    return int(allocated), int(work.stranded_bytes), int(work.cached_bytes), int(workspace)


# --- the estimate -------------------------------------------------------------------------------


def estimate_for(scenario: Scenario, config: OptimizationConfig) -> Estimate:
    """`estimate` of `config` for `scenario`, computed once per config and scenario: the rule engine
    asks for the same candidate from several rules and from its scoring."""
    key = config.key
    if key not in scenario.estimates:
        scenario.estimates[key] = estimate(
            scenario.profile, scenario.workload, config, scenario.target, memo=scenario.memo
        )
    return scenario.estimates[key]


def resident_blocks_that_fit(scenario: Scenario, config: OptimizationConfig, name: str) -> int:
    """The most blocks of component `name` that partial offload (``offload.resident_blocks``) can
    keep resident with the peak of every phase within the scenario's budget; 1 when not even one
    does (the candidate then fails the budget like any other). Kept blocks stay resident in every
    phase, so one estimate's phases give each count's peak: the phase's bytes with this
    component's weights replaced by what that count keeps (`advisor.levers.offload.resident_bytes`)."""
    key = ("fit", config.key, name)
    if key in scenario.memo:
        return scenario.memo[key]
    component = next(c for c in scenario.profile.components if c.name == name)
    weights = weight_bytes(component, config)
    phases = estimate_for(scenario, config).phases
    budget = scenario.budget_bytes
    k = constants()

    def peak(count: int) -> int:
        return max(
            p.reserved_bytes
            if p.name == LOADING  # what loading holds doesn't depend on the blocks kept
            else p.reserved_bytes
            - p.weights_bytes.get(name, 0)
            + offload.resident_bytes(component, weights, config, ROLE_OF_PHASE[p.name] == component.role, count, k=k)
            for p in phases
        )

    # The peak grows with the count: bisect for the largest count within the budget.
    low, high = 1, sum(b.count for b in component.blocks) - 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if peak(middle) <= budget else (low, middle - 1)
    scenario.memo[key] = low
    return low


def estimate(
    profile: ModelProfile,
    workload: Workload,
    config: OptimizationConfig,
    target: TargetHardware,
    *,
    memo: dict | None = None,
) -> Estimate:
    """Predict peak device memory, peak host RAM and latency of running `workload` with `config`.

    >>> from advisor.probe.models import load_profile
    >>> from advisor.probe.workload import make_workload
    >>> from advisor.probe.target import planned_target
    >>> profile = load_profile("black-forest-labs/FLUX.1-dev")
    >>> e = estimate(profile, make_workload(profile), OptimizationConfig(), planned_target(machine=None, vram=80 * 2**30))
    >>> round(e.weight_bytes["transformer"] / 2**30, 1)
    22.2
    """
    if workload.kind != profile.workload:
        raise EstimateError(f"workload is {workload.kind!r} but {profile.model_id} is an {profile.workload} pipeline")
    unknown = sorted({name for _key, name in config.named_components()} - {c.name for c in profile.components})
    if unknown:
        raise EstimateError(
            f"config names {unknown} which {profile.model_id} does not have; it has {[c.name for c in profile.components]}"
        )
    weights = {c.name: weight_bytes(c, config) for c in profile.components}
    on_cpu = target.device == "cpu" or config.device == "cpu"
    k = constants()

    works = phase_work(profile, workload, config, memo)
    phases = []
    for phase in PHASES:
        role = ROLE_OF_PHASE[phase]
        active = [c for c in profile.components if c.role == role]
        if phase == "denoising" and offload.only_one_denoiser_resident(config) and len(active) > 1:
            active = [max(active, key=lambda c: weights[c.name])]  # Wan2.2's experts take turns
        if phase == "text_encoding" and len(active) > 1:
            order = encoding_order(profile.offload_sequence, [c.name for c in active])
            passes = encoding_passes(profile.pipeline_class, workload, profile.pipeline_config)
            together = offload.encoders_resident_at_once(config, order, weights, passes)
            active = [c for c in active if c.name in together]
        resident = {
            c.name: offload.resident_bytes(
                c, weights[c.name], config, c in active, activation=works[phase].activation_bytes, k=k
            )
            for c in profile.components
            if c.role != "other" or offload.unused_components_resident(config)
        }
        activation, stranded, cached, workspace = _device_activation(
            profile, config, phase, works[phase], target, on_cpu
        )
        share = math.prod(lever.activation_share(config, phase) for lever in LEVERS)  # split over GPUs
        if share != 1:
            activation, stranded, cached = int(activation * share), int(stranded * share), int(cached * share)
            activation += int(works[phase].gathered_bytes)
        if phases and not offload.empties_cache_between_models(config):
            # Nothing gives the cache back between phases: the earlier phases' cached segments stay
            # reserved beside this one's (an upper bound: some of its requests may reuse them).
            cached += phases[-1].cached_bytes
        weights_here = {n: b for n, b in resident.items() if b}
        room = target.vram_total_bytes - (sum(weights_here.values()) + activation + stranded)
        workspace = min(workspace, max(room, 0))  # cuDNN settles for what the card has left
        phases.append(PhaseEstimate(phase, weights_here, activation, stranded, cached, workspace))
    placed = offload.gpu_placement(config, profile.components, target.gpu_count, target.vram_free_bytes)
    gpu_peaks: dict[str, int] = {}
    if placed and not on_cpu:
        phases, gpu_peaks = _fullest_gpu(phases, placed, profile)
    # Loading with no device_map (sequential offloading, 8-bit models, offloading to disk):
    # bitsandbytes quantizes every component it converts straight onto the GPU, all there at once
    # until the offload call moves them off. Otherwise, under group offloading, 4-bit models load onto
    # the host and go to the card one at a time (`offload.load_device_map`).
    loaded = offload.on_device_after_loading(config, [c.name for c in profile.components])
    if loaded and offload.OFFLOAD.is_on(config) and not on_cpu:
        phases.insert(0, PhaseEstimate(LOADING, {n: weights[n] for n in sorted(loaded)}, 0))
    elif (moved := offload.moved_whole_before_offloading(config)) and not on_cpu:
        phases.insert(0, _moving_the_largest_whole(profile, config, weights, moved))
    peak = max(phases, key=lambda p: p.reserved_bytes)

    ram, disk, kept = _host_memory(profile, config, weights, on_cpu, peak)
    seconds, step, breakdown = latency(profile, workload, config, target, weights, works, on_cpu, memo)
    notes = [
        f"{c.name}: no traced FLOP and activation curves; estimated with the parameter formula"
        for c in profile.components
        if c.role in ("denoiser", "text_encoder", "vae") and not _traced(c)
    ]
    q = config.quantization
    if q is not None and not config.compile and (note := quantization.backend_of(q).eager_note(q)):
        notes.append(note)
    notes += [note for lever in LEVERS if (note := lever.warmup_note(config))]
    used = levers.processes(config)  # one per GPU
    if used > target.gpu_count and not on_cpu:
        notes.append(
            f"the config runs on {used} GPUs and {target.cards} has {target.gpu_count}: figures are per GPU of {used}"
        )
    return Estimate(
        peak_vram_bytes=0 if on_cpu else peak.reserved_bytes,
        peak_vram_allocated_bytes=0 if on_cpu else max(p.device_bytes for p in phases),
        peak_vram_reserved_bytes=0 if on_cpu else max(p.cached_peak_bytes for p in phases),
        peak_ram_bytes=sum(ram.values()),
        peak_phase=peak.name,
        phases=phases,
        weight_bytes=weights,
        ram_breakdown=ram,
        steady_ram_weight_bytes=kept,
        disk_bytes=disk,
        latency_s=seconds,
        step_latency_s=step,
        latency_breakdown=breakdown,
        notes=notes,
        warmup_s=sum(lever.warmup_s(config, profile, constants()) for lever in LEVERS),
        gpu_peaks_bytes=gpu_peaks,
    )


def _moving_the_largest_whole(
    profile: ModelProfile, config: OptimizationConfig, weights: dict[str, int], moved: set[str]
) -> PhaseEstimate:
    """The card while the largest of the models moved there whole before their offloading
    (`offload.moved_whole_before_offloading`) is there: that model's weights beside what every
    other group-offloaded model keeps resident (an upper bound: those applied after it are not on
    the card yet). The models kept on the card whole move there after all the offloading."""
    largest = max(sorted(moved), key=lambda name: weights[name])
    on_card = {
        c.name: offload.resident_bytes(c, weights[c.name], config, active=False, k=constants())
        for c in profile.components
        if c.name != largest and offload.group_offloaded(config, c.name)
    }
    return PhaseEstimate(LOADING, {name: b for name, b in {**on_card, largest: weights[largest]}.items() if b}, 0)


def _fullest_gpu(
    phases: list[PhaseEstimate], placed: dict[str, int | str], profile: ModelProfile
) -> tuple[list[PhaseEstimate], dict[str, int]]:
    """The phases as the fullest of the GPUs the components are spread over sees them, and each GPU's
    peak: a GPU holds its components' weights all along, and a phase's activations where the phase's
    component runs (`advisor.levers.offload.balanced`)."""
    per_gpu = {}
    for gpu in sorted({at for at in placed.values() if isinstance(at, int)}):
        mine = {name for name, at in placed.items() if at == gpu}
        seen = []
        for p in phases:
            here = any(c.name in mine for c in profile.components if c.role == ROLE_OF_PHASE[p.name])
            seen.append(
                PhaseEstimate(
                    p.name,
                    {name: b for name, b in p.weights_bytes.items() if name in mine},
                    p.activation_bytes if here else 0,
                    p.reserve_bytes if here else 0,
                    p.cached_bytes if here else 0,
                    p.workspace_bytes if here else 0,
                )
            )
        per_gpu[gpu] = seen
    peaks = {str(gpu): max(p.reserved_bytes for p in seen) for gpu, seen in per_gpu.items()}
    fullest = max(per_gpu, key=lambda gpu: peaks[str(gpu)])
    return per_gpu[fullest], peaks


def _host_memory(profile, config, weights, on_cpu, peak) -> tuple[dict[str, int], int, int]:
    """Host RAM peak as named parts that add up to it, bytes spilled to disk, and weight bytes kept
    in RAM once loaded. The peak is the larger of loading and running."""
    k = constants()
    ram = {"process": k["host_baseline_bytes"]}
    # Loading costs host RAM only for what it converts. diffusers reads each shard memory-mapped, and a
    # component stored in the dtype it runs in keeps the file's pages (the kernel can drop them: they
    # are not the process's own memory; measured by tests/test_host_memory.py); one that is converted
    # is built anew, keeping its shard's pages next to the new tensors while it loads, and some
    # backends first materialise it at the compute dtype before quantizing. Nothing is staged for
    # what loads straight onto the GPU (`offload.on_device_after_loading`).
    read_whole = quantization.read_into_ram(config)  # a GGUF file, wherever it goes after
    onto_device = offload.on_device_after_loading(config, [c.name for c in profile.components]) - read_whole
    materialised = quantization.materialised_at_compute_dtype(config)

    def converted(c) -> bool:
        return not (c.dtype == config.dtype and weights[c.name] == c.bytes)

    def transient(c) -> int:
        if not converted(c) or c.name in read_whole:  # none beyond the copy itself
            return 0
        # Loading converts one shard at a time; catalog entries don't record their shards, and
        # diffusers and transformers write shards of at most 10 GB.
        shard = c.largest_file_bytes or min(c.bytes, k["default_shard_bytes"])
        at_compute_dtype = (
            shard / c.bytes * c.parameters * dtype_size(config.dtype) if c.name in materialised and c.bytes else 0
        )
        return int(shard + at_compute_dtype)

    in_ram = [c for c in profile.components if c.name not in onto_device]
    loading = sum(weights[c.name] for c in in_ram if converted(c)) + max((transient(c) for c in in_ram), default=0)
    disk = 0
    if on_cpu:
        kept = sum(weights.values())
        running = kept + peak.activation_bytes
        ram["weights"] = kept
        ram["activations"] = peak.activation_bytes
    else:
        ram["cuda_runtime"] = k["host_cuda_context_bytes"]
        kept, disk = offload.host_bytes(profile.components, config, weights, k)
        running = kept
        ram["weights"] = kept
    if loading > running:
        ram["loading"] = loading - running
    processes = levers.processes(config)
    if processes > 1:  # one per GPU, each loading the pipeline (`advisor.levers.multi_gpu`)
        ram[f"the other {processes - 1} processes"] = (processes - 1) * sum(ram.values())
    return ram, disk, kept
