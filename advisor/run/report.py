"""Reports of a tuning study: the latency-against-memory plot and a Markdown summary.

matplotlib is imported only here, when a report is asked for.
"""

from __future__ import annotations

from pathlib import Path

from advisor.run.tune import TrialRecord, TuneResult
from advisor.units import GIB, format_size


def pareto_front(trials: list[TrialRecord]) -> list[TrialRecord]:
    """Measured trials no other measured trial beats on both latency and peak memory."""
    points = sorted(
        (t for t in trials if t.status in {"ok", "over-budget"} and t.latency_s is not None and t.peak_bytes),
        key=lambda t: (t.peak_bytes, t.latency_s),
    )
    front, best_latency = [], float("inf")
    for trial in points:
        if trial.latency_s < best_latency:
            front.append(trial)
            best_latency = trial.latency_s
    return front


def plot(result: TuneResult, path: Path) -> Path:
    """Latency against peak memory: every measured trial, the budget line, the Pareto front, the pick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {
        "ok": dict(marker="o", color="tab:blue", label="fits"),
        "over-budget": dict(marker="o", color="tab:orange", label="over budget"),
    }
    for status, style in styles.items():
        points = [(t.peak_bytes / GIB, t.latency_s) for t in result.trials if t.status == status and t.peak_bytes and t.latency_s]
        if points:
            ax.scatter(*zip(*points), s=40, alpha=0.8, **style)
    failed = [t for t in result.trials if t.status in {"oom", "crash", "timeout"} and t.predicted_peak_bytes]
    if failed:
        ax.scatter([t.predicted_peak_bytes / GIB for t in failed], [0] * len(failed), marker="x", color="tab:red", label="OOM / crash / timeout (at predicted peak)")
    front = pareto_front(result.trials)
    if len(front) > 1:
        ax.plot([t.peak_bytes / GIB for t in front], [t.latency_s for t in front], "--", color="tab:gray", label="Pareto front")
    ax.axvline(result.budget_bytes / GIB, color="tab:red", linestyle=":", label=f"budget {format_size(result.budget_bytes)}")
    if result.best is not None and result.best.peak_bytes:
        ax.scatter([result.best.peak_bytes / GIB], [result.best.latency_s], marker="*", s=300, color="gold", edgecolor="black", zorder=5, label="chosen")
    ax.set_xlabel("peak memory (GB = GiB)")
    ax.set_ylabel("latency per generation (s)")
    ax.set_title(f"advisor tune: {result.study}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(result: TuneResult, image: str | None = None) -> str:
    """A summary a person can read: the pick, then every trial."""
    lines = [f"# advisor tune: {result.study}", "", f"Budget: {format_size(result.budget_bytes)}; storage: `{result.storage}`; search space: {result.space_size} configurations.", ""]
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
    lines += ["| trial | configuration | status | latency (s) | peak | predicted peak | source | reason |", "|---|---|---|---|---|---|---|---|"]
    for t in result.trials:
        latency = "-" if t.latency_s is None else f"{t.latency_s:.3f}" + (f" ± {t.latency_spread_s:.3f}" if t.latency_spread_s is not None else "")
        if t.noisy:
            latency += " (noisy)"
        lines.append(
            f"| {t.number} | {t.summary} | {t.status} | {latency} | {format_size(t.peak_bytes)} | "
            f"{format_size(t.predicted_peak_bytes)} | {t.source} | {t.reason or ''} |"
        )
    return "\n".join(lines) + "\n"


def write_report(result: TuneResult, directory: str | Path) -> Path:
    """`tune.png` and `summary.md` in `directory`; returns the summary's path."""
    directory = Path(directory)
    image = plot(result, directory / "tune.png")
    summary = directory / "summary.md"
    summary.write_text(markdown(result, image.name))
    return summary
