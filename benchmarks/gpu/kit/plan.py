"""The plan: the items to measure, the time budget they share, and measuring one item.

The budget (``--budget-s``) counts from the kit's start, installation included. Before each
measurement the kit predicts its duration (`Kit.expected_s`: start-up, loading, the timed calls
from the estimate's latency, compilation), times a correction learnt from the items measured so
far; an item that does not fit what is left is skipped with the reason, and every measurement's
timeout is cut to what is left.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kit import GIB, advisor_api
from kit.report import Log, fmt_gib, write_json


KIT_VERSION = 1
SAFETY_S = 15.0  # kept free at the end for writing results


@dataclass
class Item:
    """One measurement (or study) of the plan, and what came of it."""

    id: str
    part: str
    label: str
    config: Any = None  # an advisor OptimizationConfig; None for the tune study until it picks
    notes: list[str] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    budget_bytes: int | None = None
    status: str = "planned"  # ok | oom | crash | timeout | skipped | reused | nothing-fits | error
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The config's one-line summary, or the item's label before it has a config."""
        return advisor_api.config_record(self.config)[0] if self.config is not None else self.label

    def to_dict(self) -> dict[str, Any]:
        summary, config = advisor_api.config_record(self.config) if self.config is not None else (None, None)
        return {
            "id": self.id,
            "part": self.part,
            "label": self.label,
            "status": self.status,
            "summary": summary,
            "config": config,
            "budget_bytes": self.budget_bytes,
            "notes": self.notes,
            "reference": self.reference,
            **self.result,
        }


class Kit:
    """The plan, the time budget, the results and their JSON."""

    def __init__(self, args: argparse.Namespace, log: Log) -> None:
        self.args = args
        self.log = log
        self.t0 = log.t0
        self.deadline = self.t0 + args.budget_s if args.budget_s is not None else math.inf  # none: a dry run
        self.items: list[Item] = []
        self.measured: dict[str, Item] = {}  # config key -> the item that measured it
        # Set up by run_kit.setup(): the machine, the target, the model and the workload (advisor objects).
        self.machine: Any = None
        self.packages: dict[str, str | None] = {}
        self.target: Any = None
        self.ctx: Any = None
        self.profile: Any = None
        self.workload: Any = None
        self.folder: Path | None = None
        self.model_bytes = 0
        self.device, self.dtype = "cuda", "bfloat16"
        self.step_points: tuple[int, ...] = (2, 4)
        self.repeats = 2
        self.max_rounds = 4  # two rounds beyond `repeats` while the spread settles: the kit has minutes, not hours
        self.bnb_ok, self.bnb_note, self.torchao = False, "", False
        self.budget_scaling_note = ""
        self.scaled_budget: Callable[[int], int] = lambda gb: gb * GIB
        self.ratios: list[float] = []  # measured wall / expected, for the correction
        self.data: dict[str, Any] = {
            "kit_version": KIT_VERSION,
            "mode": "dry-run" if args.dry_run else "gpu",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t0)),
            "budget_s": args.budget_s,
            "parts": args.parts,
            "notes": [],
        }
        out = os.environ.get("OUT")
        self.json_path = args.json or (Path(out) / "gpu_kit.json" if out else args.work / "gpu_kit.json")
        self.md_path = self.json_path.with_suffix(".md")

    # time ---------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time() - SAFETY_S

    def correction(self) -> float:
        return min(max(statistics.median(self.ratios), 0.5), 5.0) if self.ratios else 1.0

    def expected_s(self, config: Any) -> float:
        """Seconds one `measure` of `config` should take: start-up, load, warm-up and timed calls."""
        est = advisor_api.estimate_record(self.profile, self.workload, config, self.target)
        points, repeats = self.step_points, self.repeats
        steps = points[0] + repeats * sum(points)
        calls = 1 + repeats * len(points)
        gpu = not self.args.dry_run
        startup = 10.0 if gpu else 3.0
        load = self.model_bytes / (1.5e9 if gpu else 3e8)
        if gpu and config.quantization is not None:
            load *= 1.5  # quantizing while loading
        compile_s = 0.0
        if config.compile is not None:
            compile_s = 60.0 if config.compile.backend == "inductor" else 1.0
        return (
            startup + load + steps * est["step_latency_s"] + calls * est["fixed_s"] + compile_s
        ) * self.correction()

    def result_of(self, item_id: str, key: str) -> Any:
        """A measured value of an item ("latency_s", "per_step_s", ... or "measured_peak_bytes"), if any."""
        item = next((i for i in self.items if i.id == item_id), None)
        if item is None or item.status not in ("ok", "reused"):
            return None
        if key in item.result:
            return item.result[key]
        return (item.result.get("measurement") or {}).get(key)

    # output -------------------------------------------------------------------------------------
    def save(self) -> None:
        self.data["items"] = [item.to_dict() for item in self.items]
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        write_json(self.data, self.json_path)

    # measuring ----------------------------------------------------------------------------------
    def output_of(self, item_id: str) -> Path:
        """Where an item's output is saved, for the quality comparisons of the attention part."""
        return self.args.work / "outputs" / (item_id.replace("/", "_") + ".npy")

    def measure_item(self, item: Item, save_output: bool = False) -> None:
        """Estimate and measure `item.config` (or reuse an earlier item's measurement of it)."""
        config = item.config
        est = advisor_api.estimate_record(self.profile, self.workload, config, self.target)
        item.result["estimate"] = est
        earlier = self.measured.get(advisor_api.config_key(config))
        if earlier is not None and save_output and not self.output_of(earlier.id).exists():
            earlier = None  # measured without saving its output: measure again, this time saving it
        if earlier is not None:
            if save_output:
                shutil.copyfile(self.output_of(earlier.id), self.output_of(item.id))
            item.status = "reused" if earlier.status == "ok" else earlier.status
            item.notes.append(f"same config as {earlier.id}: its measurement is reused")
            for key in ("measurement", "errors", "measured_peak_bytes", "phase_peaks"):
                item.result[key] = earlier.result.get(key)
            return
        expected = self.expected_s(config)
        item.result["expected_s"] = round(expected, 1)
        left = self.left()
        if left < expected:
            item.status = "skipped"
            item.notes.append(f"skipped: expected {expected:.0f} s, {max(left, 0):.0f} s left in the budget")
            self.log(f"{item.id}: {item.notes[-1]}")
            return
        timeout = min(left, max(3 * expected, 120.0))
        self.log(f"{item.id}: measuring {item.summary} (expected {expected:.0f} s, timeout {timeout:.0f} s)")
        output = self.output_of(item.id) if save_output else None
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
        m, measured = advisor_api.measure(
            self.folder,
            config,
            self.workload,
            self.target,
            timeout_s=timeout,
            step_points=self.step_points,
            repeats=self.repeats,
            max_rounds=self.max_rounds,
            output_path=output,
        )
        item.status = m["status"]
        item.result["measurement"] = m
        if m["reason"]:
            item.notes.append(m["reason"])
        if m["status"] == "ok" and m["wall_s"]:
            self.ratios.append(m["wall_s"] / (expected / self.correction()))
        item.result["measured_peak_bytes"] = measured
        item.result["errors"] = errors(est, m, measured)
        item.result["phase_peaks"] = phase_peaks(est, m)
        self.measured[advisor_api.config_key(config)] = item
        lat = f"{m['latency_s']:.2f} s" if m["latency_s"] is not None else "-"
        self.log(
            f"{item.id}: {m['status']} in {m['wall_s'] or 0:.0f} s: latency {lat}, peak {fmt_gib(measured)} "
            f"(predicted {fmt_gib(est['peak_bytes'])})"
        )

    def run_item(self, item: Item, work: Callable[[Item], None]) -> None:
        """Add `item` and do its `work`; an exception becomes the item's result, and the kit goes on."""
        self.items.append(item)
        try:
            work(item)
        except Exception as exc:
            item.status = "error"
            item.notes.append(f"{type(exc).__name__}: {str(exc)[:500]}")
            self.log(f"{item.id}: ERROR {item.notes[-1]}")
        self.save()


def rel(p: float | None, actual: float | None) -> float | None:
    """The relative error (predicted - measured) / measured; None without both."""
    return None if p is None or not actual else round((p - actual) / actual, 4)


def errors(est: dict[str, Any], m: dict[str, Any], measured: int | None) -> dict[str, float | None]:
    """Relative errors of the estimate, (predicted - measured) / measured."""
    reserved = m.get("peak_vram_reserved_bytes")
    return {
        "peak": rel(est["peak_bytes"], measured),
        "peak_vs_reserved": rel(est["peak_vram_bytes"], reserved) if reserved else None,
        "latency": rel(est["latency_s"], m.get("latency_s")),
        "per_step": rel(est["step_latency_s"], m.get("per_step_s")),
    }


def phase_peaks(est: dict[str, Any], m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per phase: the estimate's device bytes, the measured peak (``max_memory_allocated`` from the
    phase's start to the next one's; None on a CPU, which has no allocator peak) and the error."""
    measured = m.get("phase_peak_vram_bytes") or {}
    predicted = est.get("phase_device_bytes") or {}
    return {
        phase: {
            "predicted_bytes": predicted.get(phase),
            "measured_bytes": measured.get(phase),
            "error": rel(predicted.get(phase), measured.get(phase)),
        }
        for phase in [*predicted, *(p for p in measured if p not in predicted)]
    }
