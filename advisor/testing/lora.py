"""Tiny LoRAs for tiny pipelines, made here with peft: in diffusers' layout (saved with the
pipeline's own ``save_lora_weights``, as a trainer would) or in kohya's (sd-scripts' names for
Flux's double blocks, with ``alpha``), for tests of `advisor.probe.lora` and the LoRA lever.

Random ``B`` matrices (``init_lora_weights=False``: peft's default zero ``B`` would have no effect),
seeded, so that two LoRAs of one rank differ and each changes the output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from advisor.testing._common import seeded


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA trainers' default targets
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def _adapter_state(model: Any, rank: int, targets: tuple[str, ...], seed: int) -> dict:
    from peft import LoraConfig, get_peft_model_state_dict

    seeded(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    model.add_adapter(config, adapter_name="made")  # diffusers' and transformers' PeftAdapterMixin
    state = get_peft_model_state_dict(model, adapter_name="made")
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def write_tiny_lora(
    pipeline_dir: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = ATTENTION,
    text_encoder: bool = False,
) -> Path:
    """A LoRA of `rank` on `targets` of the tiny pipeline's denoiser (and on its first text
    encoder's attention, with `text_encoder`), saved in diffusers' layout in `folder`; its file."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), torch_dtype=torch.float32)
    denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    layers = {f"{denoiser}_lora_layers": _adapter_state(getattr(pipe, denoiser), rank, targets, seed)}
    if text_encoder:
        layers["text_encoder_lora_layers"] = _adapter_state(pipe.text_encoder, rank, CLIP_ATTENTION, seed + 1)
    folder = Path(folder)
    type(pipe).save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"


def write_kohya_flux_lora(diffusers_lora: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """The first double block's attention of a diffusers-layout Flux LoRA (`write_tiny_lora`), as
    sd-scripts writes it: ``lora_unet_double_blocks_0_img_attn_qkv`` (q, k and v fused: their A
    matrices stacked, their B block-diagonal, alpha = the stacked rank, so diffusers' converter gives
    each back exactly) and ``..._img_attn_proj`` (to_out.0) stored with alpha 2 and B doubled (the
    same change: kohya scales by alpha / rank)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(diffusers_lora))
    prefix = "transformer.transformer_blocks.0.attn."
    a = [state[f"{prefix}to_{x}.lora_A.weight"] for x in "qkv"]
    b = [state[f"{prefix}to_{x}.lora_B.weight"] for x in "qkv"]
    rank = a[0].shape[0]
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.cat(a, 0).contiguous(),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.block_diag(*b).contiguous(),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(3 * rank)),
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": state[
            f"{prefix}to_out.0.lora_A.weight"
        ].contiguous(),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": (
            state[f"{prefix}to_out.0.lora_B.weight"] * (rank / 2)
        ).contiguous(),
        "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(path))
    return path
