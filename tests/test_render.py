"""What people read, at 80 columns: the recommend output, the tune table and the live progress
display never cut a cell (no "…", every word of every configuration there), and lines keep to the
width (a URL longer than a line excepted: it stays whole, so it stays clickable)."""

from __future__ import annotations

import io
import itertools
import re

import pytest
from rich.console import Console

from advisor import render
from advisor.run.results import TuneResult
from advisor.run.trials import TrialRecord


LONG = "bf16, int8_weight_only(transformer, text_encoder_2), compiled (regional), group offload (block, 2 per group, stream)"


@pytest.fixture
def console80(monkeypatch):
    console = Console(width=80, file=io.StringIO(), record=True, highlight=False)
    monkeypatch.setattr(render, "stdout_console", lambda: console)
    return console


def words(text: str) -> str:
    return " ".join(text.split())


def check_80(text: str) -> None:
    assert "…" not in text and "..." not in text, text
    for line in text.splitlines():
        assert len(line) <= 80 or re.search(r"https?://\S{40,}", line), f"{len(line)} columns: {line!r}"


def test_recommend_output_reads_at_80_columns(monkeypatch):
    from advisor.plan.recommend import recommend
    from advisor.plan.scenario import Request, scenario_for
    from advisor.probe.hardware import probe_machine
    from advisor.run.steps import summary

    scenario = scenario_for(Request("black-forest-labs/FLUX.1-dev", gpu="RTX 4090", ram=64 * 2**30), probe_machine())
    result = recommend(scenario)
    out = io.StringIO()
    monkeypatch.setattr(render, "text_console", lambda: render.PlainConsole(out, width=80))
    render.render_recommendation(result, result.config, None)
    text = out.getvalue()
    check_80(text)
    for alternative in result.alternatives:  # each runner-up's configuration whole, under its numbers
        assert words(summary(alternative.config)) in words(text.split("Alternatives:", 1)[1])
    assert words(f"Recommended: {summary(result.config)}") in words(text)
    for reason in result.reasons:  # every reason whole, its wrapped lines indented under its dash
        assert words(reason) in words(text)
    reason_lines = text.split("Why:\n", 1)[1].splitlines()
    assert all(line.startswith(("  - ", "    ")) for line in reason_lines[: len(result.reasons)])


def record(number: int, summary: str, status: str = "ok", reason: str | None = None) -> TrialRecord:
    return TrialRecord(
        number,
        summary,
        status,
        "measured",
        status == "ok",
        12.345,
        15 * 2**30,
        14 * 2**30,
        reason,
        {},
        latency_spread_s=0.2,
        noisy="the spread ±9% did not settle within ±5% after 12 rounds" if number == 1 else None,
    )


def test_the_tune_table_reads_at_80_columns(console80):
    trials = [
        record(0, "bf16, no offload"),
        record(1, LONG),
        record(
            2,
            LONG,
            "oom",
            "the trial process died out of memory (exit -9): CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
    ]
    result = TuneResult(
        "flux-1-dev-image-15.00GB-t900s-1a2b3c4d",
        "sqlite:///x.db",
        16 * 2**30,
        trials,
        trials[0],
        None,
        6,
        notes=["trial 0 (12.345s ± 0.200) is as fast as 1 (12.345s ± 0.200) within the measured spread"],
    )
    render.render_tune(result, "advisor.json")
    text = console80.export_text()
    check_80(text)
    for trial in trials:  # every configuration, status, latency and reason whole
        assert words(trial.summary) in words(text)
        assert words(trial.reason or "") in words(text)
    assert "12.345s ±2%" in text and "15.00 GB" in text and "14.00 GB" in text
    assert words(result.notes[0]) in words(text)


def test_the_tune_table_uses_the_width_when_there_is_more(monkeypatch):
    console = Console(width=160, file=io.StringIO(), record=True, highlight=False)
    monkeypatch.setattr(render, "stdout_console", lambda: console)
    trials = [record(0, LONG)]
    render.render_tune(TuneResult("study", "sqlite:///x.db", 16 * 2**30, trials, trials[0], None, 6), None)
    text = console.export_text()
    assert any(LONG in line for line in text.splitlines())  # one row, the configuration on one line


def test_a_compiled_pick_says_what_compiling_adds_to_the_first_call(console80):
    from dataclasses import replace

    compiled = replace(record(0, "bf16, compiled (regional)"), config={"compile": {"regional": True}}, one_off_s=9.6)
    render.render_tune(TuneResult("study", "sqlite:///x.db", 16 * 2**30, [compiled], compiled, None, 6), None)
    assert "compiling adds 9.6s to its first call, once a process" in words(console80.export_text())


def test_the_progress_display_reads_at_80_columns():
    progress = render.TuneProgress(8)
    progress.done, progress.best = 2, record(0, "bf16, no offload")
    progress.started -= 83  # 1 min 23 s into the study
    progress.phase(3, LONG, "timing, call 4 (8 steps)")
    progress.current = (*progress.current[:3], progress.current[3] - 12)  # 12 s into the phase
    console = Console(width=80, file=io.StringIO(), record=True, highlight=False)
    console.print(progress)
    text = console.export_text()
    check_80(text)
    first, second = text.splitlines()[0], text.splitlines()[1]
    assert "2/8" in first and "1:23" in first  # the count and the clock whole
    assert "trial 3: timing, call 4 (8 steps) 0:12" in second  # the phase and its clock whole
    assert words(LONG) in words(text) and words("best 12.345s ±2%: bf16, no offload") in words(text)


def test_the_probe_reads_at_80_columns_with_gpus(monkeypatch):
    """Two H100s (their NVML readings) on this host: every table's cells whole, the reasons wrapped
    under their column, each GPU's name, memory and link on its line."""
    from dataclasses import replace

    from test_hardware import H100_READINGS

    from advisor.probe.hardware import gpu_from_nvml_readings, probe_machine, probe_software
    from advisor.units import format_size

    gpus = [gpu_from_nvml_readings(i, H100_READINGS) for i in range(2)]
    profile = replace(
        probe_machine(),
        gpus=gpus,
        gpu_source="nvml",
        driver_version="580.65.06",
        cuda_driver_version="13.0",
        software=probe_software(gpus),
    )
    out = io.StringIO()
    monkeypatch.setattr(render, "text_console", lambda: render.PlainConsole(out, width=80))
    render.render_probe(profile)
    text = out.getvalue()
    check_80(text)
    lines = text.splitlines()
    for index in (0, 1):  # each GPU's name on its line, what the plan reads of it under the name
        at = lines.index(f"  {index}  NVIDIA H100 80GB HBM3")
        details = (
            f"{format_size(gpus[0].memory_total_bytes)} total, {format_size(gpus[0].memory_free_bytes)} free, "
            "compute capability 9.0, PCIe gen5 x16 (63.0 GB/s host<->GPU)"
        )
        assert words(" ".join(lines[at + 1 : at + 3])) == details and all(
            line.startswith("     ") for line in lines[at + 1 : at + 3]
        )
    for title, backends in (
        ("Quantization backends:", profile.software.quantization_backends),
        ("Attention backends (set_attention_backend):", profile.software.attention_backends),
    ):
        for name, status in backends.items():
            assert words(f"{name} {'yes' if status.usable else 'no'} {status.reason}") in words(text)
        # Each line of the table is a backend's row or its reason continued under the "why" column.
        start = lines.index(title) + 1
        why = lines[start].index("why")
        rows = list(itertools.takewhile(lambda line: line.startswith(" "), lines[start + 1 :]))
        assert len(rows) >= len(backends) + (
            "Attention" in title
        )  # some attention kernels' reasons wrap at 80 columns
        assert all(
            line.startswith(tuple(f"  {name} " for name in backends))
            or line.startswith(" " * why)
            and line[why] != " "
            for line in rows
        ), rows


@pytest.mark.parametrize("width", [80, 120])
def test_inspect_never_cuts_a_cell_for_any_catalog_model(width, monkeypatch):
    """Every class name whole (UMT5EncoderModel, Qwen2_5_VLForConditionalGeneration), every row's
    numbers on its line; where a class leaves no room it goes under its row, never cut."""
    from advisor.probe.layout import catalog_names
    from advisor.probe.models import load_profile
    from advisor.units import format_size

    for model in catalog_names():
        profile = load_profile(model)
        out = io.StringIO()
        monkeypatch.setattr(render, "text_console", lambda: render.PlainConsole(out, width=width))
        render.render_inspect(profile)
        text = out.getvalue()
        assert "…" not in text and all(len(line) <= width for line in text.splitlines()), text
        tokens, lines = text.split(), text.splitlines()
        table = lines[next(i for i, line in enumerate(lines) if line.startswith("  component ")) :]
        for c in profile.components:
            assert c.class_name in tokens, (model, c.class_name, text)
            row = next(line for line in table if line.split()[:1] == [c.name])
            assert words(f"{render.format_count(c.parameters)} {c.dtype} {format_size(c.bytes)}") in words(row), row
        assert words(f"total {render.format_count(profile.parameters)} {format_size(profile.bytes)}") in words(text)


@pytest.mark.parametrize("width", [78, 80])
def test_the_saved_config_line_reads_at_the_width(width, monkeypatch):
    """Where the config went, then the code that loads it, whole on its own line: code is copied, not read in pieces."""
    from advisor.plan.recommend import recommend
    from advisor.plan.scenario import Request, scenario_for
    from advisor.probe.hardware import probe_machine

    result = recommend(scenario_for(Request("flux-dev", gpu="RTX 4090", ram=64 * 2**30), probe_machine()))
    out = io.StringIO()
    monkeypatch.setattr(render, "text_console", lambda: render.PlainConsole(out, width=width))
    render.render_recommendation(result, result.config, "advisor.json")
    lines = out.getvalue().splitlines()
    check_80("\n".join(lines))
    assert lines[-2:] == [
        "Config written to advisor.json; apply it in code with:",
        "  advisor.load_pipeline(model, advisor.load_config('advisor.json'))",
    ]


def _run_piped(args: list[str], columns: str | None) -> str:
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    advisor_cli = shutil.which("advisor") or str(Path(sys.executable).with_name("advisor"))
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    result = subprocess.run(
        [advisor_cli, *args], capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["recommend", "flux-dev", "--gpu", "RTX 4090"],
        ["estimate", "flux-dev", "--gpu", "RTX 4090"],
        ["inspect", "qwen-image"],
    ],
)
def test_an_explicit_columns_is_honoured_when_piped(command):
    """`COLUMNS=80 advisor ... | less`: the plain views and rich's tables keep to 80; without
    COLUMNS a pipe gets the wide PIPED_WIDTH."""
    narrow = _run_piped(command, "80")
    check_80(narrow)
    wide = _run_piped(command, None)
    assert max(len(line) for line in wide.splitlines()) > 80
    assert all(len(line) <= render.PIPED_WIDTH or re.search(r"https?://\S{40,}", line) for line in wide.splitlines())


def test_the_tune_table_never_splits_a_word_of_a_configuration(monkeypatch):
    """At 120 columns with long reasons beside it, the configuration column once folded
    `int8_weight_only(tran|sformer`: a column is at least as wide as its longest word."""
    import re

    console = Console(width=120, file=io.StringIO(), record=True, highlight=False)
    monkeypatch.setattr(render, "stdout_console", lambda: console)
    reason = "the trial process died out of memory (exit -9): CUDA out of memory. Tried to allocate 2.00 GiB " * 2
    trials = [record(0, LONG), record(1, LONG, "oom", reason), record(2, "bf16, no offload", "crash", reason)]
    render.render_tune(TuneResult("study", "sqlite:///x.db", 16 * 2**30, trials, trials[0], None, 6), None)
    table = console.export_text().split("Fastest that fits")[0]  # the pick's line below has it whole
    cells = set(re.split(r"[\s│┃|]+", table))
    assert [word for word in LONG.split() if word not in cells] == []
