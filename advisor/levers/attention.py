"""The attention kernel lever: the kernels diffusers can dispatch to, as far as the advisor plans with them.

diffusers 0.42 selects a kernel per model with ``model.set_attention_backend(name)`` (names and
package checks: ``diffusers/models/attention_dispatch.py``). It checks only that a package is
installed; device, dtype and compute capability are checked per call only with
``DIFFUSERS_ATTN_CHECKS=1``, and nothing falls back: a kernel that can't run here fails in the
first denoising step. So the facts below feed the lever's constraints (refuse before loading), the
probe's table, the estimate (``speedup``) and the search space. Pure Python at import.

``speedup`` is the attention kernel's throughput against ``native`` (torch's SDPA, which on a CUDA
GPU with bf16 runs its bundled FlashAttention-2 kernel), by the lowest compute capability it holds
from; the estimate divides the attention FLOPs' time by it. Each figure is the published one, with
its source; `advisor tune` measures the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advisor.config import OptimizationConfig
from advisor.levers.base import Filter, Lever, Pick, StepContext
from advisor.levers.code import Step, method_step
from advisor.paths import diffusers_tables
from advisor.platform import Constraint, Platform, constraint, on_cuda, version_tuple


DISPATCH_SOURCE = "https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/attention_dispatch.py"
_PYTORCH_25 = "https://pytorch.org/blog/pytorch2-5/"  # cuDNN SDPA: "up to 75% speed-up over FlashAttentionV2" on H100
_FA3 = "https://arxiv.org/abs/2407.08608"  # FlashAttention-3: 1.5-2.0x FlashAttention-2 in FP16 on H100
_SAGE1 = "https://arxiv.org/abs/2410.02367"  # SageAttention: about 2.1x FlashAttention-2 (RTX 4090)
_SAGE2 = "https://arxiv.org/abs/2411.10958"  # SageAttention2: about 3x FlashAttention-2 on RTX 4090
_ORT_SDPA = "https://github.com/microsoft/onnxruntime/pull/21629"  # H100 fp16: torch flash 229.5, efficient 144.8, math 76.5 TFLOPs


@dataclass(frozen=True)
class AttentionBackend:
    """What one of diffusers' attention backends needs, and how fast it is against ``native``."""

    name: str  # diffusers' AttentionBackendName value
    kernel: str  # what runs, in words
    package: str | None = None  # the distribution it needs beyond torch (None: bundled with torch)
    min_version: str | None = None  # of `package`, as diffusers requires it
    cuda_only: bool = True
    min_capability: float | None = None  # CUDA compute capability it needs
    max_capability: float | None = None  # ... and the newest it has kernels for (FA3: Hopper, 9.0, only)
    half_only: bool = False  # q, k, v in bf16 or fp16 only (a float32 pipeline can't use it)
    hub: bool = False  # its kernel is downloaded from the Hub when set (needs `kernels` and a network)
    lossy: bool = False  # quantizes q and k (SageAttention's int8): the output changes
    takes_mask: bool = True  # runs a call given an attention mask (flash-attn, FA3, Sage and torch's flash raise)
    speedup: dict[float, float] = field(default_factory=lambda: {0.0: 1.0})  # from capability -> x native
    source: str = DISPATCH_SOURCE
    published: str = "the kernel native runs"  # what the source says, in its words

    def speedup_at(self, capability: float) -> float:
        """The published speed-up against native at a GPU's compute capability."""
        return max(((cap, x) for cap, x in self.speedup.items() if cap <= capability), default=(0.0, 1.0))[1]


BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        AttentionBackend("native", "torch scaled_dot_product_attention (its own choice of kernel)", cuda_only=False),
        AttentionBackend(
            "_native_math",
            "torch SDPA's unfused math kernel (the attention matrix in memory)",
            cuda_only=False,
            speedup={0.0: 76.5 / 229.5},
            source=_ORT_SDPA,
            published="76.5 against 229.5 TFLOPs for torch's flash kernel, H100 fp16",
        ),
        AttentionBackend(
            "_native_flash",
            "torch SDPA's bundled FlashAttention-2 kernel",
            cuda_only=False,
            half_only=True,
            takes_mask=False,
        ),
        AttentionBackend(
            "_native_efficient",
            "torch SDPA's memory-efficient kernel",
            speedup={0.0: 144.8 / 229.5},
            source=_ORT_SDPA,
            published="144.8 against 229.5 TFLOPs for torch's flash kernel, H100 fp16",
        ),
        AttentionBackend(
            "_native_cudnn",
            "torch SDPA's cuDNN attention",
            min_capability=8.0,
            half_only=True,
            # Measured on an H100 only: Hopper gets the figure, Blackwell (10.0, 12.0) and older cards 1x.
            speedup={0.0: 1.0, 9.0: 1.75, 10.0: 1.0},
            source=_PYTORCH_25,
            published="'up to 75% speed-up over FlashAttentionV2' on H100: the upper figure, on Hopper only",
        ),
        AttentionBackend(
            "flex",
            "torch flex_attention (fast only under torch.compile)",
            cuda_only=False,
            speedup={0.0: 0.9},
            source="https://pytorch.org/blog/flexattention/",
            published="about 90% of FlashAttention-2's forward, compiled",
        ),
        AttentionBackend(
            "flash",
            "FlashAttention-2 (flash-attn)",
            package="flash-attn",
            min_version="2.6.3",
            min_capability=8.0,
            half_only=True,
            takes_mask=False,
            published="the algorithm native's flash kernel runs",
        ),
        AttentionBackend(
            "_flash_3",
            "FlashAttention-3 (Hopper, built from source)",
            package="flash-attn-3",
            min_capability=9.0,
            max_capability=9.0,
            half_only=True,
            takes_mask=False,
            speedup={9.0: 1.5},
            source=_FA3,
            published="1.5-2.0x FlashAttention-2 in FP16 on H100: the lower figure",
        ),
        AttentionBackend(
            "sage",
            "SageAttention (int8 q/k, picks its kernel by GPU)",
            package="sageattention",
            min_version="2.1.1",
            min_capability=8.0,
            half_only=True,
            lossy=True,
            takes_mask=False,
            speedup={8.0: 2.1, 8.9: 3.0, 9.0: 2.1},
            source=_SAGE2,
            published="about 3x FlashAttention-2 on an RTX 4090 (SageAttention2); elsewhere SageAttention's 2.1x as a floor",
        ),
        AttentionBackend(
            "xformers",
            "xformers memory-efficient attention",
            package="xformers",
            min_version="0.0.29",
            speedup={0.0: 2.1 / 2.7},
            source=_SAGE1,
            published="SageAttention is 2.1x FlashAttention-2 and 2.7x xformers",
        ),
    )
}

# The backends the advisor proposes: the default and those that can beat it. math, efficient and
# xformers are slower than native by their sources; flex only pays with masks; flash-attn 2 is the
# kernel native already runs; the hub kernels need a download.
PROPOSED = ("native", "_native_cudnn", "_flash_3", "sage")

HUB_PACKAGE = "kernels"  # what diffusers' *_hub backends download their kernels with
# The distributions the backends need (the probe reports their versions).
PACKAGES = (*sorted({b.package for b in BACKENDS.values() if b.package}), HUB_PACKAGE)


def is_hub(name: str) -> bool:
    """A backend whose kernel diffusers downloads from the Hub when it is set (``flash_hub``, ...)."""
    return name.lower().endswith("_hub")


def backend_of(name: str | None) -> AttentionBackend | None:
    """The facts of a config's `attention_backend` (diffusers reads the name case-insensitively);
    None for one the advisor doesn't plan with (diffusers' own checks apply to it)."""
    return BACKENDS.get((name or "").lower())


def speedup_of(name: str | None, device: str, capability: float) -> float:
    """The published speed of kernel `name` (None: native) against native SDPA on a GPU of `capability`; 1 on a CPU."""
    backend = backend_of(name or "native")
    return backend.speedup_at(capability) if device == "cuda" and backend is not None else 1.0


# --- constraints ---------------------------------------------------------------------------------
# diffusers checks only a backend's package when it is set; device, dtype and capability are
# checked per call only with DIFFUSERS_ATTN_CHECKS=1, and nothing falls back. So these refuse a
# kernel that would fail in the first denoising step.

_ATTENTION_SOURCE = "https://huggingface.co/docs/diffusers/main/en/optimization/attention_backends"
CONSTRAINTS: list[Constraint] = []


@constraint(
    "attention-backend-runs-on-the-device",
    "attention_backend",
    "CUDA-only attention kernels (cuDNN, memory-efficient, flash-attn, FlashAttention-3, SageAttention, xformers) "
    "need a CUDA GPU of the compute capability they have kernels for",
    _ATTENTION_SOURCE,
    into=CONSTRAINTS,
)
def attention_backend_runs_on_the_device(config: OptimizationConfig, platform: Platform) -> str | None:
    backend = backend_of(config.attention_backend)
    if backend is None:
        return None
    if not on_cuda(config, platform):
        if not backend.cuda_only:
            return None
        where = platform.no_cuda if platform.accelerator != "cuda" else f"`device` is {config.device}"
        return f"`attention_backend: {backend.name}` needs a CUDA GPU and {where}; use `attention_backend: native`"
    capability = platform.capability
    if backend.min_capability is not None and capability < backend.min_capability:
        return (
            f"`attention_backend: {backend.name}` needs compute capability >= {backend.min_capability}, this GPU has "
            f"{platform.compute_capability}; use `attention_backend: native`"
        )
    if backend.max_capability is not None and capability > backend.max_capability:
        return (
            f"`attention_backend: {backend.name}` has kernels for compute capability {backend.max_capability} only, "
            f"this GPU has {platform.compute_capability}; use `attention_backend: native`"
        )
    return None


@constraint(
    "attention-backend-needs-half-precision",
    "attention_backend",
    "flash, FlashAttention-3, cuDNN and SageAttention kernels take bf16 or fp16 q/k/v only",
    DISPATCH_SOURCE,
    into=CONSTRAINTS,
)
def attention_backend_needs_half_precision(config: OptimizationConfig, platform: Platform) -> str | None:
    backend = backend_of(config.attention_backend)
    if backend is not None and backend.half_only and config.dtype == "float32":
        return f"`attention_backend: {backend.name}` takes bf16 or fp16 only and `dtype` is float32; use `dtype: bfloat16` or `attention_backend: native`"
    return None


@constraint(
    "attention-backend-installed",
    "attention_backend",
    "flash, FlashAttention-3, SageAttention and xformers need their packages (at the versions diffusers requires); "
    "the *_hub kernels need `kernels` and a download from the Hub",
    DISPATCH_SOURCE,
    into=CONSTRAINTS,
)
def attention_backend_installed(config: OptimizationConfig, platform: Platform) -> str | None:
    name = (config.attention_backend or "").lower()
    if is_hub(name):
        if platform.offline:
            return f"`attention_backend: {name}` downloads its kernel from the Hub and HF_HUB_OFFLINE is set; use `attention_backend: native`"
        if platform.missing(HUB_PACKAGE):
            return f"`attention_backend: {name}` needs `pip install {HUB_PACKAGE}` (and a download from the Hub); use `attention_backend: native`"
        return None
    backend = backend_of(name)
    if backend is None or backend.package is None or platform.packages is None:
        return None
    installed = platform.packages.get(backend.package)
    if not installed:
        return f"`attention_backend: {name}` needs `pip install {backend.package}`, which is not installed here; use `attention_backend: native`"
    if backend.min_version and version_tuple(installed) < version_tuple(backend.min_version):
        return f"`attention_backend: {name}` needs {backend.package} >= {backend.min_version}, {installed} is installed; upgrade it or use `attention_backend: native`"
    return None


def refusal(config: OptimizationConfig, platform: Platform) -> str | None:
    """The first of this lever's constraints `config` breaks on `platform`, or None."""
    return next((message for c in CONSTRAINTS if (message := c.check(config, platform))), None)


# --- the lever -----------------------------------------------------------------------------------

QUALITY_COST = (
    "SageAttention quantizes q and k to int8: near-identical outputs reported for image and video models",
    BACKENDS["sage"].source,
)


# Ring attention merges the GPUs' partial attentions by their log-sum-exp, which these backends
# refuse to return (attention_dispatch.py: "Native attention does not support return_lse=True").
NO_LOG_SUM_EXP = frozenset({"native", "_native_npu"})


def context_parallel_problem(backend: str | None, *, ring: bool) -> str | None:
    """Why the attention `backend` (None: native) can't run a context-parallel model, or None:
    enable_parallelism refuses a backend registered without context-parallel support (read from the
    installed diffusers), and ring attention needs the log-sum-exp."""
    name = backend or "native"
    if name not in diffusers_tables()["context_parallel_backends"]:
        return f"the {name} attention backend has no context-parallel support"
    if ring and name in NO_LOG_SUM_EXP:
        return f"ring attention needs the log-sum-exp, which {name} does not return"
    return None


def attention_choices(platform: Platform, dtype: str) -> list[str]:
    """The attention kernels worth searching: ``native`` (diffusers' default, torch SDPA) and each
    proposed kernel (`PROPOSED`) that runs on `platform` in `dtype` and is published faster than
    native at its compute capability. When the packages are unknown (planning another machine)
    only torch's own kernels count: a pick never assumes an install."""
    choices = ["native"]
    if platform.accelerator != "cuda":
        return choices
    for name in PROPOSED[1:]:
        backend = BACKENDS[name]
        if backend.package and platform.packages is None:
            continue
        probe = OptimizationConfig(device="cuda", dtype=dtype, attention_backend=name)
        if backend.speedup_at(platform.capability) > 1 and refusal(probe, platform) is None:
            choices.append(name)
    return choices


def masked_denoiser(profile: Any, batched: bool = False) -> str | None:
    """The class of the model's first denoiser whose attention is given a mask (its trace says so:
    Chroma's padding mask, LTX's text mask on its cross-attention; with `batched` calls, Z-Image's
    mask over captions of unequal length), or None."""
    for denoiser in profile.by_role("denoiser"):
        trace = denoiser.trace if isinstance(denoiser.trace, dict) else {}
        if trace.get("masked_attention") or (batched and trace.get("masked_when_batched")):
            return denoiser.class_name
    return None


def mask_problem(config: OptimizationConfig, profile: Any, batched: bool) -> str | None:
    """Why `config`'s attention kernel can't run `profile`'s denoiser (it takes no mask, and the
    denoiser gives one), or None; `batched`: the denoiser's calls batch samples (guidance batched)."""
    backend = backend_of(config.attention_backend)
    masked = None if backend is None or backend.takes_mask else masked_denoiser(profile, batched)
    if masked is None:
        return None
    return (
        f"`attention_backend: {backend.name}` takes no attention mask, and {masked} gives its attention one "
        "(diffusers raises in the first denoising step); use attention_backend: native"
    )


def _takes_the_mask(config: OptimizationConfig, scenario: Any) -> str | None:
    return mask_problem(config, scenario.profile, scenario.batched_calls)


MASK_SOURCE = "https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/attention_dispatch.py (_flash_attention, _flash_attention_3, _sage_attention, _native_flash_attention)"


class AttentionKernel(Lever):
    """The attention backend of every denoiser (``set_attention_backend``)."""

    name, key = "attention", "attention_backend"
    order = 50  # after placement and the VAE; before step caching and compile
    off_choice = "native"  # diffusers' default: no call
    names = frozenset(BACKENDS)
    constraints = tuple(CONSTRAINTS)
    filters = (
        Filter(
            "attention-kernel-takes-the-models-mask",
            "flash-attn 2 and 3, SageAttention and torch's flash kernel raise ValueError when an attention call "
            "is given a mask, as Chroma's transformer gives every call its padding mask: the planner offers them "
            "only to models whose traced attention takes none",
            MASK_SOURCE,
            _takes_the_mask,
        ),
    )

    def choices(self, scenario: Any, dtype: str) -> dict[str, str | None]:
        return {
            name: None if name == self.off_choice else name for name in attention_choices(scenario.platform, dtype)
        }

    def attention_speedup(self, config: OptimizationConfig, step: StepContext) -> float:
        speedup = speedup_of(config.attention_backend, step.device, step.capability)
        share = step.masked_attention_share
        if not share or step.device != "cuda" or step.capability < 8.0 or config.dtype == "float32":
            return speedup  # no mask, or native ran the memory-efficient kernel anyway
        # torch's SDPA picks its flash kernel only for calls without a mask, its memory-efficient one
        # for the others; no published figure gives another kernel's speed with a mask: no faster.
        masked = min(speedup, speedup_of("_native_efficient", step.device, step.capability))
        return 1 / ((1 - share) / speedup + share / masked)

    def lossy(self, config: OptimizationConfig) -> bool:
        backend = backend_of(config.attention_backend)
        return backend is not None and backend.lossy

    def quality_cost(self, config: OptimizationConfig) -> tuple[str, str] | None:
        return QUALITY_COST if self.lossy(config) else None

    def reason(self, pick: Pick) -> str | None:
        """On a GPU: the pick's published speed-up and predicted gain over native, and the faster
        kernels left out here (not installed, not known to be, or lossy under the policy)."""
        config, scenario, latency_s = pick.config, pick.scenario, pick.latency_s
        if scenario.target.device != "cuda":
            return None
        platform = scenario.platform
        capability = platform.capability
        chosen = config.attention_backend or self.off_choice
        masked = masked_denoiser(scenario.profile, scenario.batched_calls)
        if chosen == self.off_choice:
            if masked is not None and capability >= 8.0 and config.dtype != "float32":
                kernel = (
                    f"its memory-efficient kernel for the attention calls {masked} gives a mask (flash takes "
                    "none), FlashAttention-2 for any others"
                )
            elif capability >= 8.0:
                kernel = "FlashAttention-2 on this GPU in bf16/fp16"
            else:
                kernel = "its memory-efficient kernel on this GPU (FlashAttention-2 needs compute capability 8.0)"
            said = f"attention: native (torch SDPA, diffusers' default: {kernel})"
        else:
            backend = BACKENDS[chosen]
            said = (
                f"attention: {chosen} ({backend.kernel}), modelled at {backend.speedup_at(capability):.2f}x native's attention "
                f"at compute capability {platform.compute_capability} ({backend.published}, {backend.source}): predicted "
                f"{latency_s:.1f}s against {pick.without(self):.1f}s with native; tune measures it"
            )
        offered = attention_choices(platform, config.dtype)
        missed, maskless = [], []
        for name in PROPOSED:
            backend = BACKENDS[name]
            if name == chosen or backend.speedup_at(capability) <= BACKENDS[chosen].speedup_at(capability):
                continue
            if masked is not None and not backend.takes_mask:
                maskless.append(f"{name} ({backend.speedup_at(capability):.1f}x)")
                continue
            if name in offered:
                if backend.lossy and scenario.quality != "fast":
                    why = f"lossy, and --quality {scenario.quality} prefers lossless"
                elif masked is not None:
                    why = "its published speed-up was measured without a mask: no faster on masked calls"
                else:
                    why = "not faster with the rest of this plan"
            elif backend.package and platform.packages is None:
                why = f"needs `pip install {backend.package}`, not assumed on a machine the advisor can't see"
            else:
                continue  # can't run on this GPU or dtype (its constraint says why)
            missed.append(f"{name} ({backend.speedup_at(capability):.1f}x, {why})")
        if missed:
            said += "; faster kernels not taken: " + ", ".join(missed)
        if maskless:
            said += f"; can't run with the mask {masked} gives: " + ", ".join(maskless)
        return said

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        if config.attention_backend is None:
            return []
        return [
            method_step(
                "attention_backend",
                f"{config.attention_backend} attention in {name}",
                name,
                "set_attention_backend",
                (config.attention_backend,),
            )
            for name in components.denoisers()
        ]
