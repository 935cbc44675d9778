"""The arguments each pipeline passes to its denoiser, text encoders and VAE, built at any size.

One builder per denoiser class, from the module's config and the latent geometry of a workload.
`tests/test_trace.py` checks every builder against the arguments the real pipeline passes (a
forward pre-hook on the tiny pipeline of each catalog class), so a builder that drifts from
diffusers fails there, not silently in the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Geometry:
    """One denoiser call's latent shape: batch, latent frames (1 for images), latent height/width, text tokens."""

    batch: int
    frames: int
    height: int
    width: int
    text_tokens: int

    @property
    def positions(self) -> int:
        """Latent positions of one sample: the variable every denoiser curve is fitted over."""
        return self.frames * self.height * self.width


class Maker:
    """Tensors of a requested shape on one device: empty on meta, seeded random elsewhere."""

    def __init__(self, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.device.type == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        return torch.randn(shape, generator=self.generator).to(device=self.device, dtype=dtype)

    def ones(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.ones(shape, dtype=dtype or self.dtype, device=self.device)

    def zeros(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype or self.dtype, device=self.device)

    def timestep(self, batch: int) -> torch.Tensor:
        return torch.full((batch,), 500.0, device=self.device)


def _text_dim(config: Any) -> int:
    # caption_channels before cross_attention_dim: LTX's cross_attention_dim is its inner width.
    for key in (
        "joint_attention_dim",
        "text_dim",
        "caption_channels",
        "text_embed_dim",
        "cross_attention_dim",
        "cap_feat_dim",
    ):
        value = config.get(key)
        if isinstance(value, int):
            return value
    raise ValueError("the denoiser config names no text dimension")


def _flux(config, g: Geometry, make: Maker) -> dict[str, Any]:
    tokens = (g.height // 2) * (g.width // 2)  # 2x2 latent patches packed into channels
    kwargs = {
        "hidden_states": make(g.batch, tokens, config["in_channels"]),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
        "pooled_projections": make(g.batch, config["pooled_projection_dim"]),
        "timestep": make.timestep(g.batch) / 1000,
        "img_ids": make.zeros(tokens, 3),
        "txt_ids": make.zeros(g.text_tokens, 3),
    }
    if config.get("guidance_embeds"):
        kwargs["guidance"] = make.ones(g.batch, dtype=torch.float32)
    return kwargs


def _chroma(config, g: Geometry, make: Maker) -> dict[str, Any]:
    # FLUX.1's call without pooled text or guidance, plus the padding mask over text and image tokens
    # that ChromaPipeline._prepare_attention_mask builds (in the compute dtype; the transformer
    # squares it into a (batch, 1, tokens, tokens) mask for every block).
    tokens = (g.height // 2) * (g.width // 2)
    return {
        "hidden_states": make(g.batch, tokens, config["in_channels"]),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
        "timestep": make.timestep(g.batch) / 1000,
        "img_ids": make.zeros(tokens, 3),
        "txt_ids": make.zeros(g.text_tokens, 3),
        "attention_mask": make.ones(g.batch, g.text_tokens + tokens),
    }


def _flux2(config, g: Geometry, make: Maker) -> dict[str, Any]:
    tokens = (g.height // 2) * (g.width // 2)  # 2x2 latent patches packed into channels
    kwargs = {
        "hidden_states": make(g.batch, tokens, config["in_channels"]),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
        "timestep": make.timestep(g.batch) / 1000,
        # 4-axis positions (time, height, width, layer) per sample, as Flux2Pipeline builds them
        "img_ids": make.zeros(g.batch, tokens, 4, dtype=torch.int64),
        "txt_ids": make.zeros(g.batch, g.text_tokens, 4, dtype=torch.int64),
    }
    if config.get("guidance_embeds", True):  # FLUX.2 [dev] embeds it; [klein] is called with guidance=None
        kwargs["guidance"] = make.ones(g.batch, dtype=torch.float32)
    return kwargs


def _z_image(config, g: Geometry, make: Maker) -> dict[str, Any]:
    # Lists with a tensor per sample: latents (channels, frames, height, width), caption features
    # (its real tokens, width); the pipeline passes them positionally, as `x`, `t` and `cap_feats`.
    # Batched, the samples after the first stand for the negative prompt, whose caption is shorter.
    lengths = [g.text_tokens] + [max(1, g.text_tokens // 2)] * (g.batch - 1)
    return {
        "x": [make(config["in_channels"], 1, g.height, g.width) for _ in range(g.batch)],
        "t": make.timestep(g.batch) / 1000,
        "cap_feats": [make(length, _text_dim(config)) for length in lengths],
    }


def _qwen_image(config, g: Geometry, make: Maker) -> dict[str, Any]:
    tokens = (g.height // 2) * (g.width // 2)
    return {
        "hidden_states": make(g.batch, tokens, config["in_channels"]),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
        "encoder_hidden_states_mask": None,  # the pipeline drops an all-ones mask
        "timestep": make.timestep(g.batch) / 1000,
        "img_shapes": [[(1, g.height // 2, g.width // 2)]] * g.batch,
    }


def _sd3(config, g: Geometry, make: Maker) -> dict[str, Any]:
    return {
        "hidden_states": make(g.batch, config["in_channels"], g.height, g.width),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
        "pooled_projections": make(g.batch, config["pooled_projection_dim"]),
        "timestep": make.timestep(g.batch),
    }


def _unet(config, g: Geometry, make: Maker) -> dict[str, Any]:
    kwargs = {
        "sample": make(g.batch, config["in_channels"], g.height, g.width),
        "timestep": make.timestep(1)[0],  # the SDXL pipeline passes one scalar timestep
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 size/crop ids
        time_ids = 6
        pooled = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": make(g.batch, pooled), "time_ids": make(g.batch, time_ids)}
    return kwargs


def _wan(config, g: Geometry, make: Maker) -> dict[str, Any]:
    return {
        "hidden_states": make(g.batch, config["in_channels"], g.frames, g.height, g.width),
        "timestep": make.timestep(g.batch),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
    }


def _hunyuan_video(config, g: Geometry, make: Maker) -> dict[str, Any]:
    kwargs = {
        "hidden_states": make(g.batch, config["in_channels"], g.frames, g.height, g.width),
        "timestep": make.timestep(g.batch),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
        "encoder_attention_mask": make.ones(g.batch, g.text_tokens, dtype=torch.int64),
        "pooled_projections": make(g.batch, config["pooled_projection_dim"]),
    }
    if config.get("guidance_embeds"):
        kwargs["guidance"] = make.ones(g.batch, dtype=torch.float32) * 6000
    return kwargs


def _ltx(config, g: Geometry, make: Maker) -> dict[str, Any]:
    return {
        "hidden_states": make(g.batch, g.positions, config["in_channels"]),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
        "timestep": make.timestep(g.batch),
        "encoder_attention_mask": make.ones(g.batch, g.text_tokens, dtype=torch.int64),
        "num_frames": g.frames,
        "height": g.height,
        "width": g.width,
        "rope_interpolation_scale": (8 / 25, 32, 32),
    }


def _cogvideox(config, g: Geometry, make: Maker) -> dict[str, Any]:
    kwargs = {
        "hidden_states": make(g.batch, g.frames, config["in_channels"], g.height, g.width),
        "encoder_hidden_states": make(g.batch, g.text_tokens, _text_dim(config)),
        "timestep": make.timestep(g.batch),
    }
    if config.get("use_rotary_positional_embeddings"):
        patch = config["patch_size"]
        tokens = g.frames * (g.height // patch) * (g.width // patch)
        dim = config["attention_head_dim"]
        kwargs["image_rotary_emb"] = (make(tokens, dim, dtype=torch.float32), make(tokens, dim, dtype=torch.float32))
    return kwargs


DENOISER_INPUTS: dict[str, Callable[[Any, Geometry, Maker], dict[str, Any]]] = {
    "FluxTransformer2DModel": _flux,
    "ChromaTransformer2DModel": _chroma,
    "Flux2Transformer2DModel": _flux2,
    "QwenImageTransformer2DModel": _qwen_image,
    "ZImageTransformer2DModel": _z_image,
    "SD3Transformer2DModel": _sd3,
    "UNet2DConditionModel": _unet,
    "WanTransformer3DModel": _wan,
    "HunyuanVideoTransformer3DModel": _hunyuan_video,
    "LTXVideoTransformer3DModel": _ltx,
    "CogVideoXTransformer3DModel": _cogvideox,
}


def denoiser_inputs(
    module: torch.nn.Module, g: Geometry, make: Maker, pipeline_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Keyword arguments of one denoiser call at geometry `g` (KeyError: a class without a builder);
    `pipeline_config` the pipeline's own settings (`ModelProfile.pipeline_config`)."""
    kwargs = DENOISER_INPUTS[type(module).__name__](module.config, g, make)
    if (pipeline_config or {}).get("expand_timesteps"):
        # Wan2.2 TI2V: WanPipeline passes a timestep per latent token, (batch, tokens), which the
        # transformer embeds per token (pipeline_wan.py: `expand_timesteps`).
        patch_t, patch_h, patch_w = module.config["patch_size"]
        tokens = (g.frames // patch_t) * (g.height // patch_h) * (g.width // patch_w)
        kwargs["timestep"] = make.timestep(g.batch * tokens).reshape(g.batch, tokens)
    return {**kwargs, "return_dict": False}


def text_encoder_inputs(tokens: int, batch: int, make: Maker) -> dict[str, Any]:
    # No attention mask: pipelines pad to full length and a full mask is the same as none (and on
    # the meta device a mask can't be inspected).
    return {
        "input_ids": torch.zeros((batch, tokens), dtype=torch.int64, device=make.device),
        "output_hidden_states": True,
    }


def vae_latents(vae: torch.nn.Module, g: Geometry, make: Maker) -> torch.Tensor:
    """The latents `vae.decode` receives: (batch, channels, [frames,] height, width); a VAE built
    from 3D convolutions (video VAEs, and Qwen-Image's, which is Wan's) takes the frames axis."""
    channels = vae.config.get("latent_channels") or vae.config.get("z_dim")
    if any(isinstance(m, torch.nn.Conv3d) for m in vae.modules()):
        return make(g.batch, channels, g.frames, g.height, g.width)
    return make(g.batch, channels, g.height, g.width)
