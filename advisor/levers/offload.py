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

This module owns what the advisor knows of them: the search space's choices (`Offloading.choices_for`,
partial offload's fitted counts `partial_offset`), the constraints and the planner's filter and
prefer rules, the cost terms the estimate asks for (device bytes per phase `resident_bytes`,
transfer seconds `streaming_seconds` and `swap_seconds`, their overlap `overlapped`, host RAM and
disk `host_bytes`), and the placement steps. Placement is not composable as a step cache's share
is: exactly one strategy decides where a weight is, so the estimate asks this lever by name.

Pure Python at import: torch and diffusers only inside a step's ``run``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

from advisor.config import Offload, OptimizationConfig
from advisor.levers.base import Filter, Lever, Prefer
from advisor.levers.code import Expr, Step, call_source, function_step, method_step, source
from advisor.platform import Constraint, Platform, constraint, on_cuda


DOCS = "https://huggingface.co/docs/diffusers/main/en/optimization/memory"
SEED_PAGE = "https://huggingface.co/docs/diffusers/main/en/optimization/speed-memory-optims"

# The strategies, as the config spells them (`advisor.config.OffloadStrategy`).
NONE, MODEL, GROUP, SEQUENTIAL = "none", "model", "group", "sequential"
BLOCK_LEVEL, LEAF_LEVEL = "block_level", "leaf_level"

# Partial offload (``offload.resident_blocks``): the most resident blocks that the estimate fits to
# the budget (`advisor.plan.estimate.resident_blocks_that_fit`), and a step of a tenth of the blocks
# either side of it, which tune measures too: the estimate's error decides which is truly fastest.
PARTIAL = "partial"
PARTIAL_OFFSETS = {PARTIAL: 0, "partial-fewer": -1, "partial-more": 1}
PARTIAL_STEP = 0.10


# --- which weights go where ----------------------------------------------------------------------


def group_offloaded(config: OptimizationConfig, name: str) -> bool:
    """Whether component `name` is group-offloaded (in whole or in part)."""
    offload = config.offload
    return offload.strategy == GROUP and (offload.components is None or name in offload.components)


def uses_group_offload(config: OptimizationConfig) -> bool:
    return config.offload.strategy == GROUP


def blocks_move_with_module_to(config: OptimizationConfig) -> bool:
    """Whether group offload moves whole blocks with ``Module.to`` (block level without streams;
    streams copy each tensor's data into place instead)."""
    return config.offload.offload_type == BLOCK_LEVEL and not config.offload.use_stream


def block_split(component: Any, config: OptimizationConfig, count: int | None = None) -> tuple[int, list[int]]:
    """(parameters of the blocks that never leave the device, parameters of each block that is
    streamed, largest first) of a group-offloaded `component` (`advisor.probe.models.ComponentProfile`).
    Plain group offload streams every block; partial offload (``offload.resident_blocks``) keeps its
    largest N, as the steps apply it (`count`, when given, instead of the config's). The modules
    outside the block lists are neither: diffusers onloads them as one group of their own whenever
    the component runs."""
    sizes = _block_sizes(tuple((b.total, b.count) for b in component.blocks))
    if count is None:
        count = (config.offload.resident_blocks or {}).get(component.name, 0)
    return sum(sizes[:count]), list(sizes[count:])


@lru_cache(maxsize=64)
def _block_sizes(groups: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """Parameters of every block, largest first, from (total, count) per block list. A list whose
    blocks differ (UNets) counts each at the list's mean: their own sizes aren't recorded."""
    return tuple(sorted((total // count for total, count in groups for _ in range(count)), reverse=True))


def _partly_resident(component: Any, config: OptimizationConfig) -> bool:
    return config.offload.strategy == GROUP and component.name in (config.offload.resident_blocks or {})


def resident_bytes(
    component: Any, weights: int, config: OptimizationConfig, active: bool, count: int | None = None
) -> int:
    """Device bytes of a component's `weights` during a phase where it is `active` (or not); `count`
    resident blocks of a partially offloaded component instead of the config's."""
    offload = config.offload
    if offload.strategy == NONE or (offload.strategy == GROUP and not group_offloaded(config, component.name)):
        return weights
    per_parameter = weights / component.parameters if component.parameters else 0.0
    partial = _partly_resident(component, config)
    kept, streamed = block_split(component, config, count) if partial else (0, [])
    if not active:
        return math.ceil(kept * per_parameter)
    if offload.strategy == MODEL:
        return weights
    in_flight = 2 if offload.use_stream else 1  # the stream prefetches the next group
    if offload.strategy == SEQUENTIAL or offload.offload_type == LEAF_LEVEL:
        return math.ceil(in_flight * component.largest_layer_parameters * per_parameter)
    # block_level: groups of k blocks, plus the modules outside any block list (embedders,
    # final norms), which diffusers onloads as one group of their own; partial offload's kept blocks.
    if partial:
        largest_block = streamed[0] if streamed else 0
    else:
        largest_block = max((b.parameters_per_block for b in component.blocks), default=component.parameters)
    outside = max(component.parameters - component.block_parameters, 0)
    # diffusers: streams move one block at a time
    group = (1 if offload.use_stream else offload.num_blocks_per_group) * largest_block
    return math.ceil((in_flight * group + outside + kept) * per_parameter)


def only_one_denoiser_resident(config: OptimizationConfig) -> bool:
    """Whether denoisers that take turns (Wan2.2's experts) are on the device one at a time."""
    return config.offload.strategy == MODEL


def unused_components_resident(config: OptimizationConfig) -> bool:
    """Whether components that no phase runs stay on the device (only when nothing is offloaded)."""
    return config.offload.strategy == NONE


def loaded_on_device_until_first_denoise(config: OptimizationConfig) -> bool:
    """Whether components that load straight onto the GPU (bitsandbytes) stay there through text
    encoding: model offload moves a module only when the next one's hook fires, so until the
    denoiser's first call every one of them is resident (diffusers 0.42 enable_model_cpu_offload)."""
    return config.offload.strategy == MODEL


def host_bytes(
    components: list[Any], config: OptimizationConfig, weights: dict[str, int], k: dict[str, Any]
) -> tuple[int, int]:
    """(weight bytes kept in host RAM, bytes spilled to disk) on a GPU machine once loaded: every
    component's under model and sequential offload, the offloaded part of each group-offloaded one
    (a pinned copy besides with streams), none without offloading."""
    offload = config.offload
    if offload.strategy in (MODEL, SEQUENTIAL):
        return sum(weights.values()), 0
    if offload.strategy != GROUP:
        return 0, 0
    offloaded = sum(  # partial offload keeps some of it on the device, not in RAM
        weights[c.name] - resident_bytes(c, weights[c.name], config, active=False)
        for c in components
        if group_offloaded(config, c.name)
    )
    if offload.offload_to_disk_path:
        return 0, offloaded
    if offload.use_stream and not offload.low_cpu_mem_usage:
        return int(offloaded * k["pinned_copy_factor"]), 0
    return offloaded, 0


# --- transfers -----------------------------------------------------------------------------------


def streaming_seconds(
    component: Any, config: OptimizationConfig, weight: int, calls: int, h2d_bytes_per_s: float, k: dict[str, Any]
) -> float:
    """Seconds `calls` runs of a group- or sequentially-offloaded `component` spend moving its weights
    in (and in the hooks that move them); 0 where it stays put."""
    offload = config.offload
    if not (offload.strategy == SEQUENTIAL or group_offloaded(config, component.name)):
        return 0.0
    bandwidth = h2d_bytes_per_s * k["group_offload_bandwidth_factor"]
    if offload.strategy == SEQUENTIAL:
        bandwidth = h2d_bytes_per_s * k["unpinned_bandwidth_factor"]
    if offload.low_cpu_mem_usage:
        bandwidth *= k["low_cpu_mem_usage_bandwidth_factor"][offload.offload_type]
    moved = weight * calls
    layers = sum(b.count for b in component.blocks) or 1
    if _partly_resident(component, config):  # partial offload: the kept blocks stay
        kept, streamed = block_split(component, config)
        per_parameter = weight / component.parameters if component.parameters else 0.0
        moved = (component.parameters - kept) * per_parameter * calls
        layers = len(streamed)
    seconds = moved / bandwidth + (moved / k["disk_bytes_per_s"] if offload.offload_to_disk_path else 0.0)
    level = SEQUENTIAL if offload.strategy == SEQUENTIAL else offload.offload_type
    units = layers * 8 if level != BLOCK_LEVEL else layers / offload.num_blocks_per_group
    return seconds + units * calls * k["offload_hook_overhead_s"][level]


def overlapped(compute: float, transfer: float, config: OptimizationConfig, k: dict[str, Any]) -> float:
    """Compute and transfers together: group offload's stream hides most, not all, of the shorter one."""
    if config.offload.strategy == GROUP and config.offload.use_stream:
        return max(compute, transfer) + (1 - k["stream_overlap"]) * min(compute, transfer)
    return compute + transfer


def swap_seconds(config: OptimizationConfig, weights: list[int], h2d_bytes_per_s: float) -> float:
    """Model offload's moves: each component's weights come in once per generation."""
    return sum(weights) / h2d_bytes_per_s if config.offload.strategy == MODEL else 0.0


# --- the search space ----------------------------------------------------------------------------


def choice_name(offload: Offload) -> str:
    if offload.strategy != GROUP:
        return offload.strategy
    parts = [GROUP, "leaf" if offload.offload_type == LEAF_LEVEL else f"block{offload.num_blocks_per_group}"]
    flags = (
        ("stream", offload.use_stream),
        ("lowram", offload.low_cpu_mem_usage),
        ("disk", bool(offload.offload_to_disk_path)),
    )
    return "-".join(parts + [name for name, on in flags if on])


def _whole_choices(device: str) -> list[Offload]:
    if device != "cuda":
        return [Offload()]
    return [
        Offload(),
        Offload(strategy=MODEL),
        Offload(strategy=GROUP, use_stream=True, record_stream=True),
        Offload(strategy=GROUP, offload_type=LEAF_LEVEL, use_stream=True, record_stream=True),
        Offload(strategy=GROUP, num_blocks_per_group=2),
        Offload(strategy=GROUP, use_stream=True, low_cpu_mem_usage=True),
        Offload(strategy=GROUP, offload_to_disk_path="advisor-offload"),
        Offload(strategy=SEQUENTIAL),
    ]


def _partial_choices(profile: Any) -> dict[str, Offload]:
    """Partial offload of the denoiser, where there is one denoiser with repeated blocks of one size
    per list, as transformers have (Wan2.2's two experts would each keep their blocks resident, and
    the sizes of a UNet's down and up blocks aren't recorded: neither is offered). The count 1
    stands in until `partial_offset` has the space fit it to the scenario."""
    denoisers = profile.by_role("denoiser")
    if (
        len(denoisers) != 1
        or sum(b.count for b in denoisers[0].blocks) < 2
        or not all(b.uniform for b in denoisers[0].blocks)
    ):
        return {}
    partial = Offload(strategy=GROUP, use_stream=True, record_stream=True, resident_blocks={denoisers[0].name: 1})
    return dict.fromkeys(PARTIAL_OFFSETS, partial)


def partial_offset(choice: str) -> int | None:
    """For a partial-offload choice, how many steps of `PARTIAL_STEP` from the count that fits it keeps;
    None for the others."""
    return PARTIAL_OFFSETS.get(choice)


def fitted_choice(config: OptimizationConfig) -> str | None:
    """The choice a config with fitted resident blocks comes from (partial offload's own count), or None."""
    return PARTIAL if config.offload.resident_blocks else None


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


def guidance_rival(config: OptimizationConfig) -> Offload | None:
    """The strategy the guidance weighs this one against (model offload against group offload, and
    back), for `advisor recommend` to say which the guidance prefers; None for the others."""
    rivals = {MODEL: GROUP, GROUP: MODEL}
    strategy = rivals.get(config.offload.strategy)
    return Offload(strategy=strategy) if strategy else None


# What partial offload is weighed against when it is picked: offloading every block of the denoiser.
WHOLE_RIVALS = (
    ("every block group-offloaded on a stream", Offload(strategy=GROUP, use_stream=True, record_stream=True)),
    ("model offload", Offload(strategy=MODEL)),
)


# --- the steps -----------------------------------------------------------------------------------


def _placement_steps(config: OptimizationConfig, components: Any) -> list[Step]:
    device = config.device
    offload = config.offload
    if offload.strategy == NONE:
        return [method_step("offload", f"move the pipeline to {device}", None, "to", (device,))]
    if offload.strategy in (MODEL, SEQUENTIAL):
        method = "enable_model_cpu_offload" if offload.strategy == MODEL else "enable_sequential_cpu_offload"
        kwargs = {} if device == "cuda" else {"device": device}
        what = f"{offload.strategy} CPU offload: {'whole models' if offload.strategy == MODEL else 'every layer'}"
        return [method_step("offload", f"{what} move to {device} when used", None, method, (), kwargs)]

    kwargs: dict[str, Any] = {"onload_device": device, "offload_device": "cpu", "offload_type": offload.offload_type}
    if offload.offload_type == BLOCK_LEVEL:
        kwargs["num_blocks_per_group"] = offload.num_blocks_per_group
    for flag in ("use_stream", "record_stream", "non_blocking", "low_cpu_mem_usage"):
        if getattr(offload, flag):
            kwargs[flag] = True
    if offload.offload_to_disk_path:
        kwargs["offload_to_disk_path"] = offload.offload_to_disk_path
    partial = offload.resident_blocks or {}
    what = offload.replace(resident_blocks=None).label()  # of the components offloaded whole
    if offload.components is None:
        whole = {**kwargs, "exclude_modules": list(partial)} if partial else kwargs
        others = " but " + ", ".join(partial) if partial else ""
        steps = [method_step("offload", f"{what} of every model{others}", None, "enable_group_offload", (), whole)]
        return steps + [_partial_offload_step(name, count, device, kwargs) for name, count in partial.items()]

    steps = []
    for name in offload.components:
        description = f"{what} of {name}"
        if name in partial:
            steps.append(_partial_offload_step(name, partial[name], device, kwargs))
        elif components.is_diffusers_model(name):
            steps.append(method_step("offload", description, name, "enable_group_offload", (), kwargs))
        else:
            steps.append(
                function_step("offload", description, "diffusers.hooks", "apply_group_offloading", name, kwargs)
            )
    if components.known:
        # by name: a loaded pipe and its model_index.json list them in other orders
        for name in sorted(components.modules()):
            if name not in offload.components:
                steps.append(method_step("offload", f"keep {name} on {device}", name, "to", (device,)))
    else:
        keep = list(offload.components)

        def run(pipe: Any) -> None:
            import torch

            for name, component in pipe.components.items():
                if name not in keep and isinstance(component, torch.nn.Module):
                    component.to(device)

        code = (
            "for name, component in pipe.components.items():\n"
            f"    if name not in {source(keep)} and isinstance(component, torch.nn.Module):\n"
            f"        component.to({source(device)})"
        )
        steps.append(Step("offload", f"keep the other models on {device}", code, run))
    return steps


def _partial_offload_step(name: str, count: int, device: str, kwargs: dict[str, Any]) -> Step:
    """Partial offload of one component: its `count` largest repeated blocks (those of its top-level
    ModuleLists, as diffusers' block-level offloading finds them; ties in model order) go to
    `device`, and diffusers' ``apply_group_offloading`` offloads the rest of the component while its
    block lists hold only the other blocks (the lists are whole again right after: the hooks sit on
    the blocks). Streams work as for plain group offload: diffusers orders the prefetches at the
    first call, over the blocks it offloads. The step runs the very code it shows (`exec`), so a
    script and `advisor.apply_config` cannot differ."""
    component = f"pipe.{name}"
    code = "\n".join(
        [
            f"lists = {{key: child for key, child in {component}.named_children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))}}",
            "blocks = [block for child in lists.values() for block in child]",
            f"resident = set(sorted(blocks, key=lambda block: -sum(p.numel() for p in block.parameters()))[:{count}])",
            "for key, child in lists.items():  # the offloading sees only the other blocks...",
            f"    setattr({component}, key, torch.nn.ModuleList([block for block in child if block not in resident]))",
            call_source("apply_group_offloading", [Expr(component, None)], kwargs),
            "for key, child in lists.items():  # ...then every block is back in its place",
            f"    setattr({component}, key, child)",
            "for block in resident:",
            f"    block.to({source(device)})",
        ]
    )
    imports = ("import torch", "from diffusers.hooks import apply_group_offloading")

    def run(pipe: Any) -> None:
        import torch
        from diffusers.hooks import apply_group_offloading

        exec(code, {"pipe": pipe, "torch": torch, "apply_group_offloading": apply_group_offloading})

    description = (
        f"partial offload of {name}: its {count} largest blocks stay on {device}, diffusers group-offloads the rest"
    )
    return Step("offload", description, code, run, imports)


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
        | {choice_name(o) for o in _whole_choices("cuda")[1:]}  # [0] is no offload: the off choice
    )
    constraints = tuple(CONSTRAINTS)
    filters = (
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

    def choices_for(self, profile: Any, device: str) -> dict[str, Offload]:
        """Choice name -> offload, for `profile` (`advisor.probe.models.ModelProfile`) on `device`:
        no offload first, partial offload's counts still to fit (`partial_offset`)."""
        choices = {choice_name(o): o for o in _whole_choices(device)}
        return choices | _partial_choices(profile) if device == "cuda" else choices

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        """Device placement: ``pipe.to(device)``, model / sequential CPU offload or group offload."""
        return _placement_steps(config, components)


OFFLOAD = Offloading()
