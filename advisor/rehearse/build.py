"""A full-size pipeline with no weights, and the call geometry of a workload: what a rehearsal runs.

`virtual_pipeline(profile, dtype)` builds each weighted component from its published config on the
meta device at the run's dtype (as ``from_pretrained(dtype=...)`` loads it: diffusers'
``_keep_in_fp32_modules`` stay float32) and assembles the real pipeline class around them; its
tokenizers and scheduler are left out (a rehearsal feeds the components token ids and latents
directly). `rehearsal_geometry` is one denoiser call's shape for a workload: the latent geometry
and text tokens the estimate uses, with batched classifier-free guidance doubling the batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from advisor.plan.compute import latent_geometry, text_tokens
from advisor.probe.workload import Workload, encoding_passes, run_behaviour
from advisor.trace.inputs import Geometry
from advisor.trace.meta import build_on_meta, cast


def virtual_pipeline(profile: Any, dtype: torch.dtype) -> Any:
    """The pipeline class of `profile` (a `ModelProfile`) holding its components built on meta."""
    import diffusers

    pipeline_class = getattr(diffusers, profile.pipeline_class)
    components = {
        c.name: cast(build_on_meta(c.library, c.class_name, c.config), dtype)
        for c in profile.components
        if c.library in ("diffusers", "transformers")
    }
    # Tokenizers, schedulers and image processors stay None: a rehearsal calls the components itself.
    # The pipeline's own settings (Wan2.2 TI2V's expand_timesteps) are the model's.
    names = [n for n in inspect.signature(pipeline_class.__init__).parameters if n != "self"]
    settings = profile.pipeline_config
    return pipeline_class(**{name: settings[name] if name in settings else components.get(name) for name in names})


def rehearse_planned(profile: Any, workload: Workload, config: Any, target: Any, budget_bytes: int) -> Any:
    """Rehearse `config` for `profile`'s `workload` at full size on a virtual `target` (a
    `TargetHardware`: its name, memory and compute capability are what ``torch.cuda`` answers),
    with `budget_bytes` for the caching allocator to reserve."""
    from advisor.rehearse.rehearsal import rehearse

    geometry, tokens, calls, passes = rehearsal_geometry(profile, workload)
    capability = tuple(int(part) for part in (target.compute_capability or "9.0").split(".")[:2])
    return rehearse(
        virtual_pipeline(profile, getattr(torch, config.dtype)),
        config,
        geometry,
        text_tokens=tokens,
        calls_per_step=calls,
        prompt_passes=passes,
        decode_batch=workload.batch,
        gpu_name=target.name,
        vram_bytes=target.vram_total_bytes,
        capability=capability,
        budget_bytes=budget_bytes,
    )


def rehearsal_geometry(profile: Any, workload: Workload) -> tuple[Geometry, dict[str, int], int, int]:
    """(one denoiser call's geometry, each text encoder's sequence length, denoiser calls per step,
    text encoder passes)."""
    frames, height, width = latent_geometry(profile, workload)
    cfg = run_behaviour(profile.pipeline_class, workload, profile.pipeline_config)["cfg"]
    batch = workload.batch * (2 if cfg == "batched" else 1)
    tokens = {c.name: c.facts.get("max_sequence_length") or 77 for c in profile.by_role("text_encoder")}
    calls = 2 if cfg == "separate" else 1
    passes = encoding_passes(profile.pipeline_class, workload, profile.pipeline_config)
    return Geometry(batch, frames, height, width, text_tokens(profile) or 77), tokens, calls, passes
