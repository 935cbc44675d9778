"""The kit's ``multi_gpu`` part: context parallelism over the machine's GPUs, measured against one GPU.

It runs where the machine has more than one GPU like its first (`TargetHardware.gpu_count`); with one
it records that it did not run. Each measurement is one ``torchrun`` launch (``python -m
torch.distributed.run --standalone``), one process per GPU, each running
``python -m advisor.testing.distributed``: ``advisor.load_pipeline`` joins the process group and
splits the transformer (Ulysses), then one warm-up generation and one timed generation at the kit's
workload. The result is the speed-up over one GPU, next to the estimate's. A dry run rehearses the
plumbing on the CPU: two processes on gloo, the tiny pipeline (as tests/test_multi_gpu.py does).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

from kit import advisor_api
from kit.plan import Item, Kit


def part_multi_gpu(kit: Kit) -> None:
    gpus = 2 if kit.args.dry_run else kit.target.gpu_count
    if gpus < 2:
        item = Item(id="multi_gpu", part="multi_gpu", label="context parallelism over several GPUs", status="skipped")
        item.notes.append(f"not run: this machine has one {kit.target.name}")
        kit.run_item(item, lambda item: None)
        return
    target = dataclasses.replace(kit.target, gpu_count=gpus)  # the dry run's two CPU processes stand for two GPUs
    # Ulysses, where the FLUX.1-dev-shaped transformer's 24 heads divide by the degree (2, 3, 4, 6, 8)
    for degree in sorted({1, 2} | ({gpus} if 24 % gpus == 0 else set())):
        split = {"context_parallel": {"degree": degree}} if degree > 1 else {}
        config = advisor_api.config_from_dict({"dtype": kit.dtype, "device": kit.device, **split})
        label = "one GPU" if degree == 1 else f"context parallel (ulysses) over {degree}"
        item = Item(id=f"multi_gpu/{degree}", part="multi_gpu", label=label, config=config)
        kit.run_item(item, lambda item, degree=degree: _measure(kit, item, degree, target))
    one = kit.result_of("multi_gpu/1", "latency_s")
    predicted_one = kit.result_of("multi_gpu/1", "predicted_s")
    kit.data["multi_gpu_speedups"] = {
        item.id: {
            "measured": round(one / item.result["latency_s"], 3),
            "predicted": round(predicted_one / item.result["predicted_s"], 3),
        }
        for item in kit.items
        if item.part == "multi_gpu" and item.status == "ok" and one and predicted_one
    }


def _measure(kit: Kit, item: Item, degree: int, target: Any) -> None:
    config_path = kit.args.work / f"multi_gpu_{degree}.json"
    config_path.write_text(json.dumps(advisor_api.config_record(item.config)[1]))
    out = kit.args.work / f"multi_gpu_{degree}.npy"
    workload = kit.workload
    size = [] if kit.args.dry_run else [str(workload.height), str(workload.width), str(workload.steps)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={degree}",
        "-m", "advisor.testing.distributed", str(kit.folder), str(config_path), str(out), *size,
    ]  # fmt: skip
    kit.log(f"{item.id}: {' '.join(command[1:])}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(min(kit.left(), 600), 60))
    if done.returncode != 0:
        item.status = "error"
        item.notes.append(f"exit {done.returncode}: {(done.stderr or done.stdout)[-800:]}")
        return
    ranks = [json.loads((out.parent / f"{out.name}.rank{rank}.json").read_text()) for rank in range(degree)]
    item.status = "ok"
    item.result["latency_s"] = max(rank["seconds"] for rank in ranks)
    item.result["block_tokens"] = ranks[0]["block_tokens"][:1]
    item.result["predicted_s"] = advisor_api.estimate_record(kit.profile, workload, item.config, target)["latency_s"]
