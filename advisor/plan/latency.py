"""Latency of one generation: each phase's compute at the target's throughput, and the transfers
offloading adds, overlapped where a stream hides them.

    latency = text encoding + steps x max/sum(step compute, step transfers) + VAE decode
              + model-offload transfers

The levers' terms (a step cache's share of the work, an attention kernel's speed-up, offloading's
transfers and how a stream overlaps them) come from each lever (`advisor.levers`), per device.
"""

from __future__ import annotations

import math
from dataclasses import replace

from advisor.config import OptimizationConfig
from advisor.levers import LEVERS, StepContext, offload, quantization, torch_compile
from advisor.plan.compute import (
    Work,
    activation_shape,
    call_batch,
    constants,
    evaluate,
    latent_positions,
    text_work,
    trace_of,
)
from advisor.probe.safetensors_header import dtype_size
from advisor.probe.target import TargetHardware
from advisor.probe.workload import run_behaviour
from advisor.units import parse_capability


def _speed_factors(config: OptimizationConfig, component: str, generation: str) -> tuple[float, float]:
    """How much faster (>1) or slower (<1) than eager bf16 this component runs: all of it (compile),
    and its linear layers on top (quantization replaces nn.Linear alone: not
    the attention, not the convolutions, not the memory-bound ops).

    Compile's speed-up is per GPU generation; a quantization's factor is against bf16 in the same
    mode (eager against eager bf16, compiled against compiled bf16), so the two multiply.
    """
    k = constants()
    compiled = torch_compile.compiles(config, component)
    whole = torch_compile.speedup(config, component, generation, k)
    linear = 1.0
    q = quantization.quantized(config, component)
    if q is not None:
        linear = k["quantization_speed"][quantization.backend_of(q).speed_key(q)]["compiled" if compiled else "eager"]
    return whole, linear


def _seconds(
    work: Work, target: TargetHardware, speed: tuple[float, float] = (1.0, 1.0), attention: float = 1.0
) -> float:
    """Roofline time of `work`: tensor-core FLOPs at the generation's efficiency (the linear layers'
    at `speed`'s second factor, for their quantization; the attention's `attention` times faster,
    for its kernel), plus the bytes memory-bound ops write (and read) at the memory's streaming
    rate; `speed`'s first factor speeds up all of it."""
    k = constants()
    whole, linear = speed
    efficiency = k["tensor_efficiency"].get(target.generation, k["tensor_efficiency"]["default"])
    flops = work.matmul_flops / linear + work.conv_flops + work.attention_flops / attention
    tensor = flops / (target.matmul_flops * efficiency)
    memory = (
        work.written_bytes
        * k["memory_traffic_per_written_byte"]
        / (target.memory_bytes_per_s * k["memory_bandwidth_efficiency"])
    )
    return (tensor + memory) / whole


def _per_call(work: Work, config: OptimizationConfig, component, calls: int) -> tuple[Work, float]:
    """(`work` with the memory traffic the levers' hooks add over `calls` runs of `component`, the
    host seconds they add): layerwise casting's up- and down-casts, for one."""
    k = constants()
    written = sum(lever.per_call_written_bytes(config, component, dtype_size(config.dtype), k) for lever in LEVERS)
    host = sum(lever.per_call_host_seconds(config, component, k) for lever in LEVERS)
    return (replace(work, written_bytes=work.written_bytes + calls * written) if written else work), calls * host


def _streaming_seconds(component, config, target, weight, calls, on_cpu) -> float:
    """Seconds `calls` runs of `component` spend moving its weights in (`advisor.levers.offload`)."""
    if on_cpu:
        return 0.0
    return offload.streaming_seconds(component, config, weight, calls, target.h2d_bytes_per_s, constants())


def _overlapped(compute: float, transfer: float, config: OptimizationConfig) -> float:
    return offload.overlapped(compute, transfer, config, constants())


def masked_attention_share(profile, denoiser, workload, batch: int) -> float:
    """The share of a denoiser call's attention FLOPs given a mask, at this workload's size (from its
    trace; 0 without one): all of it for a batch of captions of unequal length that it masks."""
    trace = trace_of(denoiser)
    if not trace:
        return 0.0
    if batch > 1 and trace.get("masked_when_batched"):
        return 1.0
    if not trace.get("masked_attention"):
        return 0.0
    x = {"x": latent_positions(profile, workload)}
    masked = evaluate(trace["basis"], trace["fit"]["masked_attention_flops"], x)
    attention = evaluate(trace["basis"], trace["fit"]["attention_flops"], x)
    return min(max(masked / attention, 0.0), 1.0) if attention > 0 else 0.0


def latency(profile, workload, config, target, weights, works, on_cpu, memo) -> tuple[float, float, dict[str, float]]:
    behaviour = run_behaviour(profile.pipeline_class, workload, profile.pipeline_config)
    generation = target.generation
    calls_per_step = 2 if behaviour["cfg"] == "separate" else 1
    step_compute = step_transfer = step_link = 0.0
    batch = call_batch(workload, behaviour)
    for denoiser in profile.by_role("denoiser")[:1]:  # Wan2.2's experts run one at a time: one per step
        here = StepContext(
            target.device,
            parse_capability(target.compute_capability),
            workload.steps,
            denoiser.class_name,
            link_bytes_per_s=target.link.bytes_per_s if target.link else 0.0,
            attention_layers=sum(block.count for block in denoiser.blocks),
            masked_attention_share=masked_attention_share(profile, denoiser, workload, batch),
        )
        share = math.prod(lever.compute_share(config, here) for lever in LEVERS)  # the blocks a step cache skips
        attention = math.prod(lever.attention_speedup(config, here) for lever in LEVERS)  # a faster kernel
        work, host = _per_call(works["denoising"], config, denoiser, calls_per_step)
        step_compute += share * (
            _seconds(work, target, _speed_factors(config, denoiser.name, generation), attention) + host
        )
        step_transfer += _streaming_seconds(denoiser, config, target, weights[denoiser.name], calls_per_step, on_cpu)
        if here.link_bytes_per_s:  # what the GPUs of a split generation send each other
            shape = activation_shape(profile, denoiser, workload, config.dtype, batch, calls_per_step)
            step_link += calls_per_step * sum(lever.link_seconds(config, here, shape) for lever in LEVERS)
    step = _overlapped(step_compute, step_transfer, config) + step_link
    # The text encoders and the VAE run once: a group-offloaded one streams its weights in that once.
    text = 0.0
    for t in profile.by_role("text_encoder"):
        work, host = _per_call(text_work(t, workload, config.dtype, memo), config, t, 1)
        text += _overlapped(
            _seconds(work, target, _speed_factors(config, t.name, generation)) + host,
            _streaming_seconds(t, config, target, weights[t.name], 1, on_cpu),
            config,
        )
    vae = profile.vae
    decode = _overlapped(
        _seconds(works["vae_decode"], target),
        _streaming_seconds(vae, config, target, weights[vae.name], 1, on_cpu) if vae else 0.0,
        config,
    )
    moved = [weights[c.name] for c in profile.components if c.role != "other"]
    swaps = 0.0 if on_cpu else offload.swap_seconds(config, moved, target.h2d_bytes_per_s)
    breakdown = {
        "text_encoding_s": text,
        "denoising_s": step * workload.steps,
        "vae_decode_s": decode,
        "model_offload_transfers_s": swaps,
        "step_compute_s": step_compute,
        "step_transfer_s": step_transfer,
        "step_link_s": step_link,
    }
    return text + step * workload.steps + decode + swaps, step, breakdown
