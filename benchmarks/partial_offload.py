"""Partial offload against N: predicted for Flux and Wan 14B on a 24 GB and a 16 GB card, and counted on this CPU.

Part 1 (the estimate, instant): bf16 FLUX.1-dev and Wan2.1-T2V-14B on an RTX 4090 (24 GB) and an
RTX 4080 (16 GB), 64 GB of RAM, their default workloads: predicted peak and latency with N of the
transformer's blocks resident (the rest on a CUDA stream, as the rule engine offers it), against
model offload and every block group-offloaded (on a stream, and without). The row marked `<- fit`
is the N the rule engine fits to the budget.

Part 2 (measured, this machine): the tiny Flux at scale 3 (5 double- and 9 single-stream blocks)
partly offloaded for real on the CPU. A CPU has one memory, so RAM can't show what stays on a GPU:
instead the bytes left resident (parameters no group of diffusers' group offloading holds) and the
groups loaded per transformer call (diffusers' ``ModuleGroup.onload_`` calls: each streamed block,
and the modules outside the blocks as one) are counted and put beside the estimate's, and the
image is compared with the unoffloaded pipeline's.

    python benchmarks/partial_offload.py [--dir /tmp/advisor-bench]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from advisor.config import Offload, OptimizationConfig
from advisor.levers.offload import block_split, resident_bytes
from advisor.plan.compute import constants
from advisor.plan.estimate import estimate, resident_blocks_that_fit
from advisor.plan.scenario import make_scenario
from advisor.plan.weights import weight_bytes
from advisor.probe.models import load_profile
from advisor.probe.target import planned_target
from advisor.probe.workload import make_workload
from advisor.units import format_size, parse_size


CARDS = ("RTX 4090", "RTX 4080")
MODELS = ("black-forest-labs/FLUX.1-dev", "Wan-AI/Wan2.1-T2V-14B-Diffusers")


def predicted() -> None:
    print("| model | card (budget) | offload | resident blocks | predicted peak | fits | predicted latency |")
    print("|---|---|---|---|---|---|---|")
    for model in MODELS:
        profile = load_profile(model)
        workload = make_workload(profile)
        transformer = next(c for c in profile.components if c.name == "transformer")
        total = sum(b.count for b in transformer.blocks)
        for card in CARDS:
            target = planned_target(machine=None, gpu=card, ram=parse_size("64GB"))
            scenario = make_scenario(profile, workload, target)
            budget = scenario.budget_bytes
            base = OptimizationConfig()

            def row(label: str, offload: Offload, blocks: str, mark: str = "") -> None:
                e = estimate(profile, workload, base.replace(offload=offload), target)
                fits = "yes" if e.peak_vram_bytes <= budget else "no"
                print(
                    f"| {profile.model_id.split('/')[-1]} | {card} ({format_size(budget)}) | {label} | {blocks}{mark} | "
                    f"{format_size(e.peak_vram_bytes)} | {fits} | {e.latency_s:.1f} s |"
                )

            row("model offload", Offload(strategy="model"), "all, one model at a time")
            row("group, block, stream", Offload(strategy="group", use_stream=True, record_stream=True), "0")
            row("group, block", Offload(strategy="group"), "0")
            stream = {"strategy": "group", "use_stream": True, "record_stream": True}
            probe = base.replace(offload=Offload(**stream, resident_blocks={"transformer": 1}))
            fit = resident_blocks_that_fit(scenario, probe, "transformer")
            for count in sorted({max(1, total * k // 4) for k in (1, 2, 3)} | {fit, min(fit + 2, total - 1)}):
                row(
                    "partial, stream",
                    Offload(**stream, resident_blocks={"transformer": count}),
                    f"{count} of {total}",
                    " <- fit" if count == fit else "",
                )


def counted(folder_root: Path) -> None:
    import numpy as np
    from diffusers.hooks.group_offloading import ModuleGroup

    from advisor.probe.models import profile_from_folder
    from advisor.run.apply import load_pipeline
    from advisor.testing import build_tiny_flux, tiny_call_kwargs

    folder = build_tiny_flux(folder_root / "flux-x3", scale=3)
    profile = profile_from_folder(folder)
    component = next(c for c in profile.components if c.name == "transformer")
    total = sum(b.count for b in component.blocks)
    plain = OptimizationConfig(device="cpu", dtype="float32")
    reference = np.asarray(load_pipeline(folder, plain)(**tiny_call_kwargs("image", seed=0)).images)
    onloads: list[ModuleGroup] = []
    original = ModuleGroup.onload_
    ModuleGroup.onload_ = lambda self: onloads.append(self) or original(self)  # count diffusers' own calls
    try:
        print(
            "| resident blocks | resident bytes: counted | estimated | groups loaded per call: counted | estimated | same image |"
        )
        print("|---|---|---|---|---|---|")
        for count in (1, total // 3, 2 * total // 3, total - 1):
            config = plain.replace(
                offload=Offload(strategy="group", components=["transformer"], resident_blocks={"transformer": count})
            )
            pipe = load_pipeline(folder, config)
            calls: list[int] = []
            pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
            onloads.clear()
            image = np.asarray(pipe(**tiny_call_kwargs("image", seed=0)).images)
            groups = {id(g): g for g in onloads}.values()
            offloaded = {
                id(p) for g in groups for p in [*g.parameters, *(q for m in g.modules for q in m.parameters())]
            }
            resident = sum(
                p.numel() * p.element_size() for p in pipe.transformer.parameters() if id(p) not in offloaded
            )
            _, sizes = block_split(component, config)
            expected = resident_bytes(component, weight_bytes(component, config), config, active=False, k=constants())
            print(
                f"| {count} of {total} | {format_size(resident)} | {format_size(expected)} | {len(onloads) / len(calls):g} | "
                f"{len(sizes) + 1} | {'yes' if np.array_equal(image, reference) else 'NO'} |",
                flush=True,
            )
    finally:
        ModuleGroup.onload_ = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "advisor-bench")
    args = parser.parse_args()
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    print()
    predicted()
    print()
    counted(args.dir)


if __name__ == "__main__":
    main()
