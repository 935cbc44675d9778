"""Build one pipeline component on the meta device from its published config (shapes, no weights)."""

from __future__ import annotations

import copy
from typing import Any

import torch


def build_on_meta(
    library: str, class_name: str, config: dict[str, Any], *, attention: str = "sdpa"
) -> torch.nn.Module:
    """The component `class_name` of `library` built from `config` on the meta device, in eval mode.

    `attention` is the transformers attention implementation: "sdpa" (its default, what runs) for
    tracing; "eager" for counting parameters, where it avoids any backend availability check.
    """
    # Deep copy: transformers configs mutate nested dicts (rope_scaling, text_config) in place.
    config = copy.deepcopy(config)
    if library == "diffusers":
        import diffusers

        with torch.device("meta"):
            model = getattr(diffusers, class_name).from_config(config)
    elif library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        model_type = config.pop("model_type", None) or cls.config_class.model_type
        for key in ("transformers_version", "_name_or_path", "architectures"):  # serialisation only
            config.pop(key, None)
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        if not isinstance(cfg, cls.config_class):
            cfg = cls.config_class(**config)
        cfg._attn_implementation = attention
        for sub in ("text_config", "vision_config"):
            sub_cfg = getattr(cfg, sub, None)
            if sub_cfg is not None and hasattr(sub_cfg, "_attn_implementation"):
                sub_cfg._attn_implementation = attention
        with torch.device("meta"):
            model = cls(cfg)
    else:
        raise ValueError(f"unsupported library {library!r} for {class_name}")
    return model.eval()


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` in `dtype` as `from_pretrained(torch_dtype=...)` would load it: diffusers keeps its
    `_keep_in_fp32_modules` (a dotted segment of a submodule's name) in float32 for half precision.
    Plain `nn.Module.to`, not diffusers' override, which warns about exactly this."""
    torch.nn.Module.to(module, dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype in (torch.float16, torch.bfloat16) and keep and type(module).__module__.startswith("diffusers"):
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                torch.nn.Module.to(sub, torch.float32)
    return module
