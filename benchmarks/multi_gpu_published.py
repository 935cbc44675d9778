"""Context parallelism: the estimate's speed-up over several GPUs against every published run it can express.

Each row is a published set of runs of one model on 1, 2, 4 (or 8) GPUs of one card and what
`advisor.plan.estimate` predicts for the same configuration, planned from the datasheet and the
link the advisor assumes for the card (no GPU needed): the speed-up over one GPU, published and
predicted. Speed-ups, not seconds, are compared: a card's one-GPU latency is the single-GPU
estimate's business (benchmarks/published_anchors.py). Goal (issue 33): within 15 % where the run
is diffusers-like (diffusers' own context parallelism, or xDiT/cache-dit's Ulysses on a diffusers
pipeline); Wan's own code (FSDP and its own VAE) and the RTX 4090 rows are shown for what they say.

    python benchmarks/multi_gpu_published.py

Sources:
- cache-dit: NVIDIA L20 (PCIe), FLUX.1-dev 1024x1024, 28 steps, Ulysses, eager
  (https://github.com/vipshop/cache-dit/blob/main/docs/benchmark/NVIDIA_GPU.md, vipshop/cache-dit#754).
- xDiT: H100 with NVLink, FLUX.1-dev 1024x1024, 28 steps, Ulysses, eager and compiled
  (https://github.com/xdit-project/xDiT/blob/main/docs/performance/flux.md).
- diffusers: the distributed-inference guide, 4x H100, FLUX.1-dev, 50 steps, Ulysses, 6.67 s
  (docs/source/en/training/distributed_inference.md); its one-GPU figure is xDiT's 28-step 6.71 s x 50/28.
- Wan: Wan 2.1's README "Computational Efficiency" (FSDP + xDiT's Ulysses; its one-GPU runs offload
  the model): T2V-14B 720p 81 frames 50 steps on H100s, T2V-1.3B 480p on RTX 4090s (ring over 8).
"""

from __future__ import annotations

from advisor.config import Compile, ContextParallel, OptimizationConfig
from advisor.levers.multi_gpu.context_parallel import kind_for
from advisor.plan.estimate import estimate
from advisor.probe.models import load_profile
from advisor.probe.target import planned_target
from advisor.probe.workload import make_workload


FLUX = "black-forest-labs/FLUX.1-dev"
ROWS = [
    ("cache-dit", FLUX, "L20", {"steps": 28}, False, {1: 23.25, 2: 13.87, 4: 8.22}),
    ("xDiT eager", FLUX, "H100", {"steps": 28}, False, {1: 6.71, 2: 4.38, 4: 4.24}),
    ("xDiT compiled", FLUX, "H100", {"steps": 28}, True, {1: 4.30, 2: 2.68, 4: 1.63}),
    ("diffusers guide", FLUX, "H100", {"steps": 50}, False, {1: 6.71 * 50 / 28, 4: 6.67}),
    (
        "Wan README",
        "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        "H100",
        {"width": 1280, "height": 720, "frames": 81, "steps": 50},
        False,
        {1: 1837.9, 2: 945.1, 4: 497.0, 8: 287.9},
    ),
    (
        "Wan README",
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "RTX 4090",
        {"width": 832, "height": 480, "frames": 81, "steps": 50},
        False,
        {1: 261.4, 2: 188.5, 4: 120.8, 8: 112.3},
    ),
]


def predicted_seconds(model: str, gpu: str, gpus: int, job: dict, compiled: bool) -> float:
    profile = load_profile(model)
    target = planned_target(machine=None, gpu=f"{gpus}x {gpu}" if gpus > 1 else gpu)
    heads = profile.by_role("denoiser")[0].facts["num_attention_heads"]
    split = ContextParallel(degree=gpus, kind=kind_for(heads, gpus)) if gpus > 1 else None
    config = OptimizationConfig(context_parallel=split, compile=Compile() if compiled else None)
    return estimate(profile, make_workload(profile, **job), config, target).latency_s


def main() -> int:
    print("| source | model | GPUs | published s | speed-up published | predicted | error |")
    print("|---|---|---|---|---|---|---|")
    for source, model, gpu, job, compiled, published in ROWS:
        one = predicted_seconds(model, gpu, 1, job, compiled)
        for gpus, seconds in published.items():
            if gpus == 1:
                continue
            said = published[1] / seconds
            predicted = one / predicted_seconds(model, gpu, gpus, job, compiled)
            print(
                f"| {source} | {model.split('/')[1]} | {gpus}x {gpu} | {seconds:.2f} | {said:.2f}x | {predicted:.2f}x "
                f"| {predicted / said - 1:+.0%} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
