"""A traced call's allocation pattern (advisor/trace/pattern.py): fitted over sizes, cut to two of
each run of identical blocks, and replayed at a plan's size with what the caching-allocator model
gives for the log itself (advisor/plan/allocator.py)."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from advisor.plan.compute import constants, replay_pattern  # noqa: E402
from advisor.plan.replay import allocation_peaks  # noqa: E402
from advisor.trace.counter import MARK  # noqa: E402
from advisor.trace.pattern import allocation_record  # noqa: E402


MIB = 2**20


def _log(x: int, blocks: int = 6) -> list[tuple[int, int]]:
    """A transformer-like call at size `x`: an input projection, `blocks` blocks that each make a new
    hidden state (freeing the last) and a temporary of x^2/16 bytes (an attention score, say), and
    an output. Storages are numbered as a counter's ids would be (any distinct keys)."""
    log, key = [], iter(range(1, 10_000))
    hidden = next(key)
    log.append((64 * x, hidden))
    for _ in range(blocks):
        log.append(MARK)
        temp, new = next(key), next(key)
        log += [(x * x // 16, temp), (64 * x, new), (-(x * x // 16), temp), (-64 * x, hidden)]
        hidden = new
    out = next(key)
    log += [(3 * MIB, out), (-64 * x, hidden)]
    return log


def _ops(log: list[tuple[int, int]]) -> list[int]:
    """The log as `allocation_peaks` takes it: bytes for an allocation, -k for a free."""
    order: dict[int, int] = {}
    ops = []
    for nbytes, key in log:
        if (nbytes, key) == MARK:
            continue
        if nbytes > 0:
            order[key] = sum(1 for op in ops if op > 0)
            ops.append(nbytes)
        else:
            ops.append(-(sum(1 for op in ops if op > 0) - order.pop(key)))
    return ops


def test_a_pattern_fitted_at_three_sizes_replays_exactly_at_a_fourth():
    sizes = [4096, 8192, 16384]
    record = allocation_record([_log(x) for x in sizes], [{"x": x} for x in sizes], ["1", "x", "x^2"])
    assert "events" in record
    # Every size here is a quadratic in x: the curves give the log's own bytes at a size never traced.
    assert replay_pattern(record, {"x": 24576}) == allocation_peaks(_ops(_log(24576)))


@pytest.mark.parametrize("blocks, like", [(40, 6), (41, 7)])
def test_runs_of_identical_blocks_are_cut_to_two_or_three_and_replay_the_same(blocks, like):
    # Each block frees the last one's hidden state: the allocator alternates between two states, so
    # an even run keeps two blocks and an odd one three; 40 blocks keep what 6 do, 41 what 7 do.
    sizes = [4096, 8192, 16384]

    def record(count: int) -> dict:
        return allocation_record([_log(x, count) for x in sizes], [{"x": x} for x in sizes], ["1", "x", "x^2"])

    many = record(blocks)
    assert many["events"] == record(like)["events"] != record(blocks + 1)["events"]
    assert replay_pattern(many, {"x": 20000}) == allocation_peaks(_ops(_log(20000, blocks)))


def test_a_pattern_that_changes_with_size_keeps_the_replays_and_plans_from_the_nearest():
    # More frames, more decoder calls: the structure differs, so each traced size's replay is kept.
    points = [{"f": 9}, {"f": 33}]
    record = allocation_record([_log(8192, 2), _log(8192, 8)], points, ["1", "f"])
    assert [p["at"] for p in record["replayed"]] == points
    assert replay_pattern(record, {"f": 40}) == allocation_peaks(_ops(_log(8192, 8)))
    doubled = replay_pattern(record, {"f": 8}, scale=2.0)
    assert doubled.needs == 2 * allocation_peaks(_ops(_log(8192, 2))).needs


@pytest.mark.slow
def test_the_tiny_flux_transformers_stored_pattern_replays_its_traced_peak(tiny_flux_dir):
    # The counter's activation peak is the same log's live bytes: the replay rounds each storage up
    # to 512 B and counts a large block's unsplit rest (up to 1 MiB) as allocated, as the allocator
    # does, so its allocated peak is that or a little more.
    from advisor.plan.compute import evaluate
    from advisor.probe.models import profile_from_folder
    from advisor.trace.tracer import trace_component

    profile = profile_from_folder(tiny_flux_dir)
    trace = trace_component(profile, profile.by_role("denoiser")[0])
    for point in trace["points"]:
        peaks = replay_pattern(trace["allocations"], {"x": point["x"]})
        assert point["activation_peak_bytes"] <= peaks.allocated <= 1.02 * point["activation_peak_bytes"] + 2 * MIB
        assert peaks.allocated <= peaks.needs <= peaks.reserved
    x = trace["check"]["x"]
    curve = evaluate(trace["basis"], trace["fit"]["activation_peak_bytes"], {"x": x})
    assert replay_pattern(trace["allocations"], {"x": x}).allocated == pytest.approx(curve, rel=0.05)


@pytest.mark.parametrize("model", ["black-forest-labs/FLUX.1-dev", "hunyuanvideo-community/HunyuanVideo"])
def test_replays_the_catalog_keeps_at_the_default_size_are_the_replays_themselves(model):
    # The catalog keeps each pattern's replay at the model's default workload so that a plan at
    # that size replays nothing: what it keeps must be what the allocator model gives.
    from advisor.plan.allocator import AllocatorSettings
    from advisor.plan.compute import pattern_ops, trace_of
    from advisor.probe.models import load_profile

    profile = load_profile(model)
    checked = 0
    for component in profile.components:
        trace = trace_of(component) or {}
        records = [trace.get("allocations"), *(trace[m]["allocations"] for m in ("untiled", "tiled") if m in trace)]
        for record in filter(None, records):
            for stored in record.get("replays", ()):
                settings = AllocatorSettings(expandable_segments=stored["expandable_segments"])
                replayed = allocation_peaks(pattern_ops(record, stored["variables"], stored["scale"]), settings)
                assert (replayed.allocated, replayed.reserved, replayed.needs) == (
                    stored["allocated"],
                    stored["reserved"],
                    stored["needs"],
                )
                checked += 1
    assert checked >= 2  # the denoiser's at least, with and without expandable segments


def test_leaf_level_offload_holds_a_layer_or_two_where_the_activations_peak(tiny_flux_dir):
    # diffusers' leaf-level groups onload each layer before it runs (and, on a stream, the next
    # one too) and offload it after: at any moment one or two layers' weights are on the card,
    # never more than two of the largest, and the activation peak falls within some layer's run.
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    from advisor.config import Offload, OptimizationConfig
    from advisor.levers.offload import resident_bytes
    from advisor.probe.models import profile_from_folder
    from advisor.trace.meta import build_on_meta
    from advisor.trace.tracer import trace_component

    profile = profile_from_folder(tiny_flux_dir)
    denoiser = profile.by_role("denoiser")[0]
    frontier = trace_component(profile, denoiser)["layers_in_flight"]
    module = build_on_meta(denoiser.library, denoiser.class_name, denoiser.config)
    layers = [m for m in module.modules() if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS)]
    largest = max(sum(p.numel() for p in m.parameters()) for m in layers)
    for kind, most in (("layer", largest), ("with_next", 2 * largest)):
        assert frontier[kind] and all(0 < params <= most for _share, params in frontier[kind]), kind
        assert max(share for share, _params in frontier[kind]) == 1.0  # the peak is inside a layer's run
    # The estimate holds what the frontier gives at the plan's activations: at most two of the largest.
    streamed = OptimizationConfig(offload=Offload(strategy="group", offload_type="leaf_level", use_stream=True))
    traced = replace(denoiser, trace={"layers_in_flight": frontier})
    held = resident_bytes(traced, 2 * denoiser.parameters, streamed, True, activation=10 * 2**20, k=constants())
    assert 0 < held <= 2 * largest * 2
