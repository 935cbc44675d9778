"""How `advisor recommend` explains the offload lever's part of a pick: what offloading saves, partial
offload against offloading the whole denoiser, and the guidance on which strategy suits the workload."""

from __future__ import annotations

from advisor.config import Offload, OptimizationConfig
from advisor.levers.base import Pick, Prefer
from advisor.levers.offload.balanced import balanced_map
from advisor.levers.offload.strategies import GROUP, MODEL, NONE, load_device_map, moved_whole_before_offloading
from advisor.units import format_size


def guidance_rival(config: OptimizationConfig) -> Offload | None:
    """The strategy the guidance weighs this one against (model offload against group offload, and
    back); None for the others."""
    rivals = {MODEL: GROUP, GROUP: MODEL}
    strategy = rivals.get(config.offload.strategy)
    return Offload(strategy=strategy) if strategy else None


# What partial offload is weighed against when it is picked: offloading every block of the denoiser.
WHOLE_RIVALS = (
    ("every block group-offloaded on a stream", Offload(strategy=GROUP, use_stream=True, record_stream=True)),
    ("model offload", Offload(strategy=MODEL)),
)


def memory_reasons(pick: Pick) -> list[str]:
    """What offloading saves (the peak without it); partial offload against the whole; or that nothing moves."""
    offload = pick.config.offload
    lines = []
    if offload.strategy != NONE:
        no_offload = pick.predict(pick.config.replace(offload=Offload()))
        lines.append(f"{offload.label()}: without it the peak would be {format_size(no_offload.peak_vram_bytes)}")
    if load_device_map(pick.config) == "cpu":
        quantized = ", ".join(pick.config.quantization.components)
        moved = sorted(moved_whole_before_offloading(pick.config))
        then = (
            f"; {', '.join(moved)} then each move to the GPU whole, scales with them, just before group offloading "
            "moves their weights back, one model at a time"
            if moved
            else ""
        )
        lines.append(
            f'loads with device_map="cpu": bitsandbytes would otherwise quantize {quantized} straight onto the GPU, '
            "all there at once before offloading starts; on the CPU it quantizes more slowly, once per load "
            f"(as FLUX.2's 24 GB recipe loads: https://huggingface.co/blog/flux-2){then}"
        )
    if offload.device_map:
        lines.append(_over_the_gpus(pick))
    if offload.resident_blocks:
        lines.append(_partial_against_whole(pick))
    elif pick.scenario.target.device == "cuda" and offload.strategy == NONE:
        lines.append("no offloading: everything stays on the GPU, so no time goes to transfers")
    return lines


def _over_the_gpus(pick: Pick) -> str:
    """What lands on which GPU, each GPU's peak, and what one GPU would need instead."""
    target = pick.scenario.target
    placed = balanced_map(
        pick.scenario.profile.components, pick.config.dtype, target.gpu_count, target.vram_free_bytes
    )
    peaks = pick.estimate.gpu_peaks_bytes
    cards = "; ".join(
        f"GPU {gpu}: {', '.join(name for name, at in placed.items() if at == int(gpu))} (peak {format_size(peak)})"
        for gpu, peak in sorted(peaks.items())
    )
    one = pick.predict(pick.config.replace(offload=Offload()))
    return (
        f'components over the {target.gpu_count} GPUs (device_map="balanced"): {cards}; diffusers deals them out '
        "largest first, sized at the load dtype, over the GPUs in a zig-zag (0, 1, 1, 0 on two), each with the "
        f"activations of the phase it runs; on one GPU they would need {format_size(one.peak_vram_bytes)} "
        "(diffusers/pipelines/pipeline_loading_utils.py, _assign_components_to_devices)"
    )


def _partial_against_whole(pick: Pick) -> str:
    """Partial offload against offloading the whole denoiser: every block group-offloaded (on a
    stream, diffusers' fastest) and whole models moved (model offload), predicted side by side."""
    resident = pick.config.offload.resident_blocks
    kept = ", ".join(f"{count} of {name}'s blocks" for name, count in resident.items())
    fits = {name: pick.resident_blocks_that_fit(name) for name in resident}
    if all(resident[name] == fits[name] for name in resident):
        why = "the most that fit the budget with every phase's activations, the largest first"
    else:
        why = (
            f"the largest first; {', '.join(str(n) for n in fits.values())} would fit the budget, and these are "
            f"within {pick.tie:.0%} as fast with a smaller peak"
        )
    rivals = []
    for label, whole in WHOLE_RIVALS:
        rival = pick.predict(pick.config.replace(offload=whole))
        peak = pick.peak(rival)
        fits_budget = "fits" if peak <= pick.scenario.budget_bytes else "over the budget"
        rivals.append(f"{label} {rival.latency_s:.1f}s (peak {format_size(peak)}, {fits_budget})")
    return (
        f"partial offload keeps {kept} on the GPU ({why}) and streams the rest: predicted {pick.latency_s:.1f}s, "
        f"against {' and '.join(rivals)}"
    )


def guidance_reasons(pick: Pick, prefers: tuple[Prefer, ...]) -> list[str]:
    """The guidance on which offloading suits this workload, against the strategy it weighs the pick's
    against (`guidance_rival`): followed, or overruled by a clear win."""
    other = guidance_rival(pick.config)
    if other is None:
        return []
    strategy = pick.config.offload.strategy
    rival = pick.config.replace(offload=other)
    lines = []
    for prefer in prefers:
        mine, theirs = prefer.rank(pick.config, pick.scenario), prefer.rank(rival, pick.scenario)
        if mine < theirs:
            lines.append(f"{prefer.reason} ({prefer.source})")
        elif mine > theirs:
            # Against candidates as lossy as the pick: the quality policy, not the offloading, decided between those.
            kind = "lossy" if pick.lossy else "lossless"
            runner = pick.rival(lambda config: config.offload.strategy == other.strategy)
            if runner is None:
                lines.append(
                    f"no {kind} {other.strategy}-offload candidate fits the budget, so the guidance's preference can't apply: "
                    f"{prefer.reason} ({prefer.source})"
                )
                continue
            gain = 1 - pick.score_s / runner.score_s
            lines.append(
                f"{strategy} offloading is predicted {gain:.0%} faster than the best {kind} {other.strategy}-offload candidate "
                f"({runner.score_s:.1f}s), more than the {pick.tie:.0%} within which the guidance decides: {prefer.reason} "
                f"({prefer.source})"
            )
    return lines
