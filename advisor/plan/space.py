"""The candidate configurations: quantization x offload x compile (x each lever), one object for recommend, tune and the GPU kit.

A point of the space is a name per dimension (``{"quantization": "nf4[transformer]", "offload":
"model", "compile": True}``, plus each lever's dimension, ``"attention"`` or ``"cache"``, where it
holds a choice: `advisor.levers`): optuna suggests them, the rule engine walks them all.
`SearchSpace.candidate` turns a point into the finished config (`finish`: the adjust rules complete
it) and says which constraint or filter rule rejects it (`rejection`: "the first rule that fires"
lives here, and only here).

>>> from advisor.probe.models import load_profile
>>> space = SearchSpace.for_profile(load_profile("flux-dev"), device="cuda")
>>> space.size()
176
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from advisor.config import Compile, LayerwiseCasting, Offload, OptimizationConfig, Quantization
from advisor.constraints import first_violation
from advisor.levers import LEVERS, searched_levers
from advisor.levers.offload import OFFLOAD, PARTIAL_STEP, fitted_choice, partial_offset
from advisor.levers.quantization import QUANTIZATION
from advisor.levers.torch_compile import COMPILE
from advisor.plan.estimate import resident_blocks_that_fit
from advisor.plan.rules import rules_of
from advisor.probe.layout import has_repeated_blocks
from advisor.probe.models import ModelProfile


if TYPE_CHECKING:
    from advisor.plan.scenario import Scenario

# Text encoders smaller than this are not worth quantizing (CLIP-L is 0.12 B parameters).
LARGE_TEXT_ENCODER = 1_000_000_000


def repaired_by_adjust() -> set[str]:
    """The constraints an adjust rule repairs (no-fullgraph-with-offload-hooks sets fullgraph=False):
    judged on the finished candidate only."""
    return {adjust.repairs for lever in LEVERS for adjust in lever.adjusts if adjust.repairs}


StorageChoice = tuple[Quantization | None, LayerwiseCasting | None]


def quantization_choices(profile: ModelProfile) -> list[StorageChoice]:
    """Which components to quantize, and how: the denoisers and large text encoders, never the VAE."""
    denoisers = [c.name for c in profile.by_role("denoiser")]
    encoders = [c.name for c in profile.by_role("text_encoder") if c.parameters >= LARGE_TEXT_ENCODER]
    both = denoisers + encoders
    choices: list[StorageChoice] = [(None, None)]
    for components in [denoisers, both] if encoders else [denoisers]:
        choices += [(q, None) for q in QUANTIZATION.choices_for(components, profile.model_id)]
        choices += [(None, LayerwiseCasting(components=components))]
    return choices


def preferred_dtype(device: str, supports_bf16: bool) -> str:
    """bf16 where the hardware computes it natively; else fp16 on older GPUs and fp32 on CPUs."""
    if supports_bf16:
        return "bfloat16"
    return "float16" if device == "cuda" else "float32"


def storage_name(quantization: Quantization | None, casting: LayerwiseCasting | None) -> str:
    if quantization:
        return f"{quantization.kind}[{'+'.join(quantization.components)}]"
    if casting:
        return f"fp8-storage[{'+'.join(casting.components)}]"
    return "none"


def rejection(config: OptimizationConfig, scenario: Scenario) -> str | None:
    """The name of the first constraint or filter rule that rejects a finished `config`, or None."""
    violation = first_violation(config, scenario.platform)
    if violation is not None:
        return violation.constraint.name
    return next((f.name for f in rules_of("filter") if f.evaluate(config, scenario)), None)


def finish(config: OptimizationConfig, scenario: Scenario) -> tuple[OptimizationConfig, list[str]]:
    """Apply every adjust rule; return the finished config and the rules that changed it."""
    fired = []
    for adjust in rules_of("adjust"):
        adjusted = adjust.evaluate(config, scenario)
        if adjusted is not config and adjusted != config:  # a rule that does nothing returns its config
            fired.append(adjust.name)
        config = adjusted
    return config, fired


@dataclass(frozen=True)
class Candidate:
    """A finished point of the space: its config, the adjust rules that completed it, and its rejection."""

    params: dict[str, Any]
    config: OptimizationConfig
    adjusted_by: list[str]
    rejected_by: str | None


@dataclass
class SearchSpace:
    """Named choices per dimension for one model on one kind of device."""

    profile: ModelProfile
    device: str
    dtype: str
    quantization: dict[str, StorageChoice]
    offload: dict[str, Offload]
    compile: list[bool]
    # Each searched lever's dimension (`advisor.levers`): choice name -> the value it sets in the
    # config. A point names a lever only where it holds two or more choices (`optional_dimensions`).
    levers: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {lever.name: {lever.off_choice: None} for lever in searched_levers()}
    )

    @classmethod
    def for_profile(
        cls,
        profile: ModelProfile,
        *,
        device: str,
        supports_bf16: bool = True,
        compile_choices: tuple[bool, ...] = (True, False),
        gpus: int = 1,
    ) -> SearchSpace:
        quantization = {storage_name(q, c): (q, c) for q, c in quantization_choices(profile)}
        offload = OFFLOAD.choices_for(profile, device, gpus=gpus)
        return cls(
            profile, device, preferred_dtype(device, supports_bf16), quantization, offload, list(compile_choices)
        )

    @classmethod
    def for_scenario(cls, scenario: Scenario, *, compile_choices: tuple[bool, ...] = (True, False)) -> SearchSpace:
        target = scenario.target
        space = cls.for_profile(
            scenario.profile,
            device=target.device,
            supports_bf16=target.supports_bf16,
            compile_choices=compile_choices,
            gpus=target.gpu_count,
        )
        space.levers = {lever.name: lever.choices(scenario, space.dtype) for lever in searched_levers()}
        return space

    def usable(self, scenario: Scenario) -> SearchSpace:
        """The space without choices that no candidate can use on this target (what tune searches),
        nor checkpoints a trial would first have to download (a GGUF file not in the Hub's cache:
        gigabytes per candidate that a plan only names)."""

        def usable_alone(probe: OptimizationConfig) -> bool:
            return rejection(probe, scenario) in (None, *repaired_by_adjust())

        quantization = {
            name: (q, c)
            for name, (q, c) in self.quantization.items()
            if not (q is not None and QUANTIZATION.needs_download(q))
            and usable_alone(
                OptimizationConfig(device=self.device, quantization=q, layerwise_casting=c, compile=Compile())
            )
        }
        offload = {
            name: o
            for name, o in self.offload.items()
            if usable_alone(OptimizationConfig(device=self.device, offload=o))
        }
        return SearchSpace(
            self.profile,
            self.device,
            self.dtype,
            quantization,
            offload,
            list(self.compile),
            {name: dict(choices) for name, choices in self.levers.items()},
        )

    def config(self, params: dict[str, Any]) -> OptimizationConfig:
        """The point's config before the adjust rules complete it."""
        quantization, casting = self.quantization[params["quantization"]]
        compiled = COMPILE.choice_for(self.profile, has_repeated_blocks) if params["compile"] else None
        return OptimizationConfig(
            dtype=self.dtype,
            device=self.device,
            quantization=quantization,
            layerwise_casting=casting,
            offload=self.offload[params["offload"]],
            compile=compiled,
            **{
                lever.key: self.levers[lever.name][params.get(lever.name, lever.off_choice)]
                for lever in searched_levers()
            },
        )

    def candidate(self, params: dict[str, Any], scenario: Scenario) -> Candidate:
        raw = self.config(params)
        # Most rejections are known before the adjust rules run (they cost estimates); only what
        # an adjust rule repairs is judged on the finished config.
        early = rejection(raw, scenario)
        if early is not None and early not in repaired_by_adjust():
            return Candidate(params, raw, [], early)
        config, fired = finish(raw, scenario)
        offset = partial_offset(params["offload"])
        if offset is not None:
            config = self._fitted(config, scenario, offset)
        return Candidate(params, config, fired, rejection(config, scenario))

    def _fitted(self, config: OptimizationConfig, scenario: Scenario, offset: int) -> OptimizationConfig:
        """`config` keeping resident the most blocks that fit the budget, or a tenth of the blocks
        more (offset 1) or fewer (-1)."""
        counts = {}
        for name in config.offload.resident_blocks:
            total = sum(b.count for b in next(c for c in self.profile.components if c.name == name).blocks)
            fit = resident_blocks_that_fit(scenario, config, name)
            counts[name] = min(max(fit + offset * max(1, round(PARTIAL_STEP * total)), 1), total - 1)
        return config.replace(offload=config.offload.replace(resident_blocks=counts))

    def params_of(self, config: OptimizationConfig) -> dict[str, Any] | None:
        """The point that produces `config` (to enqueue the rule engine's picks in a study)."""
        quantization = next(
            (
                n
                for n, (q, c) in self.quantization.items()
                if q == config.quantization and c == config.layerwise_casting
            ),
            None,
        )
        offload = next((n for n, o in self.offload.items() if o == config.offload), None)
        if offload is None:  # a partial offload's count is fitted when the point is finished
            offload = fitted_choice(config)
        compiled = config.compile is not None
        optional = {
            lever.name: next((c for c, value in self.levers[lever.name].items() if value == lever.value(config)), None)
            for lever in searched_levers()
        }
        if quantization is None or offload is None or compiled not in self.compile or None in optional.values():
            return None
        return {
            "quantization": quantization,
            "offload": offload,
            "compile": compiled,
            **{name: value for name, value in optional.items() if name in self.optional_dimensions()},
        }

    def choices(self, name: str) -> list[str]:
        """The choices of lever dimension `name`."""
        return list(self.levers[name])

    def optional_dimensions(self) -> dict[str, list[str]]:
        """The lever dimensions a point names only where they hold a choice."""
        return {name: list(choices) for name, choices in self.levers.items() if len(choices) > 1}

    def size(self) -> int:
        return (
            len(self.quantization)
            * len(self.offload)
            * len(self.compile)
            * math.prod(len(c) for c in self.levers.values())
        )

    def points(self) -> Iterator[dict[str, Any]]:
        optional = self.optional_dimensions()
        for q, o, c, *rest in itertools.product(self.quantization, self.offload, self.compile, *optional.values()):
            yield {"quantization": q, "offload": o, "compile": c, **dict(zip(optional, rest))}
