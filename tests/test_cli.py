"""The command line through its real entry points (console script and ``python -m advisor``)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from advisor.cli import main

ADVISOR = shutil.which("advisor") or str(Path(sys.executable).with_name("advisor"))


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ADVISOR, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
    )


def test_probe_json_is_one_object_with_the_documented_keys():
    result = run("probe", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"gpus", "host", "software", "gpu_source", "schema_version"} <= set(data)
    assert isinstance(data["gpus"], list)
    assert data["host"]["ram_total_bytes"] > 0
    assert data["host"]["cpu_cores_logical"] == os.cpu_count()
    assert data["software"]["packages"]["diffusers"]


def test_python_dash_m_is_the_same_program():
    result = subprocess.run([sys.executable, "-m", "advisor", "probe", "--json"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "host" in json.loads(result.stdout)


def test_probe_table_mentions_gpu_state_and_host(capsys):
    assert main(["probe"]) == 0
    out = capsys.readouterr().out
    assert "RAM" in out and "Quantization backends" in out
    assert ("No GPU" in out) or ("GPUs (via" in out)


def test_unknown_option_is_one_line_with_exit_2():
    result = run("probe", "--bogus")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == ["advisor: error: No such option: --bogus (see 'advisor probe --help')"]


def test_unknown_command_suggests_the_right_one():
    result = run("probee")
    assert result.returncode == 2
    assert "Did you mean 'probe'" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    assert "probe" in capsys.readouterr().out


def test_advisor_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from advisor import hardware
    from advisor.errors import HardwareError

    def broken():
        raise HardwareError("--calibrate: no CUDA device to calibrate; run it on the GPU machine")

    monkeypatch.setattr(hardware, "probe_machine", broken)
    assert main(["probe"]) == 1
    assert capsys.readouterr().err == "advisor: error: --calibrate: no CUDA device to calibrate; run it on the GPU machine\n"
    with pytest.raises(HardwareError):
        main(["--debug", "probe"])
