"""Timing that knows its own error: rounds of generations until the latency settles.

A trial (`advisor.run.measure`) times rounds of short runs, one at each step point per round, fits
``fixed + per_step x steps`` through each round and extrapolates to the workload's steps (a workload
of 8 steps or fewer is timed as it is). Rounds go on until the rounds' latencies agree within a
tolerance; a round whose times don't grow with the steps is timed again, never clamped; a latency
that can't settle is marked noisy, with why. Pure Python, no torch: the child passes a callable
that runs one generation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


def fit_steps(step_times: dict[int, float]) -> tuple[float, float]:
    """Least-squares ``(fixed, per_step)`` through (steps, seconds) points.

    Times that do not grow with the steps are refused (ValueError), never clamped: they mean the
    noise was larger than the steps' cost (`time_rounds` discards such rounds and times again).
    A negative fixed cost is noise too: a line through the origin fits then (all cost per step)."""
    xs, ys = list(step_times), list(step_times.values())
    if len(set(xs)) < 2:
        raise ValueError("need at least two step counts to separate fixed and per-step cost")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    if slope <= 0:
        raise ValueError(f"the times {step_times} do not grow with the steps")
    fixed = mean_y - slope * mean_x
    if fixed < 0:
        return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return fixed, slope


# A trial times rounds of generations, one at every step point per round, until the latency it
# extrapolates from each round agrees with the others within TOLERANCE (half the range against the
# median), or MAX_ROUNDS / the time cap is reached: then it is marked noisy, with why.
TOLERANCE = 0.05
MIN_ROUNDS = 3
# Step counts a round times. Extrapolating from a < b steps to N multiplies the timing noise by about
# sqrt((1 - k)^2 + k^2) with k = (N - a) / (b - a): for 28 steps, 17.7x from (2, 4) but 5.5x from
# (2, 8), for 4 more steps a round. A workload of 8 steps or fewer is timed at its own steps.
STEP_POINTS = (2, 8)
MAX_ROUNDS = 12
TIMING_CAP_S = 120.0
TRIAL_TIMEOUT_S = 900.0  # a whole trial (loading, warm-up, timing) before it counts as a timeout
TRIALS = 8  # distinct configurations a study measures (`advisor tune --trials`)
# After the search, each finalist is measured this many more times in fresh processes (`advisor.run.confirm`).
CONFIRM_RUNS = 2
# A lossy candidate's output must be at least this close to the lossless reference (`advisor.run.guard`):
# the tools people use to judge caching and quantization (cache-dit, flux-fast) report PSNR from about 30 dB up.
MIN_PSNR_DB = 30.0
MEASURE_TIMEOUT_S = 600.0  # one `advisor.run.measure.measure` call on its own (a study gives TRIAL_TIMEOUT_S)


@dataclass(frozen=True)
class TrialTiming:
    """How a trial process times its candidate: what `advisor.run.measure.measure` is given, from
    `advisor tune`'s settings (`TuneSettings.timing`) or a benchmark's."""

    timeout_s: float = MEASURE_TIMEOUT_S  # the whole trial: loading, warm-up, timing
    step_points: tuple[int, ...] = STEP_POINTS
    min_rounds: int = MIN_ROUNDS  # timed rounds at least; more until the spread is within `tolerance`
    max_rounds: int = MAX_ROUNDS
    tolerance: float = TOLERANCE
    cap_s: float = TIMING_CAP_S  # timing, after loading and warm-up
    memory_limit_bytes: int | None = None  # RLIMIT_AS of the trial process (tests provoke OOM)
    seed: int = 0


@dataclass
class Timing:
    """What the timed rounds of one trial gave. ``spread_s`` is half the range of the rounds'
    latencies (the extremes left out from 5 rounds on, see `_half_range`): the reported latency is
    ``latency_s ± spread_s`` over ``rounds`` rounds."""

    latency_s: float
    spread_s: float | None  # None from a single round: nothing to compare it with
    fixed_s: float | None  # None when the latency was timed at the full step count
    per_step_s: float | None
    step_times: dict[int, float]  # steps -> median seconds over the kept rounds
    rounds: int  # rounds kept
    discarded: int  # rounds whose times did not grow with the steps (re-measured, never clamped)
    noisy: str | None  # why the latency did not settle; None when it did

    def fields(self) -> dict[str, Any]:
        """Its values under the names a `Measurement` stores them."""
        return {
            "latency_s": self.latency_s,
            "latency_spread_s": self.spread_s,
            "fixed_s": self.fixed_s,
            "per_step_s": self.per_step_s,
            "step_times": {str(k): v for k, v in self.step_times.items()},
            "rounds": self.rounds,
            "discarded_rounds": self.discarded,
            "noisy": self.noisy,
        }


def one_off_s(timed: dict[str, Any]) -> float | None:
    """What a trial's first call took beyond a warm call of its steps (torch.compile's tracing and code
    generation, autotuning, kernels loaded on first use), from a measurement's fields: ``warmup_s``
    at ``warmup_steps``, and the warm calls' ``fixed_s + per_step_s x steps`` or ``step_times``. None
    where they can't tell (a measurement from before ``warmup_steps`` was recorded)."""
    first, steps = timed.get("warmup_s"), timed.get("warmup_steps")
    if first is None or steps is None:
        return None
    if timed.get("fixed_s") is not None and timed.get("per_step_s") is not None:
        warm = timed["fixed_s"] + timed["per_step_s"] * steps
    elif str(steps) in (timed.get("step_times") or {}):
        warm = timed["step_times"][str(steps)]
    else:
        return None
    return max(0.0, first - warm)


def cost_per_generation(latency_s: float, one_off: float | None, generations: int) -> float:
    """Seconds per generation in a process that makes `generations`: the latency and its share of the
    first call's one-off time. What a study minimises and its pick ranks by."""
    return latency_s + (one_off or 0.0) / generations


def round_latency(times: dict[int, float], steps: int) -> float | None:
    """One round's latency extrapolated to `steps`, or None when its times don't grow with the steps
    (noise larger than the steps' cost: such a round says nothing about either)."""
    counts = sorted(times)
    if any(times[more] <= times[fewer] for fewer, more in zip(counts, counts[1:])):
        return None
    fixed, per_step = fit_steps(times)
    return fixed + per_step * steps


def _half_range(values: list[float]) -> float | None:
    """Half the range of `values`; from 5 values on, without the fastest and the slowest, so that one
    burst of load on a shared machine does not make the spread of twelve steady rounds."""
    if len(values) < 2:
        return None
    ordered = sorted(values)[1:-1] if len(values) >= 5 else sorted(values)
    return (ordered[-1] - ordered[0]) / 2


def time_rounds(
    call: Callable[[int], float],
    step_points: tuple[int, ...],
    steps: int,
    *,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    tolerance: float = TOLERANCE,
    cap_s: float = TIMING_CAP_S,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time rounds of ``call(steps) -> seconds`` until the latency settles, and say how well it did.

    A round calls every step point below the workload's `steps` once; its latency is the line
    through them extrapolated to `steps`. The order alternates between rounds, so a machine that
    slows down or speeds up during the trial biases neither end. A round whose times do not grow
    with the steps is discarded and another is timed. Where fewer than two step points lie below
    `steps` (a 4-step workload), or no round ever grows with the steps, each round is one call at
    the full `steps` instead: then the latency is timed, not extrapolated.
    """
    points = sorted({count for count in step_points if count < steps})
    kept: list[dict[int, float]] = []
    latencies: list[float] = []
    discarded = 0
    started = clock()

    def settled() -> bool:
        spread = _half_range(latencies)
        return (
            len(latencies) >= min_rounds and spread is not None and spread <= tolerance * statistics.median(latencies)
        )

    def more(rounds: int) -> bool:
        return not settled() and rounds < max_rounds and clock() - started < cap_s

    while len(points) > 1 and (not (kept or discarded) or more(len(kept) + discarded)):
        order = points if (len(kept) + discarded) % 2 == 0 else points[::-1]
        times = {count: call(count) for count in order}
        latency = round_latency(times, steps)
        if latency is None:
            discarded += 1
        else:
            kept.append(times)
            latencies.append(latency)
    inverted = (
        f"{discarded} of {len(kept) + discarded} rounds timed more steps as faster (re-measured)"
        if discarded
        else None
    )
    if kept:
        step_times = {count: statistics.median(t[count] for t in kept) for count in points}
        fixed, per_step = fit_steps(step_times)
        latency = fixed + per_step * steps
    else:  # timed at the full step count
        if discarded:
            inverted = (
                f"in {discarded} rounds, {'/'.join(map(str, points))} steps never took longer with more steps; "
                f"timed at the full {steps} steps instead"
            )
        while not latencies or more(len(latencies)):
            latencies.append(call(steps))
        step_times, fixed, per_step = {steps: statistics.median(latencies)}, None, None
        latency = step_times[steps]
    spread = _half_range(latencies)
    noisy = None
    if not settled():
        why = f"the spread ±{spread / latency:.0%}" if spread is not None else "a single round"
        timed = f"{len(latencies)} timed rounds" + (f" (and {discarded} discarded)" if discarded else "")
        limit = f"the time cap, {timed}" if clock() - started >= cap_s else timed  # `rounds`, as recorded
        noisy = f"{why} did not settle within ±{tolerance:.0%} after {limit}" + (f"; {inverted}" if inverted else "")
    return Timing(latency, spread, fixed, per_step, step_times, len(latencies), discarded, noisy)
