"""The attention kernels diffusers can dispatch to, as far as the advisor plans with them.

diffusers 0.42 selects a kernel per model with ``model.set_attention_backend(name)`` (names and
package checks: ``diffusers/models/attention_dispatch.py``). It checks only that a package is
installed; device, dtype and compute capability are checked per call only with
``DIFFUSERS_ATTN_CHECKS=1``, and nothing falls back: a kernel that can't run here fails in the
first denoising step. So the facts below feed `advisor.constraints` (refuse before loading), the
probe's table, the estimate (``speedup``) and the search space. Pure data, no torch.

``speedup`` is the attention kernel's throughput against ``native`` (torch's SDPA, which on a CUDA
GPU with bf16 runs its bundled FlashAttention-2 kernel), by the lowest compute capability it holds
from; the estimate divides the attention FLOPs' time by it. Each figure is the published one, with
its source; `advisor tune` measures the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    speedup: dict[float, float] = field(default_factory=lambda: {0.0: 1.0})  # from capability -> x native
    source: str = DISPATCH_SOURCE
    published: str = "the kernel native runs"  # what the source says, in its words

    def speedup_at(self, capability: float) -> float:
        """The published speed-up against native at a GPU's compute capability."""
        return max(((cap, x) for cap, x in self.speedup.items() if cap <= capability), default=(0.0, 1.0))[1]


BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (
    AttentionBackend("native", "torch scaled_dot_product_attention (its own choice of kernel)", cuda_only=False),
    AttentionBackend("_native_math", "torch SDPA's unfused math kernel (the attention matrix in memory)", cuda_only=False,
                     speedup={0.0: 76.5 / 229.5}, source=_ORT_SDPA, published="76.5 against 229.5 TFLOPs for torch's flash kernel, H100 fp16"),
    AttentionBackend("_native_flash", "torch SDPA's bundled FlashAttention-2 kernel", cuda_only=False, half_only=True),
    AttentionBackend("_native_efficient", "torch SDPA's memory-efficient kernel", speedup={0.0: 144.8 / 229.5}, source=_ORT_SDPA,
                     published="144.8 against 229.5 TFLOPs for torch's flash kernel, H100 fp16"),
    AttentionBackend("_native_cudnn", "torch SDPA's cuDNN attention", min_capability=8.0, half_only=True,
                     speedup={0.0: 1.0, 9.0: 1.75}, source=_PYTORCH_25,
                     published="'up to 75% speed-up over FlashAttentionV2' on H100: the upper figure"),
    AttentionBackend("flex", "torch flex_attention (fast only under torch.compile)", cuda_only=False, speedup={0.0: 0.9},
                     source="https://pytorch.org/blog/flexattention/", published="about 90% of FlashAttention-2's forward, compiled"),
    AttentionBackend("flash", "FlashAttention-2 (flash-attn)", package="flash-attn", min_version="2.6.3",
                     min_capability=8.0, half_only=True, published="the algorithm native's flash kernel runs"),
    AttentionBackend("_flash_3", "FlashAttention-3 (Hopper, built from source)", package="flash-attn-3",
                     min_capability=9.0, max_capability=9.0, half_only=True, speedup={9.0: 1.5}, source=_FA3,
                     published="1.5-2.0x FlashAttention-2 in FP16 on H100: the lower figure"),
    AttentionBackend("sage", "SageAttention (int8 q/k, picks its kernel by GPU)", package="sageattention", min_version="2.1.1",
                     min_capability=8.0, half_only=True, lossy=True, speedup={8.0: 2.1, 8.9: 3.0, 9.0: 2.1}, source=_SAGE2,
                     published="about 3x FlashAttention-2 on an RTX 4090 (SageAttention2); elsewhere SageAttention's 2.1x as a floor"),
    AttentionBackend("xformers", "xformers memory-efficient attention", package="xformers", min_version="0.0.29",
                     speedup={0.0: 2.1 / 2.7}, source=_SAGE1, published="SageAttention is 2.1x FlashAttention-2 and 2.7x xformers"),
)}

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
