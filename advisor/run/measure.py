"""Measure one candidate for real: load, warm up, time, record peak memory, in its own process.

Every trial runs in a fresh ``python -m advisor.run.measure`` child so compile caches, offload hooks and
allocator fragmentation never leak from one candidate into the next, and an out-of-memory error,
a crash or a hang costs one trial, not the study. The parent reads the child's result file; a
child that dies without one is classified from its exit status and stderr.

Latency is not measured at the full step count: the child times a few short runs (``step_points``,
2 and 4 steps by default), fits ``fixed + per_step x steps`` and reports the extrapolation to the
workload's steps. ``benchmarks/step_extrapolation.py`` shows the error against full runs.

On CUDA one timed generation also records the peak of each phase (text encoding, denoising, VAE
decode; `PhasePeaks`, `watching_phases`), to set against the estimate's per-phase device bytes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from advisor.config import OptimizationConfig
from advisor.plan.estimate import ROLE_OF_PHASE
from advisor.plan.scenario import limited_peak
from advisor.probe.workload import Workload

OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "memory allocation",
    "memoryerror",
    "std::bad_alloc",
)


@dataclass
class Measurement:
    """What one trial measured. Sizes in bytes, times in seconds; ``status`` is ok/oom/crash/timeout."""

    status: str
    reason: str | None = None
    latency_s: float | None = None  # extrapolated to the workload's steps
    fixed_s: float | None = None  # per call, independent of steps (text encoding, VAE decode, ...)
    per_step_s: float | None = None
    load_s: float | None = None
    warmup_s: float | None = None  # the first call: compilation happens here
    peak_vram_bytes: int | None = None  # torch.cuda.max_memory_allocated over the whole trial
    peak_vram_reserved_bytes: int | None = None
    # Phase (text_encoding, denoising, vae_decode) -> max_memory_allocated from its start to the next
    # phase's start in one timed generation (see `PhasePeaks`). None on a CPU: no allocator peak there.
    phase_peak_vram_bytes: dict[str, int] | None = None
    peak_rss_bytes: int | None = None  # the trial process's peak resident set
    baseline_rss_bytes: int | None = None  # its resident set after imports, before loading
    step_times: dict[str, float] = field(default_factory=dict)  # steps -> median seconds
    device: str | None = None
    wall_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def limited_peak(self, device: str) -> int | None:
        """The measured peak the budget limits on `device` (see `advisor.plan.scenario.limited_peak`)."""
        return limited_peak(device, vram_bytes=self.peak_vram_bytes, ram_bytes=self.peak_rss_bytes)


def fit_steps(step_times: dict[int, float]) -> tuple[float, float]:
    """Least-squares ``(fixed, per_step)`` through (steps, seconds) points."""
    xs, ys = list(step_times), list(step_times.values())
    if len(set(xs)) < 2:
        raise ValueError("need at least two step counts to separate fixed and per-step cost")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    if slope <= 0:  # noise swamped the steps: everything is fixed cost
        return mean_y, 0.0
    fixed = mean_y - slope * mean_x
    if fixed < 0:  # a line through the origin instead: all cost is per step
        return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return fixed, slope


def measure(
    model: str | Path,
    config: OptimizationConfig,
    workload: Workload,
    *,
    timeout_s: float = 600.0,
    step_points: tuple[int, ...] = (2, 4),
    repeats: int = 2,
    memory_limit_bytes: int | None = None,
    seed: int = 0,
) -> Measurement:
    """Run one candidate in a fresh process and return what it measured (never raises for OOM/crash).

    `memory_limit_bytes` caps the child's address space (RLIMIT_AS): a way to provoke, and test, a
    real out-of-memory on a CPU machine.
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="advisor-trial-") as scratch:
        result_path = Path(scratch) / "result.json"
        spec = {
            "model": str(model),
            "config": config.model_dump(mode="json"),
            "workload": workload.to_dict(),
            "step_points": list(step_points),
            "repeats": repeats,
            "memory_limit_bytes": memory_limit_bytes,
            "seed": seed,
            "result_path": str(result_path),
        }
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        try:
            child = subprocess.run(
                [sys.executable, "-m", "advisor.run.measure"],
                input=json.dumps(spec),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return Measurement(status="timeout", reason=f"no result within {timeout_s:.0f}s", wall_s=time.perf_counter() - started)
        if result_path.exists():
            measurement = Measurement(**json.loads(result_path.read_text()))
        else:
            measurement = _classify_death(child.returncode, child.stderr)
    measurement.wall_s = time.perf_counter() - started
    return measurement


def _classify_death(returncode: int, stderr: str) -> Measurement:
    tail = " ".join(stderr.strip().splitlines()[-3:])[-300:]
    if returncode in (-9, 137) or any(marker in stderr.lower() for marker in OOM_MARKERS):
        return Measurement(status="oom", reason=f"the trial process died out of memory (exit {returncode}): {tail}")
    return Measurement(status="crash", reason=f"the trial process exited with {returncode}: {tail}")


def is_oom(error: BaseException) -> bool:
    """torch's CUDA/CPU out-of-memory errors and Python's MemoryError, also as the cause of another."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or type(current).__name__ == "OutOfMemoryError":
            return True
        if any(marker in str(current).lower() for marker in OOM_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def describe(error: BaseException) -> str:
    """`Type: message`, with the cause's message when the error itself has none (bare MemoryError)."""
    text = str(error)
    cause = error.__cause__ or error.__context__
    if not text and cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {text[:300]}"


# --- the peak of each phase (CUDA) ------------------------------------------------------------------

# The estimate's phases (`advisor.plan.estimate.PHASES`) by the role (`advisor.probe.layout.role_of`)
# of the components whose calls make them; tests/test_measure.py checks it against the estimate's table.
PHASE_OF_ROLE = {role: phase for phase, role in ROLE_OF_PHASE.items()}  # the estimate's phases


class PhasePeaks:
    """The peak device memory of each phase of one generation, from phase starts and a peak counter.

    In a trial `read_peak` and `reset` are ``torch.cuda.max_memory_allocated`` and
    ``torch.cuda.reset_peak_memory_stats``. They are parameters so that this bookkeeping can be
    tested with a fake counter on a CPU, which has no allocator peak to read.

    A phase starts when an outermost call of one of its components begins (`enter`) while another
    phase runs: the counter is read for the phase that ends, then reset. So the peak of a phase is
    the highest allocation from its start to the next phase's start, everything resident included
    (what the estimate's per-phase device bytes predict); a phase that comes back keeps the highest
    of its intervals. Calls made inside a component's call (until its `exit`) never change the phase.
    What ran before the first phase is nobody's (a trial keeps it in its overall peak); `finish`
    closes the last phase at the end of the generation.
    """

    def __init__(self, read_peak: Callable[[], int], reset: Callable[[], None]) -> None:
        self.read_peak, self.reset = read_peak, reset
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []  # the phases in the order they started
        self.current: str | None = None
        self.depth = 0  # component calls in progress

    def enter(self, phase: str) -> None:
        if self.depth == 0 and phase != self.current:
            self._close()
            self.current = phase
            self.order.append(phase)
        self.depth += 1

    def exit(self) -> None:
        self.depth = max(self.depth - 1, 0)

    def finish(self) -> dict[str, int]:
        """Close the phase running and return phase -> peak bytes."""
        self._close()
        self.current, self.depth = None, 0
        return dict(self.peaks)

    def _close(self) -> None:
        peak = int(self.read_peak())
        if self.current is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
        self.reset()


def _bracket(obj: Any, attr: str, phase: str, phases: PhasePeaks) -> Callable[[], None]:
    """Replace ``obj.attr`` (a callable) by one that marks `phase` around it; returns the undo."""
    own = attr in vars(obj)
    original = getattr(obj, attr)

    @functools.wraps(original)
    def marked(*args: Any, **kwargs: Any) -> Any:
        phases.enter(phase)
        try:
            return original(*args, **kwargs)
        finally:
            phases.exit()

    setattr(obj, attr, marked)
    return (lambda: setattr(obj, attr, original)) if own else (lambda: delattr(obj, attr))


@contextlib.contextmanager
def watching_phases(pipe: Any, phases: PhasePeaks) -> Iterator[dict[str, str]]:
    """Report `pipe`'s phase starts to `phases` while inside; yields component name -> its phase.

    Components are placed by role, as everywhere else (`advisor.run.classes.Components`, roles from
    `advisor.probe.layout.role_of`): text encoders, denoisers (transformer, Wan2.2's transformer_2,
    unet) and the VAE. A forward pre-hook enters the phase and a forward hook (``always_call``)
    leaves it. Two exceptions:

    - a module compiled whole (``module.compile()``) runs its hooks inside the compiled frame, where
      dynamo cannot call the allocator (with fullgraph it fails): its compiled call is wrapped;
    - the VAE's work is ``decode`` (``post_quant_conv``, every tile, the decoder), not ``forward``:
      its bound ``decode`` is wrapped, outside diffusers' ``apply_forward_hook``, so the weights
      model offload brings in count in the phase too.

    Both run before any offload hook (accelerate's and diffusers' replace ``forward``), so moving a
    component's weights in is part of its phase. Everything is removed on leaving.
    """
    from advisor.run.classes import Components

    components = Components.of_pipe(pipe)
    objects = pipe.components
    undo: list[Callable[[], None]] = []
    watched: dict[str, str] = {}
    try:
        for name in components.modules():
            phase = PHASE_OF_ROLE.get(components.layout.role(name))
            module = objects.get(name)
            if phase is None or module is None:
                continue
            if phase == "vae_decode" and callable(getattr(module, "decode", None)):
                undo.append(_bracket(module, "decode", phase, phases))
            elif getattr(module, "_compiled_call_impl", None) is not None:
                undo.append(_bracket(module, "_compiled_call_impl", phase, phases))
            else:
                pre = module.register_forward_pre_hook(lambda _module, _args, phase=phase: phases.enter(phase))
                post = module.register_forward_hook(lambda _module, _args, _output: phases.exit(), always_call=True)
                undo += [pre.remove, post.remove]
            watched[name] = phase
        yield watched
    finally:
        for step in reversed(undo):
            step()


# --- the child ----------------------------------------------------------------------------------


def _call_kwargs(workload: Workload, steps: int, seed: int) -> dict[str, Any]:
    import torch

    return {
        "prompt": "a photo of a cat sitting on a mat",
        **workload.call_kwargs(steps),
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
    }


def _run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("memory_limit_bytes"):
        limit = int(spec["memory_limit_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import diffusers  # noqa: F401 - imported before the baseline reading, as any user process does
    import psutil
    import torch
    import transformers  # noqa: F401

    from advisor.config import config_from_dict
    from advisor.run.apply import load_pipeline

    baseline_rss = psutil.Process().memory_info().rss

    config = config_from_dict(spec["config"], source="trial config")
    workload = Workload(**spec["workload"])
    cuda = config.device.startswith("cuda") and torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    held = {"allocated": 0, "reserved": 0}  # the peaks before each reset, so the trial's peak survives them
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def reset_peaks() -> None:
        held["allocated"] = max(held["allocated"], torch.cuda.max_memory_allocated())
        held["reserved"] = max(held["reserved"], torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    result: dict[str, Any] = {"status": "ok", "device": "cuda" if cuda else "cpu", "baseline_rss_bytes": baseline_rss}

    def timed_call(pipe, steps: int, phases: PhasePeaks | None = None) -> float:
        with watching_phases(pipe, phases) if phases is not None else contextlib.nullcontext():
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                pipe(**_call_kwargs(workload, steps, spec["seed"]))
            sync()
            elapsed = time.perf_counter() - start
        if phases is not None:
            result["phase_peak_vram_bytes"] = phases.finish()
        return elapsed

    start = time.perf_counter()
    pipe = load_pipeline(spec["model"], config)
    result["load_s"] = time.perf_counter() - start
    points = sorted(spec["step_points"])
    result["warmup_s"] = timed_call(pipe, points[0])
    # The first timed generation after the warm-up (compiled by then) records the peak of each phase.
    phases = PhasePeaks(torch.cuda.max_memory_allocated, reset_peaks) if cuda else None
    step_times = {}
    for steps in points:
        times = []
        for _ in range(spec["repeats"]):
            times.append(timed_call(pipe, steps, phases))
            phases = None
        step_times[steps] = statistics.median(times)
    fixed, per_step = fit_steps(step_times)
    result.update(
        step_times={str(k): v for k, v in step_times.items()},
        fixed_s=fixed,
        per_step_s=per_step,
        latency_s=fixed + per_step * workload.steps,
    )
    if cuda:
        result["peak_vram_bytes"] = max(held["allocated"], torch.cuda.max_memory_allocated())
        result["peak_vram_reserved_bytes"] = max(held["reserved"], torch.cuda.max_memory_reserved())
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident set, loading included.

    Linux's VmHWM belongs to this program's own address space; ``ru_maxrss`` would also carry the
    parent's size at fork time across exec, inflating every trial by the tuner's own footprint.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def _child_main() -> int:
    spec = json.loads(sys.stdin.read())
    try:
        result = _run_trial(spec)
    except BaseException as error:  # the trial's failure is the result, whatever it is
        status = "oom" if is_oom(error) else "crash"
        result = {"status": status, "reason": describe(error)}
    result["peak_rss_bytes"] = peak_rss_bytes()
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
