"""Allocation logs and traced patterns replayed through the caching-allocator model
(`advisor.plan.allocator`): each phase's allocated and reserved peaks, and the least memory a run
completes in, which is what must fit on the card.

Two inputs: a rehearsal's ledger (`advisor.rehearse.virtual.Event`s: every allocation and free of a
run on the virtual card, `replay` and `least_capacity`), and a traced call's pattern at a plan's
size (allocations as bytes, frees as how many allocations back: `allocation_peaks`, which
`advisor.plan.compute` feeds from the catalog's traces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from advisor.plan.allocator import (
    EMPTY_CACHE,
    NO_LIMIT,
    PHASE_START,
    ROUND_LARGE,
    AllocatorSettings,
    CachingAllocator,
    OutOfMemory,
)


class AllocationEvent(Protocol):
    """One line of an allocation log (`advisor.rehearse.virtual.Event`): a block allocated (+bytes)
    or freed (-bytes) in a pool on a stream during a phase; or a `PHASE_START` or `EMPTY_CACHE` mark."""

    block: int
    pool: str
    bytes: int
    phase: str
    stream: int


@dataclass
class Replay:
    """Per phase, the allocator's peaks (as ``max_memory_allocated``/``max_memory_reserved`` after
    ``reset_peak_memory_stats`` at the phase's start); where it ran out of memory, if it did."""

    allocated: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    out_of_memory: str | None = None  # "<phase>: <what torch would say>"


def replay(
    events: Iterable[AllocationEvent],
    *,
    capacity: int = NO_LIMIT,
    settings: AllocatorSettings = AllocatorSettings(),
    pool: str = "cuda:0",
) -> Replay:
    """Replay a log's allocations and frees in `pool` through the allocator model."""
    allocator, live, result = CachingAllocator(capacity, settings), {}, Replay()
    phase = None

    def close() -> None:
        if phase is not None:
            result.allocated[phase] = max(result.allocated.get(phase, 0), allocator.peak_allocated)
            result.reserved[phase] = max(result.reserved.get(phase, 0), allocator.peak_reserved)

    for event in events:
        if event.block == PHASE_START:
            close()
            phase = event.phase
            allocator.reset_peaks()
        elif event.pool != pool:
            continue
        elif event.block == EMPTY_CACHE:
            allocator.empty_cache()
        elif event.bytes > 0:
            try:
                live[event.block] = allocator.malloc(event.bytes, event.stream)
            except OutOfMemory as error:
                result.out_of_memory = f"{event.phase}: {error}"
                phase = event.phase
                break
        elif event.block in live:  # a free (zero-byte allocations never reach the allocator)
            allocator.free(live.pop(event.block))
    close()
    return result


def least_capacity(
    events: list[AllocationEvent], *, settings: AllocatorSettings = AllocatorSettings(), pool: str = "cuda:0"
) -> int:
    """The least memory the allocator must be able to reserve for the log to run without running
    out: what must fit on the card. With room to spare the allocator keeps every freed block cached
    (``max_memory_reserved`` on a large card); near the limit it gives whole cached segments back and
    retries, so a run needs only its allocated peak plus what stays stranded in split segments.
    Found by bisection, to 2 MiB, between the allocated peak (never enough less) and the reserved
    peak without a limit (always enough)."""
    free_run = replay(events, settings=settings, pool=pool)
    return _least(
        lambda capacity: replay(events, capacity=capacity, settings=settings, pool=pool).out_of_memory is not None,
        max(free_run.allocated.values(), default=0),
        max(free_run.reserved.values(), default=0),
    )


def _least(runs_out: Callable[[int], bool], allocated: int, reserved: int, tolerance: int = 1) -> int:
    """The least capacity, in 2 MiB steps, at which `runs_out` is false: the allocated peak, rounded
    up, is tried first (where nothing strands, one run settles it), then a bisection down to
    `tolerance` steps between the allocated peak (never enough less) and the reserved peak with no
    limit (always enough)."""
    low, high = allocated // ROUND_LARGE, -(-reserved // ROUND_LARGE)
    first = -(-allocated // ROUND_LARGE)
    if first < high and not runs_out(first * ROUND_LARGE):
        high = first
    while high - low >= tolerance:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if runs_out(middle * ROUND_LARGE) else (low, middle)
    return high * ROUND_LARGE  # `high` always completes


# --- replaying a traced pattern at a plan's size -------------------------------------------------


@dataclass(frozen=True)
class PatternPeaks:
    """One traced call's allocations replayed alone on a fresh allocator."""

    allocated: int  # max_memory_allocated
    reserved: int  # max_memory_reserved on a card with room: every freed block stays cached
    needs: int  # the least the allocator completes it in (`least_capacity`): what must fit


def nearest_replay(
    replayed: list[dict], variables: dict[str, float], scale: float, settings: AllocatorSettings = AllocatorSettings()
) -> PatternPeaks:
    """Of a call's replays at its traced sizes (`advisor.trace.pattern`'s ``replayed``), the one
    nearest `variables` (by the ratio of each variable), scaled by `scale`: what carries over to the
    plan's size is its overheads over the allocated peak."""

    def distance(point: dict) -> float:
        return sum(abs(math.log(max(variables.get(k, v), 1) / max(v, 1))) for k, v in point["at"].items())

    point = min(replayed, key=distance)
    peaks = point["expandable_segments"] if settings.expandable_segments else point
    return PatternPeaks(*(int(peaks[k] * scale) for k in ("allocated", "reserved", "needs")))


def allocation_peaks(ops: list[int], settings: AllocatorSettings = AllocatorSettings()) -> PatternPeaks:
    """Allocated and reserved peaks of allocations (bytes > 0; 0 allocates nothing) and frees (-k:
    the allocation k allocations back) on a fresh allocator, and the least capacity it completes
    them in, bisected to 2 MiB or 1/256 of the allocated peak, whichever is more (planning needs no
    finer; the allocated peak, rounded up, is tried first: where nothing is stranded, one replay
    settles it)."""
    allocated, reserved, _ = _run(ops, NO_LIMIT, settings)
    tolerance = max(1, allocated // ROUND_LARGE // 256)
    needs = _least(lambda capacity: _run(ops, capacity, settings)[2], allocated, reserved, tolerance)
    return PatternPeaks(allocated, reserved, needs)


def _run(ops: list[int], capacity: int, settings: AllocatorSettings) -> tuple[int, int, bool]:
    """(allocated peak, reserved peak, ran out) of allocations (bytes > 0; 0 allocates nothing) and
    frees (-k: the allocation k allocations back)."""
    allocator = CachingAllocator(capacity, settings)
    handles: list = []  # the allocator's blocks, None for an allocation of nothing
    try:
        for op in ops:
            if op >= 0:
                handles.append(allocator.malloc(op) if op else None)
            elif (block := handles[op]) is not None:
                allocator.free(block)
    except OutOfMemory:
        return allocator.peak_allocated, allocator.peak_reserved, True
    return allocator.peak_allocated, allocator.peak_reserved, False
