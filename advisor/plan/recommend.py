"""The rule engine: score every candidate of the space for a scenario, pick the fastest that fits, say why.

`recommend(scenario)` walks the search space (`advisor.plan.space`), drops what a constraint or a
filter rule rejects, estimates the rest (`advisor.plan.estimate`), and picks the fastest whose
predicted peaks fit the budget and the RAM; near-ties go the way the prefer rules say. The result
is data (`Recommendation`); the CLI only renders it. Pure Python: no torch, a few milliseconds for
~200 candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from advisor.config import Offload, OptimizationConfig
from advisor.plan.estimate import Estimate, estimate
from advisor.plan.rules import rules_of
from advisor.plan.scenario import Scenario
from advisor.plan.space import SearchSpace
from advisor.units import GIB, format_size


@dataclass
class Scored:
    config: OptimizationConfig
    estimate: Estimate
    fits: bool
    why_not: str | None
    score_s: float  # predicted latency x the prefer rules' factors
    adjusted_by: list[str] = field(default_factory=list)  # adjust rules that changed this candidate

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json", exclude_none=True),
            "summary": self.config.summary(),
            "estimate": self.estimate.summary(),
            "fits": self.fits,
            "why_not": self.why_not,
        }


@dataclass
class Recommendation:
    """The pick (as a config with provenance), why, and what else came close; or, when nothing fits, what would."""

    scenario: Scenario
    best: Scored | None
    alternatives: list[Scored]
    reasons: list[str]
    rejected: dict[str, int]  # constraint or filter rule -> candidates it removed
    candidates: int
    smallest: Scored | None = None  # the lowest predicted peak, when nothing fits
    advice: list[str] = field(default_factory=list)

    @property
    def config(self) -> OptimizationConfig | None:
        """The pick with its provenance; None when nothing fits."""
        if self.best is None:
            return None
        provenance = self.scenario.provenance("recommend", estimate=self.best.estimate.summary())
        return self.best.config.model_copy(update={"provenance": provenance})

    def to_dict(self) -> dict[str, Any]:
        """The documented `advisor recommend --json` object (docs/cli.md)."""
        s, config = self.scenario, self.config
        return {
            "model": s.profile.model_id,
            "pipeline_class": s.profile.pipeline_class,
            "workload": s.workload.to_dict(),
            "hardware": s.target.to_dict(),
            "budget_bytes": s.budget_bytes,
            "fits": config is not None,
            "config": config.model_dump(mode="json", exclude_none=True) if config else None,
            "summary": config.summary() if config else None,
            "estimate": self.best.estimate.summary() if self.best else None,
            "reasons": self.reasons,
            "alternatives": [a.to_dict() for a in self.alternatives],
            "smallest": self.smallest.to_dict() if self.smallest else None,
            "advice": self.advice,
            "candidates": self.candidates,
            "rejected": self.rejected,
            "notes": list(s.notes),
        }


def _fit(result: Estimate, scenario: Scenario) -> str | None:
    """Why a candidate does not fit the budget or the RAM; None when it fits."""
    target = scenario.target
    peak = result.limited_peak(target.device)
    if peak > scenario.budget_bytes:
        return f"peak {format_size(peak)} > budget {format_size(scenario.budget_bytes)}"
    if target.device == "cuda" and result.peak_ram_bytes > target.ram_available_bytes:
        return f"host RAM {format_size(result.peak_ram_bytes)} > available {format_size(target.ram_available_bytes)}"
    return None


def score(config: OptimizationConfig, scenario: Scenario, adjusted_by: list[str] | None = None) -> Scored:
    """Estimate one finished candidate and check it against the budget."""
    result = estimate(scenario.profile, scenario.workload, config, scenario.target)
    why_not = _fit(result, scenario)
    factor = 1.0
    for prefer in rules_of("prefer"):
        factor *= prefer.evaluate(config, scenario)
    return Scored(config, result, why_not is None, why_not, result.latency_s * factor, adjusted_by or [])


def recommend(scenario: Scenario, *, alternatives: int = 3, compile_choices: tuple[bool, ...] = (True, False)) -> Recommendation:
    """Pick the fastest configuration predicted to fit, with reasons and runners-up.

    ``compile_choices=(False,)`` leaves torch.compile out.
    """
    space = SearchSpace.for_scenario(scenario, compile_choices=compile_choices)
    rejected: dict[str, int] = {}
    scored: list[Scored] = []
    seen: set[str] = set()
    for params in space.points():
        candidate = space.candidate(params, scenario)
        if candidate.rejected_by:
            rejected[candidate.rejected_by] = rejected.get(candidate.rejected_by, 0) + 1
            continue
        key = candidate.config.model_dump_json()
        if key not in seen:
            seen.add(key)
            scored.append(score(candidate.config, scenario, candidate.adjusted_by))
    device = scenario.target.device
    # Near-equal latencies: the smaller peak wins, then the smaller RAM need.
    feasible = sorted(
        (s for s in scored if s.fits),
        key=lambda s: (round(s.score_s, 1), s.estimate.peak_vram_bytes, s.estimate.peak_ram_bytes),
    )
    if not feasible:
        smallest = min(scored, key=lambda s: s.estimate.limited_peak(device))
        return Recommendation(scenario, None, [], [], rejected, len(scored), smallest, _advice(smallest, scenario))
    best = feasible[0]
    return Recommendation(
        scenario,
        best,
        _distinct_alternatives(feasible[1:], best, alternatives),
        explain(best, feasible, scenario),
        rejected,
        len(scored),
    )


def _distinct_alternatives(ranked: list[Scored], best: Scored, count: int) -> list[Scored]:
    """Runners-up that differ in kind (not just a flag) from the pick and from each other."""
    picked, kinds = [], {_kind(best.config)}
    for candidate in ranked:
        if _kind(candidate.config) not in kinds:
            picked.append(candidate)
            kinds.add(_kind(candidate.config))
        if len(picked) == count:
            break
    return picked


def _kind(config: OptimizationConfig) -> tuple:
    """What makes two candidates different in kind: storage format, offload strategy, compile."""
    quantization = config.quantization.kind if config.quantization else None
    return (quantization, bool(config.layerwise_casting), config.offload.strategy, bool(config.compile))


def explain(best: Scored, feasible: list[Scored], scenario: Scenario) -> list[str]:
    """The reasons a user reads: why this fits, why it is fastest, and which guidance shaped it."""
    config, result, target = best.config, best.estimate, scenario.target
    where = "RAM" if target.device == "cpu" else "GPU memory"
    peak = result.limited_peak(target.device)
    reasons = [
        f"fits: predicted peak {where} {format_size(peak)} (during {result.peak_phase.replace('_', ' ')}) "
        f"within the {format_size(scenario.budget_bytes)} budget; host RAM {format_size(result.peak_ram_bytes)}",
        f"fastest of {len(feasible)} candidates predicted to fit: {result.latency_s:.1f}s per "
        f"{scenario.workload.kind} ({result.step_latency_s:.3f}s per step)",
    ]
    if config.quantization or config.layerwise_casting:
        unquantized = config.model_copy(update={"quantization": None, "layerwise_casting": None})
        plain = estimate(scenario.profile, scenario.workload, unquantized, target)
        what = config.quantization.label() if config.quantization else f"fp8 storage({', '.join(config.layerwise_casting.components)})"
        reasons.append(
            f"quantized {what}: weights {format_size(sum(result.weight_bytes.values()))} instead of "
            f"{format_size(sum(plain.weight_bytes.values()))}; the VAE is never quantized (quality)"
        )
    if config.offload.strategy != "none":
        no_offload = estimate(scenario.profile, scenario.workload, config.model_copy(update={"offload": Offload()}), target)
        reasons.append(
            f"{config.offload.label()}: without it the peak would be {format_size(no_offload.peak_vram_bytes)}"
        )
    elif target.device == "cuda":
        reasons.append("no offloading: everything stays on the GPU, so no time goes to transfers")
    if config.compile:
        reasons.append(
            "torch.compile on the denoiser"
            + (" (regional: compile_repeated_blocks compiles one block, much faster to warm up)" if config.compile.regional else "")
            + "; expect a one-off compile on the first call"
        )
    reasons += [f"{r.reason} ({r.source})" for r in rules_of("adjust") if r.name in best.adjusted_by]
    if config.offload.strategy in {"model", "group"}:
        # The guidance on which offloading suits this workload, when the pick follows it.
        other = "group" if config.offload.strategy == "model" else "model"
        rival = config.model_copy(update={"offload": Offload(strategy=other)})
        for prefer in rules_of("prefer"):
            if prefer.evaluate(config, scenario) == 1.0 and prefer.evaluate(rival, scenario) > 1.0:
                reasons.append(f"{prefer.reason} ({prefer.source})")
    return reasons


def _advice(smallest: Scored, scenario: Scenario) -> list[str]:
    """What would make the smallest candidate fit."""
    result, target = smallest.estimate, scenario.target
    advice = []
    peak = result.limited_peak(target.device)
    if peak > scenario.budget_bytes:
        short = peak - scenario.budget_bytes
        advice.append(f"the smallest predicted peak is {format_size(peak)} ({smallest.config.summary()}), {format_size(short)} over the budget")
        heavy = max(result.phases, key=lambda p: p.device_bytes)
        if heavy.activation_bytes > sum(heavy.weights_bytes.values()):
            advice.append("activations dominate: lower --height/--width/--frames or --batch")
        if target.device == "cpu":
            advice.append(f"a machine with at least {format_size(peak / 0.9)} of RAM would fit it, or plan for a GPU with --vram")
        else:
            advice.append(f"a GPU with at least {format_size(peak + GIB + 0.05 * peak)} would fit it")
    if result.peak_ram_bytes > target.ram_available_bytes:
        advice.append(
            f"it needs {format_size(result.peak_ram_bytes)} of host RAM (available: "
            f"{format_size(target.ram_available_bytes)}): add RAM or offload to disk"
        )
    return advice
