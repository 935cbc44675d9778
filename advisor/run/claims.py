"""Workers of one study never measure one configuration twice: a trial claims its configuration first.

Two workers can be handed the same configuration at once: both took a queued seed, or the sampler
proposed, to each, the configuration the other is measuring. Optuna's storages have no
compare-and-set, so a trial claims the configuration in its user attributes (`set_claim`), then
looks at the live running trials of the study that claim it too:

- a lower-numbered claim wins, unless that trial has given the configuration up;
- a higher-numbered one has either measured already (it won: it looked before this claim was there)
  or will see this claim and give up; this trial waits the moment it takes that one to say which.

The one that wins marks its claim ``measuring``; the others mark theirs ``yielded`` and the tuner
moves on to another configuration. No trial waits on a lower-numbered one, so the waiting ends.
"""

from __future__ import annotations

import time

from advisor.run.storage import runner_alive
from advisor.run.trials import ClaimState, claim_of, claim_state, runner_of, set_claim


WAIT_S = 30.0  # for a higher-numbered claim to resolve; it takes one storage read


def claim(trial, key: str, poll_s: float = 0.1) -> bool:
    """Claim configuration `key` for `trial`; False when another live trial has it (this one yields)."""
    set_claim(trial, key, ClaimState.CLAIMED)
    deadline = time.monotonic() + WAIT_S
    while True:
        rivals = [
            t
            for t in _live_claims(trial.study, trial.number)
            if claim_of(t) == key and claim_state(t) != ClaimState.YIELDED
        ]
        won = not any(t.number < trial.number or claim_state(t) == ClaimState.MEASURING for t in rivals)
        undecided = any(t.number > trial.number and claim_state(t) == ClaimState.CLAIMED for t in rivals)
        if not won or not undecided or time.monotonic() > deadline:
            won = won and not undecided  # past the wait, a rival that never decided keeps the configuration
            set_claim(trial, key, ClaimState.MEASURING if won else ClaimState.YIELDED)
            return won
        time.sleep(poll_s)


def busy_keys(study, number: int) -> set[str]:
    """The configurations that live trials other than `number` are measuring now."""
    return {claim_of(t) for t in _live_claims(study, number) if claim_state(t) == ClaimState.MEASURING}


def _live_claims(study, number: int) -> list:
    """The running trials other than `number`, of tuners that may still run them, that claim a configuration."""
    import optuna

    return [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if t.number != number and claim_of(t) is not None and runner_alive(runner_of(t))
    ]
