"""Reports of a tuning study: the latency-against-memory plot and a Markdown summary.

matplotlib is imported only here, when a report is asked for.
"""

from __future__ import annotations

from pathlib import Path

from advisor.run.results import TuneResult
from advisor.run.trials import Source, Status, TrialRecord
from advisor.units import GIB, format_size


def pareto_front(trials: list[TrialRecord]) -> list[TrialRecord]:
    """Measured trials no other measured trial beats on both latency and peak memory."""
    points = sorted(
        (
            t
            for t in trials
            if t.status in {Status.OK, Status.OVER_BUDGET} and t.latency_s is not None and t.peak_bytes
        ),
        key=lambda t: (t.peak_bytes, t.latency_s),
    )
    front, best_latency = [], float("inf")
    for trial in points:
        if trial.latency_s < best_latency:
            front.append(trial)
            best_latency = trial.latency_s
    return front


MEASURED = {Status.OK: ("tab:blue", "measured, fits"), Status.OVER_BUDGET: ("tab:orange", "measured, over budget")}


def _unit(largest_bytes: float) -> tuple[float, str]:
    """The unit the plot's memory axis reads in: MB below 1 GB, else GB (binary, as everywhere)."""
    return (GIB, "GB") if largest_bytes >= GIB else (2**20, "MB")


def _label_offset(number: int) -> tuple[int, int]:
    """Where a point's number goes, in points from it: turns around the point, so that trials with
    nearly the same peak and latency (common: quantizing a small model changes little) stay legible."""
    return [(6, 5), (6, -13), (-14, 5), (-14, -13)][number % 4]


def plot(result: TuneResult, path: Path) -> Path:
    """`figure` saved as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def figure(result: TuneResult):
    """Latency against peak memory, the picture a user would show a colleague (a matplotlib figure).

    Every measured trial is a filled dot labelled with its number, with error bars from the
    measured spread; its predicted (peak, latency) is a hollow marker joined to it, so the
    estimate's error can be seen. Skipped candidates and failed trials have only predictions:
    hollow markers, so a study where nothing fits is not an empty chart. The axes fit the data;
    the budget is a line where it lies inside them and an arrow at the edge where it lies far
    beyond. The chosen trial is ringed. Below, a table names each trial's configuration.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = result.trials
    measured = [t for t in trials if t.status in MEASURED and t.peak_bytes and t.latency_s is not None]
    predicted = [t for t in trials if t.predicted_peak_bytes and t.predicted_latency_s is not None]
    peaks = [t.peak_bytes for t in measured] + [t.predicted_peak_bytes for t in predicted]
    scale, unit = _unit(max(peaks + [result.budget_bytes if not peaks else 0]) or GIB)

    # Laid out in inches: the chart on top, the table of trials below it, one line per trial.
    chart_h, row_h, margin = 4.2, 0.21, 0.75
    table_h = row_h * (len(trials) + 1)
    height = chart_h + margin * 2 + table_h
    fig = plt.figure(figsize=(9.5, height), dpi=110)
    ax = fig.add_axes([0.08, (table_h + margin * 1.35) / height, 0.62, chart_h / height])
    drawn_handles = set()
    for t in predicted:  # the estimate: hollow, joined to what was measured
        x, y = t.predicted_peak_bytes / scale, t.predicted_latency_s
        ax.scatter([x], [y], s=46, facecolors="none", edgecolors="tab:gray", linewidths=1.2, zorder=2)
        mine = next((m for m in measured if m.number == t.number), None)
        if mine is not None:
            ax.plot(
                [x, mine.peak_bytes / scale], [y, mine.latency_s], color="tab:gray", linewidth=0.6, alpha=0.6, zorder=1
            )
        else:
            ax.annotate(
                f"{t.number}",
                (x, y),
                xytext=_label_offset(t.number),
                textcoords="offset points",
                fontsize=8,
                color="tab:gray",
            )
        drawn_handles.add("predicted")
    for status, (color, _label) in MEASURED.items():
        points = [t for t in measured if t.status == status]
        if points:
            ax.errorbar(
                [t.peak_bytes / scale for t in points],
                [t.latency_s for t in points],
                yerr=[t.latency_spread_s or 0.0 for t in points],
                fmt="o",
                color=color,
                ecolor=color,
                elinewidth=1,
                capsize=3,
                markersize=7,
                zorder=3,
            )
            drawn_handles.add(status)
    for t in measured:
        ax.annotate(
            f"{t.number}",
            (t.peak_bytes / scale, t.latency_s),
            xytext=_label_offset(t.number),
            textcoords="offset points",
            fontsize=9,
            fontweight="bold",
        )
    front = pareto_front(trials)
    if len(front) > 1:
        ax.plot(
            [t.peak_bytes / scale for t in front],
            [t.latency_s for t in front],
            "--",
            color="tab:blue",
            alpha=0.35,
            zorder=1,
        )
        drawn_handles.add("front")
    best = result.best
    if best is not None and best.peak_bytes:
        ax.scatter(
            [best.peak_bytes / scale],
            [best.latency_s],
            s=320,
            facecolors="none",
            edgecolors="gold",
            linewidths=2.5,
            zorder=4,
        )
        drawn_handles.add("chosen")

    # Axes fitted to the data; the budget inside them when it is within half the data's magnitude
    # of them, else an arrow at the edge it lies beyond (a 12 GB budget would squash 0.5 GB points).
    xs = [p / scale for p in peaks] or [result.budget_bytes / scale]
    low, high = min(xs), max(xs)
    budget = result.budget_bytes / scale
    near = 0.5 * low <= budget <= 1.5 * high
    if near:
        low, high = min(low, budget), max(high, budget)
    pad = max(high - low, 0.02 * high) * 0.12
    ax.set_xlim(low - pad, high + pad)
    budget_label = f"budget {format_size(result.budget_bytes)}"
    if near:
        ax.axvline(budget, color="tab:red", linestyle=":", linewidth=1.5)
        ax.annotate(
            budget_label,
            (budget, 0),
            xycoords=("data", "axes fraction"),
            xytext=(4, 6),
            textcoords="offset points",
            ha="left",
            fontsize=8,
            color="tab:red",
            rotation=90,
        )
        drawn_handles.add("budget")
    elif budget > high:
        ax.annotate(
            f"{budget_label} \u2192",
            (1, 1),
            xycoords="axes fraction",
            xytext=(-4, -12),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="tab:red",
        )
    else:
        ax.annotate(
            f"\u2190 {budget_label}",
            (0, 1),
            xycoords="axes fraction",
            xytext=(4, -12),
            textcoords="offset points",
            ha="left",
            fontsize=8,
            color="tab:red",
        )
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_xlabel(f"peak memory ({unit}; 1 {unit} = 2^{30 if unit == 'GB' else 20} bytes)")
    ax.set_ylabel("latency per generation (s)")
    ys = [t.latency_s + (t.latency_spread_s or 0) for t in measured] + [t.predicted_latency_s for t in predicted]
    ax.set_ylim(0, max(ys) * 1.15 if ys else 1)
    title = result.study if best is not None else f"{result.study}: nothing fits {format_size(result.budget_bytes)}"
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(alpha=0.3)

    from matplotlib.lines import Line2D

    legend = {
        status: Line2D([], [], marker="o", linestyle="", color=color, label=f"{label} (bars: spread)")
        for status, (color, label) in MEASURED.items()
    }
    legend |= {
        "predicted": Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="none",
            markeredgecolor="tab:gray",
            label="predicted by the estimate\n(line: to its measurement)",
        ),
        "chosen": Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="none",
            markeredgecolor="gold",
            markeredgewidth=2.5,
            markersize=12,
            label="chosen",
        ),
        "budget": Line2D([], [], color="tab:red", linestyle=":", label="budget"),
        "front": Line2D([], [], color="tab:blue", linestyle="--", alpha=0.35, label="Pareto front"),
    }
    chart_top = (table_h + margin * 1.35 + chart_h) / height
    fig.legend(
        handles=[h for key, h in legend.items() if key in drawn_handles],
        loc="upper left",
        bbox_to_anchor=(0.72, chart_top),
        fontsize=8,
        frameon=False,
        labelspacing=0.9,
    )

    table = [["#", "configuration", "status", "latency", "peak", "predicted"]]
    for t in trials:
        latency = "-" if t.latency_s is None else _latency(t) + " s"
        table.append(
            [
                str(t.number) + (" *" if best is not None and t.number == best.number else ""),
                t.summary,
                t.status + (", noisy" if t.noisy else ""),
                latency,
                format_size(t.peak_bytes),
                format_size(t.predicted_peak_bytes),
            ]
        )
    cells = fig.add_axes([0.02, 0.15 / height, 0.96, table_h / height])
    cells.axis("off")
    drawn = cells.table(
        cellText=table[1:],
        colLabels=table[0],
        bbox=[0, 0, 1, 1],
        cellLoc="left",
        colLoc="left",
        colWidths=[0.05, 0.45, 0.14, 0.14, 0.11, 0.11],
    )
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(7.5)
    for cell in drawn.get_celld().values():
        cell.set_linewidth(0.3)
    return fig


def markdown(result: TuneResult, image: str | None = None, quality_image: str | None = None) -> str:
    """A summary a person can read: the pick, then every trial."""
    lines = [
        f"# advisor tune: {result.study}",
        "",
        f"Budget: {format_size(result.budget_bytes)}; storage: `{result.storage}`; search space: {result.space_size} configurations.",
        "",
    ]
    if result.best is not None:
        lines += [
            f"**Chosen**: {result.best.summary}: {result.best.latency_s:.3f} s, peak {format_size(result.best.peak_bytes)} (trial {result.best.number}).",
            "",
        ]
    else:
        lines += ["**Nothing feasible.**", ""] + [f"- {line}" for line in result.advice] + [""]
    if result.interrupted:
        lines += ["*Interrupted: the trials finished so far; running the same command resumes the study.*", ""]
    lines += [f"Note: {note}." for note in result.notes] + ([""] if result.notes else [])
    if image:
        lines += [f"![latency against peak memory]({image})", ""]
    if quality_image:
        lines += [
            "The lossless reference beside a compared output (same seed, prompt and steps):",
            "",
            f"![reference and chosen output]({quality_image})",
            "",
        ]
    lines += [
        "| trial | configuration | status | latency (s) | peak | predicted peak | quality | source | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in result.trials:
        latency = "-" if t.latency_s is None else _latency(t)
        if t.noisy:
            latency += " (noisy)"
        lines.append(
            f"| {t.number} | {t.summary} | {t.status} | {latency} | {format_size(t.peak_bytes)} | "
            f"{format_size(t.predicted_peak_bytes)} | {_quality(t)} | {t.source} | {t.reason or ''} |"
        )
    return "\n".join(lines) + "\n"


def _quality(t: TrialRecord) -> str:
    """PSNR and SSIM against the lossless reference, where the trial's output was compared; ``lossless``
    for a configuration that computes the reference's numbers (as the CLI's table says)."""
    if t.quality is None:
        return "lossless" if t.lossless else "-"
    psnr = "identical" if t.quality.get("psnr_db") is None else f"{t.quality['psnr_db']:.1f} dB"
    return f"{psnr}, SSIM {t.quality['ssim']:.4f}" + (
        f", worst frame {t.quality['worst_frame_psnr_db']:.1f} dB"
        if t.quality.get("frames", 1) > 1 and t.quality.get("worst_frame_psnr_db")
        else ""
    )


def comparison(result: TuneResult, path: Path) -> Path | None:
    """The lossless reference beside the chosen trial's output (first image or frame) as a PNG, or,
    where the chosen configuration is lossless (its output is the reference's), beside the fastest
    lossy trial that was compared; None without a reference or a compared trial."""
    folder = Path(result.images) if result.images else None
    if folder is None:
        return None
    compared = sorted(
        (
            t
            for t in result.trials
            if t.quality is not None
            and t.source == Source.MEASURED
            and t.latency_s is not None
            and (folder / f"trial-{t.number}.png").exists()
        ),
        key=lambda t: t.latency_s,
    )
    shown = result.best if result.best is not None and result.best in compared else (compared[0] if compared else None)
    if shown is None:
        return None
    import matplotlib.pyplot as plt
    from PIL import Image

    role = "chosen" if shown is result.best else "fastest lossy (not chosen)"
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, name, title in (
        (axes[0], "reference.png", f"lossless reference\n{result.reference or ''}"),
        (axes[1], f"trial-{shown.number}.png", f"{role}: trial {shown.number}, {shown.status}\n{_quality(shown)}"),
    ):
        ax.imshow(Image.open(folder / name), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(shown.summary, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _latency(t) -> str:
    """``0.612 ± 0.031``, and `` ×3`` for the median of 3 fresh processes (a confirmed finalist)."""
    spread = f" ± {t.latency_spread_s:.3f}" if t.latency_spread_s else ""
    return f"{t.latency_s:.3f}{spread}" + (f" ×{t.processes}" if t.processes > 1 else "")


def write_report(result: TuneResult, directory: str | Path) -> Path:
    """`tune.png`, `quality.png` (where an output was compared, `comparison`) and `summary.md` in `directory`; returns the summary's path."""
    directory = Path(directory)
    image = plot(result, directory / "tune.png")
    side_by_side = comparison(result, directory / "quality.png")
    summary = directory / "summary.md"
    summary.write_text(markdown(result, image.name, side_by_side.name if side_by_side else None))
    return summary
