"""The levers: one module per technique, each owning what the advisor knows about it (`Lever`).

`LEVERS` lists them in the order their steps run. The search space, the estimate, the explanation,
the quality policy, the constraints and the apply steps iterate over it (at call time: a lever
registered later is seen everywhere) instead of naming a lever's choices; `tests/test_ownership.py`
fails on any other module that names them.

The levers: load-time quantization (`quantization`, one module per backend: `bitsandbytes`,
`torchao`, `gguf`: a pre-quantized checkpoint, `quanto`, `sdnq`), torch.compile and its dynamo flags (`torch_compile`), fp8 storage
(`layerwise_casting`), the memory format (`memory_format`), offloading (`offload`), the VAE's
tiling and slicing (`vae`), the attention kernel (`attention`), the step cache (`step_cache`) and
the caching allocator's settings (`allocator`), the user's LoRAs (`lora`), and the levers of several
GPUs (`multi_gpu`: context parallelism, one pipeline per GPU).

A new lever is one module with a `Lever` subclass, its config section in `advisor.config` (a new
schema version and its step in `advisor.migrations`), and an entry below (`tests/test_levers.py`
adds a made-up one that way and follows it through); a new quantization backend is one module with
a `QuantBackend` subclass and an `add_backend` line.
"""

from __future__ import annotations

import math

from advisor.levers.allocator import ExpandableSegments
from advisor.levers.attention import AttentionKernel
from advisor.levers.base import (
    ActivationShape,
    Adjust,
    DecodeMode,
    Filter,
    Lever,
    Loading,
    Pick,
    Prefer,
    Rival,
    StepContext,
)
from advisor.levers.bitsandbytes import BITSANDBYTES
from advisor.levers.gguf import GGUF_BACKEND
from advisor.levers.layerwise_casting import LAYERWISE_CASTING
from advisor.levers.lora import LORA
from advisor.levers.memory_format import ChannelsLast
from advisor.levers.multi_gpu.context_parallel import CONTEXT_PARALLEL
from advisor.levers.multi_gpu.replicas import REPLICAS
from advisor.levers.offload import OFFLOAD
from advisor.levers.quantization import QUANTIZATION, add_backend
from advisor.levers.quanto import QUANTO_BACKEND
from advisor.levers.sdnq import SDNQ_BACKEND
from advisor.levers.step_cache import StepCache
from advisor.levers.torch_compile import COMPILE
from advisor.levers.torchao import TORCHAO_BACKEND
from advisor.levers.vae import VaeDecoding


LEVERS: list[Lever] = []

__all__ = [
    "LEVERS",
    "ActivationShape",
    "Adjust",
    "DecodeMode",
    "Filter",
    "Lever",
    "Loading",
    "Pick",
    "Prefer",
    "Rival",
    "StepContext",
    "generations_at_once",
    "lever_named",
    "processes",
    "register",
    "searched_levers",
]


def register(lever: Lever) -> Lever:
    """Add `lever` to `LEVERS`, in its order."""
    LEVERS.append(lever)
    LEVERS.sort(key=lambda each: each.order)
    return lever


def lever_named(name: str) -> Lever:
    """The lever of search-space dimension `name`."""
    return next(lever for lever in LEVERS if lever.name == name)


def processes(config) -> int:
    """The processes a run of `config` takes, one per GPU, each loading the pipeline (`Lever.processes`)."""
    return math.prod(lever.processes(config) for lever in LEVERS)


def generations_at_once(config) -> int:
    """The generations a run of `config` makes side by side (`Lever.generations_at_once`)."""
    return math.prod(lever.generations_at_once(config) for lever in LEVERS)


def searched_levers() -> list[Lever]:
    """The levers the search space has a dimension for (the others are decided by their adjust rules)."""
    return [lever for lever in LEVERS if lever.searched]


add_backend(BITSANDBYTES)
add_backend(TORCHAO_BACKEND)
add_backend(GGUF_BACKEND)
add_backend(QUANTO_BACKEND)
add_backend(SDNQ_BACKEND)
register(QUANTIZATION)
register(COMPILE)
register(LORA)
register(LAYERWISE_CASTING)
register(ChannelsLast())
register(OFFLOAD)
register(VaeDecoding())
register(AttentionKernel())
register(StepCache())
register(ExpandableSegments())
register(CONTEXT_PARALLEL)
register(REPLICAS)
