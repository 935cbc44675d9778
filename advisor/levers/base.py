"""What a lever is: one technique, everything the advisor knows about it, behind one interface.

A lever owns one section of the config (`key`) and one dimension of the search space (`name`). The
search space, the estimate, the explanation, the quality policy, the constraints and the apply
steps ask every lever (`advisor.levers.LEVERS`) instead of branching on its choices, the way
diffusers' hooks are built (``diffusers/hooks/first_block_cache.py``: a config dataclass, a check,
an apply function, private workers). A method a lever does not override leaves the config as it is.

What each part of the advisor asks, and when:

- `choices`: the search space (`advisor.plan.space`), once per scenario: choice name -> config value;
- `constraints`: what cannot run where (`advisor.constraints`), `filters`: what the planner never
  combines (`advisor.plan.rules`; a combination with another lever is judged from the config),
  `adjusts`: how the planner completes a candidate with this lever (given the estimate), `prefers`:
  how it breaks near-ties the way the guidance says;
- `stored_bytes`: a component's weight bytes where the lever stores them, `adapter_bytes` what it adds
  beside them (`advisor.plan.weights`); `call_work`: what it adds to a denoiser call (`advisor.plan.compute`);
  `warmup_s`: one-off seconds at the first call; `compute_share`, `attention_speedup`,
  `per_call_written_bytes`, `per_call_host_seconds`: the latency (`advisor.plan.latency`), per device;
  `held_bytes`: device memory held from step to step (`advisor.plan.compute`), per device;
  `decode_mode`: how the VAE decodes (tiled, sliced), which the decode's memory follows;
  `activation_share`: the share of a phase's activations each GPU holds, `link_seconds`: what a
  denoiser call waits on the link between GPUs, `processes`: the processes a run takes (each loads
  the pipeline into host RAM), `generations_at_once`: how many generations run side by side (one
  pipeline per GPU), per device (`advisor.levers.multi_gpu`);
- `lossy`, `quality_cost`: the quality policy (`advisor.plan.quality`);
- `memory_reasons`, `reason`, `guidance_reasons`: the lines `advisor recommend` explains the pick
  with (`advisor.plan.recommend`): what the lever does to its memory, to its speed, and how the
  guidance weighs it against a rival choice; the planner answers their questions (`Pick`);
  `summary_note`: what the one-line summary of a config adds for it (`advisor.run.steps.summary`);
- `loading`: what it adds to ``from_pretrained`` (`advisor.run.quantize`: the object, and the code a
  script shows);
- `process_steps`: what the process sets before torch starts CUDA (first in a script, before
  loading in `advisor.run.apply`);
- `steps`: the post-load steps, run by `advisor.run.apply` and printed by `advisor.run.emit`, at
  the lever's `order` among the others (`advisor.run.steps`), and `final_steps` after them
  all; `pipeline_problem`: what makes a loaded pipeline refuse it (`advisor.run.checks`).

Pure Python at import: torch and diffusers only inside a step's ``run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig
    from advisor.levers.code import Step
    from advisor.platform import Constraint


@dataclass(frozen=True)
class StepContext:
    """One denoising step on one device, as the estimate sees it: what a lever's latency terms need."""

    device: str  # "cuda" or "cpu"
    capability: float  # the GPU's compute capability; 0 on a CPU
    steps: int  # the workload's denoising steps
    denoiser_class: str  # the denoiser's class name (a lever's facts are often per class)
    link_bytes_per_s: float = 0.0  # what one GPU sends the others per second (`TargetHardware.link`); 0: one GPU
    attention_layers: int = 0  # the denoiser's blocks: one sequence-wide attention each
    # The share of its attention FLOPs in calls given a mask (its trace says): no flash kernel takes one.
    masked_attention_share: float = 0.0


@dataclass(frozen=True)
class ActivationShape:
    """One denoiser call's activations on a device: what a lever's held bytes are made of."""

    batch: int  # samples per call (guidance batched in doubles it)
    calls: int  # calls per step (guidance run as a second call: 2)
    tokens: int
    hidden: int  # the denoiser's hidden width
    out_channels: int  # its output channels (what it returns per token)
    dtype_bytes: int  # bytes per element at the compute dtype
    # The tokens a Linear layer sees, weighted by its weights: the call's traced matmul FLOPs over
    # 2 x its Linear weights (a UNet's widest layers run at its lowest resolutions); 0: `tokens`.
    linear_tokens: float = 0.0


@dataclass(frozen=True)
class DecodeMode:
    """How the VAE decodes, which its activations follow (`advisor.plan.compute`)."""

    tiled: bool = False  # in tiles of the VAE's sample size (and of 16 frames for video)
    sliced: bool = False  # one sample of the batch at a time


@dataclass(frozen=True)
class Loading:
    """What a lever adds to ``from_pretrained``: a keyword and its value, as the code a script shows
    (`imports`, then `code` assigning `variable`; a literal is its own `variable`, with no `code`)
    and as the object itself (`build`)."""

    keyword: str
    variable: str
    imports: tuple[str, ...]
    code: str
    build: Callable[[], Any]


@dataclass(frozen=True)
class Rival:
    """A candidate the pick is explained against: its config, estimate and score (`Pick.score_s`)."""

    config: OptimizationConfig
    estimate: Any  # `advisor.plan.estimate.Estimate`
    score_s: float


@dataclass(frozen=True)
class Pick:
    """The pick `advisor recommend` explains, and what a lever's explanation may ask the planner
    about it (the levers import nothing from the planner: `advisor.plan.recommend` builds this)."""

    config: OptimizationConfig
    scenario: Any  # `advisor.plan.scenario.Scenario`
    estimate: Any  # its `advisor.plan.estimate.Estimate`
    score_s: float  # what candidates are ranked by: the latency and its share of the one-off warm-up
    lossy: bool
    tie: float  # the share within which the guidance's preferences decide between candidates
    predict: Callable[[OptimizationConfig], Any]  # the estimate of another config for the same scenario
    peak: Callable[[Any], int]  # an estimate's peak on the target device (what the budget limits)
    resident_blocks_that_fit: Callable[[str], int]  # the most blocks of a component that fit the budget
    # The best-scored candidate that fits, is as lossy as the pick and passes the check; None where
    # there is none.
    rival: Callable[[Callable[[OptimizationConfig], bool]], Rival | None]

    @property
    def latency_s(self) -> float:
        return self.estimate.latency_s

    def without(self, lever: Lever) -> float:
        """The predicted seconds without `lever` (an estimate: ask only where it is said)."""
        return self.predict(lever.off(self.config)).latency_s


@dataclass(frozen=True)
class Filter:
    """A combination the planner never proposes, though it could run (a filter rule of
    `advisor.plan.rules`): its name, the reason and source a user reads, and the check."""

    name: str
    reason: str
    source: str
    check: Callable[[OptimizationConfig, Any], str | None]  # (config, scenario) -> why, or None


@dataclass(frozen=True)
class Adjust:
    """How the planner completes a candidate with a lever (an adjust rule of `advisor.plan.rules`): its
    name, the reason and source a user reads, and the change."""

    name: str
    reason: str
    source: str
    # (config, scenario, predict) -> the config, changed or not; predict(config) is the estimate of
    # another config for the same scenario (`advisor.plan.estimate.Estimate`)
    apply: Callable[[OptimizationConfig, Any, Callable[[OptimizationConfig], Any]], OptimizationConfig]
    repairs: str | None = None  # the constraint it repairs: the space judges such a candidate once it is finished


@dataclass(frozen=True)
class Prefer:
    """How the planner breaks a near-tie between candidates that differ in this lever (a prefer rule
    of `advisor.plan.rules`): its name, the reason and source a user reads, and the rank (0 first)."""

    name: str
    reason: str
    source: str
    rank: Callable[[OptimizationConfig, Any], int]  # (config, scenario) -> rank, 0 first


class Lever:
    """One technique. Subclass it in its own module and list it in `advisor.levers.LEVERS`."""

    name: str  # its dimension in a point of the search space (stored in studies: never rename)
    key: str  # the config field it owns
    order: int  # where its steps run among the levers' (and where its rules, reasons and notes are listed)
    off_choice: str = "none"  # the choice that leaves the config as it is
    # Whether the search space has an optional dimension for it; the storage (quantization, layerwise
    # casting), offload and compile dimensions are in every point, and the other levers' adjusts decide them.
    searched: bool = True
    # Every name of its choices, as the space and the config spell them: no other module but the
    # config schema's may name one (`tests/test_ownership.py`). "none" is every lever's off choice.
    names: frozenset[str] = frozenset()
    constraints: tuple[Constraint, ...] = ()
    filters: tuple[Filter, ...] = ()
    adjusts: tuple[Adjust, ...] = ()
    prefers: tuple[Prefer, ...] = ()

    # --- the config section --------------------------------------------------------------------

    def value(self, config: OptimizationConfig) -> Any:
        return getattr(config, self.key)

    def is_on(self, config: OptimizationConfig) -> bool:
        return self.value(config) is not None

    def off(self, config: OptimizationConfig) -> OptimizationConfig:
        """`config` without this lever (its field at the default)."""
        return config.replace(**{self.key: None})

    def work_key(self, config: OptimizationConfig) -> Any:
        """What of this lever changes a phase's work (a memo key): nothing by default."""
        return None

    # --- the search space ----------------------------------------------------------------------

    def choices(self, scenario: Any, dtype: str) -> dict[str, Any]:
        """Choice name -> the config value it sets, for `scenario` at compute `dtype`; the first is
        the off choice. Only the off choice by default."""
        return {self.off_choice: None}

    # --- cost terms ----------------------------------------------------------------------------

    def stored_bytes(self, config: OptimizationConfig, component: Any, compute_bytes: int, k: dict) -> float | None:
        """Bytes of `component`'s weights (`advisor.probe.models.ComponentProfile`) as this lever stores
        them, those kept in fp32 aside, with `compute_bytes` per parameter at the compute dtype and the
        estimate's constants `k`; None where it does not store that component."""
        return None

    def adapter_bytes(self, config: OptimizationConfig, component: Any, compute_bytes: int) -> float:
        """Bytes the lever adds beside `component`'s weights, loaded, placed and moved with them (a
        LoRA's adapters), with `compute_bytes` per parameter at the compute dtype: none by default."""
        return 0.0

    def call_work(self, config: OptimizationConfig, component: Any, shape: ActivationShape) -> tuple[float, float]:
        """(matmul FLOPs, bytes written by memory-bound ops) the lever adds to one call of the denoiser
        `component` on `shape`'s activations (a LoRA's unfused matmuls): none by default."""
        return 0.0, 0.0

    def warmup_s(self, config: OptimizationConfig, profile: Any, k: dict) -> float:
        """One-off seconds at the first call with `config` (cold caches), for `profile`
        (`advisor.probe.models.ModelProfile`) with the estimate's constants `k`: none by default."""
        return 0.0

    def warmup_note(self, config: OptimizationConfig) -> str | None:
        """What `warmup_s` leaves out for `config`, said with the estimate; nothing by default."""
        return None

    def compute_share(self, config: OptimizationConfig, step: StepContext) -> float:
        """The share of the denoiser's work that still runs each step."""
        return 1.0

    def attention_speedup(self, config: OptimizationConfig, step: StepContext) -> float:
        """How much faster the attention FLOPs run than with torch's SDPA."""
        return 1.0

    def per_call_written_bytes(self, config: OptimizationConfig, component: Any, compute_bytes: int, k: dict) -> float:
        """Memory-bound bytes the lever's hooks write (and read back) each time `component` runs,
        with `compute_bytes` per parameter at the compute dtype."""
        return 0.0

    def per_call_host_seconds(self, config: OptimizationConfig, component: Any, k: dict) -> float:
        """Host time the lever's hooks add each time `component` runs, counted as not hidden."""
        return 0.0

    def held_bytes(self, config: OptimizationConfig, shape: ActivationShape) -> int:
        """Device bytes held from one step to the next."""
        return 0

    def decode_mode(self, config: OptimizationConfig, mode: DecodeMode) -> DecodeMode:
        """How the VAE decodes with this lever, given how the levers before it left `mode`."""
        return mode

    def gathered_bytes(self, config: OptimizationConfig, shape: ActivationShape) -> int:
        """Device bytes one GPU of a split denoiser call gathers from the others beside its share of
        the activations (not divided by `activation_share`)."""
        return 0

    def activation_share(self, config: OptimizationConfig, phase: str) -> float:
        """The share of `phase`'s activations ("text_encoding", "denoising", "vae_decode") each GPU holds."""
        return 1.0

    def link_seconds(self, config: OptimizationConfig, step: StepContext, shape: ActivationShape) -> float:
        """Seconds one denoiser call on `shape` waits on the link between GPUs (not hidden by compute)."""
        return 0.0

    def processes(self, config: OptimizationConfig) -> int:
        """Processes a run takes, one per GPU, each loading the pipeline into host RAM."""
        return 1

    def generations_at_once(self, config: OptimizationConfig) -> int:
        """Generations that run side by side (a job's images shared out over them)."""
        return 1

    # --- quality and explanation ---------------------------------------------------------------

    def lossy(self, config: OptimizationConfig) -> bool:
        return False

    def quality_cost(self, config: OptimizationConfig) -> tuple[str, str] | None:
        """(what the output loses, source), where the config's choice is lossy."""
        return None

    def memory_reasons(self, pick: Pick) -> list[str]:
        """The lines explaining what this lever does to the pick's memory (said before any `reason`)."""
        return []

    def reason(self, pick: Pick) -> str | None:
        """The line explaining this lever's part of the pick (`Pick.without` predicts it without the lever)."""
        return None

    def guidance_reasons(self, pick: Pick) -> list[str]:
        """The lines saying how the guidance weighs the pick's choice for this lever against a rival
        choice (said after the adjust rules'): followed, or overruled by a clear win."""
        return []

    def summary_note(self, config: OptimizationConfig) -> str | None:
        """What a config's one-line summary adds for this lever where ``config.summary()`` says nothing."""
        return None

    # --- loading and applying ------------------------------------------------------------------

    def loading(self, config: OptimizationConfig, components: Any) -> Loading | None:
        """What loading takes for it (`components`: `advisor.run.classes.Components`), or None."""
        return None

    def process_steps(self, config: OptimizationConfig) -> list[Step]:
        """What the process must do before torch starts CUDA (the allocator's settings): first in a
        script, and run by `load_pipeline` before loading (their ``run`` takes no pipeline)."""
        return []

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        """Its post-load steps for a pipeline holding `components` (`advisor.run.classes.Components`)."""
        return []

    def final_steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        """Its steps that run after every lever's (what captures the module as the others left it)."""
        return []

    def pipeline_problem(self, config: OptimizationConfig, pipe: Any, components: Any) -> str | None:
        """Why a loaded `pipe` cannot take this lever as `config` sets it (a `ConfigError` line), or None."""
        return None
