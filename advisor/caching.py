"""Step caching of the denoiser: diffusers' First Block Cache, what it needs and what it saves.

First Block Cache (``transformer.enable_cache(FirstBlockCacheConfig(threshold))``, from
ParaAttention; ``diffusers/hooks/first_block_cache.py``) runs the first transformer block at every
step and skips the others when the first block's residual changed by less than ``threshold``
(relative mean absolute difference) since the last full step, reusing the cached residual of the
rest. It changes the output: it is lossy, offered only under ``--quality fast``, and `tune` measures
how far its output drifts from the lossless reference.

It hooks the blocks of the model's top-level block lists whose names diffusers knows
(``_ALL_TRANSFORMER_BLOCK_IDENTIFIERS``) and whose classes it has registered (their return
signature, ``TransformerBlockRegistry``): both are copied here from diffusers 0.42.1 and checked
against the installed package by tests/test_caching.py. Pure data, no torch.
"""

from __future__ import annotations

SOURCE = "https://huggingface.co/docs/diffusers/main/en/optimization/para_attn"

# ParaAttention's measurements (diffusers docs), NVIDIA L20, FLUX.1-dev 1024x1024, 28 steps:
# the generation's latency without a cache and with First Block Cache at each threshold.
PUBLISHED_BASELINE_S = 26.36
PUBLISHED_S = {0.06: 21.83, 0.08: 17.01, 0.10: 16.00, 0.12: 13.78}
THRESHOLDS = (0.08, 0.12)  # what the space offers: a mild (1.55x) and a strong (1.91x) setting

# The block lists First Block Cache hooks, and the block classes it can hook (diffusers 0.42.1).
BLOCK_LISTS = frozenset({"blocks", "layers", "single_transformer_blocks", "temporal_transformer_blocks",
                         "transformer_blocks", "visual_transformer_blocks"})
REGISTERED_BLOCKS = frozenset({
    "BasicTransformerBlock", "BriaTransformerBlock", "CogVideoXBlock", "CogView4TransformerBlock",
    "Cosmos3VLTextMoTDecoderLayer", "Flux2SingleTransformerBlock", "Flux2TransformerBlock", "FluxSingleTransformerBlock",
    "FluxTransformerBlock", "HunyuanImageSingleTransformerBlock", "HunyuanImageTransformerBlock",
    "HunyuanVideoSingleTransformerBlock", "HunyuanVideoTokenReplaceSingleTransformerBlock",
    "HunyuanVideoTokenReplaceTransformerBlock", "HunyuanVideoTransformerBlock", "JointTransformerBlock",
    "Kandinsky5TransformerDecoderBlock", "LTXVideoTransformerBlock", "MochiTransformerBlock",
    "MotifVideoSingleTransformerBlock", "MotifVideoTransformerBlock", "QwenImageTransformerBlock",
    "WanTransformerBlock", "ZImageTransformerBlock",
})


def computed_share(threshold: float) -> float:
    """The share of the denoiser's work that still runs at `threshold`: the published latency over
    the baseline's (the text encoders and the VAE decode, a few percent of Flux's 26 s, are counted
    as denoising, so the share errs high: the saving is not overstated). Linear between the
    published thresholds, from no saving at 0; above the last, the last one's share."""
    points = [(0.0, 1.0)] + [(t, s / PUBLISHED_BASELINE_S) for t, s in sorted(PUBLISHED_S.items())]
    for (t0, s0), (t1, s1) in zip(points, points[1:]):
        if threshold <= t1:
            return s0 + (s1 - s0) * (max(threshold, t0) - t0) / (t1 - t0)
    return points[-1][1]


def cacheable(block_lists: list[str], block_classes: list[str]) -> str | None:
    """Why First Block Cache can't hook a denoiser whose top-level block lists are `block_lists`
    and whose blocks are of `block_classes`, or None."""
    if not any(name in BLOCK_LISTS for name in block_lists):
        return f"none of its block lists ({', '.join(block_lists) or 'none'}) is one diffusers' cache hooks"
    unregistered = sorted(set(block_classes) - REGISTERED_BLOCKS) or ([] if block_classes else ["no block classes known"])
    if unregistered:
        return f"diffusers has not registered its blocks ({', '.join(unregistered)}) for caching"
    return None
