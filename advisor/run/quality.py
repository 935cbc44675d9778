"""How far an output is from the lossless reference: PSNR and SSIM, per frame for video.

Every lossy choice (nf4, int8, fp8, int8 attention, step caching) changes what a pipeline draws.
`advisor tune` generates the study's reference once (a lossless configuration, fixed seed and
prompt, the workload's steps) and compares each lossy candidate's output with it; a candidate under
``--min-psnr`` (`advisor.run.timing.MIN_PSNR_DB`) is infeasible, with the measured value as its reason.

PSNR is the formula (10 log10(1 / MSE) for values in [0, 1]); SSIM comes from `pytorch-msssim`
(Wang et al.'s Gaussian-window SSIM in a few hundred lines of torch, no weights to download, as
cache-dit and flux-fast report it). LPIPS or CLIP score need model weights, which an offline
machine doesn't have: not used.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def psnr(output: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two arrays of values in [0, 1]; inf when identical."""
    mse = float(np.mean((np.asarray(output, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _frames(array: np.ndarray) -> np.ndarray:
    """Images or video frames as one stack of (H, W, C) frames: (N, H, W, C) or (B, F, H, W, C) in."""
    array = np.asarray(array, dtype=np.float32)
    return array.reshape(-1, *array.shape[-3:])


def ssim(output: np.ndarray, reference: np.ndarray) -> float:
    """Mean structural similarity of each frame (1 when identical), by pytorch-msssim."""
    import torch
    from pytorch_msssim import ssim as _ssim

    a, b = (torch.from_numpy(_frames(x)).permute(0, 3, 1, 2) for x in (output, reference))
    # Its 11-pixel Gaussian window needs frames at least that large; tiny test images are smaller.
    window = min(11, *a.shape[-2:]) // 2 * 2 - 1
    return float(_ssim(a, b, data_range=1.0, size_average=True, win_size=max(window, 3)))


def compare(output: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """PSNR (dB) and SSIM of `output` against `reference`, over all frames, and the worst frame's PSNR."""
    out, ref = _frames(output), _frames(reference)
    if out.shape != ref.shape:
        raise ValueError(f"the output's shape {out.shape} differs from the reference's {ref.shape}")
    per_frame = [psnr(o, r) for o, r in zip(out, ref)]
    return {
        "psnr_db": _finite(psnr(out, ref)),
        "ssim": round(ssim(out, ref), 6),
        "frames": len(per_frame),
        "worst_frame_psnr_db": _finite(min(per_frame)),
    }


def _finite(value: float) -> float | None:
    """JSON has no infinity: an identical output's PSNR is stored as None and shown as "identical"."""
    return None if math.isinf(value) else round(value, 3)
