"""What the user wants to generate: image or video, resolution, frames, steps, batch.

Defaults come from the pipeline's own ``__call__`` defaults (``advisor/data/pipelines.json``), so
``advisor recommend --model Wan-AI/Wan2.1-T2V-14B-Diffusers`` plans for 480x832, 81 frames, 50 steps
unless told otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from advisor.config import LoraAdapter
from advisor.errors import UsageError
from advisor.paths import DATA_DIR
from advisor.probe.layout import catalog_entry
from advisor.probe.lora import hotswappable, user_loras
from advisor.probe.models import ModelProfile


# Upper bounds of the workload flags, each past anything a pipeline generates (the catalog's
# largest defaults: 1328 px, 161 frames, 50 steps; diffusers' VAEs compress time 4x or 8x, and
# 1025 frames is a valid count for both) and small enough that every estimate is a finite number:
# unbounded, 10**300 frames overflowed the FLOP count to a float.
WORKLOAD_LIMITS = {"height": 32768, "width": 32768, "frames": 1025, "steps": 10000, "batch": 256}
_TOO_LARGE = {
    "height": "is larger than any pipeline generates",
    "width": "is larger than any pipeline generates",
    "frames": "is longer than any video pipeline generates",
    "steps": "is more steps than any sampler runs",
    "batch": "is more than any GPU holds",
}


def check_workload_value(name: str, value: object) -> None:
    """A `UsageError` naming ``--<name>`` unless `value` is a whole number from 1 to its limit."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--{name}: {value!r} must be a whole number >= 1")
    if value > WORKLOAD_LIMITS[name]:
        raise UsageError(f"--{name}: {value} {_TOO_LARGE[name]}; use at most {WORKLOAD_LIMITS[name]}")


@lru_cache(maxsize=1)
def pipeline_behaviour_table() -> dict[str, Any]:
    return json.loads((DATA_DIR / "pipelines.json").read_text())


def pipeline_behaviour(pipeline_class: str, kind: str) -> dict[str, Any]:
    """CFG mode, call defaults and VAE chunking of a pipeline class (family fallback if unknown)."""
    table = pipeline_behaviour_table()
    fallback = table["_video" if kind == "video" else "_image"]
    return {**fallback, **table.get(pipeline_class, {})}


def encoding_order(offload_sequence: list[str], encoders: list[str]) -> list[str]:
    """The text encoders in the order a pipeline's ``encode_prompt`` calls them: its
    ``model_cpu_offload_seq``, any it leaves out after."""
    return [n for n in offload_sequence if n in encoders] + sorted(n for n in encoders if n not in offload_sequence)


def run_behaviour(pipeline_class: str, workload: Workload, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """How `pipeline_class` runs `workload`: its family's behaviour, with classifier-free guidance
    off where the workload's guidance scale turns it off. Pipelines guide above a scale of 1
    (``do_classifier_free_guidance`` is ``guidance_scale > 1`` in SD3, Wan, CogVideoX, ...),
    ``cfg_above`` where one differs (Z-Image guides at any scale above 0); never where one of the
    pipeline's own `settings` named by ``unguided_when`` is on (FLUX.2 [klein]'s ``is_distilled``:
    ``guidance_scale > 1 and not self.config.is_distilled``)."""
    behaviour = pipeline_behaviour(pipeline_class, workload.kind)
    scale = workload.guidance_scale
    distilled = bool((settings or {}).get(behaviour.get("unguided_when", ""), False))
    if behaviour["cfg"] != "none" and (distilled or (scale is not None and scale <= behaviour.get("cfg_above", 1))):
        return {**behaviour, "cfg": "none", "negative_prompt_encoded": False}
    return behaviour


def encoding_passes(pipeline_class: str, workload: Workload, settings: dict[str, Any] | None = None) -> int:
    """How often a pipeline runs its text encoders per generation: twice where it encodes a negative
    prompt by default (``negative_prompt_encoded``: SD3 encodes ``""``) and guidance is on."""
    return 2 if run_behaviour(pipeline_class, workload, settings)["negative_prompt_encoded"] else 1


@dataclass(frozen=True)
class Workload:
    """One generation job. ``frames`` is 1 for images; ``batch`` is images/videos per prompt."""

    kind: str
    height: int
    width: int
    frames: int = 1
    steps: int = 28
    batch: int = 1
    guidance_scale: float | None = None  # what the call passes; None: the pipeline's own default
    loras: tuple[LoraAdapter, ...] = ()  # the user's LoRAs (`advisor.probe.lora`); a config records them
    lora_swap: bool = False  # other LoRAs are loaded between calls
    lora_hotswappable: bool = True  # each swapped LoRA targets the first one's layers or fewer
    assumptions: tuple[str, ...] = field(default=(), compare=False)  # defaults taken from the model, said aloud

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in (
            "assumptions",
            "loras",
            "lora_swap",
            "lora_hotswappable",
        ):  # a config's `lora` section records the LoRAs
            del data[name]
        if self.guidance_scale is None:
            del data["guidance_scale"]
        return data

    def call_kwargs(self, steps: int | None = None) -> dict[str, Any]:
        """The pipeline call arguments for this workload (`steps` overrides the step count).

        The batch is left out at 1, the pipelines' default, so generated scripts stay minimal.
        """
        kwargs: dict[str, Any] = {"height": self.height, "width": self.width}
        kwargs["num_inference_steps"] = self.steps if steps is None else steps
        if self.kind == "video":
            kwargs["num_frames"] = self.frames
        if self.batch != 1:
            kwargs["num_videos_per_prompt" if self.kind == "video" else "num_images_per_prompt"] = self.batch
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        return kwargs

    def label(self) -> str:
        size = f"{self.width}x{self.height}"
        frames = f", {self.frames} frames" if self.kind == "video" else ""
        batch = f", batch {self.batch}" if self.batch > 1 else ""
        guidance = f", guidance {self.guidance_scale:g}" if self.guidance_scale is not None else ""
        loras = ""
        if self.loras:
            count, rank = len(self.loras), max(adapter.rank for adapter in self.loras)
            loras = f", {count} LoRA{'s' * (count > 1)} (rank {rank}{', swapped' if self.lora_swap else ''})"
        return f"{self.kind} {size}{frames}, {self.steps} steps{batch}{guidance}{loras}"


def model_defaults(profile: ModelProfile) -> dict[str, Any]:
    """Call defaults of this model where they differ from its pipeline class's, with ``source``
    saying where they come from.

    FLUX.1-schnell is timestep-distilled: its transformer has no guidance embedding
    (``guidance_embeds: false``) and its model card runs 4 steps (FLUX.1-dev, same class: 28).
    A catalog entry's ``call_defaults`` are its model card's (Z-Image-Turbo: 9 steps, guidance 0),
    for the model wherever it is read from (a local folder of it is planned by its id's entry).
    """
    if profile.pipeline_class == "FluxPipeline":
        denoiser = next(iter(profile.by_role("denoiser")), None)
        if denoiser is not None and denoiser.config.get("guidance_embeds") is False:
            return {"steps": 4, "source": "https://huggingface.co/black-forest-labs/FLUX.1-schnell"}
    if profile.source == "catalog":  # the entry's own, read with it
        return dict(profile.call_defaults)
    entry = catalog_entry(profile.model_id)  # the same model read from a folder or the cache
    return dict(entry.get("call_defaults", {})) if entry else {}


def make_workload(
    profile: ModelProfile,
    *,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    steps: int | None = None,
    batch: int | None = None,
    guidance_scale: float | None = None,
    loras: tuple[str, ...] = (),
    lora_rank: int | None = None,
    lora_count: int | None = None,
    lora_swap: bool = False,
) -> Workload:
    """The workload for `profile`, with the pipeline's defaults for anything not given; `loras`
    are the user's LoRA files (``PATH[:SCALE]``), or `lora_count` (default 1) of `lora_rank` stand
    in for them (`advisor.probe.lora`).

    Values are checked here so the CLI can show one line naming the flag.
    """
    model = model_defaults(profile)
    defaults = {**pipeline_behaviour(profile.pipeline_class, profile.workload), **model}
    values = {
        "height": height if height is not None else defaults["height"],
        "width": width if width is not None else defaults["width"],
        "frames": frames if frames is not None else (defaults["frames"] if profile.workload == "video" else 1),
        "steps": steps if steps is not None else defaults["steps"],
        "batch": batch if batch is not None else 1,
    }
    for name, value in values.items():
        check_workload_value(name, value)
    multiple = defaults.get("pixel_multiple", 8)
    for name in ("height", "width"):
        if values[name] % multiple:
            lower, upper = values[name] // multiple * multiple, (values[name] // multiple + 1) * multiple
            raise UsageError(
                f"--{name}: {values[name]} is not a multiple of {multiple} ({profile.pipeline_class} needs it); "
                f"use {lower or multiple} or {upper}"
            )
    if profile.workload != "video" and values["frames"] != 1:
        raise UsageError(
            f"--frames: {values['frames']} given for an {profile.workload} pipeline; frames are for video"
        )
    vae = profile.vae
    temporal = vae.facts.get("temporal_compression", 1) if vae else 1
    if profile.workload == "video" and (values["frames"] - 1) % temporal:
        valid = ", ".join(str(temporal * n + 1) for n in (4, 8, 12, 20))
        raise UsageError(
            f"--frames: {values['frames']} does not fit the VAE's {temporal}x time compression; "
            f"use {temporal}k+1 frames, e.g. {valid}"
        )
    if guidance_scale is not None and not (isinstance(guidance_scale, (int, float)) and 0 <= guidance_scale <= 100):
        raise UsageError(f"--guidance-scale: {guidance_scale!r} must be a number from 0 to 100")
    name = profile.model_id.rsplit("/", 1)[-1]
    card = f"{name}'s model card: {model['source']}" if "source" in model else f"{name}'s default"

    def whose(*keys: str) -> str:
        return card if any(key in model for key in keys) else f"{name}'s default"

    assumed = []
    if steps is None:
        assumed.append(f"steps: {values['steps']} ({whose('steps')}; pass --steps)")
    if height is None and width is None:
        size = f"{values['width']}x{values['height']}"
        assumed.append(f"size: {size} ({whose('height', 'width')}; pass --width/--height)")
    if frames is None and profile.workload == "video":
        assumed.append(f"frames: {values['frames']} ({whose('frames')}; pass --frames)")
    if guidance_scale is None and "guidance_scale" in model:
        guidance_scale = model["guidance_scale"]
        assumed.append(f"guidance scale: {guidance_scale:g} ({card}; pass --guidance-scale)")
    adapters = user_loras(profile, tuple(loras), lora_rank, lora_count)
    if lora_swap and not adapters:
        raise UsageError("--lora-swap: says the LoRAs are swapped between calls; give them (--lora or --lora-rank)")
    assumed += [f"LoRA: {adapter.source}" for adapter in adapters[:1] if adapter.format == "assumed"]
    return Workload(
        kind=profile.workload,
        **values,
        guidance_scale=guidance_scale,
        loras=adapters,
        lora_swap=lora_swap,
        lora_hotswappable=not lora_swap or hotswappable(adapters),
        assumptions=tuple(assumed),
    )


def recorded_workload(provenance, profile: ModelProfile) -> dict[str, int | float]:
    """The workload a config records (`provenance.workload`: what `recommend` or `tune` made it
    for) when it was made for `profile`'s pipeline class and kind: flag name -> value; else empty.
    Values of the wrong kind are left out (the model's defaults stand in for them)."""
    recorded = getattr(provenance, "workload", None)
    if not isinstance(recorded, dict) or provenance.pipeline_class != profile.pipeline_class:
        return {}
    if recorded.get("kind", profile.workload) != profile.workload:
        return {}
    kept: dict[str, int | float] = {
        name: value
        for name, value in recorded.items()
        if name in WORKLOAD_LIMITS and isinstance(value, int) and not isinstance(value, bool)
    }
    scale = recorded.get("guidance_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        kept["guidance_scale"] = scale
    return kept
