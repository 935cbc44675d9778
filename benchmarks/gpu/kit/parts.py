"""The parts of the plan (``--parts``), each a list of items run through `Kit.run_item`.

- ``seed``: the seed page's three nf4 combinations, with their ratios next to the page's RTX 4090 ones;
- ``recommend``: the rule engine's pick for 16 GB and 13 GB, measured: does it fit?
- ``tune``: ``advisor tune --budget 15GB`` with a small trial cap;
- ``offload``: group offload in four forms and sequential offload against bf16 without offload.
- ``attention``: native attention against each faster kernel installed here (`advisor.levers.attention`), and
  the step caches (First Block Cache at two thresholds, MagCache, TaylorSeer lite): latency and PSNR against native's output;
- ``multi_gpu``: context parallelism over the machine's GPUs against one (`kit.multi_gpu`); where it has one, not run.

Budgets are for full-size FLUX.1-dev; `Kit.scaled_budget` scales them to the model built.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

from kit import GIB, advisor_api
from kit.multi_gpu import part_multi_gpu
from kit.plan import Item, Kit, errors, phase_peaks


PARTS = ("seed", "recommend", "tune", "offload", "attention", "multi_gpu")
RECOMMEND_BUDGETS_GB = (16, 13)
TUNE_BUDGET_GB = 15
# The seed page's table, RTX 4090 (latency s, memory GB).
SEED_PAGE = {
    "quantization": {"latency_s": 32.602, "memory_gb": 14.9453},
    "quantization+compile": {"latency_s": 25.847, "memory_gb": 14.9448},
    "quantization+compile+model-offload": {"latency_s": 32.312, "memory_gb": 12.2369},
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def measure_finished(kit: Kit, item: Item, config: Any, save_output: bool = False) -> None:
    """Finish `config` with the rules (after the CPU mapping in a dry run) and measure it."""
    if not kit.args.dry_run and advisor_api.bitsandbytes_needs_cuda(config) and not kit.bnb_ok:
        item.status = "skipped"
        item.notes.append(f"skipped: bitsandbytes is unusable here ({kit.bnb_note})")
        item.config = config
        return
    if kit.args.dry_run:
        config, notes = advisor_api.cpu_equivalent(config, torchao=kit.torchao)
        item.notes += notes
    finished, rejected = advisor_api.finish(config, kit.ctx, measure_cpu_offload=kit.args.dry_run)
    item.config = finished
    if kit.args.dry_run and finished.offload.strategy != "none":
        item.notes.append(
            "measured although the rule engine offers no offloading on a CPU: the dry run exercises the offload plumbing"
        )
    if rejected:
        item.status = "skipped"
        item.notes.append(f"skipped: rejected by rule {rejected}")
        return
    kit.measure_item(item, save_output)


def part_seed(kit: Kit) -> None:
    for name, label, config in advisor_api.seed_configs(kit.device, kit.dtype):
        item = Item(id=f"seed/{name}", part="seed", label=label, reference={"seed_page_rtx4090": SEED_PAGE[name]})
        kit.run_item(item, lambda item, config=config: measure_finished(kit, item, config))
    lat = lambda item_id: kit.result_of(item_id, "latency_s")  # noqa: E731
    peak = lambda item_id: kit.result_of(item_id, "measured_peak_bytes")  # noqa: E731
    q, qc, qco = "seed/quantization", "seed/quantization+compile", "seed/quantization+compile+model-offload"
    page = SEED_PAGE
    kit.data["seed_ratios"] = {
        "compile_speedup": _ratio(lat(q), lat(qc)),
        "seed_page_compile_speedup": _ratio(
            page["quantization"]["latency_s"], page["quantization+compile"]["latency_s"]
        ),
        "model_offload_peak_ratio": _ratio(peak(qco), peak(qc)),
        "seed_page_model_offload_peak_ratio": _ratio(
            page["quantization+compile+model-offload"]["memory_gb"], page["quantization+compile"]["memory_gb"]
        ),
        "model_offload_latency_ratio": _ratio(lat(qco), lat(qc)),
        "seed_page_model_offload_latency_ratio": _ratio(
            page["quantization+compile+model-offload"]["latency_s"], page["quantization+compile"]["latency_s"]
        ),
    }


def part_recommend(kit: Kit) -> None:
    for gb in RECOMMEND_BUDGETS_GB:
        budget = kit.scaled_budget(gb)
        item = Item(
            id=f"recommend/{gb}GB", part="recommend", label=f"advisor recommend --budget {gb}GB", budget_bytes=budget
        )

        def work(item: Item, budget: int = budget, gb: int = gb) -> None:
            if budget != gb * GIB:
                item.notes.append(f"budget {gb} GB scaled to {budget / GIB:.2f} GiB ({kit.budget_scaling_note})")
            result = advisor_api.recommend(
                kit.profile, kit.workload, kit.target, machine=kit.machine, budget_bytes=budget
            )
            item.result["recommend"] = {k: result[k] for k in ("reasons", "alternatives", "candidates")}
            if result["config"] is None:
                item.status = "nothing-fits"
                item.notes.append(
                    "nothing predicted to fit" + (f"; smallest: {result['smallest']}" if result["smallest"] else "")
                )
                return
            config = result["config"]
            if kit.args.dry_run:
                config, notes = advisor_api.cpu_equivalent(config, torchao=kit.torchao)
                item.notes += notes
            item.config = config
            kit.measure_item(item)
            measured = item.result.get("measured_peak_bytes")
            if measured is not None:
                item.result["fits_budget"] = measured <= budget

        kit.run_item(item, work)


def tune_trials(kit: Kit) -> tuple[int, float, float]:
    """(trials that fit the time left, seconds available, expected seconds per trial)."""
    reserve = 0.0
    parts = kit.args.parts
    if not kit.args.dry_run and "offload" in parts and parts.index("offload") > parts.index("tune"):
        # Leave the offload calibration that comes next its baseline and two variants.
        baseline_and_two = advisor_api.offload_configs(kit.device, kit.dtype)[:3]
        reserve = sum(kit.expected_s(advisor_api.finish(c, kit.ctx)[0]) for _, _, c in baseline_and_two)
    available = kit.left() - reserve
    typical = statistics.median(
        [kit.expected_s(i.config) for i in kit.items if i.config is not None and i.part != "tune"] or [60.0]
    )
    if math.isinf(available):  # no time budget (a dry run)
        return kit.args.tune_trials, available, typical
    trials = min(kit.args.tune_trials, int(available // typical)) if typical > 0 else 0
    return trials, available, typical


def part_tune(kit: Kit) -> None:
    budget = kit.scaled_budget(TUNE_BUDGET_GB)
    item = Item(
        id=f"tune/{TUNE_BUDGET_GB}GB",
        part="tune",
        label=f"advisor tune --budget {TUNE_BUDGET_GB}GB",
        budget_bytes=budget,
    )

    def work(item: Item) -> None:
        if budget != TUNE_BUDGET_GB * GIB:
            item.notes.append(
                f"budget {TUNE_BUDGET_GB} GB scaled to {budget / GIB:.2f} GiB ({kit.budget_scaling_note})"
            )
        trials, available, typical = tune_trials(kit)
        item.result["expected_trial_s"] = round(typical, 1)
        if trials < 1:
            item.status = "skipped"
            item.notes.append(f"skipped: a trial is expected to take {typical:.0f} s, {max(available, 0):.0f} s left")
            kit.log(f"{item.id}: {item.notes[-1]}")
            return
        if kit.args.dry_run:
            item.notes.append("tune searched without compile (inductor is too slow on 2 CPU cores)")
        timeout_s = max(available / trials, 30.0) if math.isfinite(available) else max(3 * typical, 120.0)
        study = f"gpu-kit-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        kit.log(f"{item.id}: optuna study {study}, {trials} trials, {timeout_s:.0f} s each at most")
        result = advisor_api.tune(
            kit.folder,
            kit.profile,
            kit.workload,
            kit.target,
            budget_bytes=budget,
            packages=kit.packages,
            storage=f"journal:{kit.args.work / 'tune-journal.log'}",
            study=study,
            trials=trials,
            timeout_s=timeout_s,
            step_points=kit.step_points,
            repeats=kit.repeats,
            max_rounds=kit.max_rounds,
            compile_choices=(False,) if kit.args.dry_run else (True, False),
            on_trial=lambda t: kit.log(f"{item.id}: trial {t['number']} {t['status']}: {t['summary']}"),
        )
        ref_latency = kit.result_of("seed/quantization+compile", "latency_s")
        trials_out = []
        for trial in result["trials"]:
            record = {k: v for k, v in trial.items() if k != "config"}
            earlier = kit.measured.get(advisor_api.config_key(advisor_api.config_from_dict(trial["config"])))
            earlier_latency = (earlier.result.get("measurement") or {}).get("latency_s") if earlier else None
            if earlier_latency and trial["latency_s"]:
                record["kit_item"] = earlier.id
                record["repeat_latency_diff"] = round(trial["latency_s"] / earlier_latency - 1, 4)
            trials_out.append(record)
        item.result["tune"] = {
            "study": result["study"],
            "space_size": result["space_size"],
            "trials": trials_out,
            "advice": result["advice"],
        }
        best = result["best"]
        if best is None:
            item.status = "nothing-fits"
            item.notes += result["advice"]
            return
        item.status = "ok"
        item.config = best["config"]
        item.result["measurement"] = best["measurement"]
        item.result["measured_peak_bytes"] = best["peak_bytes"]
        # The pick's estimate, as for the other items: its errors and per-phase peaks.
        est = advisor_api.estimate_record(kit.profile, kit.workload, item.config, kit.target)
        item.result["estimate"] = est
        item.result["errors"] = errors(est, best["measurement"] or {}, best["peak_bytes"])
        item.result["phase_peaks"] = phase_peaks(est, best["measurement"] or {})
        item.result["latency_vs_seed_quantization_compile"] = _ratio(best["latency_s"], ref_latency)
        if ref_latency is None:
            item.notes.append("seed/quantization+compile was not measured in this run: no relative latency")

    kit.run_item(item, work)


def part_offload(kit: Kit) -> None:
    transformer = next(c for c in kit.profile.components if c.name == "transformer")
    for name, label, config in advisor_api.offload_configs(
        kit.device, kit.dtype, sum(b.count for b in transformer.blocks)
    ):
        item = Item(id=f"offload/{name}", part="offload", label=label)
        # The baseline's output is saved: the attention part's native item is the same config and reuses it.
        kit.run_item(
            item,
            lambda item, config=config, name=name: measure_finished(kit, item, config, save_output=name == "none"),
        )
    kit.data["offload_calibration"] = offload_calibration(kit)


def offload_calibration(kit: Kit) -> dict[str, Any]:
    """Per offload variant: measured extra seconds per step over the baseline, next to the estimate's
    transfer term, and the host->device rate that the measurement implies."""
    base_step = kit.result_of("offload/none", "per_step_s")
    h2d = kit.data.get("target", {}).get("h2d_bytes_per_s")
    out: dict[str, Any] = {
        "baseline_per_step_s": base_step,
        "target_h2d_bytes_per_s": h2d,
        "calibrated_h2d_bytes_per_s": (kit.data.get("environment", {}).get("calibration") or {}).get(
            "h2d_bytes_per_s"
        ),
    }
    for item in kit.items:
        if item.part != "offload" or item.id == "offload/none" or item.status not in ("ok", "reused"):
            continue
        m = item.result.get("measurement") or {}
        est = item.result.get("estimate") or {}
        extra = m["per_step_s"] - base_step if m.get("per_step_s") is not None and base_step is not None else None
        moved = (
            est.get("streamed_block_bytes")
            if item.id.startswith("offload/partial")
            else (est.get("weight_bytes") or {}).get("transformer")
        )
        row = {
            "measured_extra_per_step_s": extra,
            "estimated_step_transfer_s": (est.get("latency_breakdown") or {}).get("step_transfer_s"),
            "moved_bytes_per_step": moved,
            "implied_bytes_per_s": moved / extra if moved and extra and extra > 0 else None,
            "measured_peak_bytes": item.result.get("measured_peak_bytes"),
            "predicted_peak_bytes": est.get("peak_bytes"),
        }
        if row["implied_bytes_per_s"] and h2d:
            row["implied_bandwidth_factor"] = round(row["implied_bytes_per_s"] / h2d, 4)
        out[item.id] = row
    return out


def part_attention(kit: Kit) -> None:
    """Native attention, each faster kernel installed here, and the step caches (First Block Cache
    at two thresholds, MagCache, TaylorSeer lite): latency against native, and PSNR/SSIM of each
    output against native's (same seed and steps)."""
    device = "cpu" if kit.args.dry_run else kit.device
    items = [
        (f"attention/{name}", label, config)
        for name, label, config in advisor_api.attention_configs(device, kit.dtype)
    ]
    caches = advisor_api.cache_configs(device, kit.dtype, kit.workload.steps)
    items += [(f"cache/{name}", label, config) for name, label, config in (caches[:1] if kit.args.dry_run else caches)]
    for item_id, label, config in items:
        item = Item(id=item_id, part="attention", label=label)
        kit.run_item(item, lambda item, config=config: measure_finished(kit, item, config, save_output=True))
    native = kit.result_of("attention/native", "latency_s")
    reference = kit.output_of("attention/native")
    kit.data["attention_speedups"] = {}
    for item in kit.items:
        if item.part == "attention" and item.status in ("ok", "reused"):
            kit.data["attention_speedups"][item.id] = _ratio(native, kit.result_of(item.id, "latency_s"))
            item.result["quality"] = (
                advisor_api.compare_outputs(kit.output_of(item.id), reference)
                if item.id != "attention/native"
                else None
            )


RUNNERS = {
    "seed": part_seed,
    "recommend": part_recommend,
    "tune": part_tune,
    "offload": part_offload,
    "attention": part_attention,
    "multi_gpu": part_multi_gpu,
}
