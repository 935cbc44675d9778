"""The `advisor` command line: parsing and rendering only; the work lives in the modules.

Every error the advisor raises on purpose, and every usage error, ends as one line on stderr and a
non-zero exit status; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from advisor.errors import AdvisorError
from advisor.units import format_size

app = typer.Typer(
    name="advisor",
    help="Find the fastest way to run a diffusers pipeline within your GPU memory.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


def _stdout() -> Console:
    # Wide enough that tables don't wrap when piped (CI logs, files).
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def print_json(data: Any) -> None:
    """Machine output: exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
) -> None:
    _state["debug"] = debug


@app.command()
def probe(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema in docs/probe.md)."),
) -> None:
    """Show this machine's GPUs, host memory, disk and inference libraries (no weights loaded)."""
    from advisor.hardware import probe_machine

    profile = probe_machine()
    if as_json:
        print_json(profile.to_dict())
        return
    _render_probe(profile)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Hub id, catalog alias, or a local pipeline folder."),
    workload: str = typer.Option(None, "--workload", help="Override the workload kind: image, video or audio."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema in docs/models.md)."),
    include_config: bool = typer.Option(False, "--config", help="With --json: include each component's config."),
) -> None:
    """Show what a pipeline weighs, per component, without loading its weights."""
    from advisor.models import load_profile

    profile = load_profile(model, workload=workload)
    if as_json:
        print_json(profile.to_dict(include_config=include_config))
        return
    console = _stdout()
    console.print(f"{profile.model_id}  ({profile.pipeline_class}, from the {profile.source})")
    console.print(f"workload: {profile.workload} ({profile.workload_reason})")
    console.print(f"model CPU offload order: {' -> '.join(profile.offload_sequence)}")
    table = Table(show_footer=True)
    table.add_column("component", footer="total")
    table.add_column("class")
    table.add_column("role")
    table.add_column("params", justify="right", footer=format_count(profile.parameters))
    table.add_column("dtype")
    table.add_column("size", justify="right", footer=format_size(profile.bytes))
    for component in profile.components:
        table.add_row(
            component.name,
            component.class_name,
            component.role,
            format_count(component.parameters),
            component.dtype,
            format_size(component.bytes),
        )
    console.print(table)


def format_count(count: int) -> str:
    """Parameter counts the way model cards print them (11.90B, 123.1M)."""
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.2f}{suffix}" if suffix == "B" else f"{count / divisor:.1f}{suffix}"
    return str(count)


def _render_probe(profile) -> None:
    console = _stdout()
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args or ["--help"], prog_name="advisor", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("advisor: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # click's usage errors: unknown option, missing value, ...
        if "--debug" in args:
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx else ""
        print(f"advisor: error: {exc.format_message()}{hint}", file=sys.stderr)
        return exc.exit_code
    except AdvisorError as exc:
        if _state["debug"] or "--debug" in args:
            raise
        print(f"advisor: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
