"""What each phase of a generation computes and holds, per component: FLOPs, bytes written by
memory-bound ops, and the activation peak.

The numbers come from the component's trace (curves fitted on the meta device by `advisor.trace`,
stored in the catalog entry or the user's cache) evaluated at the workload's size: pure arithmetic,
no torch. A component without a trace falls back to the formula below, and the estimate says so.
Traces are in bfloat16; other dtypes scale the bytes by their element size. `phase_work` sums the
components of each phase, and `constants` holds the estimate's constants (values only; their
sources stay in ``advisor/data/estimate_constants.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache, reduce
from typing import Any, Callable

from advisor.config import OptimizationConfig
from advisor.levers import LEVERS, ActivationShape, DecodeMode
from advisor.paths import DATA_DIR
from advisor.plan.allocator import AllocatorSettings
from advisor.plan.replay import PatternPeaks, allocation_peaks, nearest_replay
from advisor.probe.models import ComponentProfile, ModelProfile
from advisor.probe.safetensors_header import dtype_size
from advisor.probe.workload import Workload, pipeline_behaviour, run_behaviour


TRACE_VERSION = 3  # the record layout advisor.trace writes; an older record counts as no trace
TRACE_DTYPE_BYTES = 2


@lru_cache(maxsize=1)
def constants() -> dict[str, Any]:
    """The estimate's constants (value only; sources stay in the data file)."""
    raw = json.loads((DATA_DIR / "estimate_constants.json").read_text())
    return {key: entry["value"] for key, entry in raw.items() if not key.startswith("_")}


def evaluate(basis: list[str], coefficients: list[float], variables: dict[str, float]) -> float:
    """Sum of coefficient x term, a term being '1' or a product like 'p^2*f' of `variables`."""
    total = 0.0
    for term, coefficient in zip(basis, coefficients):
        value = 1.0
        for factor in term.split("*"):
            if factor != "1":
                name, _, power = factor.partition("^")
                value *= variables[name] ** int(power or 1)
        total += coefficient * value
    return total


def latent_geometry(profile: ModelProfile, workload: Workload) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of one sample: what the VAE encodes it to."""
    vae = profile.vae
    spatial = vae.facts.get("spatial_compression", 8) if vae else 8
    temporal = vae.facts.get("temporal_compression", 1) if vae else 1
    frames = (workload.frames - 1) // temporal + 1 if workload.kind == "video" else 1
    return frames, max(workload.height // spatial, 1), max(workload.width // spatial, 1)


def text_tokens(profile: ModelProfile) -> int:
    """Text tokens the denoiser attends to: the sequence of the wide encoders (T5/LLM, and CLIP-G
    for SD3 and SDXL; not CLIP-L, whose pooled output only conditions), at the pipeline's length."""
    return sum(
        t.facts.get("max_sequence_length", 0)
        for t in profile.by_role("text_encoder")
        if t.facts.get("hidden_size", 0) > 1024
    )


def denoiser_tokens(profile: ModelProfile, denoiser: ComponentProfile, workload: Workload) -> tuple[int, int]:
    """(sequence length of one denoiser call, hidden size) for this workload."""
    facts = denoiser.facts
    vae = profile.vae
    latent_channels = vae.facts.get("latent_channels", 4) if vae else 4
    patch = facts.get("patch_size") or 1
    if isinstance(patch, list):  # Wan: (t, h, w)
        patch_t, patch_h, patch_w = ([1, 1, 1] + patch)[-3:]
    else:
        patch_t, patch_h, patch_w = facts.get("patch_size_t") or 1, patch, patch
    # Flux and Qwen-Image pack 2x2 latents into channels instead of using patch_size.
    packed = math.isqrt(max(facts.get("in_channels", latent_channels) // max(latent_channels, 1), 1))
    patch_h, patch_w = max(patch_h, packed), max(patch_w, packed)
    frames, height, width = latent_geometry(profile, workload)
    tokens = max(frames // patch_t, 1) * max(height // patch_h, 1) * max(width // patch_w, 1)
    hidden = facts.get("hidden_size")
    if not hidden and facts.get("block_out_channels"):  # UNet: attention runs at 1/2 and 1/4 resolution
        tokens //= 4
        hidden = facts["block_out_channels"][-1]
    if pipeline_behaviour(profile.pipeline_class, profile.workload).get("joint_text_tokens"):
        tokens += text_tokens(profile)  # joint attention appends the text tokens
    return tokens, int(hidden or 1024)


def sequence_tokens(profile: ModelProfile, workload: Workload) -> tuple[int, int]:
    """(latent tokens, joint text tokens) of one call of the first denoiser: the text tokens are 0
    where the text is attended to across (cross-attention) rather than joined to the sequence."""
    denoiser = profile.by_role("denoiser")[0]
    tokens, _hidden = denoiser_tokens(profile, denoiser, workload)
    joint = (
        text_tokens(profile)
        if pipeline_behaviour(profile.pipeline_class, profile.workload).get("joint_text_tokens")
        else 0
    )
    return tokens - joint, joint


@dataclass(frozen=True)
class Work:
    """One phase's work for one component: FLOPs on tensor cores (the linear layers' apart from the
    convolutions', since quantization replaces only nn.Linear), bytes written by the rest, and the
    activation peak (bytes, at the run's dtype). ``traced`` is False for the formula."""

    matmul_flops: float  # linear layers (and bare matmuls)
    attention_flops: float
    written_bytes: float
    activation_bytes: float
    traced: bool
    largest_bytes: float = 0.0  # the largest single activation tensor
    conv_flops: float = 0.0
    # The caching allocator over the activations, from the traced allocation pattern replayed at this
    # size (`advisor.plan.allocator.replay_pattern`): what it keeps stranded in split segments when
    # the card is full (what must fit beyond the allocated peak), and what it keeps cached when the
    # card has room (max_memory_reserved beyond max_memory_allocated). 0 without a trace.
    stranded_bytes: float = 0.0
    cached_bytes: float = 0.0
    # What one GPU of a call split over several gathers from the others beside its share of the
    # activations (ring attention's keys and values): not divided by the split (`Lever.gathered_bytes`).
    gathered_bytes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(
            self.matmul_flops + other.matmul_flops,
            self.attention_flops + other.attention_flops,
            self.written_bytes + other.written_bytes,
            max(self.activation_bytes, other.activation_bytes),  # components run one after another
            self.traced and other.traced,
            max(self.largest_bytes, other.largest_bytes),
            self.conv_flops + other.conv_flops,
            max(self.stranded_bytes, other.stranded_bytes),
            max(self.cached_bytes, other.cached_bytes),
            max(self.gathered_bytes, other.gathered_bytes),
        )

    def times(self, calls: int) -> Work:
        """`calls` calls one after another: the work adds up, the activations don't."""
        return replace(
            self,
            matmul_flops=self.matmul_flops * calls,
            attention_flops=self.attention_flops * calls,
            written_bytes=self.written_bytes * calls,
            conv_flops=self.conv_flops * calls,
        )


NO_WORK = Work(0.0, 0.0, 0.0, 0.0, True)


def trace_of(component: ComponentProfile) -> dict | None:
    trace = component.trace
    return trace if isinstance(trace, dict) and trace.get("version") == TRACE_VERSION else None


def _bytes_ratio(trace: dict, dtype: str) -> dict[str, float]:
    """Bytes at `dtype` over the traced bfloat16 bytes: float32's is traced (norms and softmax run in
    float32 under bf16 too, so it is less than 2); float16 is bf16's size."""
    if dtype == "float32":
        return {
            "activation_peak_bytes": 2.0,
            "written_bytes": 2.0,
            "largest_tensor_bytes": 2.0,
            **trace.get("float32_ratio", {}),
        }
    ratio = dtype_size(dtype) / TRACE_DTYPE_BYTES
    return dict.fromkeys(("activation_peak_bytes", "written_bytes", "largest_tensor_bytes"), ratio)


def _with_allocator(
    work: Work, record: dict | None, variables: dict[str, float], scale: float, expandable: bool
) -> Work:
    """`work` with the allocator's overheads from a traced allocation record, at this size."""
    if not record:
        return work
    peaks = replay_pattern(record, variables, scale, AllocatorSettings(expandable_segments=expandable))
    return replace(
        work,
        stranded_bytes=peaks.needs - peaks.allocated,
        cached_bytes=max(peaks.reserved, peaks.needs) - peaks.allocated,
    )


_REPLAYS: dict[tuple, tuple[dict, Any]] = {}
# The allocator settings a plan replays with (a config's `expandable_segments` or not): the ones the
# catalog keeps replays for.
STORED_SETTINGS = (AllocatorSettings(), AllocatorSettings(expandable_segments=True))


def pattern_ops(record: dict, variables: dict[str, float], scale: float = 1.0) -> list[int]:
    """An allocation pattern (`advisor.trace.pattern`) at a size, as `allocation_peaks` takes it:
    each allocation's bytes evaluated at `variables` times `scale`, each free as -k (the allocation
    k back). Its events are a string as stored, a list while the tracer builds it."""
    sizes = [max(int(evaluate(record["basis"], c, variables) * scale), 0) for c in record["sizes"]]
    events = record["events"]
    return [sizes[e] if e >= 0 else e for e in (map(int, events.split()) if isinstance(events, str) else events)]


def replay_pattern(
    record: dict, variables: dict[str, float], scale: float = 1.0, settings: AllocatorSettings = AllocatorSettings()
) -> Any:
    """A traced call's allocator peaks (`advisor.plan.replay.PatternPeaks`) at a plan's size: its
    allocation pattern (`advisor.trace.pattern`) with each allocation's bytes evaluated at
    `variables` and multiplied by `scale` (the batch, a dtype's size), replayed; or, for a call whose
    pattern changes with size, the replay at the nearest traced size. Cached per record and size:
    planning asks for the same few many times."""
    key = (id(record), tuple(sorted(variables.items())), scale, settings)
    if key not in _REPLAYS:
        if "replayed" in record:
            peaks = nearest_replay(record["replayed"], variables, scale, settings)
        else:
            peaks = _stored_replay(record, variables, scale, settings) or allocation_peaks(
                pattern_ops(record, variables, scale), settings
            )
        _REPLAYS[key] = (record, peaks)  # the record kept alive: its id stays its own
    return _REPLAYS[key][1]


def _stored_replay(
    record: dict, variables: dict[str, float], scale: float, settings: AllocatorSettings
) -> PatternPeaks | None:
    """The replay `store_default_replays` kept in the record for this very size, if any."""
    if settings not in STORED_SETTINGS:
        return None
    for stored in record.get("replays", ()):
        if (stored["expandable_segments"], stored["scale"], stored["variables"]) == (
            settings.expandable_segments,
            scale,
            variables,
        ):
            return PatternPeaks(stored["allocated"], stored["reserved"], stored["needs"])
    return None


def store_default_replays(profile: ModelProfile) -> None:
    """Replay each traced allocation pattern of `profile` at its default workload (bf16, VAE tiled
    and not, both allocator settings) and keep the results in the pattern records (``replays``):
    a plan at the default size, the usual one, then replays nothing, which keeps `recommend`'s cold
    start where it was before the allocator model. The catalog builder calls it after tracing."""
    from advisor.config import Vae
    from advisor.probe.workload import make_workload

    workload = make_workload(profile)
    for expandable in (False, True):
        for vae in (Vae(), Vae(tiling=True)):
            phase_work(profile, workload, OptimizationConfig(expandable_segments=expandable, vae=vae))
    records = {id(r): r for c in profile.components for r in _allocation_records(c)}
    found: dict[int, list[dict]] = {}
    for (record_id, variables, scale, settings), (_record, peaks) in _REPLAYS.items():
        if record_id in records and settings in STORED_SETTINGS:
            found.setdefault(record_id, []).append(
                {
                    "variables": dict(variables),
                    "scale": scale,
                    "expandable_segments": settings.expandable_segments,
                    "allocated": peaks.allocated,
                    "reserved": peaks.reserved,
                    "needs": peaks.needs,
                }
            )
    for record_id, replays in found.items():
        records[record_id]["replays"] = sorted(replays, key=lambda r: (r["expandable_segments"], json.dumps(r)))


def _allocation_records(component: ComponentProfile) -> list[dict]:
    """The allocation patterns of a component's trace that planning replays (not stored replays)."""
    trace = trace_of(component) or {}
    records = [trace.get("allocations"), *(trace[m].get("allocations") for m in ("untiled", "tiled") if m in trace)]
    return [r for r in records if r and "replayed" not in r]


def _scaled(values: dict[str, float], scale: float, ratio: dict[str, float]) -> Work:
    return Work(
        matmul_flops=scale * values["matmul_flops"],
        conv_flops=scale * values.get("conv_flops", 0.0),
        attention_flops=scale * values["attention_flops"],
        written_bytes=scale * ratio["written_bytes"] * values["written_bytes"],
        activation_bytes=max(scale * ratio["activation_peak_bytes"] * values["activation_peak_bytes"], 0.0),
        traced=True,
        largest_bytes=max(scale * ratio["largest_tensor_bytes"] * values.get("largest_tensor_bytes", 0.0), 0.0),
    )


def latent_positions(profile: ModelProfile, workload: Workload) -> int:
    frames, height, width = latent_geometry(profile, workload)
    return frames * height * width


def denoiser_work(
    profile: ModelProfile,
    denoiser: ComponentProfile,
    workload: Workload,
    dtype: str,
    batch: int,
    k: dict,
    *,
    expandable: bool = False,
) -> Work:
    """One denoiser call on `batch` samples (`expandable`: the allocator's segments, for its overheads)."""
    ratio = dtype_size(dtype) / TRACE_DTYPE_BYTES
    trace = trace_of(denoiser)
    if trace:
        x = latent_positions(profile, workload)
        values = {q: evaluate(trace["basis"], c, {"x": x}) for q, c in trace["fit"].items()}
        ratio = _bytes_ratio(trace, dtype)
        work = _scaled(values, batch, ratio)
        scale = batch * ratio["activation_peak_bytes"]
        return _with_allocator(work, trace.get("allocations"), {"x": x}, scale, expandable)
    tokens, hidden = denoiser_tokens(profile, denoiser, workload)
    layers = sum(b.count for b in denoiser.blocks) or 1
    live = k["denoiser_live_tensors"] * tokens * hidden * TRACE_DTYPE_BYTES
    return Work(
        matmul_flops=batch * 2 * denoiser.linear_parameters * tokens,
        attention_flops=batch * 4 * tokens * tokens * hidden * layers,
        written_bytes=batch * ratio * live * layers,
        activation_bytes=batch * ratio * live,
        traced=False,
    )


def text_encoder_work(
    encoder: ComponentProfile, workload: Workload, dtype: str, k: dict, *, expandable: bool = False
) -> Work:
    ratio = dtype_size(dtype) / TRACE_DTYPE_BYTES
    trace = trace_of(encoder)
    if trace:
        ratio = _bytes_ratio(trace, dtype)
        work = _scaled(trace, workload.batch, ratio)
        scale = workload.batch * ratio["activation_peak_bytes"]
        return _with_allocator(work, trace.get("allocations"), {}, scale, expandable)
    tokens = encoder.facts.get("max_sequence_length", 77)
    live = k["text_encoder_live_tensors"] * tokens * encoder.facts.get("hidden_size", 768) * TRACE_DTYPE_BYTES
    layers = encoder.facts.get("num_layers", 12)
    return Work(
        workload.batch * 2 * encoder.parameters * tokens,
        0.0,
        workload.batch * ratio * live * layers,
        workload.batch * ratio * live,
        False,
    )


def decode_mode(config: OptimizationConfig) -> DecodeMode:
    """How `config` has the VAE decode: what the levers make of it, in their order."""
    return reduce(lambda mode, lever: lever.decode_mode(config, mode), LEVERS, DecodeMode())


def vae_decode_work(
    vae: ComponentProfile, workload: Workload, dtype: str, mode: DecodeMode, *, k: dict, expandable: bool = False
) -> Work:
    """Decoding the batch: sliced, one sample at a time (the peak of one); else all at once; tiled,
    in tiles of the VAE's sample size (and 16 frames at a time for video)."""
    tiling, slicing = mode.tiled, mode.sliced
    ratio = dtype_size(dtype) / TRACE_DTYPE_BYTES
    frames = decoded_frames(vae, workload)
    trace = trace_of(vae)
    at_once = 1 if slicing else workload.batch
    if trace:
        tile = trace.get("tile_pixels")
        mode = (
            "tiled"
            if tiling and tile and max(workload.height, workload.width) > tile and "tiled" in trace
            else "untiled"
        )
        variables = {"p": workload.height * workload.width, "f": frames}
        values = {q: evaluate(trace["basis"], c, variables) for q, c in trace[mode]["fit"].items()}
        ratio = _bytes_ratio(trace, dtype)
        work = _scaled(values, workload.batch, ratio)
        per_sample = at_once / workload.batch
        work = replace(
            work, activation_bytes=work.activation_bytes * per_sample, largest_bytes=work.largest_bytes * per_sample
        )
        scale = at_once * ratio["activation_peak_bytes"]
        return _with_allocator(work, trace[mode].get("allocations"), variables, scale, expandable)
    height, width = workload.height, workload.width
    if tiling and vae.facts.get("supports_tiling"):
        tile = vae.config.get("sample_size") if workload.kind == "image" else 256
        tile = tile if isinstance(tile, int) and tile > 0 else k["vae_tile_default"]
        height, width = min(height, tile), min(width, tile)
    live_frames = min(frames, 16) if tiling else frames  # temporal tiling (HunyuanVideo/LTX tile 16 frames)
    channels = (vae.facts.get("block_out_channels") or [vae.config.get("base_dim", 128)])[0]
    live = k["vae_decode_live_tensors"] * height * width * live_frames * channels * TRACE_DTYPE_BYTES * ratio
    # A conv decoder applies its weights at roughly 1/16 of the output pixels on average.
    flops = 2 * vae.parameters * workload.height * workload.width * frames * workload.batch / 16
    return Work(0.0, 0.0, live * workload.batch, live * at_once, False, conv_flops=flops)


def decoded_frames(vae: ComponentProfile, workload: Workload) -> int:
    """Frames the VAE decodes: the pipeline rounds the requested count to what its latents hold."""
    if workload.kind != "video":
        return 1
    temporal = vae.facts.get("temporal_compression", 1)
    return (workload.frames - 1) // temporal * temporal + 1


def call_batch(workload: Workload, behaviour: dict[str, Any]) -> int:
    """Samples per denoiser call: the workload's batch, doubled where guidance is batched in."""
    return workload.batch * (2 if behaviour["cfg"] == "batched" else 1)


def batches_samples(profile: ModelProfile, workload: Workload) -> bool:
    """Whether each denoiser call runs several samples (guidance batched in, or several images)."""
    return call_batch(workload, run_behaviour(profile.pipeline_class, workload, profile.pipeline_config)) > 1


def activation_shape(
    profile: ModelProfile, denoiser: ComponentProfile, workload: Workload, dtype: str, batch: int, calls: int
) -> ActivationShape:
    """One denoiser call's activations, as a lever's held bytes are made of them (`Lever.held_bytes`)."""
    tokens, hidden = denoiser_tokens(profile, denoiser, workload)
    channels = denoiser.facts.get("out_channels") or denoiser.facts.get("in_channels") or 64
    return ActivationShape(batch, calls, tokens, hidden, int(channels), dtype_size(dtype))


# --- a phase's work, summed over its components ---------------------------------------------------


def phase_work(
    profile: ModelProfile, workload: Workload, config: OptimizationConfig, memo: dict | None = None
) -> dict[str, Work]:
    """What each phase computes and holds, summed over its components.

    Denoising is one step: every denoiser call of it (guidance run as a second call or batched).
    The work depends on the dtype and a few flags only; `memo` (one profile and workload's) keeps
    what was computed.
    """
    flags = (config.dtype, *(lever.work_key(config) for lever in LEVERS))
    return _memo(memo, ("phases", *flags), lambda: _phase_work(profile, workload, config, memo))


def _phase_work(
    profile: ModelProfile, workload: Workload, config: OptimizationConfig, memo: dict | None
) -> dict[str, Work]:
    dtype, expandable = config.dtype, config.expandable_segments
    k = constants()
    behaviour = run_behaviour(profile.pipeline_class, workload, profile.pipeline_config)
    text = NO_WORK
    for encoder in profile.by_role("text_encoder"):
        text = text + text_work(encoder, workload, dtype, memo, expandable=expandable)
    denoise = NO_WORK
    for denoiser in profile.by_role("denoiser")[:1]:  # Wan2.2's experts run one at a time: one per step
        batch = call_batch(workload, behaviour)
        call = _memo(
            memo,
            ("denoise", dtype, expandable),
            lambda: denoiser_work(profile, denoiser, workload, dtype, batch, k, expandable=expandable),
        )
        calls = 2 if behaviour["cfg"] == "separate" else 1
        shape = activation_shape(profile, denoiser, workload, dtype, batch, calls)
        if denoiser.linear_parameters:
            shape = replace(shape, linear_tokens=call.matmul_flops / (2 * batch * denoiser.linear_parameters))
        held = sum(lever.held_bytes(config, shape) for lever in LEVERS)  # what a step cache keeps between steps
        added = [lever.call_work(config, denoiser, shape) for lever in LEVERS]  # a LoRA's unfused matmuls
        flops, written = sum(f for f, _ in added), sum(w for _, w in added)
        total = call.times(calls)
        denoise = replace(
            total,
            matmul_flops=total.matmul_flops + calls * flops,
            written_bytes=total.written_bytes + calls * written,
            activation_bytes=call.activation_bytes + held,
            gathered_bytes=sum(lever.gathered_bytes(config, shape) for lever in LEVERS),
        )
    vae = profile.vae
    decode = vae_decode_work(vae, workload, dtype, decode_mode(config), k=k, expandable=expandable) if vae else NO_WORK
    return {"text_encoding": text, "denoising": denoise, "vae_decode": decode}


def text_work(
    encoder: ComponentProfile, workload: Workload, dtype: str, memo: dict | None, *, expandable: bool = False
) -> Work:
    return _memo(
        memo,
        ("text", encoder.name, dtype, expandable),
        lambda: text_encoder_work(encoder, workload, dtype, constants(), expandable=expandable),
    )


def _memo(memo: dict | None, key: tuple, compute: Callable[[], Any]) -> Any:
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]
