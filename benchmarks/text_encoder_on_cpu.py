"""Would running a text encoder on the CPU beat streaming it to the GPU? (issue 27)

A GPU too small for a text encoder can stream it in (group offloading) or, with the prompt
embeddings computed beforehand, run it on the CPU. Both keep its weights in host RAM, so the trade
is time alone: per prompt, the encoder's FLOPs (traced at full size, `advisor.plan.compute`) at the
CPU's matmul rate, against its weights crossing PCIe once (the estimate's group-offload rate, its
FLOPs on the card hidden behind the copy). The table prints both for each catalog text encoder, with
this machine's CPU rate measured here (bf16 and fp32 matmuls), and the CPU rate at which the CPU
would break even: what a CPU would need to make it the better trade.

    python benchmarks/text_encoder_on_cpu.py [--gpu "RTX 3060"] [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_matmul_rate(dtype_name: str, seconds: float, size: int = 2048) -> float:
    """FLOP/s of a square matmul on this machine's CPU, median of repeated calls over `seconds`."""
    import statistics

    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        began = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - began)
    return 2 * size**3 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="RTX 3060", help="the card whose PCIe link streams the encoder")
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent measuring each CPU matmul rate")
    args = parser.parse_args()

    import torch

    from advisor.plan.compute import constants, text_work
    from advisor.probe.layout import catalog_names
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    rates = {name: cpu_matmul_rate(name, args.seconds) for name in ("bfloat16", "float32")}
    target = planned_target(machine=None, gpu=args.gpu)
    k = constants()
    stream_rate = target.h2d_bytes_per_s * k["group_offload_bandwidth_factor"]
    print(
        f"torch {torch.__version__}; this machine's CPU ({os.cpu_count()} cores): bf16 matmul "
        f"{rates['bfloat16'] / 1e9:.1f} GFLOP/s, fp32 {rates['float32'] / 1e9:.1f} GFLOP/s (measured, median; "
        f"CPU s at the faster); streaming to the {target.name}'s GPU at {stream_rate / 1e9:.1f} GB/s (PCIe, group offload)"
    )
    header = (
        f"{'model':34} {'encoder':16} {'tokens':>6} {'weights':>8} {'TFLOP':>7} {'stream s':>8} "
        f"{'CPU s':>8} {'break-even TFLOP/s':>19}"
    )
    print(header)
    print("-" * len(header))
    best = max(rates.values())
    for model in catalog_names():
        profile = load_profile(model)
        workload = make_workload(profile)
        for encoder in profile.by_role("text_encoder"):
            work = text_work(encoder, workload, "bfloat16", None)
            flops = work.matmul_flops + work.attention_flops
            weights = encoder.parameters * 2  # bf16
            stream_s = weights / stream_rate
            tokens = encoder.facts.get("max_sequence_length") or 77
            print(
                f"{profile.model_id[:34]:34} {encoder.name:16} {tokens:>6} {weights / 2**30:>7.2f}G "
                f"{flops / 1e12:>7.2f} {stream_s:>8.2f} {flops / best:>8.2f} {flops / stream_s / 1e12:>19.1f}"
            )


if __name__ == "__main__":
    main()
