"""What every tiny-pipeline builder shares: the offline tokenizer, small text encoders, seeding and saving."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Any


# Words the default prompts use, so that they tokenize to real ids rather
# than to the unknown token; everything else maps to "<unk>".
_WORDS = (
    "a photo of an the cat dog sitting on mat in garden red blue green small big "
    "astronaut riding horse video running beach sunset city street tree house"
).split()
_SPECIAL = ("<pad>", "</s>", "<unk>", "<s>")
VOCAB_SIZE = 1000


def prepare_folder(path: str | os.PathLike[str], overwrite: bool) -> tuple[pathlib.Path, bool]:
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
    tokens += [f"tok{i}" for i in range(VOCAB_SIZE - len(tokens))]
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


def seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def clip_text_encoder(seed: int, tokenizer: Any, *, hidden: int = 32, projection: bool = False, **config: Any) -> Any:
    """A CLIP text tower (5 layers); ``projection=True`` gives CLIPTextModelWithProjection (SD3, SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    values = dict(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        projection_dim=hidden,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    seeded(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**{**values, **config}))


def t5_text_encoder(seed: int, tokenizer: Any, *, d_model: int = 32, umt5: bool = False, d_ff: int = 37) -> Any:
    """A 2-layer T5 (or UMT5) encoder of width `d_model`."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    seeded(seed)
    return model_class(
        config_class(
            d_model=d_model,
            d_kv=8,
            d_ff=d_ff,
            num_layers=2,
            num_heads=4,
            vocab_size=VOCAB_SIZE,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


# A chat template that passes the user's text through (the pipelines wrap prompts in their LLM's
# chat format; the offline tokenizer has none of its special tokens).
USER_TEXT_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


def qwen3_text_encoder(seed: int, tokenizer: Any, *, layers: int, causal_lm: bool = False, hidden: int = 16) -> Any:
    """A `layers`-deep Qwen3 of width `hidden`: the bare ``Qwen3Model`` (Z-Image) or, with `causal_lm`,
    ``Qwen3ForCausalLM`` with its head tied to the embedding, as Qwen3-4B (FLUX.2 [klein])."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB_SIZE,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    seeded(seed)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def save(pipe: Any, folder: pathlib.Path) -> pathlib.Path:
    import torch

    # Only cast what is not float32 already (e.g. under a non-default
    # torch default dtype): pipe.to() warns about every model otherwise.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and any(p.dtype != torch.float32 for p in component.parameters()):
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
    return folder
