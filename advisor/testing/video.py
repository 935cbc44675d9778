"""Tiny text-to-video pipelines: Wan 2.1, Wan 2.2 (two experts; TI2V-5B), CogVideoX, HunyuanVideo, LTX-Video.

Same rules as `advisor.testing.image`: catalog component names and classes, random weights from
the smallest config that runs, offline tokenizers, float32 safetensors.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from advisor.testing._common import clip_text_encoder, offline_tokenizer, prepare_folder, save, seeded, t5_text_encoder


def _wan_parts(seed: int) -> dict[str, Any]:
    """The Wan 3D VAE (8x spatial, 4x temporal) and a UMT5 encoder with its tokenizer."""
    from diffusers import AutoencoderKLWan

    tokenizer = offline_tokenizer(model_max_length=512)
    seeded(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return {"tokenizer": tokenizer, "text_encoder": t5_text_encoder(seed, tokenizer, umt5=True), "vae": vae}


def _wan_transformer(seed: int, channels: int = 16) -> Any:
    from diffusers import WanTransformer3DModel

    seeded(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=channels,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def build_tiny_wan(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    overwrite: bool = False,
) -> pathlib.Path:
    """Build a random-weight ``WanPipeline`` (text-to-video) into ``path`` and return the folder.

    About 0.09 M parameters in total (UMT5 encoder, 2-block Wan transformer,
    Wan 3D VAE with 8x spatial / 4x temporal compression); one
    ``tiny_call_kwargs("video")`` call takes ~0.02 s on CPU. Same caching and
    seeding rules as :func:`build_tiny_flux`.

    Example::

        >>> folder = build_tiny_wan(tmp_path / "wan")
        >>> pipe = DiffusionPipeline.from_pretrained(folder)
        >>> frames = pipe(**tiny_call_kwargs("video")).frames[0]  # (5, 32, 32, 3)
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(
        **_wan_parts(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=_wan_transformer(seed)
    )
    return save(pipe, folder)


def build_tiny_wan22(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight Wan 2.2 A14B-style ``WanPipeline``: ``transformer`` (high-noise expert) and
    ``transformer_2`` (low-noise expert), switching at ``boundary_ratio=0.875`` as Wan2.2-T2V-A14B does.

    With two steps both experts run: the first timestep (1000) is above the boundary (875), the
    second below it. Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline(
        **_wan_parts(seed),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=_wan_transformer(seed),
        transformer_2=_wan_transformer(seed + 1),  # a different expert, not a copy
        boundary_ratio=0.875,
    )
    return save(pipe, folder)


def build_tiny_wan22_ti2v(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight Wan 2.2 TI2V-5B-style ``WanPipeline``: one transformer called with a timestep
    per latent token (``expand_timesteps=True``) and the Wan 2.2 VAE kind (residual, 2x2 patches:
    16x spatial, 4x temporal compression), so the smallest frame is 32x32. Same caching and seeding
    rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    parts = _wan_parts(seed)
    seeded(seed)
    parts["vae"] = AutoencoderKLWan(
        base_dim=4,
        decoder_base_dim=4,
        z_dim=8,
        in_channels=12,  # 3 colours x 2x2 patch
        out_channels=12,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        patch_size=2,
        is_residual=True,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.0] * 8,
        latents_std=[1.0] * 8,
    )
    pipe = WanPipeline(
        **parts,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
        transformer=_wan_transformer(seed, channels=8),
        expand_timesteps=True,
    )
    return save(pipe, folder)


def build_tiny_cogvideox(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``CogVideoXPipeline`` with rotary position embeddings, as CogVideoX-5b.

    The transformer's ``sample_*`` and ``max_text_seq_length`` fix the call: 16x16, 9 frames, and
    the prompt padded to 16 tokens (``max_sequence_length=16``). Same caching and seeding rules as
    :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tokenizer = offline_tokenizer(model_max_length=226)
    seeded(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # the 3D rotary embedding splits it 4 + 6 + 6 (time, height, width)
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
    )
    seeded(seed)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_text_encoder(seed, tokenizer),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(
            prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
        ),
    )
    return save(pipe, folder)


def build_tiny_hunyuan_video(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``HunyuanVideoPipeline``: a 2-layer Llama text encoder, a CLIP text encoder for the
    pooled embedding, a 1+1-block transformer and the Hunyuan 3D VAE (8x spatial, 4x temporal).

    Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    tokenizer, tokenizer_2 = offline_tokenizer(256), offline_tokenizer(77)
    seeded(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,  # the Llama width
        pooled_projection_dim=8,  # the CLIP width
        rope_axes_dim=(2, 4, 4),
    )
    seeded(seed)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    seeded(seed)
    text_encoder = LlamaModel(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            # The pipeline reads hidden_states[-3] (skips the last two layers): at least 2 layers.
            num_hidden_layers=2,
            vocab_size=1000,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip_text_encoder(seed, tokenizer_2, hidden=8),
        tokenizer_2=tokenizer_2,
    )
    return save(pipe, folder)


def build_tiny_ltx(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``LTXPipeline``: T5, a 1-block transformer and the LTX VAE (4x spatial and temporal here).

    Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tokenizer = offline_tokenizer(128)
    seeded(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    seeded(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=t5_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return save(pipe, folder)
