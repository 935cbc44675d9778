"""Full-size rehearsals of every catalog model and offload strategy, beside the estimate.

For each catalog model at its default workload, bf16, and each placement (no offload, model
offload, group offload on a stream (a VAE it would strand kept on the card, as the advisor plans
it), sequential offload), the pipeline is rehearsed on a virtual
H100 (`advisor.rehearse`: the real diffusers hooks, every allocation counted) and estimated
(`advisor.plan.estimate`). The table gives, per phase, the rehearsed GPU bytes (what
``torch.cuda.max_memory_allocated`` would show after a reset at the phase's start), the estimate's
allocated bytes (weights + activations, no allocator reserve), their difference; then the reserved
bytes (``max_memory_reserved``: the rehearsal's allocations replayed through the caching-allocator
model, `advisor.plan.allocator`, on the H100's default budget) beside the estimate's, their
difference; the pinned host bytes, and how long each rehearsal took with the process's peak RSS.
Under each configuration, what the whole run needs (`least_capacity`: the least memory the
allocator completes it in) beside the estimate's planned peak. Rows over 10% apart are marked;
docs/benchmarks.md says why they differ and what was fixed.

    python benchmarks/rehearse_catalog.py [--models flux-dev,wan2.1-t2v-14b] [--strategies none,model]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings


os.environ.setdefault("HF_HUB_OFFLINE", "1")
PHASES = ("text_encoding", "denoising", "vae_decode")
GIB = 2**30


def _strategies() -> dict:
    from advisor.config import Offload

    return {
        "none": Offload(),
        "model": Offload(strategy="model"),
        "group-stream": Offload(strategy="group", use_stream=True),
        "sequential": Offload(strategy="sequential"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="Comma-separated catalog names (default: every catalog model).")
    parser.add_argument("--strategies", help=f"Comma-separated, of {', '.join(_strategies())} (default: all).")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from advisor.run.quiet import quiet_library_noise

    quiet_library_noise()
    import torch

    from advisor.config import OptimizationConfig
    from advisor.levers.offload import without_stranded_vaes
    from advisor.plan.estimate import estimate
    from advisor.plan.scenario import default_budget
    from advisor.probe.layout import catalog_names
    from advisor.probe.models import profile_from_catalog
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload
    from advisor.rehearse.build import rehearse_planned

    models = args.models.split(",") if args.models else catalog_names()
    strategies = {k: v for k, v in _strategies().items() if not args.strategies or k in args.strategies.split(",")}
    target = planned_target(machine=None, gpu="H100", ram=512 * GIB)
    print(f"torch {torch.__version__}; target: virtual {target.name}; bf16; two denoising steps", flush=True)
    header = (
        f"{'model':34} {'placement':13} {'phase':14} {'rehearsed':>10} {'estimated':>10} {'diff':>7} "
        f"{'reserved':>10} {'est.res.':>10} {'diff':>7} {'pinned':>8}"
    )
    print(header + f" {'seconds':>8} {'RSS':>7}")
    print("-" * (len(header) + 17))
    for name in models:
        profile = profile_from_catalog(name)
        job = make_workload(profile)
        for label, offload in strategies.items():
            # as the advisor plans it: a VAE block-level offloading would strand stays on the card
            config = OptimizationConfig(device="cuda", offload=without_stranded_vaes(offload, profile))
            planned = estimate(profile, job, config, target)
            predicted = {p.name: p for p in planned.phases}
            started = time.perf_counter()
            result = rehearse_planned(profile, job, config, target, default_budget(target))
            seconds = time.perf_counter() - started
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            if not result.passed:
                why = result.failure or result.not_rehearsed or result.out_of_memory
                print(f"{profile.model_id[:34]:34} {label:13} {why}")
                continue
            for phase in PHASES:
                # the rehearsal runs no cuDNN: its tensors beside the estimate's
                real, guess = result.device_peak(phase), predicted[phase].tensor_bytes
                reserved, guessed = result.allocator.reserved.get(phase, 0), predicted[phase].cached_peak_bytes
                diff = (guess - real) / real if real else 0.0
                reserved_diff = (guessed - reserved) / reserved if reserved else 0.0
                mark = " *" if max(abs(diff), abs(reserved_diff)) > 0.10 else ""
                pinned = result.phase_peaks.get(phase, {}).get("cpu-pinned", 0)
                print(
                    f"{profile.model_id[:34]:34} {label:13} {phase:14} {real / GIB:9.2f}G {guess / GIB:9.2f}G "
                    f"{diff:+7.0%} {reserved / GIB:9.2f}G {guessed / GIB:9.2f}G {reserved_diff:+7.0%} "
                    f"{pinned / GIB:7.2f}G {seconds:8.1f} {rss:6.0f}M{mark}",
                    flush=True,
                )
            needs, plans = result.needs_bytes, planned.peak_vram_bytes
            print(
                f"{'':34} {label:13} {'whole run':14} needs {needs / GIB:.2f}G; the estimate plans "
                f"{plans / GIB:.2f}G ({(plans - needs) / needs:+.0%})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
