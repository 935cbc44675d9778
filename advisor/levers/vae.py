"""The VAE lever: decoding in tiles (``vae.enable_tiling()``) and one sample at a time (``vae.enable_slicing()``).

Neither changes the output's quality nor a step's speed; both lower the decode's peak, which for
large images and for video is often the pipeline's peak (diffusers' memory guide, "VAE tiling" and
"VAE slicing"). They are not searched: the planner completes a candidate with them where they help
(`adjusts`): tiling when the decode would set the peak and tiles make it smaller, slicing whenever
a batch has more than one sample. How a tiled or sliced decode's activations behave is the decode's
model (`advisor.plan.compute.vae_decode_work`); this lever says which it is (`decode_mode`).

Pure Python: the steps call the VAE's own methods, looked up when they run.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from advisor.config import OptimizationConfig, Vae
from advisor.errors import ConfigWarning
from advisor.levers.base import Adjust, DecodeMode, Lever
from advisor.levers.code import Step, method_step


DOCS = "https://huggingface.co/docs/diffusers/main/en/optimization/memory"
METHODS = {"tiling": "enable_tiling", "slicing": "enable_slicing"}


def tiling_when_decode_dominates(
    config: OptimizationConfig, scenario: Any, predict: Callable[[OptimizationConfig], Any]
) -> OptimizationConfig:
    """Tiles where the decode sets the peak and they lower it (an image no larger than a tile, the
    VAE's sample size, 1024 px for Flux/SDXL, decodes the same)."""
    vae = scenario.profile.vae
    if vae is None or not vae.facts.get("supports_tiling") or config.vae.tiling:
        return config
    plain = predict(config)
    if plain.peak_phase != "vae_decode":
        return config
    tiled = config.replace(vae=config.vae.replace(tiling=True))
    device = scenario.target.device
    return tiled if predict(tiled).limited_peak(device) < plain.limited_peak(device) else config


def slicing_for_batches(
    config: OptimizationConfig, scenario: Any, predict: Callable[[OptimizationConfig], Any]
) -> OptimizationConfig:
    vae = scenario.profile.vae
    if (
        scenario.workload.batch > 1
        and vae is not None
        and vae.facts.get("supports_slicing")
        and not config.vae.slicing
    ):
        return config.replace(vae=config.vae.replace(slicing=True))
    return config


class VaeDecoding(Lever):
    """The VAE's tiling and slicing (config section ``vae``)."""

    name = key = "vae"
    order = 40  # after placement: diffusers warns about tiling set before group offloading's streams
    searched = False  # the adjust rules below decide it
    adjusts = (
        Adjust(
            "vae-tiling-when-decode-dominates",
            "VAE tiling decodes in tiles when the decode would set the peak (large images, video), where the VAE "
            "supports it",
            f"{DOCS}#vae-tiling",
            tiling_when_decode_dominates,
        ),
        Adjust(
            "vae-slicing-for-batches",
            "VAE slicing decodes a batch one sample at a time: the decode peak no longer grows with the batch",
            f"{DOCS}#vae-slicing",
            slicing_for_batches,
        ),
    )

    def is_on(self, config: OptimizationConfig) -> bool:
        return config.vae != Vae()

    def off(self, config: OptimizationConfig) -> OptimizationConfig:
        return config.replace(vae=Vae())

    def work_key(self, config: OptimizationConfig) -> Any:
        return (config.vae.tiling, config.vae.slicing)

    def decode_mode(self, config: OptimizationConfig, mode: DecodeMode) -> DecodeMode:
        return DecodeMode(tiled=mode.tiled or config.vae.tiling, sliced=mode.sliced or config.vae.slicing)

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        """``pipe.vae.enable_tiling()`` / ``enable_slicing()``; skipped with a warning where the
        pipeline has no ``vae`` or its class lacks the method (attributed to the caller of
        `advisor.run.steps.plan`: this, steps_for, plan, the caller)."""
        steps = []
        for flag, method in METHODS.items():
            if not getattr(config.vae, flag):
                continue
            if components.known and "vae" not in components.names():
                warnings.warn(
                    f"`vae.{flag}: true` but the pipeline has no `vae`; skipped", ConfigWarning, stacklevel=4
                )
            elif not components.has_attr("vae", method):
                warnings.warn(
                    f"`vae.{flag}: true` but {components.class_name('vae')} has no {method}(); skipped",
                    ConfigWarning,
                    stacklevel=4,
                )
            else:
                steps.append(method_step("vae", f"VAE {flag}", "vae", method))
        return steps
