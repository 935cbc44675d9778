"""The offload lever: where weights live between uses (config section ``offload``).

Four strategies (diffusers' memory guide, "Offloading"; the config's `advisor.config.Offload`):

- none: everything on the device (``pipe.to(device)``);
- model CPU offload (``enable_model_cpu_offload``): whole components move to the GPU one at a time,
  in the pipeline's ``model_cpu_offload_seq``, when the next one is called;
- group offload (``enable_group_offload`` / ``diffusers.hooks.apply_group_offloading``): groups of
  blocks (``block_level``) or single layers (``leaf_level``) move just in time; ``use_stream``
  prefetches the next group on a CUDA stream, from pinned host memory;
- sequential CPU offload (``enable_sequential_cpu_offload``): every layer moves at every use.

Partial offload is group offload with ``resident_blocks``: of a component named there, that many
repeated blocks (the largest first) stay on the device; only the rest cross PCIe.

This package owns what the advisor knows of them: here the lever, its constraints and the planner's
filter and prefer rules; in `strategies` the names, the search space's choices (partial offload's
fitted counts `partial_offset`) and the cost terms the estimate asks for (device bytes per phase
`resident_bytes`, transfer seconds `streaming_seconds` and `swap_seconds`, their overlap
`overlapped`, host RAM and disk `host_bytes`); in `steps` the placement steps; in `reasons` how a
pick's offloading is explained. Placement is not composable as a step cache's share is: exactly one
strategy decides where a weight is, so the estimate asks this lever by name.

Pure Python at import: torch and diffusers only inside a step's ``run``.
"""

from __future__ import annotations

from typing import Any, Callable

from advisor.config import Offload, OptimizationConfig
from advisor.levers.base import Filter, Lever, Loading, Pick, Prefer
from advisor.levers.code import Step, source
from advisor.levers.offload import reasons
from advisor.levers.offload.balanced import CPU, balanced_map
from advisor.levers.offload.steps import placement_steps
from advisor.levers.offload.strategies import (
    BLOCK_LEVEL,
    GROUP,
    LEAF_LEVEL,
    MODEL,
    NONE,
    PARTIAL_OFFSETS,
    PARTIAL_STEP,
    SEQUENTIAL,
    block_split,
    blocks_move_with_module_to,
    choice_name,
    empties_cache_between_models,
    encoders_resident_at_once,
    fitted_choice,
    group_offloaded,
    host_bytes,
    load_device_map,
    loads_onto_device,
    moved_whole_before_offloading,
    on_device_after_loading,
    only_one_denoiser_resident,
    overlapped,
    partial_choices,
    partial_offset,
    resident_bytes,
    streaming_seconds,
    swap_seconds,
    unused_components_resident,
    uses_group_offload,
    whole_choices,
    without_stranded_vaes,
)
from advisor.levers.quantization import built_apart
from advisor.platform import Constraint, Platform, constraint, on_cuda


DOCS = "https://huggingface.co/docs/diffusers/main/en/optimization/memory"
SEED_PAGE = "https://huggingface.co/docs/diffusers/main/en/optimization/speed-memory-optims"

__all__ = [
    "BLOCK_LEVEL",
    "GROUP",
    "LEAF_LEVEL",
    "MODEL",
    "NONE",
    "OFFLOAD",
    "PARTIAL_OFFSETS",
    "PARTIAL_STEP",
    "SEQUENTIAL",
    "block_split",
    "blocks_move_with_module_to",
    "cpu_offload_needs_cuda",
    "empties_cache_between_models",
    "encoders_resident_at_once",
    "fitted_choice",
    "gpu_placement",
    "group_offloaded",
    "host_bytes",
    "load_device_map",
    "loads_onto_device",
    "moved_whole_before_offloading",
    "on_device_after_loading",
    "only_one_denoiser_resident",
    "overlapped",
    "partial_offset",
    "resident_bytes",
    "streaming_seconds",
    "streams_need_cuda",
    "swap_seconds",
    "unused_components_resident",
    "uses_group_offload",
    "without_stranded_vaes",
]


# --- constraints and rules -----------------------------------------------------------------------

CONSTRAINTS: list[Constraint] = []


@constraint(
    "cpu-offload-needs-cuda",
    "offload.strategy",
    "model and sequential CPU offload move weights to a CUDA GPU when they are used",
    f"{DOCS}#model-offloading",
    into=CONSTRAINTS,
)
def cpu_offload_needs_cuda(config: OptimizationConfig, platform: Platform) -> str | None:
    strategy = config.offload.strategy
    if strategy in (MODEL, SEQUENTIAL) and platform.accelerator != "cuda":
        return (
            f"`offload.strategy: {strategy}` moves weights to a CUDA GPU and {platform.no_cuda}; "
            "use `offload.strategy: group` or `none` with `device: cpu`"
        )
    return None


@constraint(
    "streams-need-cuda",
    "offload.use_stream",
    "group offloading prefetches the next group on a CUDA stream; there are none without a CUDA device",
    f"{DOCS}#cuda-stream",
    into=CONSTRAINTS,
)
def streams_need_cuda(config: OptimizationConfig, platform: Platform) -> str | None:
    if config.offload.use_stream and not on_cuda(config, platform):
        reason = platform.no_cuda if platform.accelerator != "cuda" else f"`device` is {config.device}"
        return f"`offload.use_stream: true` needs CUDA streams and {reason}; set `offload.use_stream: false`"
    return None


def gpu_placement(config: OptimizationConfig, components: list[Any], gpus: int, free_bytes: int) -> dict | None:
    """Component name -> its GPU (or "cpu"), where `config` spreads the components over `gpus` cards of
    `free_bytes` each; None where they share one device."""
    if not config.offload.device_map or gpus < 2:
        return None
    return balanced_map(components, config.dtype, gpus, free_bytes)


def _left_on_the_cpu(config: OptimizationConfig, scenario: Any) -> str | None:
    target = scenario.target
    placed = gpu_placement(config, scenario.profile.components, target.gpu_count, target.vram_free_bytes)
    if config.offload.device_map and placed is None:
        return "components over the GPUs of a one-GPU machine"
    missed = sorted(name for name, card in (placed or {}).items() if card == CPU)
    if missed:
        return f"device_map='balanced' would leave {', '.join(missed)} on the CPU"
    apart = sorted(built_apart(config)) if placed else []
    return f"{', '.join(apart)} is built from its own checkpoint, which the map does not place" if apart else None


def _needs_an_accelerator(config: OptimizationConfig, scenario: Any) -> str | None:
    if scenario.target.device != "cuda" and config.offload.strategy != NONE:
        return "offloading needs an accelerator"
    return None


# The guidance's order of the strategies for each workload (0 first). Like is compared with like:
# every strategy has a place, so a tie-break can never lift sequential offload above group offload.
PREFERENCE = {"image": (NONE, MODEL, GROUP, SEQUENTIAL), "video": (NONE, GROUP, MODEL, SEQUENTIAL)}


def _rank_for(workload: str) -> Callable[[OptimizationConfig, Any], int]:
    def rank(config: OptimizationConfig, scenario: Any) -> int:
        return PREFERENCE[workload].index(config.offload.strategy) if scenario.workload.kind == workload else 0

    return rank


# --- the lever -----------------------------------------------------------------------------------


class Offloading(Lever):
    """Model, group (whole or partial) and sequential offloading (config section ``offload``)."""

    name = key = "offload"
    order = 30  # after the in-place weight rewrites (layerwise casting, channels_last): its hooks capture them
    # Not one of the optional dimensions: every point of the search space names an offload choice
    # (`advisor.plan.space`), which asks `choices_for` and, for partial offload, `partial_offset`.
    searched = False
    names = frozenset(
        {MODEL, GROUP, SEQUENTIAL, BLOCK_LEVEL, LEAF_LEVEL, *PARTIAL_OFFSETS}
        | {choice_name(o) for o in whole_choices("cuda", gpus=2)[1:]}  # [0] is no offload: the off choice
    )
    constraints = tuple(CONSTRAINTS)
    filters = (
        Filter(
            "components-over-gpus-all-on-a-gpu",
            "device_map='balanced' sizes each component at the load dtype (before quantization) and deals them out "
            "largest first over the GPUs; one too large for its turn's GPU is left on the CPU, and one built from its "
            "own checkpoint (a GGUF file) and handed over stays where it was built",
            "https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/pipeline_loading_utils.py",
            _left_on_the_cpu,
        ),
        Filter(
            "offload-needs-an-accelerator",
            "model, group and sequential offloading move weights between CPU and an accelerator; on a CPU-only "
            "machine everything already lives in RAM",
            DOCS,
            _needs_an_accelerator,
        ),
    )
    prefers = (
        Prefer(
            "images-prefer-model-offload",
            "for images, quantization + model CPU offload is usually the best trade-off: group offloading can't "
            "fully overlap transfers when each step's compute finishes quickly",
            SEED_PAGE,
            _rank_for("image"),
        ),
        Prefer(
            "one-gpu-when-it-is-enough",
            "components spread over several GPUs are no faster than on one that holds them: where one does, the "
            "plan keeps to it (one device, nothing crossing between GPUs)",
            DOCS,
            lambda config, scenario: int(bool(config.offload.device_map)),
        ),
        Prefer(
            "video-prefers-group-offload",
            "for video, quantization + group offloading tends to be better: video models are compute-bound, so "
            "transfers hide behind compute, and the activations get the memory model offload would keep for weights",
            SEED_PAGE,
            _rank_for("video"),
        ),
    )

    def is_on(self, config: OptimizationConfig) -> bool:
        return config.offload.strategy != NONE

    def off(self, config: OptimizationConfig) -> OptimizationConfig:
        return config.replace(offload=Offload())

    def choices_for(self, profile: Any, device: str, *, gpus: int = 1) -> dict[str, Offload]:
        """Choice name -> offload, for `profile` (`advisor.probe.models.ModelProfile`) on `device`:
        no offload first, partial offload's counts still to fit (`partial_offset`); over several
        `gpus`, the components spread over them too (`advisor.levers.offload.balanced`)."""
        choices = {choice_name(o): o for o in whole_choices(device, gpus)}
        choices = choices | partial_choices(profile) if device == "cuda" else choices
        return {name: without_stranded_vaes(offload, profile) for name, offload in choices.items()}

    def memory_reasons(self, pick: Pick) -> list[str]:
        return reasons.memory_reasons(pick)

    def guidance_reasons(self, pick: Pick) -> list[str]:
        return reasons.guidance_reasons(pick, self.prefers)

    def loading(self, config: OptimizationConfig, components: Any) -> Loading | None:
        """Straight onto the GPU where nothing is offloaded, onto the host where a quantizer would
        otherwise fill the GPU before offloading starts (`load_device_map`); the placement step
        ``pipe.to`` stays, for a pipeline loaded some other way (there it moves nothing)."""
        device_map = load_device_map(config)
        if device_map is None:
            return None
        return Loading("device_map", source(device_map), (), "", lambda: device_map)

    def pipeline_problem(self, config: OptimizationConfig, pipe: Any, components: Any) -> str | None:
        """A VAE that block-level group offloading would leave on the CPU for its decode, asked of the
        installed class itself (`DECODE_ONLOADING_VAES` says why); on a CPU both devices are one. A
        pipeline for components over the GPUs that was not loaded with the map."""
        offload = config.offload
        if offload.device_map and not isinstance(getattr(pipe, "hf_device_map", None), dict):
            return (
                f"`offload.device_map: {offload.device_map}` spreads the components over the GPUs as they load: load "
                f'the pipeline with advisor.load_pipeline, or with device_map="{offload.device_map}"'
            )
        if offload.strategy != GROUP or offload.offload_type != BLOCK_LEVEL or not config.device.startswith("cuda"):
            return None
        for name in offload.components or components.modules():
            module = pipe.components.get(name)
            if components.layout.role(name) == "vae" and not getattr(
                type(module), "_group_offload_block_modules", None
            ):
                return (
                    f"`offload`: block-level group offloading of {name} ({type(module).__name__}) leaves its "
                    "decode's weights on the CPU (the class lists no `_group_offload_block_modules`; diffusers "
                    f"#11086); name the other components in `offload.components` or use `offload_type: {LEAF_LEVEL}`"
                )
        return None

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        """Device placement: ``pipe.to(device)``, model / sequential CPU offload or group offload."""
        return placement_steps(config, components)


OFFLOAD = Offloading()
