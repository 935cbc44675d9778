"""The FLUX.1-dev-shaped pipeline: the catalog's component configs, random weights, a chosen depth.

``--depth`` scales the transformer's double- and single-stream block counts and T5's layers (full
width, full CLIP and VAE); ``--depth 1`` is the real 12B + 4.7B size (31 GiB on disk). The
pipeline is built in bf16 directly on the GPU in a child process, saved once under ``--work`` and
reused by later runs on the same machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from kit import GIB, RUN_KIT, advisor_api


# FLUX.1-dev's scheduler_config.json (not in the catalog, which holds the weighted components only).
FLUX_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
_CONFIG_NOISE = {"architectures", "torch_dtype", "dtype", "transformers_version", "model_type"}
# Which config keys count blocks, per component; every other size stays FLUX.1-dev's.
DEPTH_KEYS = {"transformer": ("num_layers", "num_single_layers"), "text_encoder_2": ("num_layers",)}


def scaled_flux_configs(entry: dict[str, Any], depth: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each weighted component's config from the catalog, with depth scaled; and the scaling applied.

    ``depth`` (0 < depth <= 1) multiplies the transformer's ``num_layers`` (19) and
    ``num_single_layers`` (38) and T5's ``num_layers`` (24), rounded, at least 1. Widths, CLIP and the
    VAE stay at full size, so per-block time and memory and the activations are FLUX.1-dev's.

    >>> configs, _ = scaled_flux_configs(advisor_api.catalog_entry(), 0.25)
    >>> configs["transformer"]["config"]["num_layers"]
    5
    """
    if not 0 < depth <= 1:
        raise ValueError(f"--depth: {depth} must be in (0, 1]")
    configs, scaling = {}, {"depth": depth}
    for component in entry["components"]:
        config = {k: v for k, v in component["config"].items() if not k.startswith("_") and k not in _CONFIG_NOISE}
        for key in DEPTH_KEYS.get(component["name"], ()):
            full = config[key]
            config[key] = max(1, round(full * depth))
            scaling[f"{component['name']}.{key}"] = {"full": full, "used": config[key]}
        configs[component["name"]] = {"class_name": component["class_name"], "config": config}
    return configs, scaling


def build_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a child process: build the pipeline on `spec['device']` in bf16 and save it (timings returned)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    configs = spec["configs"]
    device = torch.device(spec["device"])
    started = time.perf_counter()
    torch.manual_seed(spec.get("seed", 0))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:  # parameters are created, and randomly initialised, on the GPU directly
            transformer = FluxTransformer2DModel.from_config(configs["transformer"]["config"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]["config"]))
            text_encoder_2 = T5EncoderModel(T5Config(**configs["text_encoder_2"]["config"]))
            vae = AutoencoderKL.from_config(configs["vae"]["config"])
    finally:
        torch.set_default_dtype(default)
    models = {"transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae}
    for model in models.values():
        if any(p.dtype != torch.bfloat16 for p in model.parameters()):
            model.to(torch.bfloat16)
        model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    construct_s = time.perf_counter() - started
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        tokenizer=advisor_api.offline_tokenizer(model_max_length=77),
        tokenizer_2=advisor_api.offline_tokenizer(model_max_length=512),
        **models,
    )
    started = time.perf_counter()
    pipe.save_pretrained(spec["folder"], safe_serialization=True)
    return {
        "construct_s": round(construct_s, 2),
        "save_s": round(time.perf_counter() - started, 2),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure_flux_dev_shaped(
    work: Path, depth: float, log: Callable[[str], None], timeout_s: float
) -> tuple[Path, dict[str, Any]]:
    """The FLUX.1-dev-shaped folder for `depth` under `work`, built (in a child process) unless already there."""
    entry = advisor_api.catalog_entry()
    configs, scaling = scaled_flux_configs(entry, depth)
    folder = work / f"flux-dev-shaped-depth{depth:g}"
    marker = folder / "kit_model.json"
    if marker.is_file() and (folder / "model_index.json").is_file():
        info = json.loads(marker.read_text())
        log(f"reusing {folder} ({info['bytes'] / GIB:.1f} GiB)")
        return folder, {**info, "reused": True}
    needed = sum(c["parameters"] for c in entry["components"]) * 2 * depth * 1.1
    free = shutil.disk_usage(work).free
    if free < needed:
        raise RuntimeError(
            f"{work}: {free / GIB:.1f} GiB free, the depth-{depth:g} pipeline needs about {needed / GIB:.1f} GiB"
        )
    staging = work / f".{folder.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    log(f"building the FLUX.1-dev-shaped pipeline at depth {depth:g} on the GPU ({scaling})")
    started = time.time()
    spec = {"configs": configs, "device": "cuda", "folder": str(staging), "seed": 0}
    done = subprocess.run(
        [sys.executable, str(RUN_KIT), "--internal", "build", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the pipeline failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    info.update(
        scaling=scaling, bytes=folder_bytes(folder), build_s=round(time.time() - started, 2), folder=str(folder)
    )
    marker.write_text(json.dumps(info, indent=2))
    log(
        f"built {folder} in {info['build_s']} s (construct {info['construct_s']} s, save {info['save_s']} s, {info['bytes'] / GIB:.1f} GiB)"
    )
    return folder, {**info, "reused": False}
