"""Turn an `OptimizationConfig` into a loaded, optimized diffusers pipeline.

`load_pipeline(model, config)` checks the config against this machine and the model's layout
(before any weight is read), loads with the config's dtype and load-time quantization
(`advisor.run.quantize`), checks the loaded pipeline, and runs the post-load steps
(`advisor.run.steps`) in order. `apply_config(pipe, config)` does the same for a pipeline you
loaded yourself. The config is checked once per load.

>>> config = OptimizationConfig(device="cpu", compile=Compile(backend="eager"))  # doctest: +SKIP
>>> pipe = load_pipeline("black-forest-labs/FLUX.1-dev", config)  # doctest: +SKIP

torch, diffusers and torchao are imported inside the functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from advisor.errors import UsageError
from advisor.probe.layout import names_a_folder, no_such_folder
from advisor.run.checks import check_components, check_machine, check_pipeline
from advisor.run.classes import Components
from advisor.run.quantize import pipeline_kwargs
from advisor.run.quiet import quiet_library_noise
from advisor.run.steps import plan, process_steps


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig


def _prepare_process(config: OptimizationConfig) -> None:
    for step in process_steps(config):
        step.run(None)


def _run_steps(pipe: Any, config: OptimizationConfig, *, loaded_as_planned: bool = False) -> Any:
    check_pipeline(pipe, config)
    for step in plan(config, pipe):
        if not (loaded_as_planned and step.done_by_loading):
            step.run(pipe)
    return pipe


def apply_config(pipe: Any, config: OptimizationConfig) -> Any:
    """Check `config` against this machine and `pipe`, then run its steps on `pipe`; returns `pipe`.

    >>> pipe = advisor.apply_config(DiffusionPipeline.from_pretrained(model, **advisor.pipeline_kwargs(config)), config)  # doctest: +SKIP
    """
    check_machine(config)
    quiet_library_noise()
    _prepare_process(config)
    return _run_steps(pipe, config)


def load_pipeline(model: str | Path, config: OptimizationConfig | str | Path, **from_pretrained_kwargs: Any) -> Any:
    """Load `model` the way `config` says and apply it: ``advisor.load_pipeline(model, advisor.load_config(path))``.

    `config` may also be the path of a config file. Extra keyword arguments go to
    ``DiffusionPipeline.from_pretrained`` (e.g. ``revision``, ``variant``, ``local_files_only``).
    """
    from advisor.config import OptimizationConfig, load_config

    if not isinstance(config, OptimizationConfig):
        config = load_config(config)
    if names_a_folder(model) and not Path(model).expanduser().is_dir():  # else diffusers' own error, about the hub
        raise no_such_folder(model)
    check_machine(config)
    check_components(config, Components.of_model(model), str(model))
    quiet_library_noise()
    _prepare_process(config)
    from diffusers import DiffusionPipeline

    kwargs = pipeline_kwargs(config, model)  # the dtype, and what the levers load with (quantization, device_map)
    for key in sorted(set(from_pretrained_kwargs) & {"dtype", "torch_dtype", "quantization_config", *kwargs}):
        raise UsageError(f"load_pipeline: `{key}` comes from the config; change the config instead of passing it")
    pipe = DiffusionPipeline.from_pretrained(model, **kwargs, **from_pretrained_kwargs)
    return _run_steps(pipe, config, loaded_as_planned=True)
