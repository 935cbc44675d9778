"""One pipeline per GPU: each of several processes loads the whole pipeline on its own GPU and makes
its share of the job's images.

No generation is faster, and nothing crosses the link between the GPUs, so a job of many images
(``--images N``) finishes about N/GPUs generations later instead of N: diffusers' distributed-
inference guide shares prompts over processes this way (accelerate's ``split_between_processes``,
or ``torchrun`` with a pipeline per rank; a pipeline is no nn.Module, so ``nn.DataParallel`` can't,
diffusers#10640). What it costs is host RAM: every process loads the pipeline. Offered only for a
job of more images than one (a single image is as fast on one GPU).
"""

from __future__ import annotations

from typing import Any

from advisor.config import OptimizationConfig, Replicas
from advisor.levers.base import Lever, Pick
from advisor.levers.code import Step
from advisor.levers.multi_gpu import conflict, job_seconds, start_process_group
from advisor.platform import Constraint, Platform, constraint
from advisor.units import format_size


DOCS = "https://huggingface.co/docs/diffusers/main/en/training/distributed_inference"


CONSTRAINTS: list[Constraint] = []


@constraint(
    "one-way-of-using-several-gpus",
    "replicas",
    "one process per GPU (context parallelism, a pipeline per GPU) or one process over them all (components over "
    "the GPUs), one way at a time: splitting each of several pipelines over a group of GPUs needs a device mesh per "
    "group, not set up (yet); and a pipeline per GPU's processes can't share an offload folder",
    DOCS,
    into=CONSTRAINTS,
)
def one_way_of_using_several_gpus(config: OptimizationConfig, platform: Platform) -> str | None:
    return conflict(config)


class ReplicasLever(Lever):
    """One pipeline per GPU (config section ``replicas``)."""

    name = key = "replicas"
    names = frozenset({"pipeline-per-gpu"})
    constraints = tuple(CONSTRAINTS)
    order = 97  # its process step after the allocator's (95): this process's GPU, before CUDA starts

    def choices(self, scenario: Any, dtype: str) -> dict[str, Replicas | None]:
        target, found = scenario.target, {self.off_choice: None}
        if target.device != "cuda" or target.gpu_count < 2 or (scenario.images or 1) < 2:
            return found
        # one on every GPU: fewer pipelines make the job no faster (they only save host RAM)
        found[f"pipeline-per-gpu-{target.gpu_count}"] = Replicas(count=target.gpu_count)
        return found

    def processes(self, config: OptimizationConfig) -> int:
        return config.replicas.count if config.replicas else 1

    def generations_at_once(self, config: OptimizationConfig) -> int:
        return config.replicas.count if config.replicas else 1

    def reason(self, pick: Pick) -> str | None:
        replicas, images = pick.config.replicas, pick.scenario.images or 1
        if replicas is None:
            return None
        alone = job_seconds(pick.latency_s, images, 1)
        shared = job_seconds(pick.latency_s, images, replicas.count)
        split = pick.rival(lambda config: config.context_parallel is not None and config.replicas is None)
        against = (
            ""
            if split is None
            else f"; splitting each image over {split.config.context_parallel.degree} GPUs instead: "
            f"{job_seconds(split.estimate.latency_s, images, 1) / 60:.1f} min"
        )
        return (
            f"one pipeline per GPU: {replicas.count} processes each make their share of the {images} images "
            f"({DOCS}); no generation is faster ({pick.latency_s:.1f}s each), the job takes {shared / 60:.1f} min "
            f"instead of {alone / 60:.1f} min ({3600 * images / shared:.0f} images an hour), with nothing sent "
            f"between the GPUs; each process loads the pipeline into host RAM ({format_size(pick.estimate.peak_ram_bytes)} "
            "in all)"
            f"{against}"
        )

    def process_steps(self, config: OptimizationConfig) -> list[Step]:
        replicas = config.replicas
        return [start_process_group(replicas.count, "replicas.count", collectives=False)] if replicas else []


REPLICAS = ReplicasLever()
