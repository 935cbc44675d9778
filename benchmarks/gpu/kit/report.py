"""What the kit leaves: the log lines, strict JSON, and the notes, findings and tables (stdout and .md)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit import GIB


if TYPE_CHECKING:
    from kit.plan import Kit


class Log:
    """Timestamped lines on stdout, copied to a log file when one is set."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.path: Path | None = None

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(line + "\n")


def finite(value: Any) -> Any:
    """`value` with every infinite or NaN float replaced by None, so the results are strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as strict JSON, replacing `path` at once so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(finite(data), indent=2, default=str, allow_nan=False) + "\n")
    tmp.replace(path)


def fmt_gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


PHASES_ON_CPU = "no allocator peak on CPU"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def table(kit: Kit) -> str:
    """One row per item: config, status, latency and peak next to the estimate's, reserved memory, wall time."""
    gpu = not kit.args.dry_run
    peak_name = "alloc GiB" if gpu else "RSS GiB"
    header = [
        "item",
        "config",
        "status",
        "latency s ±spread (est)",
        f"{peak_name} (est, err)",
        "reserved GiB",
        "wall s",
    ]
    rows = []
    for item in kit.items:
        m = item.result.get("measurement") or {}
        est = item.result.get("estimate") or {}
        err = (item.result.get("errors") or {}).get("peak")
        latency = m.get("latency_s")
        spread = m.get("latency_spread_s")
        lat = (f"{latency:.2f}" if latency is not None else "-") + (
            f" ±{spread / latency:.0%}" if latency and spread is not None else ""
        )
        lat += (" noisy" if m.get("noisy") else "") + (
            f" ({est['latency_s']:.2f})" if est.get("latency_s") is not None else ""
        )
        peak = item.result.get("measured_peak_bytes")
        peak_text = f"{peak / GIB:.2f}" if peak else "-"
        if est.get("peak_bytes"):
            peak_text += f" ({est['peak_bytes'] / GIB:.2f}" + (f", {err:+.0%})" if err is not None else ")")
        reserved = m.get("peak_vram_reserved_bytes")
        wall = m.get("wall_s")
        rows.append(
            [
                item.id,
                item.summary,
                item.status,
                lat,
                peak_text,
                f"{reserved / GIB:.2f}" if reserved else "-",
                f"{wall:.0f}" if wall else "-",
            ]
        )
    return _markdown(header, rows)


def phase_table(kit: Kit) -> str:
    """Per measured item and phase: the estimate's device bytes next to the measured peak, and the error.

    The measured peak of a phase is ``torch.cuda.max_memory_allocated`` from its start to the next
    phase's start in one timed generation (`advisor.run.phases.PhasePeaks`); a CPU has no allocator
    peak, so the dry run says so instead of a table. Items that reuse another's measurement are left out.
    """
    items = [i for i in kit.items if i.status == "ok" and i.result.get("phase_peaks")]
    title = "Per-phase peaks (predicted: the estimate's device bytes of the phase; measured: max_memory_allocated from the phase's start to the next's):"
    if not any(row.get("measured_bytes") is not None for i in items for row in i.result["phase_peaks"].values()):
        why = PHASES_ON_CPU if kit.args.dry_run else "no item measured per-phase peaks"
        return f"{title}\n{why}" + ("; the predicted ones are in the JSON's phase_peaks" if items else "")
    rows = []
    for item in items:
        for phase, row in item.result["phase_peaks"].items():
            predicted, measured, err = row.get("predicted_bytes"), row.get("measured_bytes"), row.get("error")
            rows.append(
                [
                    item.id,
                    phase,
                    f"{predicted / GIB:.2f}" if predicted is not None else "-",
                    f"{measured / GIB:.2f}" if measured is not None else "-",
                    f"{err:+.0%}" if err is not None else "-",
                ]
            )
    return f"{title}\n\n" + _markdown(["item", "phase", "predicted GiB", "measured GiB", "error"], rows)


def findings_block(kit: Kit) -> str:
    """A few lines on what the seed, tune, offload and attention parts found, against the seed page."""
    lines = ["Findings:"]
    ratios = kit.data.get("seed_ratios") or {}
    if ratios.get("compile_speedup"):
        lines.append(
            f"- compile speed-up (nf4): {ratios['compile_speedup']:.2f}x (seed page, RTX 4090: {ratios['seed_page_compile_speedup']:.2f}x)"
        )
    if ratios.get("model_offload_peak_ratio"):
        lines.append(
            f"- model offload peak / no offload (nf4 + compile): {ratios['model_offload_peak_ratio']:.2f} "
            f"(seed page: {ratios['seed_page_model_offload_peak_ratio']:.2f}); "
            f"latency {ratios.get('model_offload_latency_ratio') or float('nan'):.2f} "
            f"(seed page: {ratios['seed_page_model_offload_latency_ratio']:.2f})"
        )
    tune = next((i for i in kit.items if i.part == "tune"), None)
    if tune is not None and tune.result.get("latency_vs_seed_quantization_compile"):
        lines.append(
            f"- tune's pick ({tune.summary}) runs at {tune.result['latency_vs_seed_quantization_compile']:.2f}x "
            "the latency of the seed's nf4 + compile"
        )
    for item_id, row in (kit.data.get("offload_calibration") or {}).items():
        if isinstance(row, dict) and row.get("implied_bytes_per_s"):
            lines.append(
                f"- {item_id}: +{row['measured_extra_per_step_s']:.3f} s/step over no offload "
                f"(estimate {row['estimated_step_transfer_s'] or 0:.3f} s), {row['implied_bytes_per_s'] / 1e9:.1f} GB/s moved"
            )
    for item_id, speedup in (kit.data.get("multi_gpu_speedups") or {}).items():
        if item_id != "multi_gpu/1":
            lines.append(
                f"- {item_id}: {speedup['measured']:.2f}x the speed of one GPU, whole generation "
                f"(predicted {speedup['predicted']:.2f}x)"
            )
    for item in kit.items:
        if item.id == "multi_gpu" and item.status == "skipped":
            lines.append(f"- multi_gpu: {'; '.join(item.notes)}")
    for item_id, speedup in (kit.data.get("attention_speedups") or {}).items():
        if speedup is not None and item_id != "attention/native":
            quality = next((i.result.get("quality") for i in kit.items if i.id == item_id), None) or {}
            psnr = (
                ("identical" if quality.get("psnr_db") is None else f"PSNR {quality['psnr_db']:.1f} dB")
                if quality
                else "not compared"
            )
            lines.append(
                f"- {item_id}: {speedup:.2f}x the speed of native attention, whole generation; {psnr} against native's output"
            )
    peak_errors = [
        i.result["errors"]["peak"]
        for i in kit.items
        if (i.result.get("errors") or {}).get("peak") is not None and i.status == "ok"
    ]
    if peak_errors:
        lines.append(
            f"- estimate peak error over {len(peak_errors)} measured configs: median {statistics.median(peak_errors):+.0%}, "
            f"worst {max(peak_errors, key=abs):+.0%}"
        )
    by_phase: dict[str, list[float]] = {}
    for item in kit.items:
        for phase, row in (item.result.get("phase_peaks") or {}).items() if item.status == "ok" else ():
            if row.get("error") is not None:
                by_phase.setdefault(phase, []).append(row["error"])
    if by_phase:
        lines.append(
            "- estimate per-phase peak error, median (worst): "
            + ", ".join(
                f"{phase} {statistics.median(e):+.0%} ({max(e, key=abs):+.0%})" for phase, e in by_phase.items()
            )
        )
    return "\n".join(lines)


def notes_block(kit: Kit) -> str:
    lines = [f"- {item.id}: {note}" for item in kit.items for note in item.notes]
    return "\n".join(lines + [f"- {note}" for note in kit.data["notes"]])


def final_report(kit: Kit, environment: dict[str, Any]) -> str:
    """Notes, findings, the per-phase peaks, a header line and the table: written to the .md file and printed last."""
    gpu = not kit.args.dry_run
    budget = f"{kit.args.budget_s:.0f} s" if kit.args.budget_s is not None else "no time budget"
    header = (
        f"GPU kit ({kit.data['mode']}), {environment.get('gpu') or 'CPU'}, torch {environment.get('torch')}, "
        f"model {kit.data['model']['model_id']}, workload {kit.data['workload_label']}, {time.time() - kit.t0:.0f} s of {budget}"
    )
    legend = (
        "latency: extrapolated to the workload's steps (estimate in brackets); peak: "
        + ("torch.cuda.max_memory_allocated" if gpu else "the trial process's peak RSS")
        + " (estimate, its error)"
    )
    return f"Notes:\n{notes_block(kit)}\n\n{findings_block(kit)}\n\n{phase_table(kit)}\n\n{header}\n{legend}\n\n{table(kit)}\n"
