"""The levers that use several GPUs of one machine (``--gpu "2x RTX 4090"``, or the probe's cards).

- `context_parallel`: one generation's denoiser split over the GPUs by its sequence (diffusers'
  ``ContextParallelConfig``), one process per GPU under ``torchrun``: a generation is faster, at
  the cost of the traffic between the GPUs at every attention;
- `replicas`: one pipeline per GPU, each making its share of a job's images (``--images N``): no
  traffic at all, and no generation is faster, but the job is.

What both share is here: the process a GPU runs in (``torchrun`` starts one per GPU and says which
in ``LOCAL_RANK``), and which ways of using several GPUs go together. The third way, the pipeline's
components spread over the GPUs in one process, is where weights live: the offload lever's
(``offload.device_map``, `advisor.levers.offload.balanced`). Pure Python at import: torch only inside
a step's ``run``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from advisor.levers.code import Step


TORCHRUN = "https://docs.pytorch.org/docs/stable/elastic/run.html"


def job_seconds(latency_s: float, images: int, at_once: int) -> float:
    """Seconds a job of `images` takes with `at_once` generations side by side (the last round may
    be short of work: 5 images over 2 GPUs take 3 rounds)."""
    return math.ceil(images / at_once) * latency_s


def conflict(config: Any) -> str | None:
    """Why `config`'s ways of using several GPUs can't go together, or None: one process per GPU
    (context parallelism, a pipeline per GPU) or one process over them all (components over the GPUs),
    one way at a time; and processes of a pipeline per GPU can't share an offload folder. The
    planner's filter, and what loading and ``--emit python`` refuse for a config written by hand."""
    ways = [
        key
        for key, on in (
            ("context_parallel", config.context_parallel),
            ("replicas", config.replicas),
            ("offload.device_map", config.offload.device_map),
        )
        if on
    ]
    if len(ways) > 1:
        return f"`{ways[0]}` and `{ways[1]}` are two ways of using several GPUs; a config takes one"
    if config.replicas and config.offload.offload_to_disk_path:
        return "`replicas` with `offload.offload_to_disk_path`: every process would write its weights to one folder"
    return None


def world_size() -> int:
    """The processes ``torchrun`` started for this run (``WORLD_SIZE``); 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's GPU on its machine (``LOCAL_RANK``, set by ``torchrun``); 0 without it."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def start_process_group(processes: int, what: str, *, collectives: bool) -> Step:
    """The process step of a plan over `processes` GPUs: this process's GPU (``torch.cuda.set_device
    (LOCAL_RANK)``, so that ``cuda`` means it), and where the processes talk to each other
    (`collectives`), the process group (NCCL between GPUs, gloo on a CPU). Refused in one line when
    the process was not started as one of `processes` (``torchrun --nproc-per-node``)."""

    def run(_pipe: Any) -> None:
        import torch
        import torch.distributed as dist

        from advisor.errors import ConfigError

        if world_size() != processes:
            raise ConfigError(
                f"`{what}` runs {processes} processes, one per GPU, but this one was started as 1 of {world_size()}: "
                f"start the script with `torchrun --nproc-per-node {processes} SCRIPT.py` ({TORCHRUN})"
            )
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank())
        if collectives and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")

    code = 'torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))'
    if collectives:
        code += '\ntorch.distributed.init_process_group("nccl")'
    return Step(
        what.split(".")[0],
        f"this process's GPU, one of {processes} that torchrun starts",
        code,
        run,
        ("import os", "import torch", *(("import torch.distributed",) if collectives else ())),
    )
