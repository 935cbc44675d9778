"""A made-up lever, the whole of what a new technique adds (`tests/test_levers.py` installs it in a copy
of the package): this module as ``advisor/levers/made_up.py``, its config field in `advisor.config`
(``made_up: float | None = None``) and its entry in `advisor.levers`.

It claims to halve the denoiser's work (an estimate term) and turns the progress bars off (an
apply step whose line a generated script shows), so that every part of the advisor that must see a
lever can be checked to see it.
"""

from __future__ import annotations

from typing import Any

from advisor.config import OptimizationConfig
from advisor.levers.base import Lever, Pick, StepContext
from advisor.levers.code import Step, method_step


class MadeUp(Lever):
    name = key = "made_up"
    order = 55  # between the attention backend (50) and step caching (60)
    names = frozenset({"made-up-half"})

    def choices(self, scenario: Any, dtype: str) -> dict[str, float | None]:
        return {self.off_choice: None, "made-up-half": 0.5}

    def compute_share(self, config: OptimizationConfig, step: StepContext) -> float:
        return config.made_up or 1.0

    def reason(self, pick: Pick) -> str | None:
        if pick.config.made_up is None:
            return None
        return f"made-up lever: predicted {pick.latency_s:.1f}s against {pick.without(self):.1f}s without"

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        if config.made_up is None:
            return []
        return [
            method_step(
                "made_up", "made-up lever: no progress bars", None, "set_progress_bar_config", (), {"disable": True}
            )
        ]
