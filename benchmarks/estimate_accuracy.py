"""Predicted against measured peak memory for every configuration that runs on this machine.

On CPU: the peak RSS of a fresh trial process (load + warm-up + timed runs) against the estimate's
peak host RAM. With CUDA: torch.cuda.max_memory_allocated against the estimate's peak VRAM.
Each configuration runs in its own process through `advisor.run.measure` (the same path `tune` uses).

    python benchmarks/estimate_accuracy.py [--scale 8] [--size 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from advisor.config import LayerwiseCasting, Offload, OptimizationConfig, Quantization
from advisor.plan.estimate import estimate
from advisor.probe.hardware import probe_machine
from advisor.probe.models import profile_from_folder
from advisor.probe.target import target_from_probe
from advisor.probe.workload import make_workload
from advisor.run.measure import measure
from advisor.testing import build_tiny_flux, build_tiny_wan
from advisor.units import format_size


def configurations(device: str, encoders: list[str]) -> dict[str, OptimizationConfig]:
    both = ["transformer", *encoders]
    configs = {
        "fp32": OptimizationConfig(device=device, dtype="float32"),
        "bf16": OptimizationConfig(device=device),
        "torchao int8 (transformer + encoders)": OptimizationConfig(
            device=device, quantization=Quantization(backend="torchao", components=both)
        ),
        "layerwise fp8 (transformer + encoders)": OptimizationConfig(
            device=device, layerwise_casting=LayerwiseCasting(components=both)
        ),
        "group offload, block level": OptimizationConfig(device=device, offload=Offload(strategy="group")),
    }
    if device == "cuda":
        configs |= {
            "nf4 (transformer + encoders)": OptimizationConfig(
                quantization=Quantization(backend="bitsandbytes_4bit", components=both)
            ),
            "model offload": OptimizationConfig(offload=Offload(strategy="model")),
            "group offload, leaf + stream": OptimizationConfig(
                offload=Offload(strategy="group", offload_type="leaf_level", use_stream=True)
            ),
            "sequential offload": OptimizationConfig(offload=Offload(strategy="sequential")),
        }
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=8, help="tiny Flux scale (8 -> ~68 M parameters)")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "advisor-bench")
    args = parser.parse_args()

    machine = probe_machine()
    target = target_from_probe(machine)
    print(
        f"machine: {target.name} ({target.device}), {format_size(machine.host.ram_total_bytes)} RAM, Python {platform.python_version()}"
    )
    pipelines = {
        f"flux-like x{args.scale}": (
            build_tiny_flux(args.dir / f"flux-x{args.scale}", scale=args.scale),
            {"height": args.size, "width": args.size},
        ),
        "wan-like": (build_tiny_wan(args.dir / "wan"), {"height": 32, "width": 32, "frames": 5}),
    }
    what = "max_memory_allocated" if target.device == "cuda" else "peak RSS"
    print(f"{'pipeline':<14} {'configuration':<40} {'predicted':>11} {'measured':>11} {'error':>7}  ({what})")
    started = time.perf_counter()
    estimate_times = []
    for label, (folder, job) in pipelines.items():
        profile = profile_from_folder(folder)
        workload = make_workload(profile, steps=args.steps, **job)
        encoders = [c.name for c in profile.by_role("text_encoder") if c.parameters > 40_000]
        for name, config in configurations(target.device, encoders).items():
            t0 = time.perf_counter()
            predicted = estimate(profile, workload, config, target)
            estimate_times.append(time.perf_counter() - t0)
            predicted_peak = predicted.peak_vram_bytes if target.device == "cuda" else predicted.peak_ram_bytes
            result = measure(folder, config, workload, step_points=(1, 2), min_rounds=1)
            measured = result.peak_vram_bytes if target.device == "cuda" else result.peak_rss_bytes
            if not result.ok or not measured:
                print(
                    f"{label:<14} {name:<40} {format_size(predicted_peak):>11} {result.status:>11}  {result.reason or ''}"
                )
                continue
            error = (predicted_peak - measured) / measured
            print(
                f"{label:<14} {name:<40} {format_size(predicted_peak):>11} {format_size(measured):>11} {error:>+7.1%}"
            )
    median_ms = sorted(estimate_times)[len(estimate_times) // 2] * 1000
    print(
        f"estimate cost: median {median_ms:.3f} ms per candidate; benchmark wall time {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
