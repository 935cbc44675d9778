"""The diffusers guidance as small named rules: what is never worth it, how to finish a candidate, how to break ties.

Three kinds of rule, each a small function ``(config, scenario)`` with the reason the user reads
and its source:

- **filter** rules reject candidates that could run but are never worth it (int8/fp8 dynamic
  quantization without compile, ...); they return why, or None. What *cannot* run is a constraint
  (`advisor.constraints`), checked before these;
- **adjust** rules complete a candidate the way the guidance says (dynamo flags for compile with
  bitsandbytes or offloading, VAE tiling when the decode dominates, ...); they return a new config;
- **prefer** rules break near-ties the way the guidance says (images: model offload over group
  offload; video: the reverse: `advisor.levers.offload`); they return a rank, 0 first.

A rule about one lever lives in the lever's module (`advisor.levers`); `every_rule` gathers them.

The engine that uses them is `advisor.plan.recommend`; docs/rules.md lists them all
(``python scripts/build_rules_doc.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from advisor.config import OptimizationConfig
from advisor.constraints import DOCS, fullgraph_breaks_on_offload_hooks, named
from advisor.levers import LEVERS
from advisor.levers.offload import OFFLOAD
from advisor.plan.estimate import estimate_for
from advisor.plan.quality import is_lossy


if TYPE_CHECKING:
    from advisor.plan.scenario import Scenario

SEED_PAGE = f"{DOCS}/speed-memory-optims"
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
    if q is None or q.kind not in {"int8_dynamic", "float8_dynamic"}:
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


# --- adjust rules -------------------------------------------------------------------------------


@rule(
    "dynamo-capture-for-bitsandbytes",
    "adjust",
    "compiling a bitsandbytes model needs torch._dynamo.config.capture_dynamic_output_shape_ops = True",
    SEED_PAGE,
)
def dynamo_capture_for_bitsandbytes(config: OptimizationConfig, scenario: Scenario) -> OptimizationConfig:
    if config.compile and config.quantization and config.quantization.backend.startswith("bitsandbytes"):
        return _with_compile(
            config, dynamo_config={**config.compile.dynamo_config, "capture_dynamic_output_shape_ops": True}
        )
    return config


def _with_compile(config: OptimizationConfig, **changes: Any) -> OptimizationConfig:
    """`config` with some of its compile settings changed."""
    return config.replace(compile=config.compile.replace(**changes))


@rule(
    "dynamo-cache-limit-with-offload",
    "adjust",
    "compiling with offloading raises torch._dynamo.config.cache_size_limit to 1000 to avoid recompiling "
    "as weights move",
    SEED_PAGE,
)
def dynamo_cache_limit_with_offload(config: OptimizationConfig, scenario: Scenario) -> OptimizationConfig:
    if config.compile and OFFLOAD.is_on(config):
        return _with_compile(config, dynamo_config={**config.compile.dynamo_config, "cache_size_limit": 1000})
    return config


@rule(
    "no-fullgraph-with-offload-hooks",
    "adjust",
    named("fullgraph-breaks-on-offload-hooks").reason,
    SEED_PAGE,
)
def no_fullgraph_with_offload_hooks(config: OptimizationConfig, scenario: Scenario) -> OptimizationConfig:
    if fullgraph_breaks_on_offload_hooks(config, scenario.platform):
        return _with_compile(config, fullgraph=False)
    return config
