"""Trace each component of a pipeline at a few sizes and fit the exact shape of each curve.

Per component role:

* denoiser: one call at three latent sizes (plus a fourth that checks the fit); FLOPs (matmul,
  conv, attention), the activation peak and the largest attention score matrix, each fitted as
  ``c0 + c1*x + c2*x^2`` over ``x`` = latent positions of one sample (frames x height x width);
* text encoder: one call at the pipeline's sequence length;
* VAE decode: untiled and tiled, over pixels per frame ``p`` (and frames ``f`` for video),
  least squares on a small grid.

A record is plain JSON (`advisor.plan.compute` evaluates it with no torch). Everything runs on
the meta device, so a 14B model traces in seconds and allocates nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from advisor.plan.compute import TRACE_VERSION, decoded_frames, evaluate, latent_geometry, text_tokens
from advisor.probe.models import ComponentProfile, ModelProfile
from advisor.probe.workload import Workload
from advisor.trace.counter import Counter, counting
from advisor.trace.inputs import DENOISER_INPUTS, Geometry, Maker, denoiser_inputs, text_encoder_inputs, vae_latents
from advisor.trace.meta import build_on_meta, cast
from advisor.trace.pattern import allocation_record, replayed_record


TRACE_DTYPE = torch.bfloat16
QUANTITIES = (
    "matmul_flops",
    "conv_flops",
    "attention_flops",
    "activation_peak_bytes",
    "written_bytes",
    "largest_tensor_bytes",
    "score_elements",
    "masked_attention_flops",
)
VAE_BASIS = {"image": ["1", "p", "p^2"], "video": ["1", "p", "p*f", "p^2*f"]}


@dataclass(frozen=True)
class TraceSizes:
    """Where the curves are traced: (height, width, frames) of the denoiser's fit points and check
    point per workload kind, and the VAE's untiled sizes, frame counts and check point. Multiples
    of 64 pixels and 8k+1 frames suit every catalog pipeline's size rules."""

    denoiser: dict[str, list[tuple[int, int, int]]] = field(
        default_factory=lambda: {
            "image": [(512, 512, 1), (768, 768, 1), (1024, 1024, 1)],
            "video": [(512, 512, 25), (512, 768, 49), (768, 1024, 49)],
        }
    )
    denoiser_check: dict[str, tuple[int, int, int]] = field(
        default_factory=lambda: {"image": (1536, 1536, 1), "video": (512, 512, 97)}
    )
    vae: list[tuple[int, int]] = field(default_factory=lambda: [(256, 256), (512, 512), (768, 768)])
    # Frames past every video VAE's chunking threshold (HunyuanVideo and LTX decode in 16-frame
    # tiles once the latents are longer), so the curve is fitted in the regime videos run in.
    vae_frames: list[int] = field(default_factory=lambda: [25, 49])
    vae_check: tuple[int, int, int] = (1024, 1024, 33)


CATALOG_SIZES = TraceSizes()


def _least_squares(
    basis: list[str], points: list[dict[str, Any]], variables: Callable[[dict], dict[str, float]]
) -> dict[str, list[float]]:
    import numpy as np

    design = np.array(
        [[evaluate([term], [1.0], variables(point)) for term in basis] for point in points], dtype=np.float64
    )
    scale = np.abs(design).max(axis=0)  # columns span 1 to 1e10: scale them for a stable solve
    fits = {}
    for quantity in QUANTITIES:
        values = np.array([point[quantity] for point in points], dtype=np.float64)
        solution, *_ = np.linalg.lstsq(design / scale, values, rcond=None)
        fits[quantity] = [float(c) for c in solution / scale]
    return fits


def _relative_errors(basis, fits, point, variables) -> float:
    worst = 0.0
    for quantity, coefficients in fits.items():
        actual = point[quantity]
        predicted = evaluate(basis, coefficients, variables(point))
        if actual or predicted:
            worst = max(worst, abs(predicted - actual) / max(abs(actual), 1.0))
    return round(worst, 6)


def _float32_ratio(module: torch.nn.Module, bf16: dict[str, Any], fp32: dict[str, Any]) -> dict[str, float]:
    """Bytes in float32 over bytes in bfloat16 at one size: less than 2 where bf16 runs upcast to
    float32 (norms, softmax statistics), so no blanket 2x."""
    cast(module, TRACE_DTYPE)
    return {
        q: round(fp32[q] / bf16[q], 4) if bf16[q] else 2.0
        for q in ("activation_peak_bytes", "written_bytes", "largest_tensor_bytes")
    }


def _count(
    module: torch.nn.Module,
    call: Callable[[], Any],
    *inputs: Any,
    log: list | None = None,
    marks: tuple = (),
    leaf_log: list | None = None,
) -> dict[str, int]:
    """What one call computes and holds; its allocations appended to `log`, with a mark where each
    module of `marks` (the repeated blocks) starts; each leaf layer call appended to `leaf_log` as
    (the most live bytes while it ran, its parameters), in the order they ran."""
    counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda *_: counter.mark()) for m in marks]
    called: list[int] = []
    if leaf_log is not None:
        from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

        def enter(layer: torch.nn.Module, _args: Any) -> None:
            counter.enter_leaf()
            called.append(sum(p.numel() for p in layer.parameters()))

        leaves = [m for m in module.modules() if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS)]
        hooks += [m.register_forward_pre_hook(enter) for m in leaves]
    try:
        with counting(module, *inputs, counter=counter) as counts:
            out = call()
            del out
    finally:
        for hook in hooks:
            hook.remove()
    if log is not None:
        log.extend(counter.events)
    if leaf_log is not None:
        leaf_log.extend(zip(counter.leaf_live, called))
    return counts.as_dict()


def layers_in_flight(leaf_log: list[tuple[int, int]], peak_bytes: int) -> dict[str, list[list[float]]]:
    """Over one call's leaf layers in the order they ran, the live activations while each ran (as a
    share of the call's peak, so they scale with a plan's size) beside its weights (``layer``) and
    beside its own and the next layer's (``with_next``): what leaf-level offloading holds
    (`advisor.levers.offload.strategies`). Only the pairs no other pair beats on both counts are
    kept: the plan takes the largest sum at its size."""

    def frontier(pairs: list[tuple[float, int]]) -> list[list[float]]:
        kept: list[list[float]] = []
        for share, params in sorted(pairs, key=lambda p: (-p[1], -p[0])):
            if not kept or share > kept[-1][0]:
                kept.append([share, params])
        return kept

    shares = [round(live / peak_bytes, 4) if peak_bytes else 0.0 for live, _ in leaf_log]
    params = [p for _, p in leaf_log]
    return {
        "layer": frontier(list(zip(shares, params))),
        "with_next": frontier([(s, p + n) for s, p, n in zip(shares, params, [*params[1:], 0])]),
    }


def _repeated_blocks(component: ComponentProfile, module: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The modules a call repeats: each block of the component's block lists, and a VAE's decoder
    (video VAEs call it once per chunk of frames)."""
    blocks = [b for blocks in component.blocks for b in module.get_submodule(blocks.name)]
    decoder = getattr(module, "decoder", None)
    return (*blocks, *([decoder] if isinstance(decoder, torch.nn.Module) else []))


def _workload(profile: ModelProfile, height: int, width: int, frames: int) -> Workload:
    return Workload(profile.workload, height=height, width=width, frames=frames, steps=1)


def trace_denoiser(
    profile: ModelProfile, component: ComponentProfile, module: torch.nn.Module, sizes: TraceSizes
) -> dict[str, Any]:
    tokens = text_tokens(profile) or 77
    marks = _repeated_blocks(component, module)

    def point(
        height: int,
        width: int,
        frames: int,
        dtype: torch.dtype = TRACE_DTYPE,
        log: list | None = None,
        leaf_log: list | None = None,
        batch: int = 1,
    ) -> dict[str, Any]:
        latent_frames, latent_h, latent_w = latent_geometry(profile, _workload(profile, height, width, frames))
        g = Geometry(batch=batch, frames=latent_frames, height=latent_h, width=latent_w, text_tokens=tokens)
        cast(module, dtype)
        kwargs = denoiser_inputs(module, g, Maker("meta", dtype), profile.pipeline_config)
        counts = _count(module, lambda: module(**kwargs), kwargs, log=log, marks=marks, leaf_log=leaf_log)
        return {"height": height, "width": width, "frames": frames, "x": g.positions, **counts}

    basis = ["1", "x", "x^2"]
    logs: list[list] = [[] for _ in sizes.denoiser[profile.workload]]
    leaf_log: list[tuple[int, int]] = []  # the largest size's, where activations weigh most
    last = len(logs) - 1
    points = [
        point(*size, log=log, leaf_log=leaf_log if i == last else None)
        for i, (size, log) in enumerate(zip(sizes.denoiser[profile.workload], logs))
    ]
    fits = _least_squares(basis, points, lambda p: {"x": p["x"]})
    check = point(*sizes.denoiser_check[profile.workload])
    return {
        "basis": basis,
        "variables": {"x": "latent positions of one sample (latent frames x height x width)"},
        "text_tokens": tokens,
        # Whether its attention is given a mask (Chroma's padding mask; LTX's text mask on its
        # cross-attention): flash kernels refuse one. Batched, the samples' captions may differ in
        # length, which some denoisers mask then only (Z-Image: guidance batched with a shorter negative prompt).
        "masked_attention": any(p["masked_attention_flops"] for p in points),
        "masked_when_batched": not points[0]["masked_attention_flops"]
        and point(*sizes.denoiser[profile.workload][0], batch=2)["masked_attention_flops"] > 0,
        "fit": fits,
        "float32_ratio": _float32_ratio(
            module, points[1], point(*sizes.denoiser[profile.workload][1], dtype=torch.float32)
        ),
        "points": points,
        "check": {**check, "max_relative_error": _relative_errors(basis, fits, check, lambda p: {"x": p["x"]})},
        "allocations": allocation_record(logs, [{"x": p["x"]} for p in points], basis),
        "layers_in_flight": layers_in_flight(leaf_log, points[-1]["activation_peak_bytes"]),
    }


def trace_text_encoder(
    profile: ModelProfile, component: ComponentProfile, module: torch.nn.Module, sizes: TraceSizes
) -> dict[str, Any]:
    tokens = component.facts.get("max_sequence_length") or 77
    kwargs = text_encoder_inputs(tokens, 1, Maker("meta", TRACE_DTYPE))
    # T5 pipelines read the last hidden state only; CLIP/LLM pipelines ask for every layer's.
    kwargs["output_hidden_states"] = not component.class_name.startswith(("T5", "UMT5"))
    log: list = []
    bf16 = _count(module, lambda: module(**kwargs), kwargs, log=log, marks=_repeated_blocks(component, module))
    fp32 = _count(cast(module, torch.float32), lambda: module(**kwargs), kwargs)  # int inputs: any dtype
    return {
        "tokens": tokens,
        **bf16,
        "float32_ratio": _float32_ratio(module, bf16, fp32),
        "allocations": replayed_record([log], [{}]),  # one size: the replay, not the pattern
    }


def _tile_pixels(module: torch.nn.Module) -> int | None:
    size = getattr(module, "tile_sample_min_size", None) or getattr(module, "tile_sample_min_height", None)
    return int(size) if isinstance(size, (int, float)) and size > 0 else None


def trace_vae(
    profile: ModelProfile, component: ComponentProfile, module: torch.nn.Module, sizes: TraceSizes
) -> dict[str, Any]:
    video = profile.workload == "video"
    marks = _repeated_blocks(component, module)

    def point(
        height: int, width: int, frames: int, dtype: torch.dtype = TRACE_DTYPE, log: list | None = None
    ) -> dict[str, Any]:
        latent_frames, latent_h, latent_w = latent_geometry(profile, _workload(profile, height, width, frames))
        cast(module, dtype)
        z = vae_latents(module, Geometry(1, latent_frames, latent_h, latent_w, 0), Maker("meta", dtype))
        out_frames = decoded_frames(component, _workload(profile, height, width, frames))
        return {
            "height": height,
            "width": width,
            "frames": out_frames,
            "p": height * width,
            "f": out_frames,
            **_count(module, lambda: module.decode(z, return_dict=False), z, log=log, marks=marks),
        }

    basis = VAE_BASIS[profile.workload]
    variables = lambda p: {"p": p["p"], "f": p["f"]}  # noqa: E731
    record: dict[str, Any] = {"basis": basis, "variables": {"p": "output pixels per frame", "f": "output frames"}}
    frame_counts = sizes.vae_frames if video else [1]
    check_size = sizes.vae_check if video else (*sizes.vae_check[:2], 1)
    modes = {"untiled": sizes.vae}
    tile = None
    if hasattr(module, "enable_tiling"):
        module.enable_tiling()
        tile = _tile_pixels(module)
        module.disable_tiling()
    if tile:
        side = lambda k: int(math.ceil(tile * k / 64) * 64)  # noqa: E731
        modes["tiled"] = [(side(1.5), side(1.5)), (side(2), side(2)), (side(2), side(3))]
        record["tile_pixels"] = tile
    h, w = sizes.vae[1]
    record["float32_ratio"] = _float32_ratio(
        module, point(h, w, frame_counts[0]), point(h, w, frame_counts[0], dtype=torch.float32)
    )
    for mode, sizes in modes.items():
        if mode == "tiled":
            module.enable_tiling()
        grid = [(h, w, f) for h, w in sizes for f in frame_counts]
        logs: list[list] = [[] for _ in grid]
        points = [point(*size, log=log) for size, log in zip(grid, logs)]
        fits = _least_squares(basis, points, variables)
        check = point(*(check_size if mode == "untiled" else (side(2.5), side(2.5), check_size[2])))
        record[mode] = {
            "fit": fits,
            "points": points,
            "check": {**check, "max_relative_error": _relative_errors(basis, fits, check, variables)},
            "allocations": allocation_record(logs, [variables(p) for p in points], basis),
        }
        if mode == "tiled":
            module.disable_tiling()
    return record


TRACERS = {"denoiser": trace_denoiser, "text_encoder": trace_text_encoder, "vae": trace_vae}


def traceable(component: ComponentProfile) -> str | None:
    """Why `component` can't be traced, or None."""
    if component.role not in TRACERS:
        return f"no tracer for role {component.role!r}"
    if component.role == "denoiser" and component.class_name not in DENOISER_INPUTS:
        return f"no input builder for {component.class_name} (advisor/trace/inputs.py)"
    if not component.config:
        return "no config to build it from"
    return None


def trace_component(
    profile: ModelProfile, component: ComponentProfile, sizes: TraceSizes = CATALOG_SIZES
) -> dict[str, Any]:
    """The trace record of one component (raises on a component that can't be traced)."""
    reason = traceable(component)
    if reason:
        raise ValueError(f"{component.name}: {reason}")
    import diffusers
    import transformers
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

    module = cast(build_on_meta(component.library, component.class_name, component.config), TRACE_DTYPE)
    # The curves are native attention's (a kernel's speed-up is the attention lever's). A model with
    # no kernel of its own uses the process's default, which `set_attention_backend` on any pipeline
    # applied earlier in this process changed too (diffusers 0.42 ModelMixin.set_attention_backend ->
    # _AttentionBackendRegistry.set_active_backend): flex, for one, refuses meta tensors.
    with attention_backend(AttentionBackendName.NATIVE):
        record = TRACERS[component.role](profile, component, module, sizes)

    return {
        "version": TRACE_VERSION,
        "dtype": "bfloat16",
        "traced_with": {
            "torch": torch.__version__.split("+")[0],
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        **record,
    }
