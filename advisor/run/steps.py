"""A config's post-load steps, in the order they must run: each knows what it does, its code, and how to run it.

Everything a config asks for after loading is a list of `Step` objects (`plan`): each has a one-line
``description``, the exact Python ``code`` a user would write (it refers to ``pipe``) and a ``run``
function that performs it. `advisor.run.apply` runs the steps; `advisor.run.emit` prints their
code. Both come from the same objects, so a generated script and ``advisor.load_pipeline`` cannot
drift apart.

Order of the steps (and why): each lever's at its ``order`` (`advisor.levers`), then its final steps:

1. ``torch._dynamo.config`` flags (`advisor.levers.torch_compile`): dynamo reads them when it first
   traces, so they go before anything is compiled (``capture_dynamic_output_shape_ops`` for
   bitsandbytes, a larger ``cache_size_limit`` with offloading: the seed page sets them first);
2. layerwise casting (fp8 storage: `advisor.levers.layerwise_casting`), then ``channels_last``
   (`advisor.levers.memory_format`): both rewrite the weights in place, before offloading hooks
   capture them;
3. device placement (`advisor.levers.offload`): ``pipe.to(device)``, model / sequential CPU
   offload or group offload;
4. VAE tiling / slicing (`advisor.levers.vae`; after group offload: diffusers warns about tiling
   set before streams);
5. the attention backend, then step caching (`advisor.levers`; a cache's hooks wrap the blocks'
   forward, as offloading's do);
6. ``torch.compile`` last (the compile lever's final steps): compiling captures the module as it
   is then, hooks included.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from advisor.levers import LEVERS
from advisor.levers.code import Step
from advisor.levers.torch_compile import COMPILE
from advisor.run.classes import Components


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig


def summary(config: OptimizationConfig) -> str:
    """One line naming everything the config does: ``config.summary()`` plus the steps it leaves out
    (``channels_last``, the dynamo flags set before compiling).

    >>> summary(config)  # doctest: +SKIP
    'bf16, float8_dynamic(unet), compiled (regional), no offload, channels_last'
    """
    notes = [note for lever in LEVERS if (note := lever.summary_note(config))]
    return ", ".join([config.summary(), *notes, *filter(None, [COMPILE.dynamo_note(config)])])


def steps_for(config: OptimizationConfig, components: Components) -> list[Step]:
    """The post-load steps of `config` for a pipeline holding `components`: each lever's in its order,
    then their final steps."""
    steps: list[Step] = []
    # A plain loop, not a comprehension: the levers' warnings count frames up to the caller of `plan`.
    for produce in [*(lever.steps for lever in LEVERS), *(lever.final_steps for lever in LEVERS)]:
        steps += produce(config, components)
    return steps


def process_steps(config: OptimizationConfig) -> list[Step]:
    """What the process sets before torch starts CUDA, each lever's in its order."""
    return [step for lever in LEVERS for step in lever.process_steps(config)]


def plan(config: OptimizationConfig, pipe: Any = None, *, model: str | Path | None = None) -> list[Step]:
    """The post-load steps for `config`, in the order they must run.

    Component classes come from `pipe` when given (what `apply_config` does), else from `model`'s
    layout (local folder, HF cache or the built-in catalog); with neither, names are taken as
    written and ``transformer`` is the denoiser.
    """
    components = Components.of_pipe(pipe) if pipe is not None else Components.of_model(model)
    return steps_for(config, components)
