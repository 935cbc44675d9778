"""The rule engine: score every candidate of the space for a scenario, pick the fastest that fits, say why.

`recommend(scenario)` walks the search space (`advisor.plan.space`), drops what a constraint or a
filter rule rejects, estimates the rest (`advisor.plan.estimate`), and picks the fastest whose
predicted peaks fit the budget and the RAM; near-ties go the way the prefer rules say. The result
is data (`Recommendation`); the CLI only renders it. Pure Python: no torch, a few milliseconds for
~200 candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Literal

from advisor.config import OptimizationConfig
from advisor.levers import LEVERS, Pick, Rival, generations_at_once
from advisor.levers.multi_gpu import job_seconds
from advisor.plan.estimate import Estimate, estimate, estimate_for, resident_blocks_that_fit
from advisor.plan.quality import CLEAR_WIN, fp16_warnings, is_lossy
from advisor.plan.rules import TIE, rules_of
from advisor.plan.scenario import RAM_USABLE, Scenario, smallest_card_for
from advisor.plan.space import SearchSpace
from advisor.units import format_size


if TYPE_CHECKING:
    from advisor.probe.target import TargetHardware

# Above this share of the machine's RAM the reasons carry a warning.
RAM_WARN = 0.85


@dataclass
class Scored:
    config: OptimizationConfig
    estimate: Estimate
    fits: bool
    why_not: str | None  # `Unfit.reason`
    score_s: float  # predicted latency with its share of the one-off warm-up (what candidates are ranked by)
    adjusted_by: list[str] = field(default_factory=list)  # adjust rules that changed this candidate
    over: str | None = None  # the limit it does not fit (`Unfit.limit`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
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
        return self.best.config.replace(provenance=provenance)

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
            "config": config.to_dict() if config else None,
            "summary": config.summary() if config else None,
            "estimate": self.best.estimate.summary() if self.best else None,
            "reasons": self.reasons,
            "alternatives": [a.to_dict() for a in self.alternatives],
            "smallest": self.smallest.to_dict() if self.smallest else None,
            "advice": self.advice,
            "candidates": self.candidates,
            "rejected": self.rejected,
            "notes": list(s.notes),
            "assumptions": list(s.assumptions),
            "quality": s.quality,
        }


def usable_ram(scenario: Scenario) -> int:
    """Host RAM a plan may take: the available RAM less headroom for the OS and other programs."""
    return int(scenario.target.ram_available_bytes * RAM_USABLE)


@dataclass(frozen=True)
class Unfit:
    """Why an estimate does not fit: which limit it is over, and the reason in words."""

    limit: Literal["budget", "host RAM"]
    reason: str


@dataclass(frozen=True)
class Fit:
    """An estimate judged against a budget, as `advisor estimate` reports it."""

    budget_bytes: int
    unfit: Unfit | None  # None: it fits
    budget_source: str | None = None  # where the budget came from; None: recommend's default

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source or "default",
            "fits": self.unfit is None,
            "why_not": self.unfit.reason if self.unfit else None,
        }


def why_it_does_not_fit(result: Estimate, target: TargetHardware, budget_bytes: int) -> Unfit | None:
    """Why an estimate does not fit the budget or the host RAM a plan may take; None when it fits
    (the rule recommend picks by, and `advisor estimate` reports)."""
    peak = result.limited_peak(target.device)
    if peak > budget_bytes:
        return Unfit(
            "budget",
            f"peak {'RAM' if target.device == 'cpu' else 'VRAM'} {format_size(peak)} > budget {format_size(budget_bytes)}",
        )
    if target.device == "cuda" and result.peak_ram_bytes > int(target.ram_available_bytes * RAM_USABLE):
        return Unfit(
            "host RAM",
            f"host RAM {format_size(result.peak_ram_bytes)} > {RAM_USABLE:.0%} of the available "
            f"{format_size(target.ram_available_bytes)}",
        )
    return None


def per_generation_s(config: OptimizationConfig, result: Estimate, scenario: Scenario) -> float:
    """What candidates are ranked by: a generation's seconds with its share of the one-off warm-up,
    and for a job of several images (``--images``), its share of the job's time, where generations
    run side by side (one pipeline per GPU)."""
    images = scenario.images or 1
    at_once = generations_at_once(config)
    return job_seconds(result.latency_s, images, at_once) / images + result.warmup_s / scenario.generations


def score(config: OptimizationConfig, scenario: Scenario, adjusted_by: list[str] | None = None) -> Scored:
    """Estimate one finished candidate and check it against the budget."""
    result = estimate_for(scenario, config)
    unfit = why_it_does_not_fit(result, scenario.target, scenario.budget_bytes)
    return Scored(
        config,
        result,
        unfit is None,
        unfit.reason if unfit else None,
        per_generation_s(config, result, scenario),
        adjusted_by or [],
        unfit.limit if unfit else None,
    )


def _preference(scored: Scored, scenario: Scenario) -> tuple:
    """How the guidance orders near-equal candidates: the prefer rules, lossless first, then less RAM and VRAM."""
    ranks = tuple(prefer.evaluate(scored.config, scenario) for prefer in rules_of("prefer"))
    e = scored.estimate
    return (*ranks, is_lossy(scored.config), e.peak_ram_bytes, e.peak_vram_bytes, scored.score_s)


def _pick(candidates: list[Scored], scenario: Scenario) -> Scored:
    """The fastest candidate, or among those within TIE of it, the one the guidance prefers."""
    fastest = min(s.score_s for s in candidates)
    tied = [s for s in candidates if s.score_s <= fastest * (1 + TIE)]
    return min(tied, key=lambda s: _preference(s, scenario))


def _choose(feasible: list[Scored], scenario: Scenario) -> tuple[Scored, str | None]:
    """The pick under the quality policy, and the sentence that explains a lossy or lossless choice."""
    best = _pick(feasible, scenario)
    lossless = [s for s in feasible if not is_lossy(s.config)]
    if not is_lossy(best.config) or scenario.quality == "fast":
        return best, None
    if not lossless:
        return best, "nothing lossless fits, so the pick is lossy"
    plain = _pick(lossless, scenario)
    gain = 1 - best.score_s / plain.score_s
    if gain >= CLEAR_WIN:
        return best, (
            f"lossy, because it is predicted {gain:.0%} faster than the best lossless candidate "
            f"({plain.config.summary()}, {plain.score_s:.1f}s); --quality balanced takes a lossy option "
            f"from {CLEAR_WIN:.0%} up, --quality exact never"
        )
    return plain, (
        f"lossless: the fastest lossy candidate ({best.config.summary()}) is predicted only {gain:.0%} faster, "
        f"under the {CLEAR_WIN:.0%} that --quality balanced asks for (--quality fast would take it)"
    )


def recommend(
    scenario: Scenario, *, alternatives: int = 3, compile_choices: tuple[bool, ...] = (True, False)
) -> Recommendation:
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
        key = candidate.config.key
        if key not in seen:
            seen.add(key)
            scored.append(score(candidate.config, scenario, candidate.adjusted_by))
    device = scenario.target.device
    feasible = sorted((s for s in scored if s.fits), key=lambda s: (s.score_s, _preference(s, scenario)))
    if not feasible:
        smallest = min(scored, key=lambda s: s.estimate.limited_peak(device))
        return Recommendation(scenario, None, [], [], rejected, len(scored), smallest, _advice(smallest, scenario))
    best, quality_note = _choose(feasible, scenario)
    reasons = explain(best, feasible, scenario) + ([quality_note] if quality_note else [])
    return Recommendation(
        scenario,
        best,
        _distinct_alternatives([s for s in feasible if s is not best], best, alternatives),
        reasons + _more_ram(best, scored, scenario),
        rejected,
        len(scored),
    )


def _more_ram(best: Scored, scored: list[Scored], scenario: Scenario) -> list[str]:
    """What a larger host RAM would allow: the fastest candidate held back by RAM alone, if faster."""
    held = [
        s for s in scored
        if s.over == "host RAM" and s.score_s < best.score_s * (1 - TIE)
    ]  # fmt: skip
    if not held:
        return []
    faster = min(held, key=lambda s: s.score_s)
    need = faster.estimate.peak_ram_bytes / RAM_USABLE
    return [
        f"with at least {format_size(need)} of host RAM (--ram), {faster.config.summary()} would be predicted "
        f"{faster.score_s:.1f}s instead of {best.score_s:.1f}s"
    ]


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
        f"fastest of {len(feasible)} candidates predicted to fit (or within {TIE:.0%} of it and preferred by the "
        f"guidance): {result.latency_s:.1f}s per {_unit(scenario)} ({result.step_latency_s:.3f}s per step)"
        + (f", {best.score_s:.1f}s of the job's time per {_unit(scenario)}" if (scenario.images or 1) > 1 else ""),
    ]
    if target.device == "cuda" and result.peak_ram_bytes > target.ram_total_bytes * RAM_WARN:
        if target.ram_assumed:  # not the user's machine: say what to pass
            whose, advice = "the assumed", "pass --ram with your machine's RAM: a plan for less may differ"
        else:
            whose, advice = "the machine's", "close other programs or pass a larger --ram if you have it"
        reasons.append(
            f"warning: host RAM {format_size(result.peak_ram_bytes)} is over {RAM_WARN:.0%} of {whose} "
            f"{format_size(target.ram_total_bytes)}; {advice}"
        )
    pick = _pick_for(best, feasible, scenario)
    for lever in LEVERS:
        reasons += lever.memory_reasons(pick)
    for lever in LEVERS:
        said = lever.reason(pick)
        reasons += [said] if said else []
    reasons += [f"{r.reason} ({r.source})" for r in rules_of("adjust") if r.name in best.adjusted_by]
    for lever in LEVERS:
        reasons += lever.guidance_reasons(pick)
    reasons += fp16_warnings(config, {c.name: c.class_name for c in scenario.profile.components})
    return reasons


def _pick_for(best: Scored, feasible: list[Scored], scenario: Scenario) -> Pick:
    """What the levers' explanations may ask about the pick, answered by the planner."""
    lossy = is_lossy(best.config)

    def rival(check: Callable[[OptimizationConfig], bool]) -> Rival | None:
        alike = [s for s in feasible if check(s.config) and is_lossy(s.config) == lossy]
        found = min(alike, key=lambda s: s.score_s, default=None)
        return None if found is None else Rival(found.config, found.estimate, found.score_s)

    return Pick(
        best.config,
        scenario,
        best.estimate,
        best.score_s,
        lossy,
        TIE,
        lambda config: estimate_for(scenario, config),
        lambda result: result.limited_peak(scenario.target.device),
        lambda name: resident_blocks_that_fit(scenario, best.config, name),
        rival,
    )


def _unit(scenario: Scenario) -> str:
    kind, batch = scenario.workload.kind, scenario.workload.batch
    return f"batch of {batch} {kind}s" if batch > 1 else kind


def _about_half_the_pixels(side: int) -> int:
    """A side 0.7x as long (half the pixels), kept a multiple of 16 (what every catalog pipeline accepts)."""
    return max(side * 7 // 10 // 16 * 16, 16)


def _smaller_job(smallest: Scored, scenario: Scenario) -> str:
    """What halving the pixels (or the batch) would do to the smallest peak: advice with its effect."""
    job = scenario.workload
    if job.batch > 1:
        smaller, what = replace(job, batch=job.batch // 2), f"--batch {job.batch // 2}"
    else:
        height, width = _about_half_the_pixels(job.height), _about_half_the_pixels(job.width)
        smaller, what = replace(job, height=height, width=width), f"{width}x{height}"
    peak = estimate(scenario.profile, smaller, smallest.config, scenario.target).limited_peak(scenario.target.device)
    return f"activations dominate the peak: at {what} it would be {format_size(peak)}"


def _advice(smallest: Scored, scenario: Scenario) -> list[str]:
    """What would make the smallest candidate fit."""
    result, target = smallest.estimate, scenario.target
    advice = []
    peak = result.limited_peak(target.device)
    if peak > scenario.budget_bytes:
        short = peak - scenario.budget_bytes
        advice.append(
            f"the smallest predicted peak is {format_size(peak)} ({smallest.config.summary()}), {format_size(short)} over the budget"
        )
        heavy = max(result.phases, key=lambda p: p.device_bytes)
        if heavy.activation_bytes > sum(heavy.weights_bytes.values()):
            advice.append(_smaller_job(smallest, scenario))
        card = target.vram_total_bytes
        if target.device == "cpu":
            advice.append(
                f"a machine with at least {format_size(peak / RAM_USABLE)} of RAM would fit it, or plan for a GPU with --vram"
            )
        elif scenario.budget_source == "--budget" and smallest_card_for(peak) <= card:
            advice.append(
                f"the card ({format_size(card)}) can hold it: raise --budget to at least {format_size(peak)}"
            )
        else:
            advice.append(f"a GPU with at least {format_size(smallest_card_for(peak))} would fit it")
    if result.peak_ram_bytes > target.ram_available_bytes:
        advice.append(
            f"it needs {format_size(result.peak_ram_bytes)} of host RAM (available: "
            f"{format_size(target.ram_available_bytes)}): add RAM or offload to disk"
        )
    return advice
