"""advisor.run.measure: one candidate measured for real in its own process, and every way a trial can end.

A real measurement of the tiny Flux pipeline on CPU; the step fit; and out-of-memory, crash and
timeout as results (a `Measurement` with a status and a reason), never as exceptions. The
out-of-memory is real: the trial process runs under an address-space limit (RLIMIT_AS) that lets
torch and diffusers import but not a 270 MB pipeline load.
"""

from __future__ import annotations

import time

import pytest

from advisor.config import Compile, OptimizationConfig
from advisor.probe.workload import Workload
from advisor.run.measure import Measurement, fit_steps, is_oom, measure

WORKLOAD = Workload(kind="image", height=32, width=32, steps=4)

# --- a real measurement -----------------------------------------------------------------------------


@pytest.mark.slow
def test_measures_the_tiny_flux_pipeline_for_real(tiny_flux_dir):
    # Steps 2 and 8 (median of 3 each): a step costs a few ms here, so a wide gap keeps the slope clear
    # of the noise of a shared 2-core machine.
    m = measure(tiny_flux_dir, OptimizationConfig(device="cpu"), WORKLOAD, timeout_s=300, step_points=(2, 8), repeats=3)
    assert m.status == "ok", m.reason
    assert m.reason is None
    assert m.device == "cpu"
    assert set(m.step_times) == {"2", "8"}
    assert all(t > 0 for t in m.step_times.values())
    assert m.per_step_s > 0 and m.fixed_s >= 0
    assert m.latency_s > 0
    assert m.latency_s == pytest.approx(m.fixed_s + m.per_step_s * WORKLOAD.steps)
    assert m.load_s > 0 and m.warmup_s > 0
    # The whole trial process (torch, diffusers, the pipeline): far more than 100 MB on any machine.
    assert m.peak_rss_bytes > 100 * 2**20
    assert m.peak_vram_bytes is None  # CPU: no CUDA numbers
    assert m.wall_s >= m.load_s
    # A result round-trips through the dict the study stores.
    assert Measurement(**m.to_dict()) == m


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


def test_fit_steps_with_a_negative_slope_falls_back_to_the_mean_time():
    # 2 steps measured slower than 4 (a noisy machine): the constant that fits best is the mean.
    assert fit_steps({2: 2.0, 4: 1.0}) == pytest.approx((1.5, 0.0))


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


def test_is_oom_follows_the_exception_chain():
    try:
        try:
            raise MemoryError()
        except MemoryError as cause:
            raise RuntimeError("Failed to import diffusers.pipelines.pipeline_utils because of the following error") from cause
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
