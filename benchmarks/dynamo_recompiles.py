"""Where dynamo recompiles: regional compile alone, with group offload and with partial offload.

Each configuration is measured as `advisor tune` measures it (its own process, warm-up and timed
rounds), and the trial reports what dynamo did over all its calls (`Measurement.dynamo`): frames
compiled (a recompile is one more), unique graphs and graph breaks. On a CPU the compile backend is
`eager` (dynamo traces, guards and recompiles as it does for inductor; nothing is code-generated)
and nothing moves between devices, so a recompile here comes from the hooks themselves, not from
weights changing device; the GPU kit reports the same counters on a GPU.

    python benchmarks/dynamo_recompiles.py [--scale 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from advisor.config import Compile, Offload, OptimizationConfig
from advisor.probe.models import profile_from_folder
from advisor.probe.workload import make_workload
from advisor.run.measure import measure
from advisor.testing import build_tiny_flux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2, help="tiny Flux width and depth (2: 8 transformer blocks)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "advisor-bench")
    args = parser.parse_args()
    folder = build_tiny_flux(args.dir / f"flux-x{args.scale}", scale=args.scale)
    profile = profile_from_folder(folder)
    blocks = sum(b.count for b in profile.by_role("denoiser")[0].blocks)
    workload = make_workload(profile, height=32, width=32, steps=8)
    compiled = Compile(
        components=["transformer"],
        regional=True,
        fullgraph=False,
        backend="eager",
        dynamo_config={"cache_size_limit": 1000},
    )
    group = dict(strategy="group", components=["transformer"])
    configs = {
        "regional compile, no offload": OptimizationConfig(device="cpu", dtype="float32", compile=compiled),
        "+ group offload (every block)": OptimizationConfig(
            device="cpu", dtype="float32", compile=compiled, offload=Offload(**group)
        ),
        f"+ partial offload ({blocks // 3} of {blocks} resident)": OptimizationConfig(
            device="cpu",
            dtype="float32",
            compile=compiled,
            offload=Offload(**group, resident_blocks={"transformer": blocks // 3}),
        ),
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}; tiny Flux x{args.scale} "
        f"({blocks} transformer blocks of 2 classes), {workload.label()}, compile backend eager"
    )
    print()
    print("| configuration | calls | frames compiled | unique graphs | graph breaks | latency (s) |")
    print("|---|---|---|---|---|---|")
    for label, config in configs.items():
        m = measure(folder, config, workload, min_rounds=3, max_rounds=3, tolerance=0.5)
        calls = 1 + (m.rounds or 0) * 2  # the warm-up, then two step points per round
        d = m.dynamo or {}
        print(
            f"| {label} | {calls} | {d.get('frames_compiled')} | {d.get('unique_graphs')} | {d.get('graph_breaks')} | "
            f"{m.latency_s:.3f} |"
            if m.ok
            else f"| {label} | - | - | - | - | {m.status}: {m.reason} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
