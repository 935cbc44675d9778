"""Tiny text-to-image pipelines: Flux, Stable Diffusion 3, Stable Diffusion XL, Qwen-Image, FLUX.2, Z-Image.

Each builder writes the catalog model's component names with the catalog's component classes (so
``DiffusionPipeline.from_pretrained`` gives the real pipeline class), with random weights from the
smallest config that runs (sizes and times: the table in `advisor.testing`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from advisor.testing._common import (
    USER_TEXT_CHAT_TEMPLATE,
    VOCAB_SIZE,
    clip_text_encoder,
    offline_tokenizer,
    prepare_folder,
    qwen3_text_encoder,
    save,
    seeded,
    t5_text_encoder,
)


def _tiny_vae(seed: int, latent_channels: int, *, use_post_quant_conv: bool = False, **config: Any) -> Any:
    """An AutoencoderKL with one block: no downsampling, so the latent has the image's height and width."""
    from diffusers import AutoencoderKL

    seeded(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=use_post_quant_conv,
        **config,
    )


def build_tiny_flux(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    scale: int = 1,
    overwrite: bool = False,
) -> pathlib.Path:
    """Build a random-weight ``FluxPipeline`` into ``path`` and return the folder.

    ``scale`` (int >= 1) widens the transformer (``2 * scale`` heads of 16)
    and deepens it (``2 * scale - 1`` double-stream and ``4 * scale - 3``
    single-stream blocks, Flux's 1:2 ratio); the text encoders widen to
    ``32 * scale``. scale=1 is the minimal config. Measured totals (all
    components, float32) and CPU time of one ``tiny_call_kwargs("image")`` call
    on 2 cores:

    =====  ==========  =======  ========
    scale  parameters  on disk  one call
    =====  ==========  =======  ========
    1      0.19 M      0.8 MB   ~0.02 s
    2      1.1 M       4.5 MB
    4      8.4 M       34 MB
    8      68 M        270 MB   ~0.4 s
    12     230 M       920 MB
    =====  ==========  =======  ========

    The VAE does not downsample (one block), so the transformer sees
    ``(height / 2) * (width / 2)`` tokens: 32x32 gives 256 tokens, 256x256
    already 16384 (minutes on CPU at scale=8).

    If ``path`` already holds a ``model_index.json`` nothing is built (cheap
    caching for benchmarks) unless ``overwrite=True``. ``torch.manual_seed(seed)``
    runs before each component, so equal seeds give equal weights.

    Example::

        >>> folder = build_tiny_flux(tmp_path / "flux", scale=2)
        >>> pipe = DiffusionPipeline.from_pretrained(folder)
        >>> out = pipe(**tiny_call_kwargs("image"))
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    scale = int(scale)
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    text_dim = 32 * scale
    tokenizer = offline_tokenizer(model_max_length=77)
    tokenizer_2 = offline_tokenizer(model_max_length=512)

    seeded(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        # Flux packs 2x2 latent patches: in_channels = 4 * vae latent_channels.
        in_channels=4,
        num_layers=2 * scale - 1,
        num_single_layers=4 * scale - 3,
        attention_head_dim=16,
        num_attention_heads=2 * scale,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        axes_dims_rope=[4, 4, 8],
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        # FluxPipeline decodes with latents / scaling_factor + shift_factor; None would crash.
        vae=_tiny_vae(seed, 1, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_encoder(seed, tokenizer, hidden=text_dim, intermediate_size=37 * scale),
        tokenizer=tokenizer,
        text_encoder_2=t5_text_encoder(seed, tokenizer_2, d_model=text_dim, d_ff=37 * scale),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return save(pipe, folder)


def build_tiny_chroma(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``ChromaPipeline`` (Chroma: FLUX.1 [schnell] with the per-block modulation
    moved into one small approximator network, T5 alone as text encoder, real CFG). Same caching and
    seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    text_dim = 32
    tokenizer = offline_tokenizer(model_max_length=512)
    seeded(seed)
    transformer = ChromaTransformer2DModel(
        in_channels=4,  # 2x2 packing of a 1-channel latent, as build_tiny_flux
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        axes_dims_rope=[4, 4, 8],
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(seed, 1, shift_factor=0.0609, scaling_factor=1.5035),  # FLUX.1's VAE values
        text_encoder=t5_text_encoder(seed, tokenizer, d_model=text_dim),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return save(pipe, folder)


def build_tiny_sd3(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``StableDiffusion3Pipeline`` (two CLIP towers with projection, T5, 1-block MMDiT).

    Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = offline_tokenizer(77), offline_tokenizer(77)
    tokenizer_3 = offline_tokenizer(256)
    seeded(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        # The two CLIP hidden states (32 + 32) are cut to the T5 width (32) before joining it.
        joint_attention_dim=32,
        pooled_projection_dim=64,  # the two pooled CLIP projections, concatenated
        out_channels=4,
        qk_norm="rms_norm",  # as SD3.5
        pos_embed_max_size=16,  # a (16*16, 32) position table, not the default 96*96 (1.2 MB)
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(seed, 4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_encoder(seed, tokenizer, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(seed + 1, tokenizer_2, projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_text_encoder(seed, tokenizer_3),
        tokenizer_3=tokenizer_3,
    )
    return save(pipe, folder)


def build_tiny_sdxl(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``StableDiffusionXLPipeline`` (2-level UNet with one cross-attention level).

    Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = offline_tokenizer(77), offline_tokenizer(77)
    seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=1,
        cross_attention_dim=64,  # both CLIP hidden states (32 + 32), concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # 6 size/crop numbers x 8 + the pooled projection of text_encoder_2 (32)
        projection_class_embeddings_input_dim=80,
    )
    pipe = StableDiffusionXLPipeline(
        # SDXL's VAE has a post_quant_conv: the pipeline reads its dtype when it upcasts an fp16 VAE.
        vae=_tiny_vae(seed, 4, use_post_quant_conv=True),
        text_encoder=clip_text_encoder(seed, tokenizer),
        text_encoder_2=clip_text_encoder(seed + 1, tokenizer_2, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    return save(pipe, folder)


def build_tiny_qwen_image(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``QwenImagePipeline``: a 2-layer Qwen2.5-VL text encoder (with its 1-block vision tower,
    as the class always has one), a 1-block MMDiT and the Qwen-Image 3D VAE.

    The tokenizer is the offline word-level one, not Qwen2Tokenizer (which needs vocab files from the
    hub): the chat template's special tokens become unknown words, and the template still spans more
    than the 34 tokens the pipeline crops, so the prompt's own tokens survive the crop.
    Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = offline_tokenizer(1024)
    seeded(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 2x2 packed latents of the 4-channel VAE
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    seeded(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    seeded(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": VOCAB_SIZE,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
            },
            vocab_size=VOCAB_SIZE,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return save(pipe, folder)


def _tiny_flux2_denoiser_and_vae(seed: int, text_dim: int, *, guidance_embeds: bool) -> tuple[Any, Any]:
    """FLUX.2's 1+1-block transformer (conditioned on three stacked hidden states of a `text_dim`-wide
    encoder) and its VAE kind with two blocks and 4 latent channels."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    seeded(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 2x2 packed latents of the 4-channel VAE
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_dim,
        timestep_guidance_channels=16,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    seeded(seed)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=32,
    )
    return transformer, vae


# FLUX.2's chat messages carry their text as [{"type": "text", "text": ...}] (diffusers' format_input);
# this template joins them, as Mistral's would, without its special tokens.
_FLUX2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}{{ part['text'] }} {% endfor %}{% endfor %}"
)


def build_tiny_flux2(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``Flux2Pipeline`` (FLUX.2 [dev]): a 3-layer Mistral 3 text encoder (with its
    1-layer Pixtral vision tower, as the class always has one), a 1+1-block transformer and a
    2-block FLUX.2 VAE.

    The pipeline stacks three hidden states of the text encoder (``text_encoder_out_layers``, 10, 20
    and 30 of Mistral Small's 40 by default); the tiny call passes layers 1, 2 and 3, so the
    transformer's ``joint_attention_dim`` is 3 x the encoder's width. The tokenizer is the offline
    word-level one with a chat template that joins the messages' text; the system message's words
    are unknown tokens. Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text_dim = 16
    tokenizer = offline_tokenizer(1024)
    tokenizer.chat_template = _FLUX2_CHAT_TEMPLATE
    transformer, vae = _tiny_flux2_denoiser_and_vae(seed, text_dim, guidance_embeds=True)
    seeded(seed)
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config={
                "model_type": "mistral",
                "hidden_size": text_dim,
                "intermediate_size": 16,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "vocab_size": VOCAB_SIZE,
            },
            vision_config={
                "model_type": "pixtral",
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "head_dim": 8,
                "image_size": 28,
                "patch_size": 14,
            },
            image_token_index=VOCAB_SIZE - 1,
            spatial_merge_size=1,
        )
    )
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return save(pipe, folder)


def build_tiny_z_image(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``ZImagePipeline`` (Z-Image-Turbo): a 2-layer Qwen3 text encoder (the pipeline
    takes its second-to-last hidden state), a 1-layer single-stream transformer with 1-layer refiners
    and Flux's VAE kind without downsampling.

    The tokenizer is the offline word-level one with a chat template that passes the user's text
    through. Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    text_dim = 16
    tokenizer = offline_tokenizer(1024)
    tokenizer.chat_template = USER_TEXT_CHAT_TEMPLATE
    seeded(seed)
    transformer = ZImageTransformer2DModel(
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=text_dim,
        axes_dims=[4, 6, 6],  # sums to the head width, 16
        axes_lens=[64, 32, 32],
    )
    text_encoder = qwen3_text_encoder(seed, tokenizer, layers=2, hidden=text_dim)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        # Z-Image decodes with latents / scaling_factor + shift_factor (FLUX.1's VAE values).
        vae=_tiny_vae(seed, 4, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return save(pipe, folder)


def build_tiny_flux2_klein(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """A random-weight ``Flux2KleinPipeline`` (FLUX.2 [klein], step-distilled as the 4B repo's
    ``is_distilled: true``): a 3-layer Qwen3 causal LM as text encoder (three of its hidden states
    stacked, as in :func:`build_tiny_flux2`), a 1+1-block transformer without a guidance embedding,
    and FLUX.2's VAE kind. Same caching and seeding rules as :func:`build_tiny_flux`.
    """
    folder, needs_build = prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    text_dim = 16
    tokenizer = offline_tokenizer(1024)
    tokenizer.chat_template = USER_TEXT_CHAT_TEMPLATE
    transformer, vae = _tiny_flux2_denoiser_and_vae(seed, text_dim, guidance_embeds=False)
    text_encoder = qwen3_text_encoder(seed, tokenizer, layers=3, causal_lm=True, hidden=text_dim)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    return save(pipe, folder)
