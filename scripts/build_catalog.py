#!/usr/bin/env python
"""Generate the offline pipeline catalog (``advisor/catalog/<slug>.json``).

Every ``scripts/catalog_sources/<slug>.json`` holds hand-collected public facts about one
pipeline: the Hub repo id, the pipeline class, and, per component of the repo's
``model_index.json``, the library, class, stored dtype and the published ``config.json``.
This script builds each weighted component from that config on the *meta* device (shapes
only: no weights, no download, no network) and records what memory estimates need:

``parameters``
    ``sum(p.numel() for p in model.parameters())``; tied weights count once, as
    ``parameters()`` yields a shared Parameter once.
``bytes``
    What the safetensors files hold: every tensor of ``model.state_dict()`` (parameters plus
    *persistent* buffers; tied tensors once, as ``save_pretrained`` writes them once) times
    the byte size of the stored ``dtype``.  Integer buffers count at their own dtype.  Tensors
    named by a component's optional ``stored_fp32_patterns`` count at 4 bytes.  Note that
    ``_keep_in_fp32_modules`` is a *load-time* rule: it does not by itself put float32 tensors
    in the files (FLUX's T5-XXL, whose ``wo`` layers are "keep in fp32", is stored as pure
    bf16: its index ``total_size`` is exactly 2 bytes x parameters), so it is reported
    separately as ``keep_in_fp32_parameters`` for the loaded-size estimate.  The safetensors
    header (a few tens of KB) is not counted.
``bytes_variants``
    The same for each variant file set (e.g. SDXL's ``variant="fp16"``), when the source
    lists ``variants``.
``linear_parameters`` / ``linear_layers`` / ``linear_rows`` / ``linear_columns``
    ``weight.numel()`` / count / output features / input features of the ``torch.nn.Linear`` modules the bitsandbytes and torchao
    weight quantizers would replace by default.  Excluded (kept unquantized), mirroring the
    quantizers: diffusers models skip modules named in ``_keep_in_fp32_modules`` (matched as
    ``diffusers.quantizers.bitsandbytes`` does: a module's own name, or ``key + "."`` inside /
    equal to its dotted path); transformers models skip
    ``transformers.quantizers.base.get_keys_to_not_convert(model)`` (tied weights, the last
    module, the output embedding such as ``lm_head``) plus ``_keep_in_fp32_modules``, matched
    with ``transformers.quantizers.quantizers_utils.should_convert_module``.  The patterns
    used are written to ``quantization_skip_modules``.
``casting_skipped_parameters``
    Parameters that diffusers' layerwise casting (``enable_layerwise_casting`` /
    ``apply_layerwise_casting``) leaves in the compute dtype: the module tree is walked
    exactly as ``diffusers.hooks.layerwise_casting._apply_layerwise_casting`` does - a module
    whose qualified name ``re.search``-matches a skip pattern is skipped with its whole
    subtree, a module of a type in ``_GO_LC_SUPPORTED_PYTORCH_LAYERS`` is cast, anything
    else is descended into (so parameters owned directly by other module types are never
    cast).  Patterns: ``DEFAULT_SKIP_MODULES_PATTERN`` plus, for diffusers models, the
    class's ``_keep_in_fp32_modules`` and ``_skip_layerwise_casting_patterns`` (what
    ``ModelMixin.enable_layerwise_casting`` adds); the default patterns only for
    transformers models.  Written to ``layerwise_casting_skip_patterns``.
``blocks``
    What diffusers' block-level group offloading
    (``diffusers.hooks.group_offloading._apply_group_offloading_block_level``) splits into
    groups: every direct child that is a ``ModuleList`` / ``Sequential``, recursing into the
    children named in the class's ``_group_offload_block_modules`` (dotted names, e.g.
    ``decoder.up_blocks``).  For transformers models the repeated layers sit deeper, so the
    outermost homogeneous ``ModuleList`` / ``Sequential`` containers at any depth are listed
    (``encoder.block``, ``text_model.encoder.layers``, ...).  ``parameters_per_block`` is the
    largest item; ``parameters_total`` the sum; ``uniform`` tells whether all items are the
    same size (if not, ``parameters_min_block`` is given too).

Usage::

    python scripts/build_catalog.py               # regenerate every entry
    python scripts/build_catalog.py --only flux.1-dev
    python scripts/build_catalog.py --check       # exit 1 if a committed file is stale

Output is deterministic (sorted keys, fixed ordering), so regenerating gives no diff as long
as torch / diffusers / transformers versions are unchanged (they are recorded in
``generated_with``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any


# Never touch the network: every config comes from the source files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SOURCES_DIR = ROOT / "scripts" / "catalog_sources"
CATALOG_DIR = ROOT / "advisor" / "catalog"
SCHEMA_VERSION = 1
SCRIPT_PATH = "scripts/build_catalog.py"

# Keys of a source file that are copied to the catalog entry unchanged (when present).
PASSTHROUGH_KEYS = (
    "model_id",
    "aliases",
    "pipeline_class",
    "workload",
    "sources",
    "published_parameters",
    "published_weight_bytes",
    "call_defaults",
    "pipeline_config",
    "notes",
)
# Optional keys of a source component copied to the catalog component unchanged.
COMPONENT_PASSTHROUGH_KEYS = ("config_source", "notes", "variants")

DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


# --------------------------------------------------------------------------- helpers
def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "accelerate", "torchao", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging only
        pass
    try:
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - logging only
        pass


def source_slugs() -> list[str]:
    return sorted(p.stem for p in SOURCES_DIR.glob("*.json"))


def load_source(slug: str) -> dict[str, Any]:
    with open(SOURCES_DIR / f"{slug}.json", encoding="utf-8") as fh:
        return json.load(fh)


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {
        "script": SCRIPT_PATH,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def _dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown stored dtype {name!r}; known: {sorted(DTYPE_BYTES)}") from None


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- building
def build_model(component: dict[str, Any]):
    """Instantiate one component on the meta device from its published config."""
    from advisor.trace.meta import build_on_meta

    return build_on_meta(component["library"], component["class_name"], component["config"], attention="eager")


def _stored_bytes(model, dtype: str, fp32_patterns: list[str]) -> tuple[int, int]:
    """(bytes, persistent buffer elements) of the state dict, tied tensors counted once."""
    item = _dtype_bytes(dtype)
    param_ids = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    total = 0
    buffer_elements = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        n = tensor.numel()
        if id(tensor) not in param_ids:
            buffer_elements += n
        if not tensor.is_floating_point():
            total += n * tensor.element_size()
        elif any(re.search(p, name) for p in fp32_patterns):
            total += n * 4
        else:
            total += n * item
    return total, buffer_elements


def _linear_stats(model, library: str) -> tuple[int, int, int, int, int, int, list[str]]:
    import torch

    keep_fp32 = sorted(getattr(model, "_keep_in_fp32_modules", None) or [])
    if library == "transformers":
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = sorted(set(get_keys_to_not_convert(model)) | set(keep_fp32))

        def excluded(full: str, local: str) -> bool:
            return not should_convert_module(full, skip)

    else:
        skip = keep_fp32

        def excluded(full: str, local: str) -> bool:
            # diffusers.quantizers.bitsandbytes.utils._replace_with_bnb_linear
            return local in skip or any((k + "." in full) or (k == full) for k in skip)

    params = layers = rows = columns = fp32_params = fp32_rows = 0
    for full, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not excluded(full, full.rsplit(".", 1)[-1]):
            params += module.weight.numel()
            layers += 1
            rows += module.out_features
            columns += module.in_features
        elif library == "transformers" and should_convert_module(full, sorted(set(skip) - set(keep_fp32))):
            # Kept out by `_keep_in_fp32_modules` alone: bitsandbytes leaves these, torchao converts them.
            fp32_params += module.weight.numel()
            fp32_rows += module.out_features
    return params, layers, rows, columns, fp32_params, fp32_rows, skip


def _casting_patterns(model, library: str) -> list[str]:
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    from advisor.levers.layerwise_casting import ENCODER_CASTING_SKIP_PATTERNS

    patterns = list(DEFAULT_SKIP_MODULES_PATTERN)
    # ModelMixin.enable_layerwise_casting adds the fp32 modules and the class's own patterns;
    # advisor.run.apply casts text encoders with their embeddings and fp32 modules skipped.
    patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if library == "diffusers":
        patterns += list(getattr(model, "_skip_layerwise_casting_patterns", None) or [])
    else:
        patterns += list(ENCODER_CASTING_SKIP_PATTERNS)
    return sorted(set(patterns))


def _casting(model, patterns: list[str]) -> tuple[int, int]:
    """(parameters layerwise casting leaves alone, layers it hooks): mirrors _apply_layerwise_casting."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    def walk(module, prefix: str) -> tuple[int, int]:
        if patterns and any(re.search(p, prefix) for p in patterns):
            return _numel(module), 0  # skipped with its whole subtree
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            return 0, 1  # cast
        # Parameters owned directly by an unsupported module type are never cast.
        skipped, hooked = sum(p.numel() for p in module.parameters(recurse=False)), 0
        for name, child in module.named_children():
            s, h = walk(child, f"{prefix}.{name}" if prefix else name)
            skipped, hooked = skipped + s, hooked + h
        return skipped, hooked

    return walk(model, "")


def _block_entry(name: str, container) -> dict[str, Any] | None:
    items = list(container)
    if not items:
        return None
    sizes = [_numel(m) for m in items]
    classes = sorted({type(m).__name__ for m in items})
    entry = {
        "name": name,
        "class_name": ",".join(classes),
        "count": len(items),
        "parameters_per_block": max(sizes),
        "parameters_total": sum(sizes),
        "uniform": len(set(sizes)) == 1,
    }
    if not entry["uniform"]:
        entry["parameters_min_block"] = min(sizes)
    return entry


def _blocks_diffusers(module, prefix: str = "") -> list[dict[str, Any]]:
    """Mirror diffusers' block-level group offloading (incl. _group_offload_block_modules)."""
    import torch

    block_modules = set(getattr(module, "_group_offload_block_modules", None) or [])
    out: list[dict[str, Any]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if name in block_modules:
            out += _blocks_diffusers(child, f"{full}.")
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            entry = _block_entry(full, child)
            if entry:
                out.append(entry)
    return out


def _blocks_transformers(module, prefix: str = "") -> list[dict[str, Any]]:
    """Outermost homogeneous ModuleList/Sequential containers (the repeated layers)."""
    import torch

    out: list[dict[str, Any]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            items = list(child)
            if len(items) >= 2 and len({type(m) for m in items}) == 1 and _numel(child) > 0:
                out.append(_block_entry(full, child))
                continue
        out += _blocks_transformers(child, f"{full}.")
    return out


def _keep_fp32_params(model, library: str) -> tuple[list[str], int]:
    keep = sorted(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not keep:
        return [], 0
    # diffusers' load rule (model_loading_utils): a dotted segment of the name equals a key.
    n = sum(p.numel() for name, p in model.named_parameters() if any(k in name.split(".") for k in keep))
    return keep, n


def describe_component(name: str, component: dict[str, Any]) -> dict[str, Any]:
    """Build one weighted component on meta and return its catalog record."""
    library = component["library"]
    model = build_model(component)
    dtype = component["dtype"]
    fp32_patterns = list(component.get("stored_fp32_patterns", []))
    n_bytes, buffer_elements = _stored_bytes(model, dtype, fp32_patterns)
    lin_params, lin_layers, lin_rows, lin_columns, fp32_lin_params, fp32_lin_rows, quant_skip = _linear_stats(
        model, library
    )
    cast_patterns = _casting_patterns(model, library)
    cast_skipped, cast_layers = _casting(model, cast_patterns)
    keep_fp32, keep_fp32_n = _keep_fp32_params(model, library)
    blocks = _blocks_diffusers(model) if library == "diffusers" else _blocks_transformers(model)
    record: dict[str, Any] = {
        "name": name,
        "library": library,
        "class_name": component["class_name"],
        "dtype": dtype,
        "parameters": _numel(model),
        "parameter_tensors": sum(1 for _ in model.parameters()),
        "bytes": n_bytes,
        "persistent_buffer_elements": buffer_elements,
        "linear_parameters": lin_params,
        "linear_layers": lin_layers,
        "linear_rows": lin_rows,
        "linear_columns": lin_columns,
        "fp32_linear_parameters": fp32_lin_params,
        "fp32_linear_rows": fp32_lin_rows,
        "quantization_skip_modules": quant_skip,
        "casting_skipped_parameters": cast_skipped,
        "cast_layers": cast_layers,
        "layerwise_casting_skip_patterns": cast_patterns,
        "keep_in_fp32_modules": keep_fp32,
        "keep_in_fp32_parameters": keep_fp32_n,
        "blocks": blocks,
        "config": component["config"],
    }
    if fp32_patterns:
        record["stored_fp32_patterns"] = fp32_patterns
    variants = component.get("variants") or {}
    if variants:
        record["bytes_variants"] = {
            v: _stored_bytes(model, vdtype, fp32_patterns)[0] for v, vdtype in sorted(variants.items())
        }
    for key in COMPONENT_PASSTHROUGH_KEYS:
        if key in component:
            record[key] = component[key]
    del model
    return record


def offload_sequence(pipeline_class: str, present: list[str]) -> list[str]:
    import diffusers

    seq = getattr(getattr(diffusers, pipeline_class), "model_cpu_offload_seq", None) or ""
    return [c for c in seq.split("->") if c and c in present]


def build_entry(source: dict[str, Any], only_component: str | None = None, *, trace: bool = True) -> dict[str, Any]:
    """The catalog entry for one source file (optionally just one component, and without traces, for tests)."""
    weighted = {n: c for n, c in source["components"].items() if "config" in c}
    others = {n: c["class_name"] for n, c in source["components"].items() if "config" not in c}
    seq = offload_sequence(source["pipeline_class"], list(weighted))
    order = seq + sorted(n for n in weighted if n not in seq)
    if only_component is not None:
        order = [only_component]
    entry: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    for key in PASSTHROUGH_KEYS:
        if key in source:
            entry[key] = source[key]
    entry["offload_sequence"] = seq
    entry["generated_with"] = versions()
    entry["components"] = [describe_component(n, weighted[n]) for n in order]
    entry["other_components"] = dict(sorted(others.items()))
    if trace:
        add_traces(entry)
    return entry


def add_traces(entry: dict[str, Any]) -> None:
    """Trace every component on the meta device (FLOP and activation curves; advisor.trace)."""
    from advisor.plan.compute import store_default_replays
    from advisor.probe.models import profile_from_entry
    from advisor.trace.tracer import trace_component, traceable

    profile = profile_from_entry(entry)
    for record, component in zip(entry["components"], profile.components):
        if traceable(component) is None:
            record["trace"] = trace_component(profile, component)
    # the allocation patterns replayed at the default workload, kept in the trace records
    store_default_replays(profile_from_entry(entry))


def render(entry: dict[str, Any]) -> str:
    return json.dumps(entry, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="SLUG", help="build only this entry (repeatable)")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a committed file differs")
    args = parser.parse_args(argv)

    _quiet()
    slugs = args.only or source_slugs()
    unknown = [s for s in slugs if not (SOURCES_DIR / f"{s}.json").exists()]
    if unknown:
        parser.error(f"no source file for {unknown}; known: {source_slugs()}")

    CATALOG_DIR.mkdir(parents=True, exist_ok=True)
    stale: list[str] = []
    failed: list[str] = []
    start = time.perf_counter()
    for slug in slugs:
        t0 = time.perf_counter()
        try:
            text = render(build_entry(load_source(slug)))
        except Exception as exc:  # keep going: one bad source must not block the others
            failed.append(slug)
            print(f"FAILED {slug}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        path = CATALOG_DIR / f"{slug}.json"
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if args.check:
            status = "ok" if old == text else "STALE"
            if old != text:
                stale.append(slug)
        else:
            status = "unchanged" if old == text else "written"
            if old != text:
                path.write_text(text, encoding="utf-8")
        print(f"{slug:32s} {status:9s} {time.perf_counter() - t0:6.2f}s")
    print(f"{len(slugs)} entries in {time.perf_counter() - start:.1f}s")
    if stale:
        print(f"stale: {stale} (run python {SCRIPT_PATH})", file=sys.stderr)
    return 1 if (stale or failed) else 0


if __name__ == "__main__":
    sys.exit(main())
