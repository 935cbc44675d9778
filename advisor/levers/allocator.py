"""The allocator lever: PyTorch's caching allocator with ``expandable_segments:True``.

By default the caching allocator takes a new segment (one ``cudaMalloc``) for each request no cached
block holds, and gives memory back only a whole segment at a time: after many differently sized
tensors (a video VAE decoding chunk after chunk of frames), free space stays stranded in segments
that still hold a live block, and the run needs more of the card than it ever allocates. With
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` each stream's segment grows by mapping pages at
its end, freed neighbours merge whatever request they came from, and emptying the cache unmaps free
pages (Note [Expandable Segments] in c10/cuda/CUDACachingAllocator.cpp). The estimate replays each
phase's allocations through a model of both (`advisor.plan.allocator`), so the planner turns it on
where it lowers what must fit (`adjusts`), not as a blanket setting: where nothing is stranded it
changes nothing. Allocating is a little slower at first (pages are mapped as the segment grows); a
step's speed is the same.

It configures the allocator, which reads it when CUDA starts: a script sets it before anything
touches the GPU; `load_pipeline` sets it in the environment and, where CUDA has started already,
through ``torch.cuda.memory._set_allocator_settings`` (new segments follow it). Linux only: builds
without the CUDA driver API it maps pages with (Windows, ROCm) warn and ignore it
(``CUDAAllocatorConfig::expandable_segments()`` in c10/cuda/CUDAAllocatorConfig.h).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from advisor.config import OptimizationConfig
from advisor.levers.base import Adjust, Lever, Pick
from advisor.levers.code import Step
from advisor.platform import Constraint, Platform, constraint, on_cuda
from advisor.units import format_size


SOURCE = "https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf"
CONF = "PYTORCH_CUDA_ALLOC_CONF"  # torch 2.9 also reads PYTORCH_ALLOC_CONF; this name works in every release
OPTION = "expandable_segments:True"
# What it must lower the peak by to be set: below a 2 MiB page it is the model's rounding, not a gain.
WORTHWHILE_BYTES = 64 * 2**20

CONSTRAINTS: list[Constraint] = []


@constraint(
    "expandable-segments-need-linux-cuda",
    "expandable_segments",
    "expandable segments map pages with the CUDA driver API, which PyTorch builds only on Linux; "
    "elsewhere it warns 'expandable_segments not supported on this platform' and ignores the option",
    "https://github.com/pytorch/pytorch/blob/main/c10/cuda/CUDAAllocatorConfig.h (CUDAAllocatorConfig::expandable_segments)",
    into=CONSTRAINTS,
)
def expandable_segments_need_linux_cuda(config: OptimizationConfig, platform: Platform) -> str | None:
    if not config.expandable_segments:
        return None
    if not on_cuda(config, platform):
        return "`expandable_segments: true` configures the CUDA caching allocator; the config runs on no CUDA GPU"
    if platform.os != "linux":
        return (
            f"`expandable_segments: true` is ignored on {platform.os} (PyTorch supports it on Linux only); remove it"
        )
    return None


def expandable_where_memory_is_stranded(
    config: OptimizationConfig, scenario: Any, predict: Callable[[OptimizationConfig], Any]
) -> OptimizationConfig:
    if config.expandable_segments or not config.device.startswith("cuda") or scenario.platform.os != "linux":
        return config
    plain = predict(config)
    peak = next((phase for phase in plain.phases if phase.name == plain.peak_phase), None)
    if peak is None or peak.reserve_bytes < WORTHWHILE_BYTES:
        return config  # it can only lower the peak by what the peak phase strands
    expandable = config.replace(expandable_segments=True)
    gain = plain.peak_vram_bytes - predict(expandable).peak_vram_bytes
    return expandable if gain >= WORTHWHILE_BYTES else config


def set_expandable_segments(_pipe: Any = None) -> None:
    """Turn the option on for this process: in the environment CUDA reads when it starts, and in the
    running allocator when it has started (the whole option string: setting it resets every option
    it leaves out, so the process's own options are kept)."""
    current = os.environ.get(CONF) or os.environ.get("PYTORCH_ALLOC_CONF") or ""
    if "expandable_segments" not in current:
        current = f"{current},{OPTION}" if current else OPTION
    os.environ[CONF] = current
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings(current)


class ExpandableSegments(Lever):
    """``expandable_segments`` (a config flag): the caching allocator's segments grow in pages."""

    name = key = "expandable_segments"
    # Last: its adjust judges a candidate as every other lever left it (VAE tiling may remove what is
    # stranded); its only step is a process step, before loading, whatever the order.
    order = 95
    searched = False  # the adjust rule below decides it
    constraints = tuple(CONSTRAINTS)
    adjusts = (
        Adjust(
            "expandable-segments-where-memory-is-stranded",
            "with expandable segments the caching allocator's segments grow in pages and merge what is freed, "
            "so memory stranded in half-used segments (many differently sized tensors, as a video VAE decodes) "
            "can be reused; set where the replayed allocations need less of the card with it",
            SOURCE,
            expandable_where_memory_is_stranded,
        ),
    )

    def is_on(self, config: OptimizationConfig) -> bool:
        return config.expandable_segments

    def off(self, config: OptimizationConfig) -> OptimizationConfig:
        return config.replace(expandable_segments=False)

    def work_key(self, config: OptimizationConfig) -> Any:
        return config.expandable_segments  # the allocator's replays differ

    def summary_note(self, config: OptimizationConfig) -> str | None:
        return "expandable segments" if config.expandable_segments else None

    def memory_reasons(self, pick: Pick) -> list[str]:
        if not pick.config.expandable_segments:
            return []
        without = pick.peak(pick.predict(self.off(pick.config)))
        return [
            f"{CONF}={OPTION}: the caching allocator grows its segments in pages and merges what is freed; "
            f"without it, memory stranded in half-used segments would take the peak to {format_size(without)}"
        ]

    def process_steps(self, config: OptimizationConfig) -> list[Step]:
        if not config.expandable_segments:
            return []
        return [
            Step(
                self.key,
                "expandable segments for the caching allocator, before CUDA starts",
                f'os.environ.setdefault("{CONF}", "{OPTION}")',
                set_expandable_segments,
                ("import os",),
            )
        ]
