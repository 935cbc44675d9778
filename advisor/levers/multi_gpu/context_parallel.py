"""Context parallelism: one generation's denoiser split over several GPUs by its sequence.

diffusers 0.42's ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``
(models/modeling_utils.py) shards the inputs the model's ``_cp_plan`` names along the sequence and
gathers the output; in between each GPU runs every layer on its share of the tokens, and each
attention exchanges what it needs:

- **Ulysses**: an all-to-all turns sequence shards of q, k, v into head shards and the output back,
  so the attention heads must divide by the degree (``TemplatedUlyssesAttention``). Any backend
  registered with context-parallel support runs it, ``native`` included.
- **Ring** (``rotate_method="allgather"``, the one diffusers has): each GPU gathers the others'
  keys and values, and merges the partial attentions by their log-sum-exp, which ``native`` does
  not return (`advisor.levers.attention.context_parallel_problem`), so ring needs cuDNN's, flash
  or sage attention.

Every GPU holds the whole pipeline and runs the text encoders and the VAE whole, in its own process
(``torchrun``): those phases set how far the speed-up goes, with the link's traffic at every
attention. Published: FLUX.1-dev 1024x1024, 28 steps, NVIDIA L20 (PCIe), 23.25 s on one GPU, 13.87 s
Ulysses over two (cache-dit's benchmark); Wan 2.1 T2V 14B 720p on H100s 1838 / 945 / 497 / 288 s on
1 / 2 / 4 / 8 GPUs (Wan's README, xDiT's Ulysses). Which models have a ``_cp_plan`` and which
backends support it are read from the installed diffusers (`advisor/data/diffusers.json`).
"""

from __future__ import annotations

from typing import Any

from advisor.config import ContextParallel, Offload, OptimizationConfig
from advisor.levers.attention import context_parallel_problem
from advisor.levers.base import ActivationShape, Filter, Lever, Pick, StepContext
from advisor.levers.code import Expr, Step, call_source
from advisor.levers.multi_gpu import start_process_group
from advisor.paths import diffusers_tables
from advisor.units import format_size


DOCS = "https://huggingface.co/docs/diffusers/main/en/training/distributed_inference"
DISPATCH = "https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/attention_dispatch.py"
# Ulysses all-to-alls q, k, v before each attention and its output after it: four tensors of one GPU's
# tokens, each sending all but its own share. Ring gathers the other GPUs' keys and values.
ULYSSES_TENSORS, RING_TENSORS = 4, 2
RING_MERGE_TENSORS, FLOAT32_BYTES = 4, 4  # ring's float32 merge of the partial outputs (out, prev_out, 2 temporaries)
# What each split attention adds beside its bytes: the collectives' own latency, and the launches
# they expose (each waits for the exchange, so the host no longer runs ahead of the GPU). Fitted on
# FLUX.1-dev 1024x1024 on H100s (57 attentions a call): eager, diffusers' guide's Ulysses over 4
# (50 steps 6.67 s: 133 ms a step against 240 ms on one GPU, xDiT's 28 steps in 6.71 s), 1.2 ms an
# attention; compiled, xDiT's Ulysses over 2 and 4 (2.68 s, 1.63 s against 4.30 s on one GPU,
# https://github.com/xdit-project/xDiT/blob/main/docs/performance/flux.md), 0.27 ms an attention.
EXPOSED_S_PER_ATTENTION = {"eager": 1.2e-3, "compiled": 0.27e-3}


def splits(class_name: str) -> bool:
    """Whether diffusers can split this denoiser class (it defines a ``_cp_plan``)."""
    return bool(diffusers_tables()["models"].get(class_name, {}).get("context_parallel"))


def degrees(gpus: int) -> list[int]:
    """The degrees a plan over `gpus` GPUs weighs: the powers of two below it, and all of them."""
    return sorted({d for d in (2, 4, 8, 16) if d < gpus} | ({gpus} if gpus > 1 else set()))


def kind_for(heads: int, degree: int) -> str:
    """Ulysses where the heads divide by the degree (published faster: FLUX.1-dev on 4 H100s 6.67 s
    against ring's 13.08 s, diffusers' distributed-inference guide), else ring."""
    return "ulysses" if heads % degree == 0 else "ring"


def link_bytes(cp: ContextParallel, shape: ActivationShape) -> float:
    """Bytes one GPU sends over the link per attention of one denoiser call."""
    n = cp.degree
    tensor = shape.batch * shape.tokens * shape.hidden * shape.dtype_bytes  # one activation of the whole sequence
    if cp.kind == "ulysses":
        return ULYSSES_TENSORS * tensor / n * (n - 1) / n
    return RING_TENSORS * tensor / n * (n - 1)


# --- what the planner never combines --------------------------------------------------------------


def _sequence_does_not_split(config: OptimizationConfig, scenario: Any) -> str | None:
    cp = config.context_parallel
    if cp is None:
        return None
    latent, text = scenario.sequence
    uneven = [f"{what} tokens {count}" for what, count in (("latent", latent), ("text", text)) if count % cp.degree]
    if not uneven:
        return None
    return f"{' and '.join(uneven)} do not divide by {cp.degree}"


def _backend_problem(config: OptimizationConfig, scenario: Any) -> str | None:
    cp = config.context_parallel
    return context_parallel_problem(config.attention_backend, ring=cp.kind == "ring") if cp else None


def _with_offload(config: OptimizationConfig, scenario: Any) -> str | None:
    if config.context_parallel is None or config.offload.strategy == "none":
        return None
    return f"{config.offload.strategy} offload with context parallelism"


def _with_step_cache(config: OptimizationConfig, scenario: Any) -> str | None:
    if config.context_parallel is None or config.cache is None:
        return None
    return "a step cache with context parallelism"


class ContextParallelLever(Lever):
    """One generation over several GPUs (config section ``context_parallel``)."""

    name = key = "context_parallel"
    # After the attention backend (50): enable_parallelism checks the backend set then; its process
    # step comes after the allocator's (95), which must be set before CUDA starts.
    order = 96
    names = frozenset({"ulysses", "ring"})
    filters = (
        Filter(
            "context-parallel-sequence-divides",
            "context parallelism splits the latent (and joint text) tokens evenly over the GPUs: a count that does "
            "not divide fails (EquipartitionSharder.shard asserts it; the guide's 1008x1008 Flux runs failed)",
            DOCS,
            _sequence_does_not_split,
        ),
        Filter(
            "context-parallel-attention-backend",
            "enable_parallelism refuses an attention backend without context-parallel support, and ring attention "
            "needs one that returns the log-sum-exp (native does not)",
            DISPATCH,
            _backend_problem,
        ),
        Filter(
            "context-parallel-without-offload",
            "every GPU's process holds the whole pipeline: the guide runs context parallelism with the pipeline on "
            "the GPU (pipe.to), and offloading's hooks around the split model are not shown to work",
            DOCS,
            _with_offload,
        ),
        Filter(
            "context-parallel-without-step-cache",
            "a step cache decides in each process, from its own share of the tokens, whether to skip the blocks: "
            "processes that decide differently wait on each other's collectives",
            DOCS,
            _with_step_cache,
        ),
    )

    def choices(self, scenario: Any, dtype: str) -> dict[str, ContextParallel | None]:
        target, found = scenario.target, {self.off_choice: None}
        denoisers = scenario.profile.by_role("denoiser")
        if target.device != "cuda" or target.gpu_count < 2 or not all(splits(d.class_name) for d in denoisers):
            return found
        heads = denoisers[0].facts.get("num_attention_heads") or 1
        for degree in degrees(target.gpu_count):
            kind = kind_for(heads, degree)
            found[f"{kind}-{degree}"] = ContextParallel(degree=degree, kind=kind)
        return found

    def compute_share(self, config: OptimizationConfig, step: StepContext) -> float:
        return 1 / config.context_parallel.degree if config.context_parallel else 1.0

    def activation_share(self, config: OptimizationConfig, phase: str) -> float:
        cp = config.context_parallel
        return 1 / cp.degree if cp and phase == "denoising" else 1.0

    def work_key(self, config: OptimizationConfig) -> Any:
        cp = config.context_parallel
        return (cp.kind, cp.degree) if cp else None  # what a GPU gathers depends on both

    def gathered_bytes(self, config: OptimizationConfig, shape: ActivationShape) -> int:
        """Ring attention concatenates this GPU's keys and values and all-gathers them from every GPU
        (``TemplatedRingAttention.forward``: ``torch.cat([key, value])``, ``all_gather_tensor``): the
        whole sequence's keys and values, beside its own pair, live while each attention runs; and it
        merges the partial outputs in float32 (``convert_to_fp32``, the default): the running output,
        the new one and two temporaries of the merge, each of this GPU's tokens."""
        cp = config.context_parallel
        if cp is None or cp.kind != "ring":
            return 0
        one = shape.batch * shape.tokens * shape.hidden  # elements of one activation of the whole sequence
        key_and_value = RING_TENSORS * one * shape.dtype_bytes * (1 + 1 / cp.degree)
        merge = RING_MERGE_TENSORS * one / cp.degree * FLOAT32_BYTES
        return int(key_and_value + merge)

    def link_seconds(self, config: OptimizationConfig, step: StepContext, shape: ActivationShape) -> float:
        cp = config.context_parallel
        if cp is None or not step.link_bytes_per_s:
            return 0.0
        exposed = EXPOSED_S_PER_ATTENTION["compiled" if config.compile else "eager"]
        return step.attention_layers * (link_bytes(cp, shape) / step.link_bytes_per_s + exposed)

    def processes(self, config: OptimizationConfig) -> int:
        return config.context_parallel.degree if config.context_parallel else 1

    def reason(self, pick: Pick) -> str | None:
        cp = pick.config.context_parallel
        target = pick.scenario.target
        if cp is None:
            several = pick.config.replicas or pick.config.offload.device_map
            return _why_one_gpu(pick) if target.gpu_count > 1 and not several else None
        one = pick.without(self)
        breakdown = pick.estimate.latency_breakdown
        link = breakdown.get("step_link_s", 0.0)
        whole = breakdown["text_encoding_s"] + breakdown["vae_decode_s"]
        return (
            f"context parallel: {cp.kind} over {cp.degree} GPUs ({DOCS}): each GPU runs 1/{cp.degree} of every "
            f"denoiser call's tokens, predicted {pick.latency_s:.1f}s against {one:.1f}s on one GPU "
            f"({one / pick.latency_s:.2f}x); what limits it: the {cp.kind} exchange at every attention, "
            f"{link * 1000:.0f} ms per step over {target.link.describe() if target.link else 'the link'} (the bytes, "
            f"and the launches each exchange holds up), and the text encoding and VAE decode ({whole:.2f}s) that every "
            "GPU runs whole"
            + (
                "; through host memory the prediction is optimistic: cards without peer access share the host's "
                "memory and PCIe root (docs/multi-gpu.md)"
                if target.link and target.link.kind == "host"
                else ""
            )
        )

    def pipeline_problem(self, config: OptimizationConfig, pipe: Any, components: Any) -> str | None:
        """A denoiser diffusers can't split, or an attention backend the split can't run with."""
        cp = config.context_parallel
        if cp is None:
            return None
        for name in components.denoisers():
            if not getattr(type(getattr(pipe, name, None)), "_cp_plan", None):
                return f"`context_parallel`: {type(getattr(pipe, name, None)).__name__} defines no _cp_plan: diffusers can't split it"
        problem = context_parallel_problem(config.attention_backend, ring=cp.kind == "ring")
        return f"`context_parallel.kind: {cp.kind}`: {problem}" if problem else None

    def process_steps(self, config: OptimizationConfig) -> list[Step]:
        cp = config.context_parallel
        return [start_process_group(cp.degree, "context_parallel.degree", collectives=True)] if cp else []

    def steps(self, config: OptimizationConfig, components: Any) -> list[Step]:
        cp = config.context_parallel
        if cp is None:
            return []
        return [_split_step(cp, name) for name in components.denoisers()]


def _why_one_gpu(pick: Pick) -> str:
    """Why a plan for several GPUs runs on one: the denoiser can't be split, or splitting is predicted
    no faster; and one image at a time has no use for a second pipeline."""
    scenario = pick.scenario
    gpus = scenario.target.gpu_count
    denoiser = scenario.profile.by_role("denoiser")[0]
    split = pick.rival(lambda config: config.context_parallel is not None)
    if not splits(denoiser.class_name):
        why = f"diffusers can't split {denoiser.class_name} over GPUs (it defines no _cp_plan)"
    elif split is None:
        heads = denoiser.facts.get("num_attention_heads") or 1
        halves = ContextParallel(degree=2, kind=kind_for(heads, 2))
        bare = pick.config.replace(offload=Offload(), cache=None, context_parallel=halves)
        refused = next((said for f in CONTEXT_PARALLEL.filters if (said := f.check(bare, scenario))), None)
        why = refused or (
            f"a split needs the whole pipeline on every GPU without offloading, and none fits the "
            f"{format_size(scenario.budget_bytes)} budget"
        )
    else:
        cp = split.config.context_parallel
        why = (
            f"splitting each generation over {cp.degree} ({cp.kind}) is predicted {split.score_s:.1f}s against "
            f"{pick.score_s:.1f}s: the exchange at every attention costs more than the GPUs save"
        )
    shared = (
        "no pipeline per GPU fits alongside (each process loads the pipeline into host RAM)"
        if (scenario.images or 1) > 1
        else "one generation at a time gains nothing from a pipeline per GPU (--images N plans a job of N, shared "
        "out over the GPUs)"
    )
    return f"one GPU of the {gpus}: a second GPU does not make one generation faster here: {why}; and {shared}"


def _split_step(cp: ContextParallel, name: str) -> Step:
    """``pipe.<denoiser>.enable_parallelism(config=ContextParallelConfig(<kind>_degree=N))``."""
    expression = f"ContextParallelConfig({cp.kind}_degree={cp.degree})"
    code = call_source(f"pipe.{name}.enable_parallelism", kwargs={"config": Expr(expression, None)})

    def run(pipe: Any) -> None:
        from diffusers import ContextParallelConfig

        getattr(pipe, name).enable_parallelism(config=ContextParallelConfig(**{f"{cp.kind}_degree": cp.degree}))

    return Step(
        "context_parallel",
        f"{name}: context parallel ({cp.kind}) over {cp.degree} GPUs",
        code,
        run,
        ("from diffusers import ContextParallelConfig",),
    )


CONTEXT_PARALLEL = ContextParallelLever()
