"""The compile lever: ``torch.compile`` of the denoisers and the ``torch._dynamo`` flags it needs (config section ``compile``).

diffusers' guidance (the seed page, "torch.compile"; docs/seed-speed-memory-optims.md): compile the
denoiser, regionally where its class lists its repeated blocks (``compile_repeated_blocks``
compiles one block and reuses it: the same speed, a much shorter warm-up); with a bitsandbytes
model set ``capture_dynamic_output_shape_ops``, with offloading raise ``cache_size_limit`` so moving
weights does not recompile, and compile components that diffusers' hooks wrap (group offloading,
layerwise casting) with ``fullgraph=False``. The planner completes a compiled candidate that way
(`adjusts`). Every point of the search space says whether it compiles; this lever builds the
section it means (`choice_for`).

Its steps come at two points: the dynamo flags before any other step (`order` 0: dynamo reads them
when it first traces), the compile after every other lever's (`final_steps`: compiling captures the
module as it is then, hooks included).

Pure Python at import: torch only inside a step's ``run``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

from advisor.config import Compile, OptimizationConfig
from advisor.errors import ConfigWarning
from advisor.levers.base import Adjust, Lever, Pick
from advisor.levers.code import Step, method_step
from advisor.levers.offload import OFFLOAD, group_offloaded
from advisor.levers.quantization import needs_dynamic_output_shapes
from advisor.platform import Constraint, Platform, constraint, on_cuda


SEED_PAGE = "https://huggingface.co/docs/diffusers/main/en/optimization/speed-memory-optims"


def compiles(config: OptimizationConfig, name: str) -> bool:
    """Whether component `name` is compiled."""
    return config.compile is not None and name in config.compile.components


def speedup(config: OptimizationConfig, name: str, generation: str, k: dict[str, Any]) -> float:
    """How much faster component `name` runs compiled than eager, on a GPU of `generation` (fitted
    on published runs: `compile_speedup` in ``advisor/data/estimate_constants.json``)."""
    if not compiles(config, name):
        return 1.0
    return k["compile_speedup"].get(generation, k["compile_speedup"]["default"])


# --- constraints and adjusts ---------------------------------------------------------------------

CONSTRAINTS: list[Constraint] = []

# inductor writes Triton kernels for a CUDA GPU; Triton publishes no Windows build, and the community
# one installs as the module `triton` (PyTorch's "How to use torch.compile on Windows" tutorial).
COMPILER_PACKAGES = ("triton", "triton-windows")
WINDOWS_TRITON = "https://github.com/woct0rdho/triton-windows"


@constraint(
    "compile-needs-triton-on-windows",
    "compile",
    "torch.compile's inductor generates Triton kernels for the GPU; Triton has no official Windows build, so "
    "on Windows compiling needs the community one (pip install triton-windows)",
    f"https://docs.pytorch.org/tutorials/unstable/inductor_windows.html; {WINDOWS_TRITON}",
    into=CONSTRAINTS,
)
def compile_needs_triton_on_windows(config: OptimizationConfig, platform: Platform) -> str | None:
    compiled = config.compile
    if compiled is None or compiled.backend != "inductor" or not on_cuda(config, platform):
        return None
    missing = _windows_triton_missing(platform)
    return (
        None if missing is None else f"`compile` {missing}; remove `compile`, or install it and plan on that machine"
    )


def _windows_triton_missing(platform: Platform) -> str | None:
    """On Windows without a Triton build: what compiling needs, and why it is taken to be missing."""
    if platform.os != "windows":
        return None
    if platform.packages is None:
        why = "it is not assumed on a Windows machine the advisor can't see"
    elif not any(platform.packages.get(name) for name in COMPILER_PACKAGES):
        why = "it is not installed"
    else:
        return None
    return f"needs a Triton build for Windows (pip install triton-windows: {WINDOWS_TRITON}) and {why}"


FULLGRAPH = "fullgraph-breaks-on-offload-hooks"
FULLGRAPH_REASON = (
    "group offloading and layerwise casting run diffusers hooks around every layer, which break a full "
    "graph: such components compile with fullgraph=False (as the seed page's offloading example does)"
)


@constraint(FULLGRAPH, "compile.fullgraph", FULLGRAPH_REASON, SEED_PAGE, into=CONSTRAINTS)
def fullgraph_breaks_on_offload_hooks(config: OptimizationConfig, platform: Platform) -> str | None:
    compile_ = config.compile
    if compile_ is None or not compile_.fullgraph:
        return None
    for name in compile_.components:
        if group_offloaded(config, name):
            why = "is group-offloaded"
        elif config.layerwise_casting and name in config.layerwise_casting.components:
            why = "is layerwise-cast"
        else:
            continue
        return (
            f"`compile.fullgraph: true` fails on `{name}`, which {why}: diffusers' hooks run outside "
            "torch.compile and break the graph; set `compile.fullgraph: false`"
        )
    return None


def _with_compile(config: OptimizationConfig, **changes: Any) -> OptimizationConfig:
    """`config` with some of its compile settings changed."""
    return config.replace(compile=config.compile.replace(**changes))


def _with_dynamo_flag(config: OptimizationConfig, option: str, value: Any) -> OptimizationConfig:
    return _with_compile(config, dynamo_config={**config.compile.dynamo_config, option: value})


def capture_for_bitsandbytes(config: OptimizationConfig, scenario: Any, predict: Callable) -> OptimizationConfig:
    if config.compile and needs_dynamic_output_shapes(config):
        return _with_dynamo_flag(config, "capture_dynamic_output_shape_ops", True)
    return config


def cache_limit_with_offload(config: OptimizationConfig, scenario: Any, predict: Callable) -> OptimizationConfig:
    if config.compile and OFFLOAD.is_on(config):
        return _with_dynamo_flag(config, "cache_size_limit", 1000)
    return config


def no_fullgraph_with_offload_hooks(
    config: OptimizationConfig, scenario: Any, predict: Callable
) -> OptimizationConfig:
    if fullgraph_breaks_on_offload_hooks(config, scenario.platform):
        return _with_compile(config, fullgraph=False)
    return config


# --- the steps -----------------------------------------------------------------------------------


def _dynamo_step(option: str, value: int | bool) -> Step:
    def run(pipe: Any) -> None:
        import torch._dynamo

        setattr(torch._dynamo.config, option, value)

    return Step("compile.dynamo_config", f"dynamo flag {option}", f"torch._dynamo.config.{option} = {value!r}", run)


def _compile_steps(config: OptimizationConfig, components: Any) -> list[Step]:
    c = config.compile
    kwargs: dict[str, Any] = {}
    if c.mode is not None:
        kwargs["mode"] = c.mode
    kwargs["fullgraph"] = c.fullgraph
    if c.dynamic is not None:
        kwargs["dynamic"] = c.dynamic
    if c.backend != "inductor":
        kwargs["backend"] = c.backend
    steps = []
    for name in c.components:
        regional = c.regional and components.is_diffusers_model(name) and components.has_attr(name, "_repeated_blocks")
        if c.regional and not regional:
            warnings.warn(
                f"`compile.regional: true` but {name} ({components.class_name(name)}) has no `_repeated_blocks`; "
                "compiling the whole model instead",
                ConfigWarning,
                stacklevel=5,  # the caller of `advisor.run.steps.plan`
            )
        if regional:
            description = f"compile the repeated blocks of {name} (regional)"
            steps.append(method_step("compile", description, name, "compile_repeated_blocks", (), kwargs))
        else:
            steps.append(method_step("compile", f"compile {name}", name, "compile", (), kwargs))
    return steps


# --- the lever -----------------------------------------------------------------------------------


class TorchCompile(Lever):
    """``torch.compile`` of the denoisers, with its dynamo flags (config section ``compile``)."""

    name = key = "compile"
    order = 0  # its dynamo flags go first; the compile itself last (`final_steps`)
    # Not one of the optional dimensions: every point of the search space says whether it compiles
    # (`advisor.plan.space`), and `choice_for` builds the section.
    searched = False
    constraints = tuple(CONSTRAINTS)
    adjusts = (
        Adjust(
            "dynamo-capture-for-bitsandbytes",
            "compiling a bitsandbytes model needs torch._dynamo.config.capture_dynamic_output_shape_ops = True",
            SEED_PAGE,
            capture_for_bitsandbytes,
        ),
        Adjust(
            "dynamo-cache-limit-with-offload",
            "compiling with offloading raises torch._dynamo.config.cache_size_limit to 1000 to avoid recompiling "
            "as weights move",
            SEED_PAGE,
            cache_limit_with_offload,
        ),
        Adjust(
            "no-fullgraph-with-offload-hooks",
            FULLGRAPH_REASON,
            SEED_PAGE,
            no_fullgraph_with_offload_hooks,
            repairs=FULLGRAPH,
        ),
    )

    def choice_for(self, profile: Any, has_repeated_blocks: Callable[[str], bool]) -> Compile:
        """The compile of `profile`'s denoisers (`advisor.probe.models.ModelProfile`): regional
        (``compile_repeated_blocks``) where every denoiser's class lists its repeated blocks
        (`has_repeated_blocks`, read from the installed diffusers), else whole-model (SD3 and
        CogVideoX list none in diffusers 0.42)."""
        denoisers = profile.by_role("denoiser")
        regional = all(has_repeated_blocks(c.class_name) for c in denoisers)
        return Compile(components=[c.name for c in denoisers], regional=regional)

    def warmup_s(self, config: OptimizationConfig, profile: Any, k: dict) -> float:
        """The compile at the first call: regional compiles each kind of repeated block once, a whole
        model every block (what dynamo traces and inductor generates code for); the figures are
        Flux.1-dev's on an H100 host (`compile_warmup_s`). Components of one class share the code:
        dynamo treats their parameters as inputs (``inline_inbuilt_nn_modules``, on since torch 2.5)."""
        if config.compile is None:
            return 0.0
        figures = k["compile_warmup_s"]
        compiled = {c.class_name: c for c in profile.components if c.name in config.compile.components}
        if config.compile.regional:
            kinds = {(name, block.class_name or block.name) for name, c in compiled.items() for block in c.blocks}
            return figures["regional_per_block_kind"] * max(len(kinds), len(compiled))
        blocks = sum(max(sum(block.count for block in c.blocks), 1) for c in compiled.values())
        return figures["whole_model_per_block"] * blocks

    def warmup_note(self, config: OptimizationConfig) -> str | None:
        """max-autotune benchmarks candidate kernels for every matmul and convolution as it compiles:
        warm-up on top of the default mode's, for which no published figure was found."""
        mode = config.compile.mode if config.compile is not None else None
        if not mode or not mode.startswith("max-autotune"):
            return None
        return (
            f"compile mode {mode}: inductor benchmarks candidate kernels as it compiles (autotuning), a warm-up on "
            "top of the default mode's figure used here, not costed: no published Flux figure; tune measures it"
        )

    def reason(self, pick: Pick) -> str | None:
        """How it compiles, its warm-up against what it saves over the process's generations; or, where
        it is left out for its warm-up alone, why."""
        config, scenario = pick.config, pick.scenario
        if not config.compile:
            return _not_compiled(pick)
        classes = ", ".join(c.class_name for c in scenario.profile.by_role("denoiser"))
        how = (
            " (regional: compile_repeated_blocks compiles each kind of repeated block once)"
            if config.compile.regional
            else f" (whole model: {classes} lists no repeated blocks, so compile_repeated_blocks can't be used)"
        )
        saved = pick.without(self) - pick.latency_s
        return f"torch.compile on the denoiser{how}: {_warmup_sentence(pick.estimate.warmup_s, saved, scenario)}"

    def dynamo_note(self, config: OptimizationConfig) -> str | None:
        """The dynamo flags, for a config's one-line summary (`advisor.run.steps.summary`)."""
        if config.compile is None or not config.compile.dynamo_config:
            return None
        return "dynamo(" + ", ".join(f"{k}={v!r}" for k, v in config.compile.dynamo_config.items()) + ")"

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        """The ``torch._dynamo.config`` flags: dynamo reads them when it first traces."""
        if config.compile is None:
            return []
        return [_dynamo_step(option, value) for option, value in config.compile.dynamo_config.items()]

    def final_steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        """``compile_repeated_blocks`` (regional) or ``compile`` of each component."""
        return [] if config.compile is None else _compile_steps(config, components)


COMPILE = TorchCompile()

WARMUP_SOURCE = (
    "Flux.1-dev on an H100 compiles in 9.6 s regionally, 67.4 s whole: "
    "https://pytorch.org/blog/torch-compile-and-diffusers-a-hands-on-guide-to-peak-performance/"
)


def _warmup_sentence(warmup_s: float, saved_s: float, scenario: Any) -> str:
    """The warm-up against what compiling saves each generation, over the process's generations."""
    n = scenario.generations
    payback = f"it pays back after {math.ceil(warmup_s / saved_s)}" if saved_s > 0 else "it never pays back"
    return (
        f"a one-off warm-up of about {warmup_s:.0f}s at the first call ({WARMUP_SOURCE}; about half with "
        f"inductor's caches warm from an earlier process), {saved_s:.1f}s saved per generation: {payback}, "
        f"over {n} generation{'s' if n > 1 else ''} per process (--generations)"
    )


def _not_compiled(pick: Pick) -> str | None:
    """Why the pick leaves compile out: it can't run on the target (Windows without Triton), or a
    compiled candidate that fits is faster per generation but not once its warm-up is spread over
    the process's generations."""
    missing = _windows_triton_missing(pick.scenario.platform)
    if missing is not None and pick.scenario.target.device == "cuda":
        return f"no torch.compile: it {missing}"
    rival = pick.rival(lambda config: config.compile is not None)
    if rival is None or rival.score_s < pick.score_s:
        return None
    saved = pick.latency_s - rival.estimate.latency_s
    if saved <= 0:
        return None
    return f"no torch.compile: {_warmup_sentence(rival.estimate.warmup_s, saved, pick.scenario)}"
