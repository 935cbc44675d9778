"""The GPU kit (benchmarks/gpu): its wheel list, the pip install step, model shapes and a full dry run on the CPU."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import re
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib


REPO = Path(__file__).resolve().parent.parent
KIT = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(KIT))  # the kit's modules are imported as run_kit.py imports them

import fetch_wheels  # noqa: E402
from kit import advisor_api, bootstrap, flux_shaped, machine  # noqa: E402


# --- the wheel list ---------------------------------------------------------------------------------


def test_the_download_command_asks_for_exactly_the_pinned_wheels(tmp_path):
    pins = [f"{p.name}=={p.version}" for p in fetch_wheels.PINNED]
    assert fetch_wheels.pinned_requirements() == pins
    command = fetch_wheels.download_command(fetch_wheels.pinned_requirements(), tmp_path, python="python3")
    assert command[:4] == ["python3", "-m", "pip", "download"]
    assert command[-len(pins) :] == pins
    options = command[4 : -len(pins)]
    for flag in ("--only-binary=:all:", "--no-deps"):
        assert flag in options
    assert options[options.index("--python-version") + 1] == "3.12"
    assert options[options.index("--implementation") + 1] == "cp"
    assert options[options.index("-d") + 1] == str(tmp_path)
    platforms = [options[i + 1] for i, o in enumerate(options) if o == "--platform"]
    assert set(platforms) >= {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"}
    assert "manylinux_2_24_x86_64" in platforms  # bitsandbytes 0.50 is tagged manylinux_2_24 only


def test_the_pinned_list_is_deliberate():
    names = [fetch_wheels.normalize(p.name) for p in fetch_wheels.PINNED]
    assert len(names) == len(set(names)), "one version per distribution"
    assert all(p.role in ("required", "fallback") and p.why for p in fetch_wheels.PINNED)
    required = {fetch_wheels.normalize(p.name) for p in fetch_wheels.PINNED if p.role == "required"}
    # What the GPU image lacks and `import advisor.cli, advisor.run.apply, advisor.run.tune, diffusers` needs.
    assert required == {
        "diffusers",
        "bitsandbytes",
        "optuna",
        "alembic",
        "sqlalchemy",
        "mako",
        "colorlog",
        "pydantic",
        "pydantic-core",
        "annotated-types",
        "typing-inspection",
        "importlib-metadata",
        "lazy-importer",
        "pytorch-msssim",
        "gguf",
        "peft",
    }
    # Every runtime dependency of the project is carried, except what the image provides by design:
    # pip --no-index must find each of them installed there or among the wheels.
    import tomllib
    from packaging.requirements import Requirement

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    project = {fetch_wheels.normalize(Requirement(r).name) for r in dependencies}
    assert project - set(names) == {"torch", "transformers", "matplotlib"}
    # huggingface_hub 2.x would break the image's transformers 5.17 (it requires huggingface-hub<2.0).
    hub = next(p for p in fetch_wheels.PINNED if fetch_wheels.normalize(p.name) == "huggingface-hub")
    assert hub.version.split(".")[0] == "1"


def test_list_prints_the_pins_without_downloading(capsys, tmp_path):
    assert fetch_wheels.main(["--list", "--dest", str(tmp_path / "never")]) == 0
    printed = capsys.readouterr().out
    for pin in fetch_wheels.PINNED:
        assert pin.requirement in printed
    assert not (tmp_path / "never").exists()


def test_slimming_bitsandbytes_keeps_only_the_chosen_cuda_libraries(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    files = {
        "bitsandbytes/__init__.py": b"",
        "bitsandbytes/libbitsandbytes_cpu.so": b"c",
        "bitsandbytes/libbitsandbytes_cuda118.so": b"x" * 100,
        "bitsandbytes/libbitsandbytes_cuda130.so": b"y",
        "bitsandbytes/libbitsandbytes_rocm72.so": b"z" * 100,
    }
    record = (
        "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in files.items())
        + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    )
    with zipfile.ZipFile(wheel, "w") as out:
        for name, data in files.items():
            out.writestr(name, data)
        out.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    result = fetch_wheels.slim_bitsandbytes(wheel, ("128", "130"))
    assert result["kept_libraries"] == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    assert result["dropped_libraries"] == ["libbitsandbytes_cuda118.so", "libbitsandbytes_rocm72.so"]
    with zipfile.ZipFile(wheel) as slim:
        names = set(slim.namelist())
        record_after = slim.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert (
        "bitsandbytes/libbitsandbytes_cuda118.so" not in names and "bitsandbytes/libbitsandbytes_cuda130.so" in names
    )
    assert "cuda118" not in record_after and "rocm72" not in record_after and "cuda130" in record_after


# --- installing: a virtual environment and pip ------------------------------------------------------


def test_the_environment_is_made_over_the_machines_packages(tmp_path):
    venv = tmp_path / "venv"
    assert bootstrap.venv_command(venv, python="python3") == [
        "python3",
        "-m",
        "venv",
        "--system-site-packages",
        "--clear",
        "--without-pip",
        str(venv),
    ]
    # Only where the running Python has no pip does the environment get its own (ensurepip).
    assert "--without-pip" not in bootstrap.venv_command(venv, python="python3", with_pip=True)


def test_the_pip_command_installs_the_project_from_the_carried_wheels_only(tmp_path):
    venv, wheels = tmp_path / "venv", tmp_path / "wheels"
    command = bootstrap.pip_install_command(venv, wheels, constraints=tmp_path / "c.txt", report=tmp_path / "r.json")
    assert command == [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "--isolated",
        "install",
        "--no-index",
        "--find-links",
        str(wheels),
        "--no-build-isolation",
        "--check-build-dependencies",
        "--constraint",
        str(tmp_path / "c.txt"),
        "--report",
        str(tmp_path / "r.json"),
        "--progress-bar",
        "off",
        "-e",
        ".",
    ]
    # pip checks every dependency (no --no-deps), upgrades nothing it need not, and is never asked for torch.
    assert not {"--no-deps", "--upgrade", "-U", "--force-reinstall", "--target"} & set(command)
    assert not any("torch" in part for part in command)
    without = bootstrap.pip_install_command(venv, None, constraints=tmp_path / "c.txt", report=tmp_path / "r.json")
    assert "--find-links" not in without and without[-2:] == ["-e", "."]


def test_pip_runs_without_the_machines_pip_configuration():
    env = bootstrap.pip_environment({"PIP_FIND_LINKS": "/opt/wheels", "PIP_INDEX_URL": "x", "PATH": "/bin"})
    assert env == {"PATH": "/bin", "PIP_CONFIG_FILE": os.devnull}


def test_torch_is_pinned_to_the_installed_version():
    import torch

    assert bootstrap.never_reinstalled_constraints(bootstrap.installed_version) == [f"torch=={torch.__version__}"]
    assert bootstrap.never_reinstalled_constraints(lambda name: None) == []


def test_the_running_environments_packages_are_linked_when_it_is_a_venv():
    import torch

    folders = bootstrap.parent_site_packages()
    if sys.prefix == sys.base_prefix:
        assert folders == []  # --system-site-packages shows this Python's packages by itself
    else:
        assert folders == [p for p in site.getsitepackages() if Path(p).is_dir()]
        assert any(Path(torch.__file__).is_relative_to(folder) for folder in folders)


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel, written the way the wheel format says (RECORD with hashes)."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{info}/METADATA": (
            "Metadata-Version: 2.1\n"
            f"Name: {name}\n"
            f"Version: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test_gpu_kit\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    digest = lambda data: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()  # noqa: E731
    record = (
        "".join(f"{path},sha256={digest(data)},{len(data)}\n" for path, data in files.items()) + f"{info}/RECORD,,\n"
    )
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name_in_zip, data in files.items():
            wheel.writestr(name_in_zip, data)
        wheel.writestr(f"{info}/RECORD", record)
    return path


def _project(folder: Path, dependencies: list[str]) -> Path:
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "kit-probe-project"\nversion = "0.1"\ndependencies = {json.dumps(dependencies)}\n\n'
        '[tool.setuptools]\npy-modules = ["kit_probe_project"]\n'
    )
    (folder / "kit_probe_project.py").write_text("")
    return folder


@pytest.mark.slow
def test_pip_installs_what_is_missing_from_the_wheels_and_never_replaces_torch(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "kit-probe-dependency", "1.0", requires=("torch>=2.5",))
    _wheel(wheels, "torch", "99.0")  # a newer torch among the wheels must not replace the installed one
    project = _project(tmp_path / "project", ["kit-probe-dependency>=1", "torch>=2.5", "pydantic>=2.7"])
    venv = tmp_path / "venv"
    record = bootstrap.make_environment(venv, wheels, project=project, log=lambda line: None)
    assert {(r["name"], r["source"]) for r in record.installed} == {
        ("kit-probe-dependency", "kit_probe_dependency-1.0-py3-none-any.whl"),
        ("kit-probe-project", "project (editable)"),
    }
    assert record.commands[0][-2:] == ["--without-pip", str(venv)] and "--find-links" in record.commands[1]
    # The environment's Python sees the installed dependency, the project, and this Python's torch.
    import torch

    probe = (
        "import kit_probe_dependency, kit_probe_project, torch; print(kit_probe_dependency.VERSION, torch.__version__)"
    )
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1.0", torch.__version__]

    # A project that needs another torch fails, saying why: the carried torch 99 is not taken.
    needs_new_torch = _project(tmp_path / "new-torch", ["torch>=99"])
    with pytest.raises(bootstrap.BootstrapError) as caught:
        bootstrap.make_environment(tmp_path / "venv2", wheels, project=needs_new_torch, log=lambda line: None)
    message = str(caught.value)
    assert "kit-probe-project 0.1 depends on torch>=99" in message
    assert f"The user requested (constraint) torch=={torch.__version__}" in message


@pytest.mark.slow
def test_a_requirement_nothing_provides_is_a_clear_error(tmp_path):
    project = _project(tmp_path / "project", ["kit-probe-not-carried>=1.2"])
    with pytest.raises(bootstrap.BootstrapError) as caught:
        bootstrap.make_environment(
            tmp_path / "venv", tmp_path / "absent-wheels", project=project, log=lambda line: None
        )
    message = str(caught.value)
    assert "needs kit-probe-not-carried>=1.2" in message
    assert "a wheels folder" in message  # the folder is absent: pip ran without --find-links


# --- the kit's layout -------------------------------------------------------------------------------


def test_only_advisor_api_imports_the_advisor_package():
    """The package's internal API is being renamed: one module of the kit adapts to it."""
    sources = [KIT / "run_kit.py", *sorted((KIT / "kit").glob("*.py"))]
    importers = [p.name for p in sources if re.search(r"^\s*(from|import) advisor\b", p.read_text(), re.M)]
    assert importers == ["advisor_api.py"]


def test_every_kit_module_stays_small():
    for path in [KIT / "run_kit.py", KIT / "fetch_wheels.py", *sorted((KIT / "kit").glob("*.py"))]:
        assert len(path.read_text().splitlines()) < 500, path.name


def test_bitsandbytes_library_choice(monkeypatch, tmp_path):
    package = tmp_path / "bitsandbytes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for version in ("126", "128", "130"):
        (package / f"libbitsandbytes_cuda{version}.so").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)  # find_spec would answer from it
    importlib.invalidate_caches()
    assert machine.bitsandbytes_library("13.0") == (None, "libbitsandbytes_cuda130.so matches torch's CUDA 13.0")
    assert machine.bitsandbytes_library("12.9")[0] == "128"
    assert machine.bitsandbytes_library("12.4")[0] == "126"
    chosen, note = machine.bitsandbytes_library("11.8")
    assert chosen is None and "parts will fail" in note


# --- the plan ---------------------------------------------------------------------------------------


def test_depth_scales_the_transformer_and_t5_only():
    entry = advisor_api.catalog_entry()
    configs, scaling = flux_shaped.scaled_flux_configs(entry, 0.25)
    assert configs["transformer"]["config"]["num_layers"] == 5
    assert configs["transformer"]["config"]["num_single_layers"] == 10
    assert configs["text_encoder_2"]["config"]["num_layers"] == 6
    assert scaling["transformer.num_layers"] == {"full": 19, "used": 5}
    full = {c["name"]: c["config"] for c in entry["components"]}
    assert configs["text_encoder"]["config"]["num_hidden_layers"] == full["text_encoder"]["num_hidden_layers"]
    assert configs["vae"]["config"]["block_out_channels"] == full["vae"]["block_out_channels"]
    assert configs["transformer"]["config"]["num_attention_heads"] == 24  # full width
    assert not any(
        k.startswith("_") or k in ("architectures", "torch_dtype") for c in configs.values() for k in c["config"]
    )
    configs, _ = flux_shaped.scaled_flux_configs(entry, 1)
    assert (
        configs["transformer"]["config"]["num_layers"] == 19
        and configs["text_encoder_2"]["config"]["num_layers"] == 24
    )
    assert flux_shaped.scaled_flux_configs(entry, 0.01)[0]["transformer"]["config"]["num_layers"] == 1
    for bad in (0, 1.5):
        with pytest.raises(ValueError):
            flux_shaped.scaled_flux_configs(entry, bad)


def test_the_dry_run_maps_gpu_only_options_to_cpu_ones():
    from advisor.config import Compile, Offload, OptimizationConfig

    seed = {name: config for name, _, config in advisor_api.seed_configs("cuda", "bfloat16")}
    mapped, notes = advisor_api.cpu_equivalent(seed["quantization+compile+model-offload"], torchao=True)
    assert mapped.device == "cpu" and mapped.dtype == "float32"
    assert mapped.quantization.backend == "torchao" and mapped.quantization.components == [
        "transformer",
        "text_encoder_2",
    ]
    assert mapped.offload.strategy == "group" and mapped.offload.offload_type == "leaf_level"
    assert mapped.compile.backend == "eager"
    assert len(notes) == 4
    mapped, _ = advisor_api.cpu_equivalent(seed["quantization"], torchao=False)
    assert mapped.quantization is None
    streamed = OptimizationConfig(
        offload=Offload(strategy="group", use_stream=True, record_stream=True), compile=Compile(backend="eager")
    )
    mapped, notes = advisor_api.cpu_equivalent(streamed, torchao=True)
    assert not mapped.offload.use_stream and not mapped.offload.record_stream and mapped.compile.backend == "eager"
    sequential, _ = advisor_api.cpu_equivalent(
        OptimizationConfig(offload=Offload(strategy="sequential")), torchao=True
    )
    assert sequential.offload.strategy == "group" and sequential.offload.offload_type == "block_level"
    leaf = OptimizationConfig(
        device="cpu",
        dtype="float32",
        offload=Offload(strategy="group", offload_type="leaf_level", components=["transformer"]),
    )
    mapped, notes = advisor_api.cpu_equivalent(leaf, torchao=True)
    assert mapped.offload.offload_type == "block_level" and notes


def test_per_phase_peaks_sit_next_to_the_estimates_device_bytes_of_each_phase():
    from types import SimpleNamespace

    from kit import GIB
    from kit.plan import Item, phase_peaks
    from kit.report import PHASES_ON_CPU, findings_block, phase_table

    est = {"phase_device_bytes": {"text_encoding": 2 * GIB, "denoising": 6 * GIB, "vae_decode": 3 * GIB}}
    measured = {"phase_peak_vram_bytes": {"text_encoding": 2 * GIB, "denoising": 8 * GIB, "vae_decode": 4 * GIB}}
    rows = phase_peaks(est, measured)
    assert list(rows) == ["text_encoding", "denoising", "vae_decode"]
    assert rows["denoising"] == {"predicted_bytes": 6 * GIB, "measured_bytes": 8 * GIB, "error": -0.25}
    assert rows["text_encoding"]["error"] == 0.0
    on_cpu = phase_peaks(est, {"phase_peak_vram_bytes": None})
    assert all(r["measured_bytes"] is None and r["error"] is None and r["predicted_bytes"] for r in on_cpu.values())

    kit = SimpleNamespace(
        items=[
            Item("seed/x", "seed", "x", status="ok", result={"phase_peaks": rows}),
            Item("seed/y", "seed", "y", status="reused", result={"phase_peaks": rows}),
            Item("seed/z", "seed", "z", status="oom", result={}),
        ],
        args=SimpleNamespace(dry_run=False),
        data={},
    )
    text = phase_table(kit)
    assert "| item   | phase         | predicted GiB | measured GiB | error |" in text
    assert "| seed/x | denoising     | 6.00          | 8.00         | -25%  |" in text
    assert "seed/y" not in text and "seed/z" not in text  # reused rows repeat seed/x's; no measurement
    assert "denoising -25% (-25%)" in findings_block(kit)

    kit.items = [Item("seed/x", "seed", "x", status="ok", result={"phase_peaks": on_cpu})]
    kit.args.dry_run = True
    assert PHASES_ON_CPU in phase_table(kit) and "| seed/x" not in phase_table(kit)


# --- the dry run ------------------------------------------------------------------------------------

PLANNED = "seed/quantization seed/quantization+compile seed/quantization+compile+model-offload recommend/16GB recommend/13GB tune/15GB offload/none offload/group-block offload/group-block-stream offload/group-leaf offload/group-leaf-stream offload/partial-1of3 offload/partial-2of3 offload/sequential attention/native attention/_native_math cache/first-block-0.08 multi_gpu/1 multi_gpu/2".split()


def _strict(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_the_dry_run_has_no_time_budget_unless_given():
    """The GPU kit's budget is the lent machine's minutes; a dry run checks plumbing, and a busy CI
    machine must not make it skip an item."""
    import run_kit
    from kit.plan import Kit
    from kit.report import Log

    assert run_kit.parse_args([]).budget_s == 480
    assert run_kit.parse_args(["--dry-run", "--budget-s", "60"]).budget_s == 60
    args = run_kit.parse_args(["--dry-run"])
    assert args.budget_s is None
    kit = Kit(args, Log(0.0))  # started at the epoch: any deadline would have passed long ago
    assert kit.left() == float("inf")


@pytest.mark.slow
def test_the_dry_run_measures_every_item_and_reports(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(KIT / "run.sh"), "--dry-run", "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table_start = done.stdout.rindex("GPU kit (dry-run)")
    table = done.stdout[table_start:]
    assert "| item" in table and "latency s ±spread (est)" in table
    for item_id in PLANNED:
        assert f"| {item_id} " in table

    results = json.loads((out / "gpu_kit.json").read_text(), parse_constant=_strict)
    assert results["mode"] == "dry-run" and results["kit_version"] == 1
    assert [item["id"] for item in results["items"]] == PLANNED
    for item in results["items"]:
        assert item["status"] in ("ok", "reused"), (item["id"], item["status"], item["notes"])
        if item["part"] == "multi_gpu":  # torchrun launches, timed in the processes (kit/multi_gpu.py)
            assert item["latency_s"] > 0 and item["predicted_s"] > 0
            continue
        assert item["measurement"]["status"] == "ok" and item["measurement"]["latency_s"] is not None
        assert item["measured_peak_bytes"] > 0
        assert item["estimate"]["peak_bytes"] > 0 and "peak" in item["errors"]
        assert item["measurement"]["phase_peak_vram_bytes"] is None  # no allocator peak on a CPU
        phases = item["phase_peaks"]
        assert list(phases) == ["text_encoding", "denoising", "vae_decode"], item["id"]
        assert all(
            row["predicted_bytes"] > 0 and row["measured_bytes"] is None and row["error"] is None
            for row in phases.values()
        )
    by_id = {item["id"]: item for item in results["items"]}
    # two gloo processes split the transformer: each block saw half the tokens of one process
    assert by_id["multi_gpu/2"]["block_tokens"] == [by_id["multi_gpu/1"]["block_tokens"][0] // 2]
    assert set(results["multi_gpu_speedups"]) == {"multi_gpu/1", "multi_gpu/2"}
    assert any("bitsandbytes needs CUDA" in note for note in by_id["seed/quantization"]["notes"])
    assert by_id["recommend/13GB"]["status"] == "reused"  # same pick as 16GB on a CPU: measured once
    tune = by_id["tune/15GB"]["tune"]
    assert tune["trials"] and tune["trials"][0]["source"] == "measured"
    # Installed through pip into the kit's environment, which ran everything after: with every
    # requirement already there (system site-packages), pip installs the project alone.
    install = results["install"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"]
    assert [row["name"] for row in install["installed"]] == [project], install
    assert install["venv"] == str(tmp_path / "work" / "venv")
    assert results["environment"]["executable"] == str(tmp_path / "work" / "venv" / "bin" / "python")
    assert results["environment"]["torch"] and results["model"]["parameters"]["transformer"] > 0
    assert set(results["offload_calibration"]) >= {"baseline_per_step_s", "offload/group-block"}
    assert by_id["attention/_native_math"]["config"]["attention_backend"] == "_native_math"
    assert (
        results["attention_speedups"]["attention/native"] == 1.0
        and results["attention_speedups"]["attention/_native_math"] > 0
    )
    for item_id in (
        "attention/_native_math",
        "cache/first-block-0.08",
    ):  # compared with native's output, same seed and steps
        assert 0 < by_id[item_id]["quality"]["ssim"] <= 1, by_id[item_id]
    report = (out / "gpu_kit.md").read_text()
    assert report.count("| seed/") == 3
    assert "Per-phase peaks" in report and "no allocator peak on CPU" in report
    assert "results:" in (out / "gpu_kit.log").read_text()
