"""Generate advisor/data/diffusers.json: facts about every diffusers pipeline and model class.

The advisor must classify pipelines and plan offloading without importing diffusers (that import
takes seconds), so the facts it needs are read here, once, from the installed diffusers:
- per pipeline class: the workload (``video`` when ``__call__`` takes ``num_frames``, ``audio``
  when it takes ``audio_length_in_s``, else ``image``), ``model_cpu_offload_seq``, and the default
  ``max_sequence_length`` of its text encoders;
- per model class: ``_skip_layerwise_casting_patterns``, ``_keep_in_fp32_modules``,
  ``_repeated_blocks``, whether it has ``enable_tiling`` / ``enable_slicing``, and whether it
  defines a ``_cp_plan`` (context parallelism: ``enable_parallelism`` refuses a model without one);
- the names ``set_attention_backend`` takes (``AttentionBackendName``), and those registered with
  ``supports_context_parallel=True`` (``_AttentionBackendRegistry._supports_context_parallel``);
- per transformers text-encoder class: the modules its quantizers leave unconverted
  (``_keep_in_fp32_modules`` plus ``get_keys_to_not_convert`` of a meta-device instance).

    python scripts/build_diffusers_tables.py          # rewrite the file
    python scripts/build_diffusers_tables.py --check  # exit 1 if an entry this environment
                                                      # can generate differs from the file
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path


OUTPUT = Path(__file__).resolve().parent.parent / "advisor" / "data" / "diffusers.json"


def _workload(call_parameters) -> str:
    if "num_frames" in call_parameters:
        return "video"
    if "audio_length_in_s" in call_parameters:
        return "audio"
    return "image"


def build_tables() -> dict:
    import diffusers
    from diffusers import DiffusionPipeline, ModelMixin

    pipelines, models = {}, {}
    for name in sorted(dir(diffusers)):
        try:
            obj = getattr(diffusers, name)
        except Exception:  # optional backends missing: that class can't be used here anyway
            continue
        if not inspect.isclass(obj):
            continue
        if issubclass(obj, DiffusionPipeline) and obj is not DiffusionPipeline:
            parameters = inspect.signature(obj.__call__).parameters
            max_len = parameters.get("max_sequence_length")
            sequence = obj.model_cpu_offload_seq
            pipelines[name] = {
                "workload": _workload(parameters),
                "offload_sequence": sequence.split("->") if sequence else [],
                "max_sequence_length": max_len.default if max_len and isinstance(max_len.default, int) else None,
            }
        elif issubclass(obj, ModelMixin) and obj is not ModelMixin:
            models[name] = {
                "skip_layerwise_casting_patterns": list(obj._skip_layerwise_casting_patterns or []),
                "keep_in_fp32_modules": list(obj._keep_in_fp32_modules or []),
                "repeated_blocks": list(getattr(obj, "_repeated_blocks", None) or []),
                "tiling": hasattr(obj, "enable_tiling"),
                "slicing": hasattr(obj, "enable_slicing"),
                "context_parallel": bool(getattr(obj, "_cp_plan", None)),
            }
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return {
        "diffusers_version": diffusers.__version__,
        "attention_backends": sorted(backend.value for backend in AttentionBackendName),
        "context_parallel_backends": sorted(_AttentionBackendRegistry._supports_context_parallel),
        "pipelines": pipelines,
        "models": models,
        "transformers_models": transformers_tables(),
    }


# Text and image encoders diffusers pipelines load from transformers.
TRANSFORMERS_ENCODERS = (
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionModelWithProjection",
    "T5EncoderModel",
    "UMT5EncoderModel",
    "LlamaModel",
    "Qwen2_5_VLForConditionalGeneration",
    "Gemma2Model",
    "Qwen3Model",
    "Qwen3ForCausalLM",
    "Mistral3ForConditionalGeneration",
)


def transformers_tables() -> dict:
    import torch
    import transformers
    from transformers.quantizers.base import get_keys_to_not_convert

    tables = {}
    for name in TRANSFORMERS_ENCODERS:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        with torch.device("meta"):
            model = cls(cls.config_class())
        keep = sorted(set(getattr(model, "_keep_in_fp32_modules", None) or []))
        tables[name] = {
            "keep_in_fp32_modules": keep,  # upcast only when loading in float16 (transformers 5)
            "quantization_skip_modules": sorted(set(get_keys_to_not_convert(model)) | set(keep)),
        }
    return tables


def stale_entries(generated: dict, committed: dict) -> list[str]:
    """Entries this environment generates that the committed file lacks or has differently.

    Classes whose optional backends are not installed here (Kolors needs sentencepiece, ...) can't be
    generated, so extra committed entries are fine; what can be generated must match.
    """
    stale = [
        key
        for key in ("diffusers_version", "attention_backends", "context_parallel_backends")
        if generated.get(key) != committed.get(key)
    ]
    for section in ("pipelines", "models", "transformers_models"):
        have = committed.get(section, {})
        stale += [f"{section}.{name}" for name, entry in generated[section].items() if have.get(name) != entry]
    return stale


def render(tables: dict) -> str:
    return json.dumps(tables, indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = parser.parse_args()
    tables = build_tables()
    if args.check:
        stale = stale_entries(tables, json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {})
        if stale:
            print(
                f"{OUTPUT} is out of date ({', '.join(stale[:5])}): run python scripts/build_diffusers_tables.py",
                file=sys.stderr,
            )
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    committed = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    for section in ("pipelines", "models", "transformers_models"):  # keep what this environment can't generate
        tables[section] = dict(sorted({**committed.get(section, {}), **tables[section]}.items()))
    text = render(tables)
    OUTPUT.write_text(text)
    tables = json.loads(text)
    print(f"wrote {OUTPUT}: {len(tables['pipelines'])} pipelines, {len(tables['models'])} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
