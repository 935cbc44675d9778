"""The memory-format lever: ``channels_last`` for the denoisers' convolution weights.

The channels_last memory format speeds up convolution-heavy UNets under torch.compile; transformers
gain nothing (diffusers' "Reduce memory usage ... channels-last" guide). So it is not searched: the
planner adds it to a compiled candidate whose denoiser is a UNet (`adjusts`). It is for 4-D
weights; a denoiser with 5-D (Conv3d) weights refuses it (`pipeline_problem`). It rewrites the
weights in place, so it runs before placement's hooks capture them (`order`).
"""

from __future__ import annotations

from typing import Any, Callable

from advisor.config import OptimizationConfig
from advisor.levers.base import Adjust, Lever
from advisor.levers.code import Step, method_step, torch_expr


SOURCE = "https://huggingface.co/docs/diffusers/main/en/optimization/fp16#channels-last"


def channels_last_for_unets(
    config: OptimizationConfig, scenario: Any, predict: Callable[[OptimizationConfig], Any]
) -> OptimizationConfig:
    unet = any(c.class_name.startswith("UNet") for c in scenario.profile.by_role("denoiser"))
    if config.compile and unet and not config.channels_last:
        return config.replace(channels_last=True)
    return config


class ChannelsLast(Lever):
    """``channels_last`` (a config flag) on every denoiser."""

    name = key = "channels_last"
    order = 20  # after layerwise casting (10), before placement (30): both rewrite the weights in place
    searched = False  # the adjust rules below decide it
    adjusts = (
        Adjust(
            "channels-last-for-unets",
            "channels_last memory format speeds up convolution-heavy UNets under torch.compile; transformers gain "
            "nothing",
            SOURCE,
            channels_last_for_unets,
        ),
    )

    def is_on(self, config: OptimizationConfig) -> bool:
        return config.channels_last

    def off(self, config: OptimizationConfig) -> OptimizationConfig:
        return config.replace(channels_last=False)

    def summary_note(self, config: OptimizationConfig) -> str | None:
        return "channels_last" if config.channels_last else None

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        if not config.channels_last:
            return []
        return [
            method_step(
                "channels_last", f"channels_last memory format for {name}", name, "to", (),
                {"memory_format": torch_expr("channels_last")},
            )
            for name in components.denoisers()
        ]  # fmt: skip

    def pipeline_problem(self, config: OptimizationConfig, pipe: Any, components: Any) -> str | None:
        if not config.channels_last:
            return None
        for name in components.denoisers():
            if any(p.dim() == 5 for p in pipe.components[name].parameters()):
                return (
                    f"`channels_last: true` cannot apply to {name} ({components.class_name(name)}): it has 5-D (Conv3d) "
                    "weights and channels_last is for 4-D ones; set `channels_last: false`"
                )
        return None
