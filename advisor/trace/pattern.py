"""A traced call's allocation pattern, compact and at any size: what the caching-allocator model
(`advisor.plan.replay`) replays when planning, with no torch.

The counter (`advisor.trace.counter`) logs every storage a call creates and frees, in order, and
marks where each repeated block starts. Here the logs of one call traced at several sizes become
one record:

- the structure (which allocation each free gives back) must be the same at every size: the same
  ops ran, only sizes differ. Each allocation's bytes are then a curve over the trace's basis,
  exact at the fit points.
- consecutive repeated blocks whose events are identical put the allocator through the same states
  from the second on (two states by turns, so two of each even run are kept and three of an odd
  one); checked by replaying both at the largest traced size (the same allocated and reserved
  peaks and the same least capacity), else the pattern is kept whole.

The record (`allocation_record`): ``{"basis": [...], "sizes": [[coefficients], ...], "events":
"0 1 -2 ..."}``: an event ``n >= 0`` allocates ``sizes[n]`` evaluated at the plan's size; ``-k``
frees the allocation made ``k`` allocations before it (one string: a catalog file stays readable). Where the structure changes with size (a video VAE
decodes a chunk of frames per decoder call, a tiled decode a tile per call, so a larger size makes
more calls) or the pattern stays longer than `MAX_EVENTS`, the peaks replayed at each traced size
instead: ``{"replayed": [{"at": {...}, "allocated", "reserved", "needs", "expandable_segments": {...}},
...]}`` (the same three with ``expandable_segments:True``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from advisor.plan.allocator import AllocatorSettings
from advisor.plan.compute import evaluate, pattern_ops
from advisor.plan.replay import PatternPeaks, allocation_peaks
from advisor.trace.counter import MARK


Log = list[tuple[int, int]]  # a counter's events: (+bytes, storage), (-bytes, storage), MARK
# The longest pattern kept for planning: its replay (and the bisection for what it needs) costs
# about a millisecond per thousand events, once per plan size.
MAX_EVENTS = 3000


def _structure(log: Log) -> tuple[list[tuple[str, int]], list[int]]:
    """(events with absolute allocation ids: ("a", id), ("f", id), ("m", 0); each allocation's bytes)."""
    ids: dict[int, int] = {}
    events, sizes = [], []
    for nbytes, storage in log:
        if (nbytes, storage) == MARK:
            events.append(("m", 0))
        elif nbytes > 0:
            ids[storage] = len(sizes)
            events.append(("a", len(sizes)))
            sizes.append(nbytes)
        elif storage in ids:
            events.append(("f", ids.pop(storage)))
    return events, sizes


def allocation_record(logs: list[Log], points: list[dict[str, float]], basis: list[str]) -> dict[str, Any]:
    """The record of a call traced at `points` (each the basis' variables), one log each."""
    import numpy as np

    structures = [_structure(log) for log in logs]
    if len(logs) >= len(basis) and len({tuple(events) for events, _ in structures}) == 1:
        design = np.array([[evaluate([t], [1.0], p) for t in basis] for p in points], dtype=np.float64)
        scale = np.abs(design).max(axis=0)
        values = np.array([sizes for _, sizes in structures], dtype=np.float64)  # points x allocations
        solution, *_ = np.linalg.lstsq(design / scale, values, rcond=None)
        curves = [[_round(c) for c in column] for column in (solution / scale[:, None]).T]
        pattern = _compact(structures[-1][0], curves, basis, points[-1])
        if len(pattern["events"]) <= MAX_EVENTS:
            return {**pattern, "events": " ".join(map(str, pattern["events"]))}
    return replayed_record(logs, points)


def replayed_record(logs: list[Log], points: list[dict[str, float]]) -> dict[str, Any]:
    """The replays of a call at each traced size, for both allocator settings: what a plan takes
    where the pattern can't be replayed at its size, or needn't be (a text encoder runs at one size,
    its sequence length, so its replay is stored, not replayed at every plan)."""
    replayed = []
    for log, point in zip(logs, points):
        ops = _ops(*_structure(log))
        expandable = allocation_peaks(ops, AllocatorSettings(expandable_segments=True))
        replayed.append({"at": point, **asdict(allocation_peaks(ops)), "expandable_segments": asdict(expandable)})
    return {"replayed": replayed}


def _ops(events: list[tuple[str, int]], sizes: list[int]) -> list[int]:
    """A log at its own sizes, as `allocation_peaks` takes it."""
    return pattern_ops(_encode(events, [[float(s)] for s in sizes], ["1"]), {})


def _round(coefficient: float) -> float:
    return float(f"{coefficient:.9g}")


def _compact(
    events: list[tuple[str, int]], curves: list[list[float]], basis: list[str], at: dict[str, float]
) -> dict[str, Any]:
    """Runs of identical repeated blocks cut to two (checked by replay at `at`), then encoded."""
    kept = _cut_runs(events, curves)
    full, compact = _encode(events, curves, basis), _encode(kept, curves, basis)
    if compact["events"] != full["events"] and _peaks_at(full, at) != _peaks_at(compact, at):
        return full
    return compact


def _peaks_at(encoded: dict[str, Any], at: dict[str, float]) -> PatternPeaks:
    return allocation_peaks(pattern_ops(encoded, at))


def _segments(events: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    segments: list[list[tuple[str, int]]] = [[]]
    for event in events:
        if event[0] == "m":
            segments.append([])
        else:
            segments[-1].append(event)
    return segments


def _signature(segment: list[tuple[str, int]], curves: list[list[float]]) -> tuple:
    """A segment as its curves and relative frees: equal for blocks that run the same ops."""
    first = min((i for kind, i in segment if kind == "a"), default=0)
    return tuple((kind, tuple(curves[i]) if kind == "a" else i - first) for kind, i in segment)


def _cut_runs(events: list[tuple[str, int]], curves: list[list[float]]) -> list[tuple[str, int]]:
    """Each run of identical blocks cut to two, or three for an odd run: blocks that pass their
    output to the next leave the allocator in one of two states by turns (a ping-pong of the
    hidden states' blocks), so what it strands depends on the run's parity."""
    segments = _segments(events)
    signatures = [_signature(s, curves) for s in segments]
    keep = [True] * len(segments)
    rename: dict[int, int] = {}  # an allocation of a run's last block -> its twin in the last kept block
    start = 0
    while start < len(segments):
        end = start
        while end + 1 < len(segments) and signatures[end + 1] == signatures[start] and segments[start]:
            end += 1
        count = end - start + 1
        kept = 2 + count % 2
        if count > kept:
            twin = [i for kind, i in segments[start + kept - 1] if kind == "a"]
            last = [i for kind, i in segments[end] if kind == "a"]
            rename.update(zip(last, twin))
            keep[start + kept : end + 1] = [False] * (count - kept)
        start = end + 1
    dropped = {i for segment, kept in zip(segments, keep) if not kept for kind, i in segment if kind == "a"}
    out: list[tuple[str, int]] = []
    alive: set[int] = set()
    for segment in (s for s, kept in zip(segments, keep) if kept):
        for kind, i in segment:
            if kind == "a":
                alive.add(i)
                out.append((kind, i))
            else:
                target = rename.get(i, i)
                if target in alive and (i not in dropped or i in rename):
                    alive.discard(target)
                    out.append((kind, target))
    return out


def _encode(events: list[tuple[str, int]], curves: list[list[float]], basis: list[str]) -> dict[str, Any]:
    """Distinct curves, allocations as their index, frees as how many allocations back."""
    distinct: dict[tuple[float, ...], int] = {}
    order: dict[int, int] = {}  # allocation id -> its position among the kept allocations
    encoded = []
    for kind, i in events:
        if kind == "a":
            order[i] = len(order)
            encoded.append(distinct.setdefault(tuple(curves[i]), len(distinct)))
        elif kind == "f" and i in order:
            encoded.append(-(len(order) - order[i]))
    return {"basis": basis, "sizes": [list(c) for c in distinct], "events": encoded}
