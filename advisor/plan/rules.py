"""The diffusers guidance as small named rules: what is never worth it, how to finish a candidate, how to break ties.

Three kinds of rule, each a small function ``(config, scenario)`` with the reason the user reads
and its source:

- **filter** rules reject candidates that could run but are never worth it (int8/fp8 dynamic
  quantization without compile, ...); they return why, or None. What *cannot* run is a constraint
  (`advisor.constraints`), checked before these;
- **adjust** rules complete a candidate the way the guidance says (dynamo flags for compile with
  bitsandbytes or offloading: `advisor.levers.torch_compile`; VAE tiling when the decode
  dominates: `advisor.levers.vae`, ...); they return a new config;
- **prefer** rules break near-ties the way the guidance says (images: model offload over group
  offload; video: the reverse: `advisor.levers.offload`); they return a rank, 0 first.

A rule about one lever lives in the lever's module (`advisor.levers`); those written here weigh
several (a dynamic quantization scheme and compile; the quality policy and every lever);
`every_rule` gathers them all.

The engine that uses them is `advisor.plan.recommend`; docs/rules.md lists them all
(``python scripts/build_rules_doc.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from advisor.config import OptimizationConfig
from advisor.levers import LEVERS
from advisor.levers.quantization import backend_of
from advisor.plan.estimate import estimate_for
from advisor.plan.quality import is_lossy


if TYPE_CHECKING:
    from advisor.plan.scenario import Scenario

# Candidates within this share of the fastest count as a tie for the prefer rules.
TIE = 0.05

RuleKind = Literal["filter", "adjust", "prefer"]


@dataclass(frozen=True)
class Rule:
    name: str
    kind: RuleKind
    reason: str
    source: str
    evaluate: Callable[..., Any]  # (config, scenario) -> reason | None, a config, or a rank (0 best)


RULES: list[Rule] = []


def rule(name: str, kind: RuleKind, reason: str, source: str) -> Callable:
    """Register a rule; the decorated function keeps working on its own (for tests)."""

    def register(fn: Callable) -> Callable:
        RULES.append(Rule(name, kind, reason, source, fn))
        return fn

    return register


def every_rule() -> list[Rule]:
    """Every rule: those written here, then the levers' filters (what the planner never combines with
    a lever), adjusts (how it completes a candidate with one) and prefers (how it breaks a near-tie
    between them; `advisor.levers`), in the levers' order."""
    return [
        *RULES,
        *(Rule(f.name, "filter", f.reason, f.source, f.check) for lever in LEVERS for f in lever.filters),
        *(
            Rule(a.name, "adjust", a.reason, a.source, _with_estimate(a.apply))
            for lever in LEVERS
            for a in lever.adjusts
        ),
        *(Rule(p.name, "prefer", p.reason, p.source, p.rank) for lever in LEVERS for p in lever.prefers),
    ]


def _with_estimate(
    apply: Callable[..., OptimizationConfig],
) -> Callable[[OptimizationConfig, Scenario], OptimizationConfig]:
    """A lever's adjust as a rule ``(config, scenario)``: it gets the scenario's estimate of any config."""
    return lambda config, scenario: apply(config, scenario, lambda other: estimate_for(scenario, other))


def rules_of(kind: RuleKind) -> list[Rule]:
    """The rules of `kind`, in the order they are evaluated."""
    return [r for r in every_rule() if r.kind == kind]


# --- filter rules -------------------------------------------------------------------------------


@rule(
    "dynamic-quantization-needs-compile",
    "filter",
    "int8/fp8 dynamic quantization without torch.compile is slower than not quantizing at all "
    "(Flux on H100: 130 s uncompiled vs 3.4 s compiled), so it is only offered on compiled components",
    "https://github.com/huggingface/diffusers/blob/main/docs/source/en/quantization/torchao.md",
)
def dynamic_quantization_needs_compile(config: OptimizationConfig, scenario: Scenario) -> str | None:
    q = config.quantization
    if q is None or not backend_of(q).quantizes_activations(q):
        return None
    compiled = set(config.compile.components) if config.compile else set()
    uncompiled = [name for name in q.components if name not in compiled]  # per component: a text encoder too
    if uncompiled:
        return f"{q.kind} is never worth it without torch.compile, and {', '.join(uncompiled)} is not compiled"
    return None


@rule(
    "exact-quality-is-lossless",
    "filter",
    "--quality exact never proposes lossy storage or compute (nf4, int8, fp8 weights or activations, int8 "
    "attention, step caching)",
    "https://huggingface.co/docs/diffusers/main/en/quantization/overview",
)
def exact_quality_is_lossless(config: OptimizationConfig, scenario: Scenario) -> str | None:
    if scenario.quality == "exact" and is_lossy(config):
        return "lossy, and --quality exact asks for none"
    return None
