"""What fault injection found outside the tuner's own files (issue 25): a storage that keeps the study
nowhere, outputs the OS refuses only when written, a cache folder that can't be written, an ASCII
terminal, running out of memory in the advisor's own process, configs and model folders that lie,
the Python API's errors, and a save killed half way. The CLI answers each in one line (never "a bug
in the advisor"), the Python API with the advisor's own errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import assert_refused
from tuning import ADVISOR, tune_args, with_option

from advisor.config import OptimizationConfig, Quantization
from advisor.errors import AdvisorError, ConfigError, UsageError


def started(args: list[str], env: dict | None = None, **overrides: str) -> subprocess.CompletedProcess:
    """The console script in a process of its own, with `overrides` in its environment."""
    return subprocess.run(
        [ADVISOR, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**(env or os.environ), "HF_HUB_OFFLINE": "1", **overrides},
    )


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The one ``advisor: error:`` line a refused command printed (warnings and progress may precede it)."""
    assert done.returncode not in (0, None), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "a bug in the advisor" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("advisor: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


@pytest.fixture
def model_copy(tiny_flux_dir, tmp_path) -> Path:
    folder = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, folder)
    return folder


@pytest.fixture
def private_cache_env(tmp_path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}


# --- studies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite:///", "sqlite://"])
def test_a_storage_that_keeps_the_study_nowhere_is_refused_before_measuring(url, tiny_flux_dir, monkeypatch):
    import advisor.run.tune
    from advisor.run.storage import open_storage

    monkeypatch.setattr(
        advisor.run.tune, "run_study", lambda *a, **k: pytest.fail("measured before refusing the storage")
    )
    line = assert_refused(["tune", "-m", str(tiny_flux_dir), "--budget", "2GB", "--storage", url])
    assert line.startswith(f"advisor: error: --storage {url}: ") and "sqlite:///" in line, line
    with pytest.raises(UsageError, match="--storage"):
        open_storage(url)


@pytest.mark.slow
def test_no_reference_is_measured_when_the_estimate_rules_out_every_candidate(
    tiny_flux_dir, tmp_path, private_cache_env
):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    args = with_option(
        tune_args(tiny_flux_dir, storage, "--json", budget="1MB", trials=2), "--min-psnr", None
    )  # the guard on
    done = started(args, private_cache_env)
    assert done.returncode == 3, done.stderr[-3000:]  # nothing fits: exit 3, as documented
    data = json.loads(done.stdout)
    assert data["trials"] and all(t["source"] in ("estimate", "repeat") for t in data["trials"])
    assert data["images"] is None and data["reference"] is None
    assert not list((tmp_path / "cache").rglob("reference.npy"))


# --- outputs and the cache folder --------------------------------------------------------------------


def test_outputs_in_a_folder_where_nothing_can_be_created_are_refused_up_front(tiny_flux_dir, monkeypatch):
    """/proc lets root past every permission bit (``os.access`` says yes) and then refuses to create anything."""
    import advisor.run.tune
    from advisor.files import check_output_file, check_output_folder

    monkeypatch.setattr(
        advisor.run.tune, "run_study", lambda *a, **k: pytest.fail("measured before refusing the output")
    )
    for flag, path in (("-o", "/proc/x.json"), ("--report", "/proc/x")):
        line = assert_refused(["tune", "-m", str(tiny_flux_dir), "--budget", "2GB", flag, path])
        assert line.startswith(f"advisor: error: {flag} {path}: "), line
    with pytest.raises(UsageError):
        check_output_file("/proc/x.json", flag="-o")
    with pytest.raises(UsageError):
        check_output_folder("/proc/x", flag="--report")


@pytest.mark.slow
def test_a_cache_folder_that_cannot_be_written_is_said_and_the_plan_goes_on(model_copy, tmp_path):
    """A read-only home, here a cache path under a regular file (root writes through permission bits):
    the local model is traced but its trace can't be kept; estimate and recommend say so and plan."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    unwritable = str(blocker / "cache")
    for command in (["estimate", str(model_copy)], ["recommend", "-m", str(model_copy)]):
        done = started(command, XDG_CACHE_HOME=unwritable)
        assert done.returncode == 0, done.stderr[-3000:]
        warnings = [line for line in done.stderr.splitlines() if "XDG_CACHE_HOME" in line]
        assert len(warnings) == 1 and warnings[0].startswith("advisor: warning: "), done.stderr[-3000:]
    # tune keeps its study and the quality guard's images there: it stops at once, naming the way out.
    for extra in ([], ["--storage", f"sqlite:///{tmp_path / 's.db'}"]):
        done = started(["tune", "-m", str(model_copy), "--budget", "2GB", *extra], XDG_CACHE_HOME=unwritable)
        line = one_error_line(done)
        assert "XDG_CACHE_HOME" in line, line


def test_an_ascii_terminal_gets_everything_with_what_it_cannot_show_escaped(tmp_path):
    output = tmp_path / "plän.json"
    done = started(
        ["recommend", "-m", "flux-dev", "--gpu", "RTX 4090", "--ram", "64GB", "-o", str(output)],
        PYTHONIOENCODING="ascii",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a bug in the advisor" not in done.stderr
    assert json.loads(output.read_text())["provenance"]["model"]
    assert "pl\\xe4n.json" in done.stdout + done.stderr  # the path, escaped where it is shown


@pytest.mark.slow
def test_running_out_of_memory_in_the_advisors_own_process_is_one_line(model_copy, tmp_path):
    """Tracing a local model under an address-space limit 100 MiB below what importing torch and
    diffusers takes (tests/conftest.py measures it): MemoryError in the tracer and after it."""
    from conftest import address_space_after_imports

    limit = address_space_after_imports("1") - 100 * 2**20
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        ["prlimit", f"--as={limit}", ADVISOR, "estimate", str(model_copy)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    line = one_error_line(done)
    assert "out of memory" in line, line
    # What failed for want of memory is traced again with enough of it, not remembered as untraceable.
    again = started(["estimate", str(model_copy)], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "could not trace" not in again.stderr, again.stderr[-3000:]


# --- configs and model folders that lie --------------------------------------------------------------


def test_a_config_naming_an_attention_kernel_diffusers_lacks_is_refused(tmp_path):
    path = tmp_path / "advisor.json"
    path.write_text(json.dumps({**OptimizationConfig(device="cuda").to_dict(), "attention_backend": "banana"}))
    line = assert_refused(["estimate", "flux-dev", "--config", str(path), "--gpu", "H100"])
    assert "attention_backend" in line and "banana" in line and "native" in line, line
    import advisor

    with pytest.raises(ConfigError, match="banana"):
        advisor.load_config(path)


@pytest.mark.parametrize("name", ["../../etc", "sub/vae", "..", "."])
def test_a_model_index_entry_that_is_not_a_folder_of_the_model_is_refused(name, model_copy):
    index = model_copy / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), name: ["diffusers", "AutoencoderKL"]}))
    line = assert_refused(["inspect", str(model_copy)])
    assert line.startswith(f"advisor: error: {index}: ") and repr(name) in line, line


# --- the Python API ------------------------------------------------------------------------------------


def test_load_pipeline_of_a_model_folder_that_is_gone_raises_the_advisors_error(model_copy):
    import advisor

    shutil.rmtree(model_copy)
    with pytest.raises(AdvisorError, match=str(model_copy)):
        advisor.load_pipeline(model_copy, OptimizationConfig(device="cpu"))


def test_pipeline_kwargs_for_torchao_without_torchao_names_the_package(monkeypatch):
    import advisor

    monkeypatch.setitem(sys.modules, "torchao", None)  # what `import torchao` finds where it is not installed
    config = OptimizationConfig(device="cpu", quantization=Quantization(backend="torchao", components=["transformer"]))
    with pytest.raises(ConfigError, match="pip install torchao"):
        advisor.pipeline_kwargs(config)


# --- saves ----------------------------------------------------------------------------------------------

# Stops inside `write_text_atomic`, after the temporary file is written and before the rename.
_STALLED_SAVE = """
import os, sys, time
import advisor.files as files
def stall(fd):
    print("writing", flush=True)
    time.sleep(600)
files.os.fsync = stall
files.write_text_atomic(sys.argv[1], "{}")
"""


def test_a_save_killed_half_way_leaves_nothing_behind_after_the_next_save(tmp_path):
    from advisor.files import write_text_atomic

    target = tmp_path / "advisor.json"
    saving = subprocess.Popen([sys.executable, "-c", _STALLED_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert saving.stdout.readline().strip() == "writing"
        write_text_atomic(target, '{"a": 1}')
        assert len(list(tmp_path.glob(".advisor.json.*.tmp"))) == 1  # a save in progress keeps its file
    finally:
        saving.kill()
        saving.wait()
    write_text_atomic(target, '{"a": 2}')
    assert [p.name for p in tmp_path.iterdir()] == ["advisor.json"]  # the killed save's file is gone
    assert json.loads(target.read_text()) == {"a": 2}
