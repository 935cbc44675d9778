"""The diffusers guidance as small named rules, and the engine that picks the best fit.

Three kinds of rule, each a small function with the reason the user reads and its source:

- **filter** rules reject candidates that can't run or are never worth it (bitsandbytes without
  CUDA, int8 dynamic quantization without compile, ...); they return why, or None;
- **adjust** rules complete a candidate the way the guidance says (dynamo flags for compile with
  bitsandbytes or offloading, VAE tiling when the decode dominates, ...); they return a new config;
- **prefer** rules break near-ties the way the guidance says (images: model offload over group
  offload; video: the reverse); they return a factor on the predicted latency.

`recommend()` builds the candidate set for the target, applies the rules, scores every survivor
with the estimate, and picks the fastest one whose predicted peaks fit the budget and the RAM.
Pure Python: no torch import, a few milliseconds for ~200 candidates.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from advisor.config import Compile, LayerwiseCasting, Offload, OptimizationConfig, Quantization
from advisor.errors import UsageError
from advisor.plan.estimate import Estimate, estimate
from advisor.probe.models import ModelProfile
from advisor.probe.target import TargetHardware
from advisor.probe.workload import Workload
from advisor.units import format_size

GIB = 2**30
DOCS = "https://huggingface.co/docs/diffusers/main/en/optimization"
SEED_PAGE = f"{DOCS}/speed-memory-optims"
# Text encoders smaller than this are not worth quantizing (CLIP-L is 0.12 B parameters).
LARGE_TEXT_ENCODER = 1_000_000_000
# Candidates within this share of the fastest count as a tie for the prefer rules.
TIE = 0.05


def default_budget(target: TargetHardware) -> int:
    """Free accelerator memory minus a safety reserve: 1 GiB + 5% of the card.

    The reserve covers what `max_memory_allocated` does not count (the CUDA context, ~0.5 GiB) and
    the caching allocator's fragmentation; on CPU the budget is the available RAM minus 10%.
    """
    if target.device == "cpu":
        return int(target.ram_available_bytes * 0.9)
    return max(int(target.vram_free_bytes - GIB - 0.05 * target.vram_total_bytes), 0)


@dataclass
class Context:
    """What rules may look at besides the candidate itself."""

    profile: ModelProfile
    workload: Workload
    target: TargetHardware
    packages: dict[str, str | None] | None  # installed versions; None when planning for another machine
    budget_bytes: int

    def missing(self, package: str) -> bool:
        """True only when planning for this machine and `package` is not installed here."""
        return self.packages is not None and not self.packages.get(package)


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str  # filter | adjust | prefer
    reason: str
    source: str
    apply: Callable[..., Any]


RULES: list[Rule] = []


def rule(name: str, kind: str, reason: str, source: str) -> Callable:
    """Register a rule; the decorated function keeps working on its own (for tests)."""

    def register(fn: Callable) -> Callable:
        RULES.append(Rule(name, kind, reason, source, fn))
        return fn

    return register


def rules_of(kind: str) -> list[Rule]:
    return [r for r in RULES if r.kind == kind]


def _version(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (text or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def peak_bytes(result: Estimate, target: TargetHardware) -> int:
    """The peak that the budget limits: GPU memory, or RAM for CPU inference."""
    return result.peak_ram_bytes if target.device == "cpu" else result.peak_vram_bytes


def preferred_dtype(target: TargetHardware) -> str:
    """bf16 where the hardware computes it natively; else fp16 on older GPUs and fp32 on CPUs."""
    if target.supports_bf16:
        return "bfloat16"
    return "float16" if target.device == "cuda" else "float32"


def _capability(target: TargetHardware) -> float:
    try:
        return float(target.compute_capability or 0)
    except ValueError:
        return 0.0


# --- filter rules -------------------------------------------------------------------------------


@rule(
    "bitsandbytes-needs-cuda",
    "filter",
    "bitsandbytes quantization needs a CUDA GPU; diffusers refuses to load it on CPU",
    "https://huggingface.co/docs/diffusers/main/en/quantization/bitsandbytes",
)
def bitsandbytes_needs_cuda(config: OptimizationConfig, ctx: Context) -> str | None:
    if config.quantization and config.quantization.backend.startswith("bitsandbytes"):
        if ctx.target.device != "cuda":
            return "bitsandbytes needs a CUDA GPU"
        if ctx.missing("bitsandbytes"):
            return "bitsandbytes is not installed"
    return None


@rule(
    "torchao-installed",
    "filter",
    "torchao quantization needs the torchao package (pip install 'advisor[torchao]')",
    "https://github.com/pytorch/ao",
)
def torchao_installed(config: OptimizationConfig, ctx: Context) -> str | None:
    if config.quantization and config.quantization.backend == "torchao" and ctx.missing("torchao"):
        return "torchao is not installed"
    return None


@rule(
    "fp8-compute-needs-sm89",
    "filter",
    "fp8 matmuls (torchao float8 dynamic) need compute capability 8.9 or newer (Ada, Hopper, Blackwell)",
    "https://github.com/pytorch/ao/tree/main/torchao/float8",
)
def fp8_compute_needs_sm89(config: OptimizationConfig, ctx: Context) -> str | None:
    if config.quantization and config.quantization.kind == "float8_dynamic" and _capability(ctx.target) < 8.9:
        return f"fp8 compute needs compute capability >= 8.9 (target: {ctx.target.compute_capability or 'none'})"
    return None


@rule(
    "dynamic-quantization-needs-compile",
    "filter",
    "int8/fp8 dynamic quantization without torch.compile is slower than not quantizing at all "
    "(Flux on H100: 130 s uncompiled vs 3.4 s compiled), so it is only offered compiled",
    "https://github.com/huggingface/diffusers/blob/main/docs/source/en/quantization/torchao.md",
)
def dynamic_quantization_needs_compile(config: OptimizationConfig, ctx: Context) -> str | None:
    if config.quantization and config.quantization.kind in {"int8_dynamic", "float8_dynamic"} and not config.compile:
        return f"{config.quantization.kind} is never worth it without torch.compile"
    return None


@rule(
    "offload-needs-an-accelerator",
    "filter",
    "model, group and sequential offloading move weights between CPU and an accelerator; on a CPU-only "
    "machine everything already lives in RAM",
    f"{DOCS}/memory",
)
def offload_needs_an_accelerator(config: OptimizationConfig, ctx: Context) -> str | None:
    if ctx.target.device != "cuda" and config.offload.strategy != "none":
        return "offloading needs an accelerator"
    return None


@rule(
    "installed-diffusers-supports-it",
    "filter",
    "the installed diffusers must have the API a config uses (regional compile and group offload "
    "with streams need diffusers >= 0.33; the advisor is tested with 0.42)",
    "https://github.com/huggingface/diffusers/releases",
)
def installed_diffusers_supports_it(config: OptimizationConfig, ctx: Context) -> str | None:
    installed = (ctx.packages or {}).get("diffusers")
    if installed is None:
        return None  # planning for another machine: nothing installed to check
    if _version(installed) < (0, 33) and (
        (config.compile and config.compile.regional) or (config.offload.strategy == "group")
    ):
        return f"diffusers {installed} lacks compile_repeated_blocks / enable_group_offload; upgrade to >= 0.33"
    return None


@rule(
    "torchao-cannot-offload-to-disk",
    "filter",
    "group offloading to disk stores groups as safetensors files, which cannot hold torchao-quantized tensors",
    f"{DOCS}/memory#group-offloading",
)
def torchao_cannot_offload_to_disk(config: OptimizationConfig, ctx: Context) -> str | None:
    quantization, offload = config.quantization, config.offload
    if quantization and quantization.backend == "torchao" and offload.strategy == "group" and offload.offload_to_disk_path:
        return "torchao weights cannot be offloaded to disk"
    return None


@rule(
    "compiled-torchao-needs-leaf-or-stream-offload",
    "filter",
    "a compiled torchao model cannot be group-offloaded block by block without streams: diffusers then "
    "moves blocks with Module.to, which cannot swap torchao weights that the compiled graph references",
    f"{DOCS}/memory#group-offloading",
)
def compiled_torchao_needs_leaf_or_stream_offload(config: OptimizationConfig, ctx: Context) -> str | None:
    quantization, offload = config.quantization, config.offload
    if (
        quantization
        and quantization.backend == "torchao"
        and config.compile
        and offload.strategy == "group"
        and offload.offload_type == "block_level"
        and not offload.use_stream
    ):
        return "compiled torchao + block-level group offload without streams"
    return None


# --- adjust rules -------------------------------------------------------------------------------


@rule(
    "dynamo-capture-for-bitsandbytes",
    "adjust",
    "compiling a bitsandbytes model needs torch._dynamo.config.capture_dynamic_output_shape_ops = True",
    SEED_PAGE,
)
def dynamo_capture_for_bitsandbytes(config: OptimizationConfig, ctx: Context) -> OptimizationConfig:
    if config.compile and config.quantization and config.quantization.backend.startswith("bitsandbytes"):
        return _with_compile(config, dynamo_config={**config.compile.dynamo_config, "capture_dynamic_output_shape_ops": True})
    return config


def _with_compile(config: OptimizationConfig, **changes: Any) -> OptimizationConfig:
    """`config` with some of its compile settings changed."""
    return config.model_copy(update={"compile": config.compile.model_copy(update=changes)})


@rule(
    "dynamo-cache-limit-with-offload",
    "adjust",
    "compiling with offloading raises torch._dynamo.config.cache_size_limit to 1000 to avoid recompiling "
    "as weights move",
    SEED_PAGE,
)
def dynamo_cache_limit_with_offload(config: OptimizationConfig, ctx: Context) -> OptimizationConfig:
    if config.compile and config.offload.strategy != "none":
        return _with_compile(config, dynamo_config={**config.compile.dynamo_config, "cache_size_limit": 1000})
    return config


@rule(
    "no-fullgraph-with-offload-hooks",
    "adjust",
    "group offloading and layerwise casting run diffusers hooks around every layer, which break a full "
    "graph: such components compile with fullgraph=False (as the seed page's offloading example does)",
    SEED_PAGE,
)
def no_fullgraph_with_offload_hooks(config: OptimizationConfig, ctx: Context) -> OptimizationConfig:
    if not (config.compile and config.compile.fullgraph):
        return config
    hooked = config.offload.strategy == "group" or (
        config.layerwise_casting and set(config.layerwise_casting.components) & set(config.compile.components)
    )
    return _with_compile(config, fullgraph=False) if hooked else config


@rule(
    "vae-tiling-when-decode-dominates",
    "adjust",
    "VAE tiling decodes in tiles when the decode would set the peak (large images, video), where the VAE supports it",
    f"{DOCS}/memory#vae-tiling",
)
def vae_tiling_when_decode_dominates(config: OptimizationConfig, ctx: Context) -> OptimizationConfig:
    vae = next(iter(ctx.profile.by_role("vae")), None)
    if vae is None or not vae.facts.get("supports_tiling") or config.vae.tiling:
        return config
    plain = estimate(ctx.profile, ctx.workload, config, ctx.target)
    if plain.peak_phase != "vae_decode":
        return config
    tiled = config.model_copy(update={"vae": config.vae.model_copy(update={"tiling": True})})
    # Tiles are the VAE's sample size (1024 px for Flux/SDXL): smaller images gain nothing.
    smaller = estimate(ctx.profile, ctx.workload, tiled, ctx.target)
    return tiled if peak_bytes(smaller, ctx.target) < peak_bytes(plain, ctx.target) else config


@rule(
    "vae-slicing-for-batches",
    "adjust",
    "VAE slicing decodes a batch one sample at a time: the decode peak no longer grows with the batch",
    f"{DOCS}/memory#vae-slicing",
)
def vae_slicing_for_batches(config: OptimizationConfig, ctx: Context) -> OptimizationConfig:
    vae = next(iter(ctx.profile.by_role("vae")), None)
    if ctx.workload.batch > 1 and vae is not None and vae.facts.get("supports_slicing") and not config.vae.slicing:
        return config.model_copy(update={"vae": config.vae.model_copy(update={"slicing": True})})
    return config


@rule(
    "channels-last-for-unets",
    "adjust",
    "channels_last memory format speeds up convolution-heavy UNets under torch.compile; transformers gain nothing",
    f"{DOCS}/fp16#channels-last",
)
def channels_last_for_unets(config: OptimizationConfig, ctx: Context) -> OptimizationConfig:
    unet = any(c.class_name.startswith("UNet") for c in ctx.profile.by_role("denoiser"))
    if config.compile and unet and not config.channels_last:
        return config.model_copy(update={"channels_last": True})
    return config


# --- prefer rules -------------------------------------------------------------------------------


@rule(
    "images-prefer-model-offload",
    "prefer",
    "for images, quantization + model CPU offload is usually the best trade-off: group offloading can't "
    "fully overlap transfers when each step's compute finishes quickly",
    SEED_PAGE,
)
def images_prefer_model_offload(config: OptimizationConfig, ctx: Context) -> float:
    return 1.0 + TIE if ctx.workload.kind == "image" and config.offload.strategy == "group" else 1.0


@rule(
    "video-prefers-group-offload",
    "prefer",
    "for video, quantization + group offloading tends to be better: video models are compute-bound, so "
    "transfers hide behind compute, and the activations get the memory model offload would keep for weights",
    SEED_PAGE,
)
def video_prefers_group_offload(config: OptimizationConfig, ctx: Context) -> float:
    return 1.0 + TIE if ctx.workload.kind == "video" and config.offload.strategy == "model" else 1.0


# --- candidates ---------------------------------------------------------------------------------


def quantization_choices(profile: ModelProfile) -> list[tuple[Quantization | None, LayerwiseCasting | None]]:
    """Which components to quantize, and how: the denoisers and large text encoders, never the VAE."""
    denoisers = [c.name for c in profile.by_role("denoiser")]
    encoders = [c.name for c in profile.by_role("text_encoder") if c.parameters >= LARGE_TEXT_ENCODER]
    both = denoisers + encoders
    choices: list[tuple[Quantization | None, LayerwiseCasting | None]] = [(None, None)]
    for components in ([denoisers, both] if encoders else [denoisers]):
        choices += [
            (Quantization(backend="bitsandbytes_4bit", components=components), None),
            (Quantization(backend="bitsandbytes_8bit", components=components), None),
            (Quantization(backend="torchao", components=components, scheme="int8_weight_only"), None),
            (Quantization(backend="torchao", components=components, scheme="float8_dynamic"), None),
            (None, LayerwiseCasting(components=components)),
        ]
    return choices


def offload_choices(target: TargetHardware) -> list[Offload]:
    if target.device != "cuda":
        return [Offload()]
    return [
        Offload(),
        Offload(strategy="model"),
        Offload(strategy="group", use_stream=True, record_stream=True),
        Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True),
        Offload(strategy="group", num_blocks_per_group=2),
        Offload(strategy="group", use_stream=True, low_cpu_mem_usage=True),
        Offload(strategy="group", offload_to_disk_path="advisor-offload"),
        Offload(strategy="sequential"),
    ]


def candidate(
    profile: ModelProfile,
    target: TargetHardware,
    quantization: Quantization | None,
    casting: LayerwiseCasting | None,
    offload: Offload,
    compiled: bool,
) -> OptimizationConfig:
    """One point of the search space, before the adjust rules complete it."""
    return OptimizationConfig(
        dtype=preferred_dtype(target),
        device=target.device,
        quantization=quantization,
        layerwise_casting=casting,
        offload=offload,
        compile=Compile(components=[c.name for c in profile.by_role("denoiser")]) if compiled else None,
    )


def candidate_configs(
    profile: ModelProfile, target: TargetHardware, compile_choices: tuple[bool, ...] = (True, False)
) -> list[OptimizationConfig]:
    """Every combination of quantization, offload and compile worth scoring on this target."""
    return [
        candidate(profile, target, quantization, casting, offload, compiled)
        for (quantization, casting), offload, compiled in itertools.product(
            quantization_choices(profile), offload_choices(target), compile_choices
        )
    ]


# --- the engine ---------------------------------------------------------------------------------


@dataclass
class Scored:
    config: OptimizationConfig
    estimate: Estimate
    fits: bool
    why_not: str | None
    score_s: float  # predicted latency x the prefer rules' factors
    adjusted_by: list[str] = field(default_factory=list)  # adjust rules that changed this candidate

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json", exclude_none=True),
            "summary": self.config.summary(),
            "estimate": _estimate_summary(self.estimate),
            "fits": self.fits,
            "why_not": self.why_not,
        }


@dataclass
class Recommendation:
    """The pick, why, and what else came close (or, when nothing fits, what would)."""

    best: Scored | None
    alternatives: list[Scored]
    reasons: list[str]
    rejected: dict[str, int]  # filter rule -> candidates it removed
    candidates: int
    budget_bytes: int
    smallest: Scored | None = None  # the lowest predicted peak, when nothing fits
    advice: list[str] = field(default_factory=list)


def _estimate_summary(result: Estimate) -> dict[str, Any]:
    return {
        "peak_vram_bytes": result.peak_vram_bytes,
        "peak_ram_bytes": result.peak_ram_bytes,
        "peak_phase": result.peak_phase,
        "disk_bytes": result.disk_bytes,
        "latency_s": round(result.latency_s, 3),
        "step_latency_s": round(result.step_latency_s, 4),
    }


def finish_candidate(config: OptimizationConfig, ctx: Context) -> tuple[OptimizationConfig, list[str]]:
    """Apply every adjust rule; return the finished config and the rules that changed it."""
    fired = []
    for adjust in rules_of("adjust"):
        adjusted = adjust.apply(config, ctx)
        if adjusted != config:
            fired.append(adjust.name)
        config = adjusted
    return config, fired


def _fit(result: Estimate, ctx: Context) -> str | None:
    """Why a candidate does not fit the budget, RAM or disk; None when it fits."""
    peak = peak_bytes(result, ctx.target)
    if peak > ctx.budget_bytes:
        return f"peak {format_size(peak)} > budget {format_size(ctx.budget_bytes)}"
    if ctx.target.device == "cuda" and result.peak_ram_bytes > ctx.target.ram_available_bytes:
        return f"host RAM {format_size(result.peak_ram_bytes)} > available {format_size(ctx.target.ram_available_bytes)}"
    return None


def score(config: OptimizationConfig, ctx: Context, adjusted_by: list[str] | None = None) -> Scored:
    """Estimate one finished candidate and check it against the budget."""
    result = estimate(ctx.profile, ctx.workload, config, ctx.target)
    why_not = _fit(result, ctx)
    factor = 1.0
    for prefer in rules_of("prefer"):
        factor *= prefer.apply(config, ctx)
    return Scored(config, result, why_not is None, why_not, result.latency_s * factor, adjusted_by or [])


def recommend(
    profile: ModelProfile,
    workload: Workload,
    target: TargetHardware,
    *,
    packages: dict[str, str | None] | None = None,
    budget_bytes: int | None = None,
    alternatives: int = 3,
    compile_choices: tuple[bool, ...] = (True, False),
) -> Recommendation:
    """Pick the fastest configuration predicted to fit, with reasons and runners-up.

    `packages` are the installed versions (from the probe) when planning for this machine; pass
    None when planning for another one. ``compile_choices=(False,)`` leaves torch.compile out.
    """
    budget = default_budget(target) if budget_bytes is None else budget_bytes
    if budget <= 0:
        raise UsageError("--budget: must be larger than 0 (nothing fits in no memory)")
    ctx = Context(profile, workload, target, packages, budget)
    rejected: dict[str, int] = {}
    scored: list[Scored] = []
    seen: set[str] = set()
    for candidate in candidate_configs(profile, target, compile_choices):
        reason = next((f.name for f in rules_of("filter") if f.apply(candidate, ctx)), None)
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        finished, fired = finish_candidate(candidate, ctx)
        key = finished.model_dump_json()
        if key not in seen:
            seen.add(key)
            scored.append(score(finished, ctx, fired))
    # Near-equal latencies: the smaller peak wins, then the smaller RAM need.
    feasible = sorted(
        (s for s in scored if s.fits),
        key=lambda s: (round(s.score_s, 1), s.estimate.peak_vram_bytes, s.estimate.peak_ram_bytes),
    )
    if not feasible:
        smallest = min(scored, key=lambda s: peak_bytes(s.estimate, target))
        return Recommendation(None, [], [], rejected, len(scored), budget, smallest, _advice(smallest, ctx))
    best = feasible[0]
    return Recommendation(
        best,
        _distinct_alternatives(feasible[1:], best, alternatives),
        explain(best, feasible, ctx),
        rejected,
        len(scored),
        budget,
    )


def _distinct_alternatives(ranked: list[Scored], best: Scored, count: int) -> list[Scored]:
    """Runners-up that differ in kind (not just a flag) from the pick and from each other."""
    picked, kinds = [], {_kind(best.config)}
    for candidate in ranked:
        if _kind(candidate.config) not in kinds:
            picked.append(candidate)
            kinds.add(_kind(candidate.config))
        if len(picked) == count:
            break
    return picked


def _kind(config: OptimizationConfig) -> tuple:
    """What makes two candidates different in kind: storage format, offload strategy, compile."""
    quantization = config.quantization.kind if config.quantization else None
    return (quantization, bool(config.layerwise_casting), config.offload.strategy, bool(config.compile))


def explain(best: Scored, feasible: list[Scored], ctx: Context) -> list[str]:
    """The reasons a user reads: why this fits, why it is fastest, and which guidance shaped it."""
    config, result = best.config, best.estimate
    where = "RAM" if ctx.target.device == "cpu" else "GPU memory"
    peak = peak_bytes(result, ctx.target)
    reasons = [
        f"fits: predicted peak {where} {format_size(peak)} (during {result.peak_phase.replace('_', ' ')}) "
        f"within the {format_size(ctx.budget_bytes)} budget; host RAM {format_size(result.peak_ram_bytes)}",
        f"fastest of {len(feasible)} candidates predicted to fit: {result.latency_s:.1f}s per "
        f"{ctx.workload.kind} ({result.step_latency_s:.3f}s per step)",
    ]
    if config.quantization or config.layerwise_casting:
        unquantized = config.model_copy(update={"quantization": None, "layerwise_casting": None})
        plain = estimate(ctx.profile, ctx.workload, unquantized, ctx.target)
        what = config.quantization.label() if config.quantization else f"fp8 storage({', '.join(config.layerwise_casting.components)})"
        reasons.append(
            f"quantized {what}: weights {format_size(sum(result.weight_bytes.values()))} instead of "
            f"{format_size(sum(plain.weight_bytes.values()))}; the VAE is never quantized (quality)"
        )
    if config.offload.strategy != "none":
        no_offload = estimate(ctx.profile, ctx.workload, config.model_copy(update={"offload": Offload()}), ctx.target)
        reasons.append(
            f"{config.offload.label()}: without it the peak would be {format_size(no_offload.peak_vram_bytes)}"
        )
    elif ctx.target.device == "cuda":
        reasons.append("no offloading: everything stays on the GPU, so no time goes to transfers")
    if config.compile:
        reasons.append(
            "torch.compile on the denoiser"
            + (" (regional: compile_repeated_blocks compiles one block, much faster to warm up)" if config.compile.regional else "")
            + "; expect a one-off compile on the first call"
        )
    reasons += [f"{r.reason} ({r.source})" for r in rules_of("adjust") if r.name in best.adjusted_by]
    if config.offload.strategy in {"model", "group"}:
        # The guidance on which offloading suits this workload, when the pick follows it.
        other = "group" if config.offload.strategy == "model" else "model"
        rival = config.model_copy(update={"offload": Offload(strategy=other)})
        for prefer in rules_of("prefer"):
            if prefer.apply(config, ctx) == 1.0 and prefer.apply(rival, ctx) > 1.0:
                reasons.append(f"{prefer.reason} ({prefer.source})")
    return reasons


def _advice(smallest: Scored, ctx: Context) -> list[str]:
    """What would make the smallest candidate fit."""
    result = smallest.estimate
    advice = []
    peak = peak_bytes(result, ctx.target)
    if peak > ctx.budget_bytes:
        short = peak - ctx.budget_bytes
        advice.append(f"the smallest predicted peak is {format_size(peak)} ({smallest.config.summary()}), {format_size(short)} over the budget")
        heavy = max(result.phases, key=lambda p: p.device_bytes)
        if heavy.activation_bytes > sum(heavy.weights_bytes.values()):
            advice.append("activations dominate: lower --height/--width/--frames or --batch")
        if ctx.target.device == "cpu":
            advice.append(f"a machine with at least {format_size(peak / 0.9)} of RAM would fit it, or plan for a GPU with --vram")
        else:
            advice.append(f"a GPU with at least {format_size(peak + GIB + 0.05 * peak)} would fit it")
    if result.peak_ram_bytes > ctx.target.ram_available_bytes:
        advice.append(
            f"it needs {format_size(result.peak_ram_bytes)} of host RAM (available: "
            f"{format_size(ctx.target.ram_available_bytes)}): add RAM or offload to disk"
        )
    return advice
