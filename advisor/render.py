"""What the CLI prints for people: tables and lines at the terminal's width (data comes from the modules).

`probe`, `recommend` and `inspect` print plain lines and aligned columns (`text_console`,
`print_columns`); the other views use rich, imported where they are drawn: its import and tables
took a third of `probe`'s start-up (benchmarks/cli_latency.py). Both print at `output_width`:
``COLUMNS`` when set, else the terminal's width, else `PIPED_WIDTH`.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any, Container, TextIO

from advisor.run.steps import summary
from advisor.units import format_size


if TYPE_CHECKING:
    from rich.console import Console

    from advisor.plan.recommend import Fit

PIPED_WIDTH = 120  # wide enough that tables don't wrap when piped (CI logs, files)


def output_width(file: TextIO) -> int:
    """The width to print at: ``COLUMNS`` when it is set (a script's or a pager's wish, piped or not),
    else the terminal's, else `PIPED_WIDTH` when `file` is not a terminal."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return shutil.get_terminal_size((80, 24)).columns if file.isatty() else PIPED_WIDTH


def stdout_console() -> Console:
    from rich.console import Console

    return Console(width=output_width(sys.stdout), highlight=False)


class PlainConsole:
    """Plain lines at a width: the part of rich's Console that `probe` and `recommend` use (``width``, ``print``)."""

    def __init__(self, file: TextIO | None = None, width: int | None = None) -> None:
        self.file = file or sys.stdout
        self.width = width or output_width(self.file)

    def print(self, text: str = "", **_rich_options: Any) -> None:
        self.file.write(f"{text}\n")


def text_console() -> PlainConsole:
    return PlainConsole()


# Below this width the tune table stacks each trial (numbers on one line, configuration and reason
# under it) instead of seven columns that would cut the configuration into pieces.
WIDE = 110


def render_tune(result, output: str | None, report=None) -> None:
    """`advisor tune`'s result: every trial, the notes, the pick, where the config and report went."""
    from rich.table import Table

    console = stdout_console()
    rows = [_trial_row(t, result.best) for t in result.trials]
    console.print(f"Trials of study {result.study}", markup=False)
    if console.width >= WIDE:
        table = Table()
        columns = ("#", "configuration", "status", "latency", "peak", "predicted", "quality", "reason")
        for column in columns:  # at least as wide as its longest word: rich would fold a word mid-way
            longest = max((len(word) for row in rows for word in row[column].split()), default=0)
            right = column in {"#", "latency", "peak", "predicted"}
            table.add_column(column, justify="right" if right else "left", overflow="fold", min_width=min(longest, 40))
        for row in rows:
            table.add_row(*(row[column] for column in columns))
        console.print(table)
    else:
        _print_stacked(console, rows)
    for note in result.notes:
        _print_wrapped(console, note, "note: ", "      ")
    if report is not None:
        _print_wrapped(console, f"{report} and {report.with_name('tune.png')}", "report: ", "        ")
    if result.best is None:
        console.print(f"Nothing feasible within {format_size(result.budget_bytes)}.")
        for line in result.advice:
            _print_wrapped(console, line, "  - ", "    ")
        return
    best = result.best
    compiled = best.config.get("compile") and best.one_off_s
    first_call = f"; compiling adds {best.one_off_s:.1f}s to its first call, once a process" if compiled else ""
    _print_wrapped(
        console,
        f"{best.summary}: {format_latency(best)}, peak {format_size(best.peak_bytes)} of "
        f"{format_size(result.budget_bytes)} (trial {best.number}){first_call}",
        "Fastest that fits: ",
        "  ",
    )
    if output:
        _print_written(console, output)


def _print_written(console, output: str) -> None:
    """Where the config went, and the line of code that applies it: whole on its own line (code
    is copied, so it is never wrapped; a long path runs past the width, as a URL does)."""
    _print_wrapped(console, f"Config written to {output}; apply it in code with:")
    console.print(
        f"  advisor.load_pipeline(model, advisor.load_config({output!r}))",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _trial_row(t, best) -> dict[str, str]:
    from advisor.run.trials import Source

    status = str(t.status) if t.source == Source.MEASURED else f"{t.status} ({t.source})"
    return {
        "#": f"{t.number}{' *' if best is not None and t.number == best.number else ''}",
        "configuration": t.summary,
        "status": f"{status}, noisy" if t.noisy else status,
        "latency": format_latency(t),
        "peak": format_size(t.peak_bytes),
        "predicted": format_size(t.predicted_peak_bytes),
        "quality": format_quality(t),
        "reason": "; ".join(part for part in (t.reason, t.noisy) if part),
    }


def _print_stacked(console, rows: list[dict[str, str]]) -> None:
    """Narrow terminals: a line of numbers per trial, its configuration and reason wrapped under it."""
    columns = ("#", "status", "latency", "peak", "predicted", "quality")
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in columns}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(cells[c].rjust(widths[c]) if c != "status" else cells[c].ljust(widths[c]) for c in columns)

    console.print(line({c: c for c in columns}), markup=False, highlight=False)
    indent = " " * (widths["#"] + 2)
    for row in rows:
        console.print(line(row), markup=False, highlight=False)
        _print_wrapped(console, row["configuration"], indent, indent)
        if row["reason"]:
            _print_wrapped(console, row["reason"], indent, indent)


def _print_wrapped(console, text: str, first: str = "", rest: str = "") -> None:
    """`text` wrapped at the console's width, `first` before its first line and `rest` before the
    others (a hanging indent, which rich's own wrapping does not do); never read as markup."""
    width = max(console.width, 40)
    # A word longer than the line (a URL) stays whole: the terminal wraps it, and it stays clickable.
    lines = textwrap.wrap(
        text, width=width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False, break_long_words=False
    ) or [first]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


class TuneProgress:
    """The live display of a running study, two lines that read at any width:

        tuning ━━━━━━━━━━━━━━━━        2/8  0:01:23  best 0.092s ±3%: fp32, no offload
          trial 3: timing, call 4 (4 steps) 0:12 · fp32, int8_weight_only(transformer), no offload

    The counts, clocks and phase never shorten or wrap; the best and the configuration wrap under
    themselves when the terminal is too narrow. `trial_done` and `phase` are the study's callbacks."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.best = total, 0, None
        self.started = time.monotonic()
        self.current: tuple[int, str, str, float] | None = None  # trial number, configuration, phase, since

    def trial_done(self, partial) -> None:
        from advisor.run.trials import Source, config_key  # tune's alone: probe and recommend don't load the trials

        measured = {config_key(t.config) for t in partial.trials if t.source == Source.MEASURED}
        self.done, self.best, self.current = min(len(measured), self.total), partial.best, None

    def phase(self, number: int, configuration: str, phase: str) -> None:
        self.current = (number, configuration, phase, time.monotonic())

    def __rich__(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        now = time.monotonic()
        top = Table.grid(padding=(0, 1))
        for _ in range(4):
            top.add_column(no_wrap=True)
        top.add_column(ratio=1)
        best = f"best {format_latency(self.best)}: {self.best.summary}" if self.best else "no feasible trial yet"
        top.add_row(
            "tuning",
            ProgressBar(total=self.total, completed=self.done, width=16),
            f"{self.done}/{self.total}",
            _clock(now - self.started),
            best,
        )
        if self.current is None:
            return top
        number, configuration, phase, since = self.current
        bottom = Table.grid(padding=(0, 1))
        bottom.add_column(no_wrap=True)
        bottom.add_column(ratio=1)
        who = f"trial {number}" if number >= 0 else "lossless reference"  # the quality guard's, before the trials
        bottom.add_row(f"  {who}: {phase} {_clock(now - since)} ·", configuration)
        return Group(top, bottom)


def _clock(seconds: float) -> str:
    """Elapsed time as a clock: 0:12, 3:04, 1:02:03."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_recommendation(result, config, output: str | None) -> None:
    """`advisor recommend`'s text: the pick, its numbers, why, the alternatives, where the config went."""
    console = text_console()
    scenario = result.scenario
    target = scenario.target
    for note in scenario.notes:
        _print_wrapped(console, note, "note: ", "      ")
    _print_wrapped(
        console,
        f"{scenario.profile.model_id} | {scenario.workload.label()} | {target.cards} | quality: {scenario.quality}",
    )
    for assumption in scenario.assumptions:
        _print_wrapped(console, assumption, "assumed ", "  ")
    if config is None:
        console.print(f"Nothing fits the {format_size(scenario.budget_bytes)} budget.")
        for line in result.advice:
            _print_wrapped(console, line, "  - ", "    ")
        return
    best = result.best
    cpu = target.device == "cpu"
    _print_wrapped(console, summary(config), "Recommended: ", "  ")
    # On a CPU the budget limits RAM: the peak is the host RAM, shown once.
    peak_label = "peak RAM" if cpu else "peak VRAM"
    host = "" if cpu else f", host RAM {format_size(best.estimate.peak_ram_bytes)}"
    _print_wrapped(
        console,
        f"{peak_label} {format_size(best.estimate.limited_peak(target.device))} of "
        f"{format_size(scenario.budget_bytes)} budget{host}, predicted {best.estimate.latency_s:.1f}s",
        "  ",
        "  ",
    )
    console.print("Why:")
    for reason in result.reasons:
        _print_wrapped(console, reason, "  - ", "    ")
    if result.alternatives:
        _print_alternatives(console, result.alternatives, target.device, peak_label)
    if output:
        _print_written(console, output)
    else:
        console.print("Save it with -o advisor.json, or print the code with --emit python.")


def _print_alternatives(console, alternatives, device: str, peak_label: str) -> None:
    """The runners-up: the numbers first, then the configuration, wrapped under itself."""
    header = [peak_label] + ([] if device == "cpu" else ["host RAM"]) + ["latency", "configuration"]
    rows = []
    for alternative in alternatives:
        estimate = alternative.estimate
        numbers = [format_size(estimate.limited_peak(device))] + (
            [] if device == "cpu" else [format_size(estimate.peak_ram_bytes)]
        )
        rows.append([*numbers, f"{estimate.latency_s:.1f}s", summary(alternative.config)])
    console.print("Alternatives:")
    print_columns(console, header, rows, right=set(range(len(header) - 1)))


def format_latency(trial) -> str:
    """A measured latency with its spread: ``1.234s ±3%``, and ``×3`` when it is the median of 3 fresh
    processes (a confirmed finalist); ``-`` when nothing was measured."""
    if trial.latency_s is None:
        return "-"
    times = f" ×{trial.processes}" if trial.processes > 1 else ""
    if trial.latency_spread_s is None or not trial.latency_s:
        return f"{trial.latency_s:.3f}s{times}"
    return f"{trial.latency_s:.3f}s ±{trial.latency_spread_s / trial.latency_s:.0%}{times}"


def format_quality(trial) -> str:
    """A measured output against the lossless reference: ``31.2dB`` PSNR, ``identical``, or
    ``lossless`` for a configuration that computes the same numbers; ``-`` when not compared."""
    if trial.quality is not None:
        value = trial.quality.get("psnr_db")
        return "identical" if value is None else f"{value:.1f}dB"
    return "lossless" if trial.lossless else "-"


def format_count(count: int) -> str:
    """Parameter counts the way model cards print them (11.90B, 123.1M)."""
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.2f}{suffix}" if suffix == "B" else f"{count / divisor:.1f}{suffix}"
    return str(count)


def render_probe(profile) -> None:
    """`advisor probe`'s text: plain aligned columns (rich's tables cost a third of its start-up)."""
    console = text_console()
    if profile.gpus:
        console.print(f"GPUs (via {profile.gpu_source}):")
        for gpu in profile.gpus:  # a line for the name, one (wrapped under it) for what the plan reads
            link = gpu.links(several=len(profile.gpus) > 1)
            console.print(f"  {gpu.index}  {gpu.name}")
            indent = " " * (4 + len(str(gpu.index)))
            _print_wrapped(
                console,
                f"{format_size(gpu.memory_total_bytes)} total, {format_size(gpu.memory_free_bytes)} free, "
                f"compute capability {gpu.compute_capability or 'unknown'}, {link}",
                indent,
                indent,
            )
        if profile.driver_version:
            console.print(f"  driver {profile.driver_version}, CUDA driver {profile.cuda_driver_version or '-'}")
    else:
        _print_wrapped(console, f"No GPU: {profile.gpu_note}.", "", "  ")

    host = profile.host
    cores = f"{host.cpu_cores_physical} physical / {host.cpu_cores_logical} logical cores"
    console.print("Host:")
    print_columns(
        console,
        None,
        [
            ["RAM", f"{format_size(host.ram_available_bytes)} available of {format_size(host.ram_total_bytes)}"],
            ["swap", f"{format_size(host.swap_free_bytes)} free of {format_size(host.swap_total_bytes)}"],
            ["CPU", f"{host.cpu_model}, {cores}"],
            ["HF cache", f"{host.hf_cache_dir} ({format_size(host.hf_cache_free_bytes)} free)"],
            ["system", f"{host.os}, Python {host.python}"],
        ],
    )
    console.print("Software:")
    print_columns(
        console,
        ["package", "version"],
        [[name, version or "not installed"] for name, version in profile.software.packages.items()],
    )
    for title, backends in (
        ("Quantization backends", profile.software.quantization_backends),
        ("Attention backends (set_attention_backend)", profile.software.attention_backends),
    ):
        console.print(f"{title}:")
        print_columns(
            console,
            ["backend", "usable", "why"],
            [[name, "yes" if status.usable else "no", status.reason] for name, status in backends.items()],
        )


def print_columns(console, header: list[str] | None, rows: list[list[str]], right: Container[int] = ()) -> None:
    """Rows as aligned columns that never cut a cell: each column but the last as wide as its widest
    cell (right-aligned where `right` says), the last wrapped under itself in the width left."""
    widths = [max(len(cell) for cell in column) for column in zip(*([header] if header else []), *rows)][:-1]

    def lead(cells: list[str]) -> str:
        return "  " + "".join(
            (c.rjust(w) if i in right else c.ljust(w)) + "  " for i, (c, w) in enumerate(zip(cells, widths))
        )

    if header:
        console.print(lead(header) + header[-1])
    for row in rows:
        line = lead(row)
        _print_wrapped(console, row[-1], line, " " * len(line))


def render_inspect(profile) -> None:
    """`advisor inspect`: what a pipeline weighs, per component, in plain columns that never cut a
    cell; where a class name leaves no room at this width, it goes on its own line under its row."""
    console = text_console()
    for line in (
        f"{profile.model_id}  ({profile.pipeline_class}, from the {profile.source})",
        f"workload: {profile.workload} ({profile.workload_reason})",
        f"model CPU offload order: {' -> '.join(profile.offload_sequence)}",
    ):
        _print_wrapped(console, line, "", "  ")
    header = ["component", "class", "role", "params", "dtype", "size"]
    rows = [
        [c.name, c.class_name, c.role, format_count(c.parameters), c.dtype, format_size(c.bytes)]
        for c in profile.components
    ]
    total = ["total", "", "", format_count(profile.parameters), "", format_size(profile.bytes)]
    right = {3, 5}
    widths = [max(len(row[i]) for row in (header, *rows, total)) for i in range(len(header))]
    below = 2 + sum(widths) + 2 * (len(widths) - 1) > console.width  # the class under its row, not beside it
    shown = [i for i in range(len(header)) if not (below and i == 1)]

    def line(cells: list[str]) -> str:
        return (
            "  "
            + "  ".join(cells[i].rjust(widths[i]) if i in right else cells[i].ljust(widths[i]) for i in shown).rstrip()
        )

    console.print(line(header) + ("  (class below)" if below else ""))
    for row in rows:
        console.print(line(row))
        if below:
            console.print(f"    {row[1]}")
    console.print(line(total))


def render_estimate(profile, job, target, config, result, fit: Fit | None = None, notes: tuple[str, ...] = ()) -> None:
    """`advisor estimate`: where the workload came from, what was assumed, memory per phase, the
    peaks, whether they fit the target (`fit`: `advisor.cli.commands.fit_verdict`), the latency."""
    from rich.table import Table

    console = stdout_console()
    _print_wrapped(console, f"{profile.model_id}: {job.label()} on {target.cards} ({target.source})", "", "  ")
    for note in notes:
        _print_wrapped(console, note, "", "  ")
    for assumption in (*target.assumptions, *job.assumptions):
        _print_wrapped(console, assumption, "assumed ", "  ")
    _print_wrapped(console, config.summary(), "config: ", "  ")
    title = "Memory per phase (CPU inference: all of it is RAM)" if target.device == "cpu" else "GPU memory per phase"
    table = Table(title=title, title_justify="left")
    table.add_column("phase")
    table.add_column("resident weights", justify="right")
    table.add_column("activations", justify="right")
    table.add_column("total", justify="right")
    table.add_column("components on the device")
    for phase in result.phases:
        parts = ", ".join(f"{name} {format_size(size)}" for name, size in phase.weights_bytes.items())
        marker = " (peak)" if phase.name == result.peak_phase else ""
        table.add_row(
            phase.name + marker,
            format_size(sum(phase.weights_bytes.values())),
            format_size(phase.activation_bytes),
            format_size(phase.device_bytes),
            parts or "-",
        )
    console.print(table)
    ram = dict(result.ram_breakdown)
    loading = ram.pop("loading", 0)  # held while loading beyond what the run keeps
    kept = "while running: " + ", ".join(f"{k.replace('_', ' ')} {format_size(v)}" for k, v in ram.items())
    more = f"loading holds {format_size(loading)} more" if loading else "loading no more"
    if target.device != "cpu":
        _print_wrapped(
            console,
            f"peak VRAM: {format_size(result.peak_vram_bytes)} must fit, the least the caching allocator runs it in "
            f"({format_size(result.peak_vram_allocated_bytes)} allocated, the table's totals; on a card with room "
            f"it keeps {format_size(result.peak_vram_reserved_bytes)} reserved; without the CUDA context)",
            "",
            "  ",
        )
    _print_wrapped(console, f"peak host RAM: {format_size(result.peak_ram_bytes)} ({kept}; {more})", "", "  ")
    if result.disk_bytes:
        console.print(f"disk: {format_size(result.disk_bytes)} of offloaded weights")
    if fit is not None:
        _print_wrapped(console, _fit_line(fit, target, result), "", "  ")
    parts = ", ".join(
        f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f}s"
        for k, v in result.latency_breakdown.items()
        if v and not k.startswith("step")
    )
    _print_wrapped(
        console,
        f"predicted latency: {result.latency_s:.1f}s ({parts}; {result.step_latency_s:.3f}s per step)",
        "",
        "  ",
    )
    if result.warmup_s:
        warmup = f"about {result.warmup_s:.0f}s once, at the first call (torch.compile, cold caches)"
        _print_wrapped(console, warmup, "warm-up: ", "  ")
    for note in result.notes:
        _print_wrapped(console, note, "note: ", "      ")


def _fit_line(fit: Fit, target, result) -> str:
    """Whether the estimate fits the target, said plainly, with the budget's origin."""
    from advisor.plan.scenario import RAM_USABLE, default_budget_rule

    memory = format_size(target.ram_available_bytes if target.device == "cpu" else target.vram_free_bytes)
    origin = fit.budget_source or f"{default_budget_rule(target)}, of {memory}: recommend's default"
    budget = f"the {format_size(fit.budget_bytes)} budget ({origin})"
    if fit.unfit is None:
        peak = format_size(result.limited_peak(target.device))
        host = (
            ""
            if target.device == "cpu"
            else (
                f", host RAM {format_size(result.peak_ram_bytes)} within {RAM_USABLE:.0%} of the "
                f"{format_size(target.ram_available_bytes)} available"
            )
        )
        return (
            f"fits {target.name}: yes, peak {'RAM' if target.device == 'cpu' else 'VRAM'} {peak} within {budget}{host}"
        )
    why = fit.unfit.reason + (f" ({origin})" if fit.unfit.limit == "budget" else "")
    return f"fits {target.name}: NO, {why}; advisor recommend finds a config that fits"
