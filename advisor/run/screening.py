"""Before a tune trial spends a process on a GPU configuration: rehearse it on a virtual GPU.

A trial loads the real weights (minutes for a large model) before a device or dtype mix crashes its
first matmul. The rehearsal (`advisor.rehearse`) runs the same config through the real diffusers
hooks at full size with no weights, in seconds, and names the op that would fail: such a config is
answered without a trial process. It says nothing about speed, and its memory is a prediction, so a
config it passes is measured as before.

torch and diffusers are imported by the rehearsal only, when a GPU config is screened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig
    from advisor.plan.scenario import Scenario


REFUSED = "rehearsed on a virtual GPU, the card would refuse it"


@dataclass(frozen=True)
class Screening:
    """What rehearsing a config said before its trial: `refusal`, the one line why the card would
    refuse it (then it is not measured); `note`, what the rehearsal could not run (then it is
    measured, and the note says nothing was claimed)."""

    refusal: str | None = None
    note: str | None = None


def screen(scenario: Scenario, config: OptimizationConfig) -> Screening:
    """Rehearse `config` for `scenario`'s workload on a virtual copy of its GPU; CPU configs pass
    unrehearsed (a CPU runs what it is given: there is no second device to mix)."""
    if not config.device.startswith("cuda"):
        return Screening()
    from advisor.rehearse.build import rehearse_planned

    try:
        rehearsal = rehearse_planned(
            scenario.profile, scenario.workload, config, scenario.target, scenario.budget_bytes
        )
    except Exception as error:  # a rehearsal bug must not cost the trial: it is measured, and says why
        return Screening(note=f"not rehearsed ({type(error).__name__}: {error})")
    if rehearsal.failure:
        return Screening(refusal=f"{REFUSED}: {rehearsal.failure}")
    if rehearsal.not_rehearsed:
        return Screening(note=f"not rehearsed: {rehearsal.not_rehearsed}")
    return Screening()
