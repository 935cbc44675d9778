"""Measure one candidate for real: load, warm up, time, record peak memory, in its own process.

Every trial runs in a fresh ``python -m advisor.run.measure`` child so compile caches, offload hooks and
allocator fragmentation never leak from one candidate into the next, and an out-of-memory error,
a crash or a hang costs one trial, not the study. The parent reads the child's result file; a
child that dies without one is classified from its exit status and stderr.

Latency is timed in rounds of short runs (2 and 8 steps by default) extrapolated to the workload's
steps, until the rounds agree within a tolerance, with the spread reported (`advisor.run.timing`);
``benchmarks/step_extrapolation.py`` shows the error against full runs, ``benchmarks/tune_noise.py``
the spread across studies against the spread each trial reports. On CUDA one timed generation
also records the peak of each phase (`advisor.run.phases`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from advisor.config import OptimizationConfig
from advisor.errors import OOM_MARKERS, is_oom
from advisor.files import pid_alive
from advisor.plan.scenario import limited_peak
from advisor.probe.workload import Workload
from advisor.run.phases import PhasePeaks, watching_phases
from advisor.run.stopping import interrupts, raise_if_lost
from advisor.run.timing import TrialTiming, time_rounds
from advisor.run.trials import Status


@dataclass
class Measurement:
    """What one trial measured. Sizes in bytes, times in seconds."""

    status: Status  # ok, oom, crash or timeout
    reason: str | None = None
    latency_s: float | None = None  # extrapolated to the workload's steps
    fixed_s: float | None = None  # per call, independent of steps (text encoding, VAE decode, ...)
    per_step_s: float | None = None
    load_s: float | None = None
    warmup_s: float | None = None  # the first call: compilation happens here
    warmup_steps: int | None = None  # its steps: the first step count the timing calls
    peak_vram_bytes: int | None = None  # torch.cuda.max_memory_allocated over the whole trial
    peak_vram_reserved_bytes: int | None = None
    # Phase (text_encoding, denoising, vae_decode) -> max_memory_allocated from its start to the next
    # phase's start in one timed generation (see `PhasePeaks`). None on a CPU: no allocator peak there.
    phase_peak_vram_bytes: dict[str, int] | None = None
    peak_rss_bytes: int | None = None  # the trial process's peak resident set
    baseline_rss_bytes: int | None = None  # its resident set after imports, before loading
    step_times: dict[str, float] = field(default_factory=dict)  # steps -> median seconds
    latency_spread_s: float | None = None  # half the range of the timed rounds' latencies (see `Timing`)
    rounds: int | None = None  # timed rounds kept
    discarded_rounds: int = 0  # rounds whose times did not grow with the steps, timed again
    noisy: str | None = None  # why the latency did not settle within the tolerance; None when it did
    # A lossy trial's output against the study's lossless reference (`advisor.run.quality.compare`).
    quality: dict[str, Any] | None = None
    # With compile: what dynamo did over the whole trial (frames compiled, recompiles included; unique
    # graphs; graph breaks), where offload hooks and caches make it recompile.
    dynamo: dict[str, int] | None = None
    device: str | None = None
    wall_s: float | None = None

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # read back from JSON, it is the string

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def spread_ratio(self) -> float | None:
        """The spread against the latency (0.03 is ±3%)."""
        if self.latency_spread_s is None or not self.latency_s:
            return None
        return self.latency_spread_s / self.latency_s

    def limited_peak(self, device: str) -> int | None:
        """The measured peak the budget limits on `device` (see `advisor.plan.scenario.limited_peak`)."""
        return limited_peak(device, vram_bytes=self.peak_vram_bytes, ram_bytes=self.peak_rss_bytes)


def timed_step_points(config: OptimizationConfig, workload: Workload, step_points: tuple[int, ...]) -> tuple[int, ...]:
    """The step counts a trial times: `step_points` extrapolated to the workload's steps, except
    with a step cache, whose skips depend on the step index and on how much the output changes
    from step to step: a short run neither skips nor costs per step what the full run does, so the
    whole run is timed (`advisor.run.timing.time_rounds` times a single point at the full steps)."""
    return (workload.steps,) if config.cache is not None else step_points


@dataclass(frozen=True)
class TrialSpec:
    """What a trial process runs, and how: written as JSON for the child, read back by it."""

    model: str
    config: dict[str, Any]  # `OptimizationConfig.to_dict(exclude_none=False)`
    workload: dict[str, Any]  # `Workload.to_dict()`
    timing: TrialTiming  # its step points are the ones timed (`timed_step_points`)
    result_path: str  # where the child writes its `Measurement`
    output_path: str | None = None  # where the child saves its output for the quality guard

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialSpec:
        data = json.loads(text)
        timing = data.pop("timing")
        return cls(**data, timing=TrialTiming(**{**timing, "step_points": tuple(timing["step_points"])}))


def measure(
    model: str | Path,
    config: OptimizationConfig,
    workload: Workload,
    timing: TrialTiming | None = None,
    *,
    on_phase: Callable[[str], None] | None = None,
    output_path: str | Path | None = None,
    **changes: Any,
) -> Measurement:
    """Run one candidate in a fresh process and return what it measured (never raises for OOM/crash).

    It is timed as `timing` says (`TrialTiming`'s defaults, with any of its fields given as keyword
    `changes`): in at least ``min_rounds`` rounds, more (up to ``max_rounds`` or ``cap_s``) until
    it settles within ``tolerance`` (see `time_rounds`). ``memory_limit_bytes`` caps the child's
    address space (RLIMIT_AS): a way to provoke, and test, a real out-of-memory on a CPU machine.
    `on_phase` is called (from another thread) with what the child is doing as it starts doing it:
    "starting", "loading", "warm-up" (", compiling" with compile), "timing, call N (S steps)". With `output_path`, the child then generates once
    more at the workload's steps with the fixed seed and saves the output there (NumPy ``.npy``,
    values in [0, 1]): what the quality guard compares (`advisor.run.quality`).

    The child runs in its own process group, killed as a whole on a timeout or when this call is
    interrupted (Ctrl-C, SIGTERM), and on Linux it dies with this process even on SIGKILL
    (``PR_SET_PDEATHSIG``): a trial never outlives its tuner. Its scratch folder is named after this
    process, so that `remove_orphaned_scratch` can clean what a killed tuner left.
    """
    timing = replace(timing or TrialTiming(), **changes)
    timeout_s = timing.timeout_s
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    try:
        result_path = scratch / "result.json"
        spec = TrialSpec(
            model=str(model),
            config=config.to_dict(exclude_none=False),
            workload=workload.to_dict(),
            timing=replace(timing, step_points=tuple(timed_step_points(config, workload, timing.step_points))),
            result_path=str(result_path),
            output_path=str(output_path) if output_path else None,
        )
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        (scratch / "spec.json").write_text(spec.to_json())
        with open(scratch / "stderr.txt", "w+") as stderr:  # a file: a chatty child never blocks on a full pipe
            before = interrupts()
            child = subprocess.Popen(
                [sys.executable, "-m", "advisor.run.measure", str(scratch / "spec.json")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
            reader = threading.Thread(target=_read_phases, args=(child.stdout, on_phase), daemon=True)
            reader.start()
            try:
                raise_if_lost(before)  # a Ctrl-C while the child started
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(child)
                return Measurement(
                    status=Status.TIMEOUT,
                    reason=f"no result within {timeout_s:.0f}s",
                    wall_s=time.perf_counter() - started,
                )
            except BaseException:  # interrupted: the trial goes with this call
                kill_group(child)
                raise
            finally:
                reader.join(timeout=5)
            if result_path.exists():
                measurement = Measurement(**json.loads(result_path.read_text()))
            else:
                stderr.seek(0)
                measurement = _classify_death(child.returncode, stderr.read())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    measurement.wall_s = time.perf_counter() - started
    return measurement


PHASE_MARK = "advisor-phase: "  # a line of the child's stdout that says what it is doing now


def _report_phase(phase: str) -> None:
    print(f"{PHASE_MARK}{phase}", flush=True)


def _read_phases(stream, on_phase: Callable[[str], None] | None) -> None:
    """Pass the child's phase lines to `on_phase` until its stdout closes (other output is dropped)."""
    for line in stream:
        if on_phase is not None and line.startswith(PHASE_MARK):
            with contextlib.suppress(Exception):  # a broken progress display must not lose the trial
                on_phase(line[len(PHASE_MARK) :].strip())


# --- trials never outlive their tuner ---------------------------------------------------------------

SCRATCH_PREFIX = "advisor-trial-"  # + the tuner's pid + "-": the scratch folder of each trial


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies, however it dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``); None elsewhere, where the process group is what's left."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def kill_group(child: subprocess.Popen) -> None:
    """SIGKILL the child's process group (its compile workers too) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        child.wait(timeout=10)


def remove_orphaned_scratch(folder: str | Path | None = None) -> list[Path]:
    """Remove the trial scratch folders of tuners that are no longer running (killed with -9);
    returns what was removed."""
    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        owner = path.name.removeprefix(SCRATCH_PREFIX).split("-")[0]
        if path.is_dir() and owner.isdigit() and not pid_alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _classify_death(returncode: int, stderr: str) -> Measurement:
    tail = " ".join(stderr.strip().splitlines()[-3:])[-300:]
    if returncode in (-9, 137) or any(marker in stderr.lower() for marker in OOM_MARKERS):
        return Measurement(
            status=Status.OOM, reason=f"the trial process died out of memory (exit {returncode}): {tail}"
        )
    return Measurement(status=Status.CRASH, reason=f"the trial process exited with {returncode}: {tail}")


def describe(error: BaseException) -> str:
    """`Type: message`, with the cause's message when the error itself has none (bare MemoryError)."""
    text = str(error)
    cause = error.__cause__ or error.__context__
    if not text and cause is not None:
        text = f"{type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {text[:300]}"


# --- the child ----------------------------------------------------------------------------------


def _call_kwargs(workload: Workload, steps: int, seed: int) -> dict[str, Any]:
    import torch

    return {
        "prompt": "a photo of a cat sitting on a mat",
        **workload.call_kwargs(steps),
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
    }


def _run_trial(spec: TrialSpec) -> dict[str, Any]:
    child_started = time.perf_counter()
    _report_phase("starting")
    timing = spec.timing
    if timing.memory_limit_bytes:
        limit = int(timing.memory_limit_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import diffusers  # noqa: F401 - imported before the baseline reading, as any user process does
    import psutil
    import torch
    import transformers  # noqa: F401

    from advisor.config import config_from_dict
    from advisor.run.apply import load_pipeline

    baseline_rss = psutil.Process().memory_info().rss

    config = config_from_dict(spec.config, source="trial config")
    workload = Workload(**spec.workload)
    cuda = config.device.startswith("cuda") and torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    held = {"allocated": 0, "reserved": 0}  # the peaks before each reset, so the trial's peak survives them
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def reset_peaks() -> None:
        held["allocated"] = max(held["allocated"], torch.cuda.max_memory_allocated())
        held["reserved"] = max(held["reserved"], torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    result: dict[str, Any] = {
        "status": Status.OK,
        "device": "cuda" if cuda else "cpu",
        "baseline_rss_bytes": baseline_rss,
    }

    def timed_call(pipe, steps: int, phases: PhasePeaks | None = None) -> float:
        with watching_phases(pipe, phases) if phases is not None else contextlib.nullcontext():
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                pipe(**_call_kwargs(workload, steps, timing.seed))
            sync()
            elapsed = time.perf_counter() - start
        if phases is not None:
            result["phase_peak_vram_bytes"] = phases.finish()
        return elapsed

    _report_phase("loading")
    start = time.perf_counter()
    pipe = load_pipeline(spec.model, config)
    result["load_s"] = time.perf_counter() - start
    points = sorted(timing.step_points)
    _report_phase("warm-up, compiling" if config.compile is not None else "warm-up")
    # At the first step count the timing calls (`time_rounds`), so that a warm call of it is timed too.
    below = [count for count in points if count < workload.steps]
    result["warmup_steps"] = below[0] if len(below) > 1 else workload.steps
    result["warmup_s"] = timed_call(pipe, result["warmup_steps"])
    # The first timed generation after the warm-up (compiled by then) records the peak of each phase.
    phases = [PhasePeaks(torch.cuda.max_memory_allocated, reset_peaks)] if cuda else []

    calls = {"done": 0}

    def call(steps: int) -> float:
        calls["done"] += 1
        _report_phase(f"timing, call {calls['done']} ({steps} steps)")
        return timed_call(pipe, steps, phases.pop() if phases else None)

    # Time until the cap, or until 80% of the trial's timeout has gone (loading and warm-up included).
    cap_s = max(0.0, min(timing.cap_s, 0.8 * timing.timeout_s - (time.perf_counter() - child_started)))
    result.update(
        time_rounds(
            call,
            tuple(points),
            workload.steps,
            min_rounds=timing.min_rounds,
            max_rounds=timing.max_rounds,
            tolerance=timing.tolerance,
            cap_s=cap_s,
        ).fields()
    )
    if cuda:
        result["peak_vram_bytes"] = max(held["allocated"], torch.cuda.max_memory_allocated())
        result["peak_vram_reserved_bytes"] = max(held["reserved"], torch.cuda.max_memory_reserved())
    if config.compile is not None:
        from torch._dynamo.utils import counters

        result["dynamo"] = {
            "frames_compiled": int(counters["frames"].get("ok", 0)),
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }
    if spec.output_path:  # after the peaks: the quality check's generation is not a timed one
        import numpy as np

        _report_phase(f"output for the quality check ({workload.steps} steps)")
        with torch.inference_mode():
            out = pipe(**_call_kwargs(workload, workload.steps, timing.seed))
        partial = f"{spec.output_path}.{os.getpid()}.part"  # renamed when whole: two workers may write one reference
        with open(partial, "wb") as file:
            np.save(file, np.asarray(out.images if hasattr(out, "images") else out.frames, dtype=np.float32))
        os.replace(partial, spec.output_path)
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
    spec = TrialSpec.from_json(Path(sys.argv[1]).read_text())
    try:
        result = _run_trial(spec)
    except BaseException as error:  # the trial's failure is the result, whatever it is
        status = Status.OOM if is_oom(error) else Status.CRASH
        result = {"status": status, "reason": describe(error)}
    result["peak_rss_bytes"] = peak_rss_bytes()
    Path(spec.result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
