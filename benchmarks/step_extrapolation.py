"""How well a few measured steps predict a full run: the tuner's latency extrapolation, checked.

For each configuration, one trial times 2 and 4 steps and extrapolates (fixed + per_step x N); a
second trial times the full N-step run. Both run through `advisor.run.measure` in fresh processes.
Goal: within 10 %.

    python benchmarks/step_extrapolation.py [--scale 8] [--size 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from advisor.config import LayerwiseCasting, OptimizationConfig, Quantization
from advisor.probe.models import profile_from_folder
from advisor.probe.workload import make_workload
from advisor.run.measure import measure
from advisor.testing import build_tiny_flux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "advisor-bench")
    args = parser.parse_args()

    folder = build_tiny_flux(args.dir / f"flux-x{args.scale}", scale=args.scale)
    profile = profile_from_folder(folder)
    workload = make_workload(profile, height=args.size, width=args.size, steps=args.steps)
    configs = {
        "fp32": OptimizationConfig(device="cpu", dtype="float32"),
        "bf16": OptimizationConfig(device="cpu"),
        "torchao int8 (transformer)": OptimizationConfig(
            device="cpu", quantization=Quantization(backend="torchao", components=["transformer"])
        ),
        "layerwise fp8 (transformer)": OptimizationConfig(
            device="cpu", layerwise_casting=LayerwiseCasting(components=["transformer"])
        ),
    }
    print(
        f"machine: {platform.node()} {platform.machine()}, {profile.parameters / 1e6:.0f} M-parameter Flux-like pipeline, {workload.label()}"
    )
    print(
        f"{'configuration':<30} {'from 2+4 steps':>15} {f'full {args.steps} steps':>15} {'error':>8} {'trial time':>11}"
    )
    for name, config in configs.items():
        short = measure(folder, config, workload, step_points=(2, 4), min_rounds=2)
        full = measure(folder, config, workload, step_points=(1, args.steps), min_rounds=1)
        if not (short.ok and full.ok):
            print(f"{name:<30} failed: {short.reason or full.reason}")
            continue
        actual = full.step_times[str(args.steps)]
        error = (short.latency_s - actual) / actual
        print(
            f"{name:<30} {short.latency_s:>14.2f}s {actual:>14.2f}s {error:>+8.1%} {short.wall_s:>6.0f}s/{full.wall_s:.0f}s"
        )


if __name__ == "__main__":
    main()
