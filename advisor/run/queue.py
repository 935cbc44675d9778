"""What a study measures next, besides what its sampler proposes: the rule engine's picks first, the
points earlier runs left unanswered, and the untried point predicted fastest when the sampler
proposed one already answered (or being measured by another worker)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from advisor.plan.estimate import estimate_for
from advisor.plan.recommend import recommend
from advisor.run.trials import config_key, enqueue, is_seeded, mark_seeded, queued_params


if TYPE_CHECKING:
    from advisor.plan.scenario import Scenario
    from advisor.plan.space import SearchSpace

# Candidates predicted beyond budget x this are skipped without measuring (unless prune=False).
PRUNE_MARGIN = 1.25


def point(params: dict[str, Any]) -> str:
    """A point of the search space as one string (its parameters, keys sorted)."""
    return json.dumps(params, sort_keys=True)


def within_prune_margin(predicted_peak: float, scenario: Scenario) -> bool:
    """Whether a candidate predicted to peak at `predicted_peak` is close enough to the budget to be measured."""
    return predicted_peak <= scenario.budget_bytes * PRUNE_MARGIN


def skipped_by_estimate(predicted_peak: float, scenario: Scenario, prune: bool) -> bool:
    """Whether a study skips the candidate without measuring it (``prune=False`` measures everything)."""
    return prune and not within_prune_margin(predicted_peak, scenario)


def seed_with_rules(study, space: SearchSpace, scenario: Scenario, limit: int) -> None:
    """Enqueue the rule engine's pick and alternatives, at most `limit` (the trials this run measures),
    once per study: seeds beyond them would wait in the queue ahead of what a later run asks for (the
    failed trials --retry-failed measures again)."""
    if is_seeded(study):
        return
    picks = recommend(scenario, compile_choices=tuple(space.compile))  # with --no-compile, seeds without it
    candidates = ([picks.best] if picks.best else []) + picks.alternatives
    if not candidates and picks.smallest:
        candidates = [picks.smallest]
    seeds = [params for scored in candidates if (params := space.params_of(scored.config))]
    for params in seeds[:limit]:
        enqueue(study, params, "rules", skip_if_exists=True)
    mark_seeded(study)


def waiting(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))


def enqueue_retries(study, stale: set[int], answered: set[str]) -> None:
    """Queue each point not `answered` whose trials are stale (failed in an earlier run) or never
    finished (killed or interrupted: optuna's FAIL), unless it is queued."""
    import optuna

    queued = {point(queued_params(t)) for t in waiting(study)}
    retry = []
    for t in study.get_trials(deepcopy=False):
        at = point(t.params) if t.params else None
        unanswered = t.number in stale or t.state == optuna.trial.TrialState.FAIL
        if unanswered and at and at not in answered and at not in queued:
            queued.add(at)
            retry.append(t.params)
    for params in retry:
        enqueue(study, params, "retry")


def enqueue_fastest_untried(study, space: SearchSpace, scenario: Scenario, answered: set[str], busy: set[str]) -> None:
    """Queue the point predicted fastest of those neither `answered` nor being measured (`busy`
    configuration keys), unless something is queued already."""
    if waiting(study):
        return
    untried = [p for p in space.points() if point(p) not in answered and _key_of(space, p, scenario) not in busy]
    if untried:
        enqueue(study, min(untried, key=lambda p: _predicted_latency(space, p, scenario)), "untried")


def _key_of(space: SearchSpace, params: dict[str, Any], scenario: Scenario) -> str:
    return config_key(space.candidate(params, scenario).config.to_dict(exclude_none=False))


def _predicted_latency(space: SearchSpace, params: dict[str, Any], scenario: Scenario) -> float:
    candidate = space.candidate(params, scenario)
    if candidate.rejected_by:
        return float("inf")
    result = estimate_for(scenario, candidate.config)
    return (
        result.latency_s
        if within_prune_margin(result.limited_peak(scenario.target.device), scenario)
        else float("inf")
    )
