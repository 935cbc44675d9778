"""Rehearse a config on the virtual CUDA device: the real diffusers code, any size, no data.

`rehearse(pipe, config, ...)` takes a pipeline whose weights are `VirtualTensor`s (`virtual_pipeline`
builds one at full size from a model profile's configs; `virtualize` turns a loaded one into one),
runs the config's post-load steps through the same `Step` objects `apply_config` runs, then the
phases of one generation as the pipeline runs them: each text encoder once, the denoiser(s) for a
step or two, the VAE decode, and the pipeline's ``maybe_free_model_hooks``. Inputs are created on
the pipeline's own ``_execution_device`` (the property diffusers computes from its offload hooks).

What comes back (`Rehearsal`): the first op that would fail on the card, in one line naming the
module, the tensors and what put the odd one there (a config step, the loading, or the hooks while
running); what could not be rehearsed and why (never reported as passed); and the ledger: every
allocation and free per pool (``cuda:0``, ``cpu``, ``cpu-pinned``), with each phase's peak. The
ledger's ``cuda:0`` allocations replayed through the caching-allocator model (`advisor.plan.replay`)
give what each phase reserves, what the run needs of the card, and whether the allocator would run
out of the budget.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from advisor.levers.offload import loads_onto_device
from advisor.plan.allocator import NO_LIMIT, AllocatorSettings
from advisor.plan.replay import Replay, least_capacity, replay
from advisor.probe.workload import Workload, encoding_order, encoding_passes
from advisor.rehearse.device import virtual_cuda
from advisor.rehearse.files import files_as_headers
from advisor.rehearse.quantize import quantize_in_place
from advisor.rehearse.virtual import (
    CPU,
    CUDA,
    DeviceMismatch,
    Ledger,
    NotRehearsable,
    VirtualTensor,
    describe,
    meta_of,
)
from advisor.run.steps import plan
from advisor.trace.inputs import Geometry, Maker, denoiser_inputs, text_encoder_inputs, vae_latents


PHASES = ("text_encoding", "denoising", "vae_decode")  # the estimate's phase names (`advisor.plan.estimate`)
LOADING, APPLYING = "loading", "applying the config"
DISK_NOT_REHEARSED = (
    "`offload.offload_to_disk_path`: group offloading to disk writes each weight to a safetensors file, "
    "and a virtual weight has no bytes to write"
)
# A rehearsal is one process on one virtual GPU (docs/multi-gpu.md).
SPREAD_NOT_REHEARSED = "`offload.device_map`: the components spread over several GPUs; the rehearsal has one"
SPLIT_NOT_REHEARSED = "`context_parallel`: a generation split over {degree} processes; the rehearsal runs one"


@dataclass
class Rehearsal:
    """What one rehearsal found. `failure` is the one line of a config that would crash on the card;
    `not_rehearsed` what the virtual device could not run (then nothing is claimed about the rest)."""

    failure: str | None
    not_rehearsed: str | None
    ledger: Ledger = field(repr=False)
    seconds: float = 0.0
    budget_bytes: int = NO_LIMIT  # what the caching allocator may reserve (the allocator model's card)
    allocator_settings: AllocatorSettings = AllocatorSettings()
    mixed_devices: bool = False  # the failure is an op mixing devices or dtypes (not a library refusing)

    @property
    def phase_peaks(self) -> dict[str, dict[str, int]]:
        """Phase -> pool ("cuda:0", "cpu", "cpu-pinned") -> peak bytes."""
        return self.ledger.phase_peaks

    @functools.cached_property
    def allocator(self) -> Replay:
        """The device's allocations replayed through the caching allocator: each phase's reserved
        peak, and the phase where it would run out of the budget."""
        return replay(self.ledger.events, capacity=self.budget_bytes, settings=self.allocator_settings)

    @functools.cached_property
    def needs_bytes(self) -> int:
        """The least the card must let the allocator reserve for this run (`least_capacity`)."""
        return least_capacity(self.ledger.events, settings=self.allocator_settings)

    @property
    def out_of_memory(self) -> str | None:
        return self.allocator.out_of_memory if self.failure is None and self.not_rehearsed is None else None

    @property
    def passed(self) -> bool:
        return self.failure is None and self.not_rehearsed is None and self.out_of_memory is None

    def device_peak(self, phase: str) -> int:
        return self.phase_peaks.get(phase, {}).get("cuda:0", 0)


class _Names:
    """Qualified names of the pipeline's modules and tensors, and the module running now."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.modules: dict[int, str] = {}
        for name, component in _modules(pipe):
            for path, module in component.named_modules():
                self.modules[id(module)] = f"{name}.{path}" if path else name
        self.stack: list[str] = []

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        def enter(module: torch.nn.Module, _args: Any) -> None:
            self.stack.append(self.modules.get(id(module), type(module).__name__))

        def leave(*_: Any) -> None:  # returns None: a forward hook's value would replace the output
            if self.stack:
                self.stack.pop()

        pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
        post = torch.nn.modules.module.register_module_forward_hook(leave)
        try:
            yield
        finally:
            pre.remove()
            post.remove()

    def where(self) -> str:
        return self.stack[-1] if self.stack else ""

    def describe(self, tensor: torch.Tensor) -> str:
        """A weight, buffer or quantization state by its qualified name (a view of one, such as
        ``weight.t()``, too), with what put it where it is; anything else as an activation."""
        block = getattr(tensor, "block", None)
        if block is not None:
            for name, owned in self._owned():
                if getattr(owned, "block", None) is block:
                    origin = block.origin or LOADING
                    how = f"moved there while {origin}" if origin in PHASES else f"put there by {origin}"
                    return f"{name} {describe(tensor)} ({how})"
        return f"an activation {describe(tensor)}"

    def _owned(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor the pipeline holds, by name: weights and buffers, and the quantization state
        kept beside them, which moves only where its owner moves it (bitsandbytes: a 4-bit weight's
        ``quant_state.absmax``, an 8-bit layer's ``state.CB`` / ``state.SCB``)."""
        for name, component in _modules(self.pipe):
            for path, module in component.named_modules():
                prefix = f"{name}.{path}" if path else name
                for key, weight in [*module._parameters.items(), *module._buffers.items()]:
                    if weight is None:
                        continue
                    yield f"{prefix}.{key}", weight
                    yield from _tensors_of(getattr(weight, "quant_state", None), f"{prefix}.{key}.quant_state")
                yield from _tensors_of(getattr(module, "state", None), f"{prefix}.state")


def _tensors_of(holder: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if holder is not None and hasattr(holder, "__dict__"):
        for key, value in vars(holder).items():
            if isinstance(value, torch.Tensor):
                yield f"{prefix}.{key}", value


def _modules(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    return [(name, c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]


def virtualize(pipe: Any, device: torch.device | str = CPU, *, staged: frozenset[str] = frozenset()) -> Any:
    """Give every weight and buffer of `pipe`'s modules a virtual twin on `device` (a loaded or a
    meta-built pipeline): what ``from_pretrained`` leaves, without the data; the `staged` components'
    on the CPU, where loading reads what it converts (a quantized component is never on the card at
    its full size: diffusers converts it a tensor at a time). Call inside `virtual_cuda`."""
    twins: dict[int, torch.Tensor] = {}  # a tied weight (T5's shared embedding) stays one tensor

    def twin(tensor: torch.Tensor, module: torch.nn.Module, key: str, parameter: bool, where: torch.device):
        if id(tensor) not in twins:
            _plain(tensor, module, key)
            empty = torch.empty_like(meta_of(tensor), device=where)
            twins[id(tensor)] = torch.nn.Parameter(empty, requires_grad=False) if parameter else empty
        return twins[id(tensor)]

    for name, component in _modules(pipe):
        where = CPU if name in staged else torch.device(device)
        for module in component.modules():
            for tensors, parameter in ((module._parameters, True), (module._buffers, False)):
                for key, tensor in tensors.items():
                    if tensor is not None and not isinstance(tensor, VirtualTensor):
                        tensors[key] = twin(tensor, module, key, parameter, where)
    return pipe


def _plain(tensor: torch.Tensor, module: torch.nn.Module, key: str) -> None:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise NotRehearsable(
            f"{type(module).__name__}.{key} is a {type(tensor).__module__}.{type(tensor).__name__}: a rehearsal "
            "takes the pipeline unquantized and quantizes it the way the config loads it"
        )


class _VirtualMaker(Maker):
    """Call inputs of a shape on a device, with no data."""

    def __call__(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)


def rehearse(
    pipe: Any,
    config: Any,
    geometry: Geometry,
    *,
    text_tokens: dict[str, int] | None = None,
    steps: int = 2,
    calls_per_step: int = 1,
    prompt_passes: int | None = None,
    decode_batch: int | None = None,
    gpu_name: str = "virtual GPU",
    vram_bytes: int = 80 * 2**30,
    capability: tuple[int, int] = (9, 0),
    budget_bytes: int = NO_LIMIT,
) -> Rehearsal:
    """Apply `config` (an `OptimizationConfig`) to `pipe` and run one generation's phases on the
    virtual device. `geometry` is one denoiser call's latent shape (its batch includes batched CFG);
    `text_tokens` each text encoder's sequence length (77 where not given); `steps` denoising steps
    of `calls_per_step` denoiser calls each (2 where guidance runs the denoiser twice a step);
    `prompt_passes` how often the text encoders run (2 where a negative prompt is encoded; the
    pipeline class's default where not given);
    `decode_batch` the latents the VAE decodes at once (the workload's batch: guidance's doubled
    batch is combined before the decode; `geometry`'s batch where not given);
    `budget_bytes` what the caching allocator may reserve when its replay asks for more.
    """
    ledger = Ledger()
    if config.offload.offload_to_disk_path:
        return Rehearsal(None, DISK_NOT_REHEARSED, ledger, budget_bytes=budget_bytes)
    if config.offload.device_map:
        return Rehearsal(None, SPREAD_NOT_REHEARSED, ledger, budget_bytes=budget_bytes)
    if config.context_parallel:
        said = SPLIT_NOT_REHEARSED.format(degree=config.context_parallel.degree)
        return Rehearsal(None, said, ledger, budget_bytes=budget_bytes)
    names: _Names | None = None
    started = time.perf_counter()
    failure = not_rehearsed = None
    mixed = False
    dtype = getattr(torch, config.dtype)
    try:
        with (
            virtual_cuda(
                ledger,
                name=gpu_name,
                total_bytes=vram_bytes,
                capability=capability,
                describe_tensor=lambda t: names.describe(t) if names else describe(t),
                where=lambda: names.where() if names else "",
            ),
            torch.compiler.set_stance("force_eager"),
            _as_a_fresh_process(),
            files_as_headers(),
        ):
            ledger.enter(LOADING)
            converted = frozenset(config.quantization.components) if config.quantization else frozenset()
            virtualize(pipe, CUDA if loads_onto_device(config) else CPU, staged=converted)
            quantize_in_place(pipe, config)
            names = _Names(pipe)
            ledger.enter(APPLYING)
            for step in plan(config, pipe):
                ledger.origin = f"{step.key}: {step.description}"
                (step.stand_in or step.run)(pipe)
            ledger.origin = ""
            with names.tracking():
                decoded = geometry.batch if decode_batch is None else decode_batch
                if prompt_passes is None:
                    kind = "video" if geometry.frames > 1 else "image"
                    prompt_passes = encoding_passes(type(pipe).__name__, Workload(kind, 1, 1), dict(pipe.config))
                _run_phases(
                    pipe,
                    geometry,
                    dtype,
                    ledger,
                    text_tokens or {},
                    prompt_passes=prompt_passes,
                    steps=steps,
                    calls=calls_per_step,
                    decode_batch=decoded,
                )
    except DeviceMismatch as error:
        failure, mixed = str(error), True
    except NotRehearsable as error:
        not_rehearsed = str(error)
    except Exception as error:
        said = f"{ledger.origin or ledger.phase}: {type(error).__name__}: {' '.join(str(error).split())}"
        if ledger.phase == APPLYING and isinstance(error, (ValueError, TypeError)):
            failure = said  # a library refused the combination while applying it: so it would on the card
        else:  # a package missing here, or something the virtual device can't run: no verdict
            not_rehearsed = said
    settings = AllocatorSettings(expandable_segments=config.expandable_segments)
    return Rehearsal(failure, not_rehearsed, ledger, time.perf_counter() - started, budget_bytes, settings, mixed)


@contextlib.contextmanager
def _as_a_fresh_process() -> Iterator[None]:
    """diffusers' process-wide state as a new process has it, and as it was afterwards: the
    accelerator it memoises (``TorchDeviceBackend._detect_device_type``, an ``lru_cache``) and the
    active attention backend, which ``set_attention_backend`` sets for the whole process
    (``_AttentionBackendRegistry``, diffusers/models/attention_dispatch.py)."""
    from diffusers.models.attention_dispatch import (
        DIFFUSERS_ATTN_BACKEND,
        AttentionBackendName,
        _AttentionBackendRegistry,
    )
    from diffusers.utils.torch_utils import TorchDeviceBackend

    active = _AttentionBackendRegistry._active_backend
    TorchDeviceBackend._detect_device_type.cache_clear()
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName(DIFFUSERS_ATTN_BACKEND))
    try:
        yield
    finally:
        TorchDeviceBackend._detect_device_type.cache_clear()
        _AttentionBackendRegistry.set_active_backend(active)


def _run_phases(
    pipe: Any,
    g: Geometry,
    dtype: torch.dtype,
    ledger: Ledger,
    tokens: dict[str, int],
    *,
    prompt_passes: int,
    steps: int,
    calls: int,
    decode_batch: int,
) -> None:
    components = pipe.components
    device = pipe._execution_device
    make = _VirtualMaker(device, dtype)
    ledger.enter("text_encoding")
    present = [n for n in components if n.startswith("text_encoder") and components[n] is not None]
    encoders = encoding_order((getattr(pipe, "model_cpu_offload_seq", None) or "").split("->"), present)
    # one prompt at a time, in model_cpu_offload_seq's order (encode_prompt's): pipelines encode the
    # prompt and then the negative one through the same encoders, and repeat the embeddings for
    # guidance and for several images per prompt afterwards
    for _pass in range(prompt_passes):
        for name in encoders:
            ledger.origin = "text_encoding"
            outputs = components[name](**text_encoder_inputs(tokens.get(name, 77), 1, make))
            del outputs
    ledger.enter("denoising")
    ledger.origin = "denoising"
    denoisers = [components[n] for n in ("transformer", "transformer_2", "unet") if components.get(n) is not None]
    settings = dict(pipe.config)  # the pipeline's own (Wan2.2 TI2V's expand_timesteps)
    for step in range(steps):
        # Experts that take turns (Wan 2.2) run in order, each for its share of the steps, never back.
        denoiser = denoisers[step * len(denoisers) // steps]
        for _call in range(calls):
            out = denoiser(**denoiser_inputs(denoiser, g, make, settings))
            del out
    ledger.enter("vae_decode")
    ledger.origin = "vae_decode"
    vae = components["vae"]
    latents = vae_latents(
        vae, Geometry(decode_batch, g.frames, g.height, g.width, 0), _VirtualMaker(device, vae.dtype)
    )
    image = vae.decode(latents, return_dict=False)[0]
    del image, latents
    pipe.maybe_free_model_hooks()
