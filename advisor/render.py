"""What the CLI prints for people: tables and lines at the terminal's width (data comes from the modules)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from advisor.run.steps import summary
from advisor.units import format_size


def stdout_console() -> Console:
    # Wide enough that tables don't wrap when piped (CI logs, files).
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def render_tune(result, output: str | None) -> None:
    console = stdout_console()
    table = Table(title=f"Trials of study {result.study}", title_justify="left")
    for column in ("#", "configuration", "status", "latency", "peak", "predicted", "reason"):
        table.add_column(column, justify="right" if column in {"#", "latency", "peak", "predicted"} else "left")
    for t in result.trials:
        marker = " *" if result.best is not None and t.number == result.best.number else ""
        status = t.status if t.source == "measured" else f"{t.status} ({t.source})"
        table.add_row(
            f"{t.number}{marker}",
            t.summary,
            f"{status}, noisy" if t.noisy else status,
            format_latency(t),
            format_size(t.peak_bytes),
            format_size(t.predicted_peak_bytes),
            "; ".join(part for part in (t.reason, t.noisy) if part),
        )
    console.print(table)
    if result.best is None:
        console.print(f"Nothing feasible within {format_size(result.budget_bytes)}.")
        for line in result.advice:
            console.print(f"  - {line}")
        return
    best = result.best
    console.print(f"Fastest that fits: {best.summary}: {format_latency(best)}, peak {format_size(best.peak_bytes)} "
                  f"of {format_size(result.budget_bytes)} (trial {best.number})")
    if output:
        console.print(f"Config written to {output}; in code: advisor.load_pipeline(model, advisor.load_config({output!r}))")


def render_recommendation(result, config, output: str | None) -> None:
    console = stdout_console()
    scenario = result.scenario
    target = scenario.target
    for note in scenario.notes:
        console.print(f"note: {note}")
    console.print(f"{scenario.profile.model_id} | {scenario.workload.label()} | {target.name} | quality: {scenario.quality}")
    for assumption in scenario.assumptions:
        console.print(f"assumed {assumption}")
    if config is None:
        console.print(f"Nothing fits the {format_size(scenario.budget_bytes)} budget.")
        for line in result.advice:
            console.print(f"  - {line}")
        return
    best = result.best
    cpu = target.device == "cpu"
    console.print(f"Recommended: {summary(config)}")
    # On a CPU the budget limits RAM: the peak is the host RAM, shown once.
    peak_label = "peak RAM" if cpu else "peak VRAM"
    host = "" if cpu else f", host RAM {format_size(best.estimate.peak_ram_bytes)}"
    console.print(
        f"  {peak_label} {format_size(best.estimate.limited_peak(target.device))} of "
        f"{format_size(scenario.budget_bytes)} budget{host}, predicted {best.estimate.latency_s:.1f}s"
    )
    console.print("Why:")
    for reason in result.reasons:
        console.print(f"  - {reason}")
    if result.alternatives:
        table = Table(title="Alternatives", title_justify="left")
        table.add_column("configuration")
        table.add_column(peak_label, justify="right")
        if not cpu:
            table.add_column("host RAM", justify="right")
        table.add_column("latency", justify="right")
        for alternative in result.alternatives:
            estimate = alternative.estimate
            host_column = [] if cpu else [format_size(estimate.peak_ram_bytes)]
            table.add_row(
                summary(alternative.config),
                format_size(estimate.limited_peak(target.device)),
                *host_column,
                f"{estimate.latency_s:.1f}s",
            )
        console.print(table)
    if output:
        console.print(f"Config written to {output}; in code: advisor.load_pipeline(model, advisor.load_config({output!r}))")
    else:
        console.print("Save it with -o advisor.json, or print the code with --emit python.")


def format_latency(trial) -> str:
    """A measured latency with its spread: ``1.234s ±3%``; ``-`` when nothing was measured."""
    if trial.latency_s is None:
        return "-"
    if trial.latency_spread_s is None or not trial.latency_s:
        return f"{trial.latency_s:.3f}s"
    return f"{trial.latency_s:.3f}s ±{trial.latency_spread_s / trial.latency_s:.0%}"


def format_count(count: int) -> str:
    """Parameter counts the way model cards print them (11.90B, 123.1M)."""
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.2f}{suffix}" if suffix == "B" else f"{count / divisor:.1f}{suffix}"
    return str(count)


def render_probe(profile) -> None:
    console = stdout_console()
    if profile.gpus:
        table = Table(title=f"GPUs (via {profile.gpu_source})", title_justify="left")
        for column in ("#", "name", "total", "free", "compute cap.", "PCIe", "host<->GPU"):
            table.add_column(column, justify="right" if column in {"total", "free"} else "left")
        for gpu in profile.gpus:
            link = f"gen{gpu.pcie_generation} x{gpu.pcie_width}" if gpu.pcie_generation else "-"
            bandwidth = f"{gpu.pcie_bandwidth_bytes_per_s / 1e9:.1f} GB/s" if gpu.pcie_bandwidth_bytes_per_s else "-"
            table.add_row(
                str(gpu.index),
                gpu.name,
                format_size(gpu.memory_total_bytes),
                format_size(gpu.memory_free_bytes),
                gpu.compute_capability or "-",
                link,
                bandwidth,
            )
        console.print(table)
        if profile.driver_version:
            console.print(f"driver {profile.driver_version}, CUDA driver {profile.cuda_driver_version or '-'}")
    else:
        console.print(f"No GPU: {profile.gpu_note}.")

    host = profile.host
    table = Table(title="Host", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("RAM", f"{format_size(host.ram_available_bytes)} available of {format_size(host.ram_total_bytes)}")
    table.add_row("swap", f"{format_size(host.swap_free_bytes)} free of {format_size(host.swap_total_bytes)}")
    cores = f"{host.cpu_cores_physical} physical / {host.cpu_cores_logical} logical cores"
    table.add_row("CPU", f"{host.cpu_model}, {cores}")
    table.add_row("HF cache", f"{host.hf_cache_dir} ({format_size(host.hf_cache_free_bytes)} free)")
    table.add_row("system", f"{host.os}, Python {host.python}")
    console.print(table)

    table = Table(title="Software", title_justify="left")
    table.add_column("package")
    table.add_column("version")
    for name, version in profile.software.packages.items():
        table.add_row(name, version or "not installed")
    console.print(table)

    table = Table(title="Quantization backends", title_justify="left")
    table.add_column("backend")
    table.add_column("usable")
    table.add_column("why")
    for name, status in profile.software.quantization_backends.items():
        table.add_row(name, "yes" if status.usable else "no", status.reason)
    console.print(table)
