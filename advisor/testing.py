"""Tiny random-weight diffusers pipelines for tests, benchmarks and dry runs.

The builders write a regular diffusers folder (``model_index.json``, one
sub-folder per component, float32 safetensors weights) that loads offline with
the real ``DiffusionPipeline.from_pretrained`` and runs on CPU in about a
second. Nothing is downloaded: the tokenizers are built in memory from a small
word-level vocabulary.

Example::

    >>> from diffusers import DiffusionPipeline
    >>> from advisor.testing import build_tiny_flux, tiny_call_kwargs
    >>> folder = build_tiny_flux("/tmp/tiny-flux")
    >>> pipe = DiffusionPipeline.from_pretrained(folder)
    >>> image = pipe(**tiny_call_kwargs("image", seed=0)).images[0]
    >>> image.shape
    (32, 32, 3)

Heavy libraries (torch, diffusers, transformers, tokenizers) are imported
inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Any

__all__ = ["build_tiny_flux", "build_tiny_wan", "offline_tokenizer", "tiny_call_kwargs"]

# Words the default prompts use, so that they tokenize to real ids rather
# than to the unknown token; everything else maps to "<unk>".
_WORDS = (
    "a photo of an the cat dog sitting on mat in garden red blue green small big "
    "astronaut riding horse video running beach sunset city street tree house"
).split()
_SPECIAL = ("<pad>", "</s>", "<unk>", "<s>")
_VOCAB_SIZE = 1000

_IMAGE_PROMPT = "a photo of a cat sitting on a mat"
_VIDEO_PROMPT = "a dog running on the beach at sunset"


def _prepare_folder(path: str | os.PathLike[str], overwrite: bool) -> tuple[pathlib.Path, bool]:
    """Return (folder, needs_build)."""
    folder = pathlib.Path(path)
    if (folder / "model_index.json").is_file() and not overwrite:
        return folder, False
    return folder, True


def offline_tokenizer(model_max_length: int) -> Any:
    """A word-level fast tokenizer that needs no download and round-trips through save/load."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(_SPECIAL) + _WORDS
    tokens += [f"tok{i}" for i in range(_VOCAB_SIZE - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Append </s> like T5/CLIP do: CLIP pools the hidden state at the eos token.
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
    )


def _save(pipe: Any, folder: pathlib.Path) -> None:
    import torch

    # Only cast what is not float32 already (e.g. under a non-default
    # torch default dtype): pipe.to() warns about every model otherwise.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and any(
            p.dtype != torch.float32 for p in component.parameters()
        ):
            component.to(torch.float32)
    # save_pretrained writes model_index.json first, so an interrupted save in
    # place would later pass for a cached pipeline: save next to the target
    # and move the finished folder in.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; this is a shared cache
        pipe.save_pretrained(staging, safe_serialization=True)
        if (folder / "model_index.json").is_file():  # overwrite=True
            shutil.rmtree(folder)
        elif folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        try:
            os.replace(staging, folder)
        except OSError:
            # Another process finished the same folder first: keep theirs.
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


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
    folder, needs_build = _prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    text_dim = 32 * scale
    tokenizer = offline_tokenizer(model_max_length=77)
    tokenizer_2 = offline_tokenizer(model_max_length=512)

    _seeded(seed)
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

    _seeded(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=text_dim,
            intermediate_size=37 * scale,
            num_attention_heads=4,
            num_hidden_layers=5,
            projection_dim=text_dim,
            vocab_size=_VOCAB_SIZE,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )

    _seeded(seed)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            d_model=text_dim,
            d_kv=8,
            d_ff=37 * scale,
            num_layers=2,
            num_heads=4,
            vocab_size=_VOCAB_SIZE,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )

    _seeded(seed)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        # FluxPipeline decodes with latents / scaling_factor + shift_factor; None would crash.
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )

    scheduler = FlowMatchEulerDiscreteScheduler()

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    _save(pipe, folder)
    return folder


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
        >>> frames = pipe(**tiny_call_kwargs("video")).frames[0]  # (5, 16, 16, 3)
    """
    folder, needs_build = _prepare_folder(path, overwrite)
    if not needs_build:
        return folder

    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = offline_tokenizer(model_max_length=512)

    _seeded(seed)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )

    _seeded(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            vocab_size=_VOCAB_SIZE,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )

    _seeded(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )

    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )
    _save(pipe, folder)
    return folder


def tiny_call_kwargs(kind: str, *, seed: int | None = None) -> dict[str, Any]:
    """Smallest call arguments that make a tiny pipeline run fast on CPU.

    ``kind`` is ``"image"`` (Flux: one 32x32 image) or ``"video"`` (Wan: 5
    frames of 16x16; Wan needs height/width divisible by 16 and
    ``(num_frames - 1) % 4 == 0``). Output is ``output_type="np"`` so the
    VAE decode runs too. With ``seed`` a ``torch.Generator`` seeded with it is
    added (a fresh dict each call, so a generator is never shared); without it
    the result depends on the global torch RNG.

    Example::

        >>> pipe(**tiny_call_kwargs("video", seed=0)).frames.shape
        (1, 5, 16, 16, 3)
    """
    from advisor.probe.workload import Workload

    if kind == "image":
        job = Workload("image", height=32, width=32, steps=2).call_kwargs()
        kwargs: dict[str, Any] = {"prompt": _IMAGE_PROMPT, **job, "guidance_scale": 3.5}
    elif kind == "video":
        job = Workload("video", height=16, width=16, frames=5, steps=2).call_kwargs()
        kwargs = {"prompt": _VIDEO_PROMPT, "negative_prompt": "", **job, "guidance_scale": 5.0}
    else:
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    kwargs.update(max_sequence_length=16, output_type="np")
    if seed is not None:
        import torch

        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs
