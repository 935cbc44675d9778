"""LoRA files of a given rank, made up for measuring: what `advisor tune --lora-rank` runs its trials with.

A LoRA's cost depends on its shapes, not its values: each made-up file has the rank asked for on
every Linear layer of the denoiser (the layers come from the model built on the meta device, as
`advisor.probe.lora.assumed_lora` counts them), with random values (A scaled by 1/sqrt(in), B
small, seeded by the file's index), so that every candidate of a study, its lossless reference
included, runs the same LoRAs. Kept in the advisor's cache folder and made once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from advisor.paths import advisor_cache_dir


def stand_in_loras(profile: Any, rank: int, count: int) -> list[Path]:
    """`count` LoRA files of `rank` on every Linear layer of `profile`'s denoiser (a `ModelProfile`)."""
    denoiser = profile.by_role("denoiser")[0]
    model_key = hashlib.sha256(repr(sorted(denoiser.config.items())).encode()).hexdigest()[:12]
    folder = advisor_cache_dir() / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{denoiser.class_name}-{model_key}-rank{rank}-{index}.safetensors" for index in range(count)]
    missing = [(index, path) for index, path in enumerate(paths) if not path.is_file()]
    if missing:
        layers = _linear_layers(denoiser)
        for index, path in missing:
            _write(path, denoiser.name, layers, rank, seed=index)
    return paths


def _linear_layers(denoiser: Any) -> list[tuple[str, int, int]]:
    import torch

    from advisor.trace.meta import build_on_meta

    model = build_on_meta(denoiser.library, denoiser.class_name, denoiser.config)
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _write(path: Path, component: str, layers: list[tuple[str, int, int]], rank: int, *, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, fan_in, fan_out in layers:
        a = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        b = torch.randn(fan_out, rank, generator=generator) * 1e-3
        state[f"{component}.{name}.lora_A.weight"] = a.to(torch.bfloat16)
        state[f"{component}.{name}.lora_B.weight"] = b.to(torch.bfloat16)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    save_file(state, str(partial))
    os.replace(partial, path)  # whole or not at all, should two studies make it at once
