"""advisor.run.measure: one candidate measured for real in its own process, and every way a trial can end.

A real measurement of the tiny Flux pipeline on CPU; the step fit; the peak of each phase (its
bookkeeping and the hooks on a real pipeline with a fake peak counter on CPU, the real counter on
CUDA); and out-of-memory, crash and timeout as results (a `Measurement` with a status and a reason),
never as exceptions. The out-of-memory is real: the trial process runs under an address-space limit
(RLIMIT_AS) that lets torch and diffusers import but not a 270 MB pipeline load.
"""

from __future__ import annotations

import time

import pytest

from advisor.config import Compile, OptimizationConfig
from advisor.probe.workload import Workload
from advisor.run.measure import Measurement, is_oom, measure
from advisor.run.phases import PhasePeaks, watching_phases
from advisor.run.timing import fit_steps, one_off_s, time_rounds


WORKLOAD = Workload(kind="image", height=32, width=32, steps=4)

# --- a real measurement -----------------------------------------------------------------------------


@pytest.mark.slow
def test_measures_the_tiny_flux_pipeline_for_real(tiny_flux_dir):
    # Steps 2 and 8, extrapolated to 12: a step costs a few ms here, so a wide gap keeps the slope
    # clear of the noise of a shared 2-core machine.
    workload = Workload(kind="image", height=32, width=32, steps=12)
    # A 20 s timing cap: on a loaded CI runner 12 rounds would take a minute; noisy is an allowed answer.
    m = measure(
        tiny_flux_dir,
        OptimizationConfig(device="cpu"),
        workload,
        timeout_s=300,
        step_points=(2, 8),
        min_rounds=3,
        cap_s=20,
    )
    assert m.status == "ok", m.reason
    assert m.reason is None
    assert m.device == "cpu"
    assert 3 <= m.rounds <= 12 and m.discarded_rounds <= 12
    if m.per_step_s is not None:  # extrapolated to 12 steps from rounds whose times grew with the steps
        assert set(m.step_times) == {"2", "8"}
        assert m.per_step_s > 0 and m.fixed_s >= 0
        assert m.latency_s == pytest.approx(m.fixed_s + m.per_step_s * workload.steps)
    else:  # no round could separate the steps (a loaded machine): timed at the full 12 steps
        assert set(m.step_times) == {"12"} and m.discarded_rounds > 0
    assert all(t > 0 for t in m.step_times.values())
    assert m.latency_s > 0
    # Either it settled within the ±5% tolerance, or it says it is noisy.
    assert m.latency_spread_s is not None
    assert (m.noisy is None and m.spread_ratio <= 0.05) or m.noisy
    assert m.load_s > 0 and m.warmup_s > 0
    assert m.warmup_steps == 2  # the first step count the rounds time, so a warm call of it is known
    if m.per_step_s is not None:
        assert one_off_s(m.to_dict()) >= 0
    # The whole trial process (torch, diffusers, the pipeline): far more than 100 MB on any machine.
    assert m.peak_rss_bytes > 100 * 2**20
    assert m.peak_vram_bytes is None  # CPU: no CUDA numbers
    assert m.phase_peak_vram_bytes is None  # no allocator peak on a CPU
    assert m.wall_s >= m.load_s
    # A result round-trips through the dict the study stores.
    assert Measurement(**m.to_dict()) == m


@pytest.mark.cuda
def test_a_cuda_measurement_records_the_peak_of_each_phase(tiny_flux_dir):
    m = measure(tiny_flux_dir, OptimizationConfig(device="cuda"), WORKLOAD, timeout_s=300)
    assert m.status == "ok", m.reason
    phases = m.phase_peak_vram_bytes
    assert set(phases) == {"text_encoding", "denoising", "vae_decode"}, phases
    assert all(peak > 0 for peak in phases.values()), phases
    # The overall peak is the running maximum across the resets, so it is never below a phase's. It
    # is the highest phase's: loading holds less than a generation, and the warm-up and the other
    # timed calls repeat the same allocations (up to the caching allocator reusing a block somewhat
    # larger than asked for, hence the tolerance).
    assert m.peak_vram_bytes >= max(phases.values())
    assert max(phases.values()) == pytest.approx(m.peak_vram_bytes, rel=0.05, abs=2 * 2**20)
    assert Measurement(**m.to_dict()) == m


# --- the peak of each phase -------------------------------------------------------------------------


class FakeAllocator:
    """A stand-in for the CUDA caching allocator's counters (allocated bytes and their peak since the
    last reset). `PhasePeaks` takes the read/reset pair as callables so that its bookkeeping can be
    tested here: the real counter exists on CUDA only (the CUDA test above uses it)."""

    def __init__(self) -> None:
        self.allocated = self.peak = 0
        self.reads = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n: int) -> None:
        self.allocated -= n

    def read_peak(self) -> int:
        self.reads += 1
        return self.peak

    def reset(self) -> None:
        self.peak = self.allocated  # what torch.cuda.reset_peak_memory_stats does


def test_phase_peaks_attribute_each_interval_to_the_phase_that_started_it():
    a = FakeAllocator()
    phases = PhasePeaks(a.read_peak, a.reset)
    a.alloc(100)  # the weights, loaded before the generation: nobody's phase
    a.alloc(1000)
    a.free(1000)
    phases.enter("text_encoding")
    a.alloc(50)
    a.free(50)
    phases.exit()
    a.alloc(7)  # between the text encoders and the denoiser (latents): still text encoding's interval
    phases.enter("denoising")
    a.alloc(300)
    a.free(300)
    phases.exit()
    phases.enter("denoising")  # the next step, or Wan2.2's other expert: the same phase goes on
    a.alloc(400)
    a.free(400)
    phases.exit()
    phases.enter("vae_decode")
    a.alloc(200)
    a.free(200)
    phases.exit()
    a.alloc(20)  # after the decode (post-processing): the last phase runs to the end of the generation
    a.free(20)
    assert phases.finish() == {"text_encoding": 150, "denoising": 507, "vae_decode": 307}
    assert phases.order == ["text_encoding", "denoising", "vae_decode"]
    assert a.reads == 4  # one reading per phase change and one at the end, not one per call
    assert a.peak == a.allocated  # reset at the end too


def test_a_phase_that_comes_back_keeps_its_highest_interval_and_nested_calls_never_switch():
    a = FakeAllocator()
    phases = PhasePeaks(a.read_peak, a.reset)
    phases.enter("text_encoding")
    a.alloc(10)
    phases.enter("denoising")  # called inside a text encoder's call: not a phase change
    a.alloc(30)
    a.free(30)
    phases.exit()
    phases.exit()
    phases.enter("denoising")
    a.alloc(5)
    a.free(5)
    phases.exit()
    phases.enter("text_encoding")  # a second prompt encoding after the denoiser started
    a.alloc(20)
    a.free(20)
    phases.exit()
    # text encoding: its first interval (40, the nested call's 30 included) beats its second (30)
    assert phases.finish() == {"text_encoding": 40, "denoising": 15}
    assert phases.order == ["text_encoding", "denoising", "text_encoding"]


def test_a_phase_reads_nothing_before_the_first_phase():
    a = FakeAllocator()
    phases = PhasePeaks(a.read_peak, a.reset)
    assert phases.finish() == {}
    a.alloc(10)
    phases.enter("denoising")
    phases.exit()
    assert phases.finish() == {"denoising": 10}


def _load(folder, config):
    from advisor.run.apply import load_pipeline

    return load_pipeline(folder, config)


def _watched_run(pipe, kind):
    """Run `pipe` once in this process while watching its phases with a counter that says which
    reading it is (the interval's number)."""
    from advisor.testing import tiny_call_kwargs

    readings = iter(range(1, 100))
    phases = PhasePeaks(lambda: next(readings), lambda: None)
    with watching_phases(pipe, phases) as watched:
        pipe(**tiny_call_kwargs(kind, seed=0))
    return watched, phases, phases.finish()


def _hooks_gone(pipe):
    for module in pipe.components.values():
        if hasattr(module, "_forward_pre_hooks"):
            assert not module._forward_pre_hooks and not module._forward_hooks
            assert "decode" not in vars(module)


@pytest.mark.usefixtures("dynamo_isolated")
def test_the_phases_of_a_real_pipeline_come_from_its_components_roles(tiny_flux_dir):
    pipe = _load(tiny_flux_dir, OptimizationConfig(device="cpu", dtype="float32"))
    watched, phases, peaks = _watched_run(pipe, "image")
    assert watched == {
        "text_encoder": "text_encoding",
        "text_encoder_2": "text_encoding",
        "transformer": "denoising",
        "vae": "vae_decode",
    }
    assert phases.order == ["text_encoding", "denoising", "vae_decode"]  # CLIP then T5: one phase
    # readings: 1 before the text encoders (nobody's), 2 at the denoiser's start, 3 at the decode's, 4 at the end
    assert peaks == {"text_encoding": 2, "denoising": 3, "vae_decode": 4}
    _hooks_gone(pipe)


@pytest.mark.slow
@pytest.mark.usefixtures("dynamo_isolated")
def test_a_module_compiled_whole_is_watched_outside_its_compiled_frame(tiny_flux_dir):
    # Hooks inside a fullgraph compiled frame would make dynamo fail on the allocator call; the
    # compiled call itself is wrapped instead, and put back afterwards.
    from advisor.config import Vae

    config = OptimizationConfig(device="cpu", dtype="float32", vae=Vae(tiling=True),
                                compile=Compile(regional=False, backend="eager", fullgraph=True))  # fmt: skip
    pipe = _load(tiny_flux_dir, config)
    compiled = pipe.transformer._compiled_call_impl
    assert compiled is not None
    watched, phases, peaks = _watched_run(pipe, "image")
    assert watched["transformer"] == "denoising"
    assert phases.order == ["text_encoding", "denoising", "vae_decode"]
    assert set(peaks) == {"text_encoding", "denoising", "vae_decode"}
    assert pipe.transformer._compiled_call_impl is compiled  # the original is back
    _hooks_gone(pipe)


@pytest.mark.usefixtures("dynamo_isolated")
def test_both_wan22_experts_are_denoising(tmp_path):
    from advisor.testing import build_tiny_wan22

    folder = build_tiny_wan22(tmp_path / "wan22")
    pipe = _load(folder, OptimizationConfig(device="cpu", dtype="float32"))
    watched, phases, _ = _watched_run(pipe, "WanPipeline")
    assert watched["transformer"] == watched["transformer_2"] == "denoising"
    assert watched["text_encoder"] == "text_encoding" and watched["vae"] == "vae_decode"
    assert phases.order == ["text_encoding", "denoising", "vae_decode"]  # the switch of experts is no phase change
    _hooks_gone(pipe)


# --- the step fit -----------------------------------------------------------------------------------


def test_fit_steps_recovers_fixed_and_per_step_cost_exactly():
    fixed, per_step = 0.75, 0.125
    points = {steps: fixed + per_step * steps for steps in (2, 4, 8)}
    assert fit_steps(points) == pytest.approx((fixed, per_step))
    assert fit_steps({2: points[2], 4: points[4]}) == pytest.approx((fixed, per_step))


def test_fit_steps_refuses_a_single_point():
    with pytest.raises(ValueError, match="at least two step counts"):
        fit_steps({4: 1.0})
    with pytest.raises(ValueError):
        fit_steps({})


def test_fit_steps_refuses_times_that_do_not_grow_with_the_steps():
    # 2 steps measured slower than 4 (a noisy machine): no per-step cost can be read, and none is made up.
    with pytest.raises(ValueError, match="do not grow with the steps"):
        fit_steps({2: 2.0, 4: 1.0})
    with pytest.raises(ValueError, match="do not grow with the steps"):
        fit_steps({2: 1.0, 4: 1.0})


# --- timed rounds: the latency with its spread ------------------------------------------------------

FIXED, PER_STEP = 0.5, 0.1  # a pipeline whose 28-step latency is 0.5 + 2.8 = 3.3 s


class Scripted:
    """A generation timer that answers ``FIXED + PER_STEP * steps`` times a scripted noise factor per
    call, and a clock that advances by what each call took: `time_rounds` without a pipeline, to
    drive the cases a real machine produces only by chance (an inverted round, a spread that never
    settles). Real trials run `time_rounds` in every measure test above."""

    def __init__(self, factors):
        self.factors, self.calls, self.now = list(factors), [], 0.0

    def call(self, steps: int) -> float:
        factor = self.factors.pop(0) if self.factors else 1.0
        seconds = (FIXED + PER_STEP * steps) * factor
        self.calls.append(steps)
        self.now += seconds
        return seconds

    def clock(self) -> float:
        return self.now


def test_steady_timings_settle_after_the_minimum_rounds_with_their_spread():
    timer = Scripted([1.0, 1.0, 1.01, 1.01, 0.99, 0.99])
    t = time_rounds(timer.call, (2, 4), 28, min_rounds=3, tolerance=0.05, clock=timer.clock)
    assert t.rounds == 3 and t.discarded == 0 and t.noisy is None
    assert t.latency_s == pytest.approx(FIXED + PER_STEP * 28, rel=0.01)
    # Rounds at x1.01 and x0.99: latencies 3.3 +- 1%, so the half range is 1% of 3.3 s.
    assert t.spread_s == pytest.approx(0.033, rel=0.01)
    assert t.fixed_s == pytest.approx(FIXED, rel=0.05) and t.per_step_s == pytest.approx(PER_STEP, rel=0.05)
    # The step points alternate order between rounds, so a drifting machine biases neither.
    assert timer.calls == [2, 4, 4, 2, 2, 4]


def test_a_round_that_times_more_steps_as_faster_is_timed_again_never_clamped():
    # Round 1: 4 steps "faster" than 2 (a burst of load during the 2-step call): discarded.
    timer = Scripted([3.0, 1.0] + [1.0] * 6)
    t = time_rounds(timer.call, (2, 4), 28, min_rounds=3, tolerance=0.05, clock=timer.clock)
    assert t.discarded == 1 and t.rounds == 3
    assert t.per_step_s == pytest.approx(PER_STEP) and t.latency_s == pytest.approx(3.3)
    assert t.noisy is None  # it settled once re-measured
    assert len(timer.calls) == 8


def test_a_spread_that_never_settles_is_marked_noisy_with_why():
    factors = [1.0, 1.0, 1.3, 1.3] * 10  # rounds alternate between two speeds 30% apart
    timer = Scripted(factors)
    t = time_rounds(timer.call, (2, 4), 28, min_rounds=3, max_rounds=6, tolerance=0.05, clock=timer.clock)
    assert t.rounds == 6
    assert t.noisy is not None and "did not settle within ±5%" in t.noisy and "6 timed rounds" in t.noisy
    assert t.spread_s == pytest.approx(3.3 * 0.15, rel=0.01)  # half of the 30% range


def test_a_noisy_reason_counts_rounds_as_the_measurement_records_them():
    """The reason once said "after 12 rounds" where provenance recorded 3: discarded rounds are said
    apart from the timed ones that `rounds` counts."""
    timer = Scripted([3.0, 1.0, 1.0, 3.0] + [1.0, 1.0, 1.3, 1.3] * 10)  # two inverted rounds, then noise
    t = time_rounds(timer.call, (2, 4), 28, min_rounds=3, max_rounds=6, tolerance=0.05, clock=timer.clock)
    assert t.discarded == 2 and f"after {t.rounds} timed rounds (and 2 discarded)" in t.noisy


def test_the_time_cap_stops_timing_and_says_so():
    timer = Scripted([1.0, 1.0, 1.3, 1.3] * 10)
    t = time_rounds(timer.call, (2, 4), 28, min_rounds=3, max_rounds=12, tolerance=0.05, cap_s=3.0, clock=timer.clock)
    assert t.rounds < 12 and "the time cap" in t.noisy


def test_timings_that_never_grow_with_the_steps_are_timed_at_the_full_step_count():
    timer = Scripted([2.0, 1.0, 1.0, 2.0] * 3)  # every round inverted, in either order
    t = time_rounds(timer.call, (2, 4), 28, min_rounds=3, max_rounds=6, tolerance=0.05, clock=timer.clock)
    assert t.discarded == 6 and t.fixed_s is None and t.per_step_s is None
    assert timer.calls[-3:] == [28, 28, 28]
    assert t.latency_s == pytest.approx(3.3) and t.spread_s == 0 and t.noisy is None  # the full-length calls agree


def test_a_workload_with_few_steps_is_timed_at_its_steps_not_extrapolated():
    timer = Scripted([1.0, 1.02, 0.98])
    t = time_rounds(timer.call, (2, 8), 4, min_rounds=3, tolerance=0.05, clock=timer.clock)
    assert timer.calls == [4, 4, 4]  # only 2 lies below 4 steps: nothing to fit a line through
    assert t.fixed_s is None and t.per_step_s is None and t.step_times == {4: pytest.approx(FIXED + PER_STEP * 4)}
    assert t.latency_s == pytest.approx(0.9) and t.spread_s == pytest.approx(0.018) and t.noisy is None


# --- out of memory, crash and timeout are results -----------------------------------------------------


@pytest.mark.slow
def test_out_of_memory_is_a_result(flux_270mb, oom_limit):
    m = measure(flux_270mb, OptimizationConfig(device="cpu"), WORKLOAD, timeout_s=300, memory_limit_bytes=oom_limit)
    assert m.status == "oom", f"limit {oom_limit / 2**20:.0f} MiB: {m.status}: {m.reason}"
    assert "memory" in m.reason.lower()
    assert m.latency_s is None and m.per_step_s is None and m.step_times == {}
    # The child got past its imports (it reports its peak) but not through loading 270 MB.
    assert m.peak_rss_bytes is not None and m.peak_rss_bytes < oom_limit


def test_is_oom_knows_torch_and_python_out_of_memory_errors():
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 655360 bytes"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_oom(type("OutOfMemoryError", (RuntimeError,), {})("boom"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("no such backend"))
    # CPython's parser out of memory while importing a module from source (seen under prlimit --as)
    assert is_oom(ValueError("field 'target' is required for AnnAssign"))
    assert not is_oom(ValueError("field 'target' is required for the config"))


def test_is_oom_follows_the_exception_chain():
    try:
        try:
            raise MemoryError()
        except MemoryError as cause:
            raise RuntimeError(
                "Failed to import diffusers.pipelines.pipeline_utils because of the following error"
            ) from cause
    except RuntimeError as error:
        assert is_oom(error)


@pytest.mark.slow
def test_a_crash_is_a_result_with_the_error(tiny_flux_dir):
    config = OptimizationConfig(device="cpu", compile=Compile(backend="no-such-backend"))
    m = measure(tiny_flux_dir, config, WORKLOAD, timeout_s=300)
    assert m.status == "crash", m.reason
    assert "no-such-backend" in m.reason
    assert m.latency_s is None
    assert m.peak_rss_bytes > 0  # the child reported before exiting


@pytest.mark.slow
def test_a_timeout_is_a_result(tiny_flux_dir):
    started = time.perf_counter()
    m = measure(tiny_flux_dir, OptimizationConfig(device="cpu"), WORKLOAD, timeout_s=1)
    elapsed = time.perf_counter() - started
    assert m.status == "timeout"
    assert "1s" in m.reason
    assert m.latency_s is None and m.peak_rss_bytes is None
    assert elapsed < 10  # the child was killed at the limit, not waited for


def test_a_child_that_dies_without_a_result_is_classified(tmp_path):
    from advisor.run.measure import _classify_death

    assert _classify_death(-9, "").status == "oom"  # the kernel's OOM killer
    crash = _classify_death(1, "Traceback ...\nSegmentation fault")
    assert crash.status == "crash" and "exited with 1" in crash.reason and "Segmentation fault" in crash.reason
    oom = _classify_death(1, "terminate called after throwing an instance of 'std::bad_alloc'")
    assert oom.status == "oom" and "memory" in oom.reason


def test_running_out_of_address_space_while_loading_a_library_is_out_of_memory():
    # What `import torch` prints under an RLIMIT_AS too small for its shared libraries (seen on the
    # dev machine at 200 MiB): the dynamic loader's ENOMEM, raised as an ImportError.
    from advisor.run.measure import _classify_death

    printed = "ImportError: libtorch_cpu.so: failed to map segment from shared object"
    assert _classify_death(1, f"Traceback (most recent call last):\n{printed}").status == "oom"
    assert is_oom(ImportError("libtorch_cpu.so: failed to map segment from shared object"))


def test_one_burst_of_load_among_steady_rounds_does_not_make_the_spread():
    # Direct timing (4 steps): five rounds, one of them 6x slower (another process took the cores).
    timer = Scripted([1.0, 1.01, 0.99, 6.0, 1.0])
    t = time_rounds(timer.call, (2, 8), 4, min_rounds=3, tolerance=0.05, clock=timer.clock)
    # Three steady rounds settle it first (±1%), before the burst even happens...
    assert t.rounds == 3 and t.noisy is None
    timer = Scripted([1.0, 6.0, 1.01, 0.99, 1.0])
    t = time_rounds(timer.call, (2, 8), 4, min_rounds=3, tolerance=0.05, clock=timer.clock)
    # ... and with the burst among the first rounds, the spread of the rest is what is reported.
    assert t.rounds == 5 and t.noisy is None
    assert t.latency_s == pytest.approx(0.9) and t.spread_s == pytest.approx(
        (0.909 - 0.9) / 2
    )  # 6x and 0.99x left out


@pytest.mark.slow
def test_a_trial_reports_what_it_is_doing_as_it_goes(tiny_flux_dir):
    phases = []
    # A wide tolerance: this checks the phase lines, not the timing (a loaded runner would time 12 rounds).
    m = measure(
        tiny_flux_dir, OptimizationConfig(device="cpu"), WORKLOAD, timeout_s=300, tolerance=0.5, on_phase=phases.append
    )
    assert m.status == "ok", m.reason
    assert phases[:3] == ["starting", "loading", "warm-up"]
    timing = phases[3:]
    # One line per timed call, numbered, each at the workload's 4 steps (timed as they are).
    assert timing == [f"timing, call {n} (4 steps)" for n in range(1, len(timing) + 1)] and len(timing) == m.rounds
