"""`advisor recommend` as data: the rule engine's pick for a model, workload and target, with provenance.

Kept apart from the CLI so code (and tests) get the same result the command prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from advisor import __version__
from advisor.config import OptimizationConfig, Provenance
from advisor.plan.rules import Recommendation, recommend
from advisor.probe.hardware import MachineProfile
from advisor.probe.models import ModelProfile
from advisor.probe.target import TargetHardware
from advisor.probe.workload import Workload


@dataclass
class RecommendResult:
    model: str
    profile: ModelProfile
    workload: Workload
    target: TargetHardware
    budget_bytes: int
    recommendation: Recommendation
    config: OptimizationConfig | None  # the pick with provenance; None when nothing fits
    notes: list[str] = field(default_factory=list)

    @property
    def advice(self) -> list[str]:
        return self.recommendation.advice

    def to_dict(self) -> dict[str, Any]:
        """The documented `advisor recommend --json` object (docs/recommend.md)."""
        best = self.recommendation.best
        smallest = self.recommendation.smallest
        return {
            "model": self.model,
            "pipeline_class": self.profile.pipeline_class,
            "workload": self.workload.to_dict(),
            "hardware": self.target.to_dict(),
            "budget_bytes": self.budget_bytes,
            "fits": self.config is not None,
            "config": self.config.model_dump(mode="json", exclude_none=True) if self.config else None,
            "summary": self.config.summary() if self.config else None,
            "estimate": best.to_dict()["estimate"] if best else None,
            "reasons": self.recommendation.reasons,
            "alternatives": [a.to_dict() for a in self.recommendation.alternatives],
            "smallest": smallest.to_dict() if smallest else None,
            "advice": self.advice,
            "candidates": self.recommendation.candidates,
            "rejected": self.recommendation.rejected,
            "notes": self.notes,
        }


def make_recommendation(
    profile: ModelProfile,
    workload: Workload,
    target: TargetHardware,
    *,
    machine: MachineProfile | None,
    budget_bytes: int | None = None,
    compile_choices: tuple[bool, ...] = (True, False),
) -> RecommendResult:
    """Run the rule engine; `machine` is this machine's probe when planning for it (else None)."""
    notes = []
    if machine is not None and not machine.gpus:
        notes.append(
            "no CUDA GPU found on this machine: planning CPU inference. To plan for a GPU, pass "
            "--vram 24GB or --gpu 'RTX 4090'"
        )
    packages = machine.software.packages if machine is not None else None
    recommendation = recommend(
        profile, workload, target, packages=packages, budget_bytes=budget_bytes, compile_choices=compile_choices
    )
    config = None
    if recommendation.best is not None:
        best = recommendation.best
        config = best.config.model_copy(
            update={
                "provenance": Provenance(
                    made_by="recommend",
                    model=profile.model_id,
                    pipeline_class=profile.pipeline_class,
                    components=[c.name for c in profile.components],
                    workload=workload.to_dict(),
                    gpu_name=target.name if target.device == "cuda" else None,
                    vram_bytes=target.vram_total_bytes or None,
                    budget_bytes=recommendation.budget_bytes,
                    packages={"advisor": __version__, **(packages or {})},
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    estimate=best.to_dict()["estimate"],
                )
            }
        )
    return RecommendResult(
        model=profile.model_id,
        profile=profile,
        workload=workload,
        target=target,
        budget_bytes=recommendation.budget_bytes,
        recommendation=recommendation,
        config=config,
        notes=notes,
    )
