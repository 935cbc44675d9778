"""The allocator lever (advisor/levers/allocator.py): ``expandable_segments:True`` where the replayed
allocations need less of the card with it, set before CUDA starts, Linux CUDA only."""

from __future__ import annotations

import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from advisor.config import OptimizationConfig  # noqa: E402
from advisor.levers.allocator import (  # noqa: E402
    CONF,
    expandable_segments_need_linux_cuda,
    expandable_where_memory_is_stranded,
    set_expandable_segments,
)
from advisor.platform import Platform  # noqa: E402


EXPANDABLE = OptimizationConfig(expandable_segments=True)


def _scenario(model: str, gpu: str, **job):
    from advisor.plan.scenario import make_scenario
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    profile = load_profile(model)
    return make_scenario(profile, make_workload(profile, **job), planned_target(machine=None, gpu=gpu, ram=2**40))


def _predict(scenario):
    from advisor.plan.estimate import estimate_for

    return lambda config: estimate_for(scenario, config)


@pytest.mark.parametrize(
    "platform, refused",
    [
        (Platform("cuda", "8.9", None, os="linux"), None),
        (Platform("cuda", "8.9", None, os="windows"), "ignored on windows"),
        (Platform(None, None, None), "no CUDA GPU"),
    ],
)
def test_it_runs_on_linux_cuda_only(platform, refused):
    message = expandable_segments_need_linux_cuda(EXPANDABLE, platform)
    assert (message is None) if refused is None else (refused in message)


def test_the_planner_sets_it_where_a_video_decode_strands_memory_and_not_where_nothing_is_stranded():
    # CogVideoX's untiled decode allocates tensors of many sizes, chunk after chunk of frames; with
    # segments of fixed size their free space strands (PyTorch's Note [Expandable Segments]), and
    # the rehearsal of the full-size pipeline needs 61.0 GB by default, 49.3 GB with it
    # (docs/benchmarks.md). FLUX.1-dev at 1024x1024 strands nothing: its peak is the allocated one.
    cog = _scenario("THUDM/CogVideoX-5b", "H100")
    plain = OptimizationConfig()
    adjusted = expandable_where_memory_is_stranded(plain, cog, _predict(cog))
    assert adjusted.expandable_segments
    assert _predict(cog)(adjusted).peak_vram_bytes < _predict(cog)(plain).peak_vram_bytes
    flux = _scenario("black-forest-labs/FLUX.1-dev", "H100")
    assert not expandable_where_memory_is_stranded(plain, flux, _predict(flux)).expandable_segments


def test_with_it_the_estimate_strands_less_but_maps_whole_pages():
    # The same allocations on pages that merge: what is stranded can only shrink, but the segment
    # grows a whole page at a time (20 MiB large, 2 MiB small), and what a run needs is bisected to
    # 2 MiB or 1/256 of its allocated activations either way (less than 1/256 of the whole peak).
    for model in ("THUDM/CogVideoX-5b", "Lightricks/LTX-Video", "black-forest-labs/FLUX.1-dev"):
        scenario = _scenario(model, "H100")
        predict = _predict(scenario)
        with_it, without = predict(EXPANDABLE), predict(OptimizationConfig())
        assert with_it.peak_vram_allocated_bytes == without.peak_vram_allocated_bytes
        bisection = max(2 * 2**20, without.peak_vram_allocated_bytes // 256)
        assert with_it.peak_vram_bytes <= without.peak_vram_bytes + (20 + 2) * 2**20 + 2 * bisection


def test_it_is_set_in_the_environment_keeping_the_processs_own_options(monkeypatch):
    monkeypatch.setenv(CONF, "max_split_size_mb:512")
    set_expandable_segments()
    assert os.environ[CONF] == "max_split_size_mb:512,expandable_segments:True"
    set_expandable_segments()  # once is enough
    assert os.environ[CONF] == "max_split_size_mb:512,expandable_segments:True"


def test_a_script_sets_it_before_importing_torch():
    from advisor.run.emit import emit_python

    script = emit_python("black-forest-labs/FLUX.1-dev", EXPANDABLE)
    lines = script.splitlines()
    setting = next(i for i, line in enumerate(lines) if CONF in line)
    assert lines.index("import os") < setting < lines.index("import torch")
