"""The GPU kit (benchmarks/gpu): its wheel list, installer, model shapes and a full dry run on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / "benchmarks" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_kit_{name}", KIT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fetch_wheels = _load("fetch_wheels")
run_kit = _load("run_kit")


# --- the wheel list ---------------------------------------------------------------------------------


def test_the_download_command_asks_for_exactly_the_pinned_wheels(tmp_path):
    pins = [f"{p.name}=={p.version}" for p in fetch_wheels.PINNED]
    assert fetch_wheels.pinned_requirements() == pins
    command = fetch_wheels.download_command(fetch_wheels.pinned_requirements(), tmp_path, python="python3")
    assert command[:4] == ["python3", "-m", "pip", "download"]
    assert command[-len(pins):] == pins
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
        "diffusers", "bitsandbytes", "optuna", "alembic", "sqlalchemy", "mako", "colorlog", "pydantic",
        "pydantic-core", "annotated-types", "typing-inspection", "importlib-metadata", "lazy-importer",
    }
    # Every runtime dependency of the project is carried, except what the image provides by design.
    from packaging.requirements import Requirement

    project = {fetch_wheels.normalize(Requirement(r).name) for r in run_kit.project_requirements()}
    assert project - set(names) == {"torch", "transformers"}
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
    record = "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in files.items()) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
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
    assert "bitsandbytes/libbitsandbytes_cuda118.so" not in names and "bitsandbytes/libbitsandbytes_cuda130.so" in names
    assert "cuda118" not in record_after and "rocm72" not in record_after and "cuda130" in record_after


# --- installing on the GPU machine ------------------------------------------------------------------


def _wheels(**entries):
    return {name: (version, Path(f"{name}-{version}-py3-none-any.whl"), requires) for name, (version, requires) in entries.items()}


def test_the_installer_adds_only_what_the_image_lacks_or_has_too_old():
    wheels = _wheels(
        **{
            "diffusers": ("0.42.1", ["huggingface-hub<3.0,>=1.32.0", "importlib_metadata", "numpy"]),
            "importlib-metadata": ("10.2.0", ["zipp>=3.20", 'lazy-importer>=0.1; python_version < "3.15"']),
            "lazy-importer": ("0.1.0", []),
            "pydantic": ("2.14.4", ["typing-extensions>=4.16.0"]),
            "typing-extensions": ("4.16.0", []),
            "huggingface-hub": ("1.33.0", []),
        }
    )
    image = {"numpy": "2.5.2", "zipp": "3.23.0", "huggingface-hub": "1.33.0", "typing-extensions": "4.15.0", "torch": "2.11.0+cu130"}
    plan = run_kit.plan_install(wheels, ["diffusers>=0.42", "pydantic>=2.7", "torch>=2.5"], installed=image.get)
    assert set(plan.install) == {"diffusers", "importlib-metadata", "lazy-importer", "pydantic", "typing-extensions"}
    assert "4.15.0 does not satisfy" in plan.install["typing-extensions"]["why"]
    assert plan.satisfied == {"numpy": "2.5.2", "zipp": "3.23.0", "huggingface-hub": "1.33.0", "torch": "2.11.0+cu130"}
    assert plan.problems == []

    older = {**image, "huggingface-hub": "1.20.0"}
    plan = run_kit.plan_install(wheels, ["diffusers>=0.42"], installed=older.get)
    assert plan.install["huggingface-hub"]["version"] == "1.33.0"

    plan = run_kit.plan_install(wheels, ["diffusers>=0.42", "torch>=2.5"], installed={}.get)
    assert any(p.startswith("torch>=2.5") and "not carried" in p for p in plan.problems)  # torch is never carried


def test_bitsandbytes_library_choice(monkeypatch, tmp_path):
    package = tmp_path / "bitsandbytes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for version in ("126", "128", "130"):
        (package / f"libbitsandbytes_cuda{version}.so").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)  # find_spec would answer from it
    importlib.invalidate_caches()
    assert run_kit.bitsandbytes_library("13.0") == (None, "libbitsandbytes_cuda130.so matches torch's CUDA 13.0")
    assert run_kit.bitsandbytes_library("12.9")[0] == "128"
    assert run_kit.bitsandbytes_library("12.4")[0] == "126"
    chosen, note = run_kit.bitsandbytes_library("11.8")
    assert chosen is None and "parts will fail" in note


# --- the plan ---------------------------------------------------------------------------------------


def test_depth_scales_the_transformer_and_t5_only():
    entry = run_kit.catalog_entry()
    configs, scaling = run_kit.scaled_flux_configs(entry, 0.25)
    assert configs["transformer"]["config"]["num_layers"] == 5
    assert configs["transformer"]["config"]["num_single_layers"] == 10
    assert configs["text_encoder_2"]["config"]["num_layers"] == 6
    assert scaling["transformer.num_layers"] == {"full": 19, "used": 5}
    full = {c["name"]: c["config"] for c in entry["components"]}
    assert configs["text_encoder"]["config"]["num_hidden_layers"] == full["text_encoder"]["num_hidden_layers"]
    assert configs["vae"]["config"]["block_out_channels"] == full["vae"]["block_out_channels"]
    assert configs["transformer"]["config"]["num_attention_heads"] == 24  # full width
    assert not any(k.startswith("_") or k in ("architectures", "torch_dtype") for c in configs.values() for k in c["config"])
    configs, _ = run_kit.scaled_flux_configs(entry, 1)
    assert configs["transformer"]["config"]["num_layers"] == 19 and configs["text_encoder_2"]["config"]["num_layers"] == 24
    assert run_kit.scaled_flux_configs(entry, 0.01)[0]["transformer"]["config"]["num_layers"] == 1
    for bad in (0, 1.5):
        with pytest.raises(ValueError):
            run_kit.scaled_flux_configs(entry, bad)


def test_the_dry_run_maps_gpu_only_options_to_cpu_ones():
    from advisor.config import Compile, Offload, OptimizationConfig

    seed = {name: config for name, _, config in run_kit.seed_configs("cuda", "bfloat16")}
    mapped, notes = run_kit.cpu_equivalent(seed["quantization+compile+model-offload"], torchao=True)
    assert mapped.device == "cpu" and mapped.dtype == "float32"
    assert mapped.quantization.backend == "torchao" and mapped.quantization.components == ["transformer", "text_encoder_2"]
    assert mapped.offload.strategy == "group" and mapped.offload.offload_type == "leaf_level"
    assert mapped.compile.backend == "eager"
    assert len(notes) == 4
    mapped, _ = run_kit.cpu_equivalent(seed["quantization"], torchao=False)
    assert mapped.quantization is None
    streamed = OptimizationConfig(offload=Offload(strategy="group", use_stream=True, record_stream=True), compile=Compile(backend="eager"))
    mapped, notes = run_kit.cpu_equivalent(streamed, torchao=True)
    assert not mapped.offload.use_stream and not mapped.offload.record_stream and mapped.compile.backend == "eager"
    sequential, _ = run_kit.cpu_equivalent(OptimizationConfig(offload=Offload(strategy="sequential")), torchao=True)
    assert sequential.offload.strategy == "group" and sequential.offload.offload_type == "block_level"
    leaf = OptimizationConfig(device="cpu", dtype="float32", offload=Offload(strategy="group", offload_type="leaf_level", components=["transformer"]))
    mapped, notes = run_kit.cpu_equivalent(leaf, torchao=True)
    assert mapped.offload.offload_type == "block_level" and notes


# --- the dry run ------------------------------------------------------------------------------------

PLANNED = [
    "seed/quantization",
    "seed/quantization+compile",
    "seed/quantization+compile+model-offload",
    "recommend/16GB",
    "recommend/13GB",
    "tune/15GB",
    "offload/none",
    "offload/group-block",
    "offload/group-block-stream",
    "offload/group-leaf",
    "offload/group-leaf-stream",
    "offload/sequential",
]


def _strict(constant):
    raise ValueError(f"not strict JSON: {constant}")


@pytest.mark.slow
def test_the_dry_run_measures_every_item_and_reports(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(KIT / "run.sh"), "--dry-run", "--work", str(tmp_path / "work"), "--budget-s", "500"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table_start = done.stdout.rindex("GPU kit (dry-run)")
    table = done.stdout[table_start:]
    assert "| item" in table and "latency s (est)" in table
    for item_id in PLANNED:
        assert f"| {item_id} " in table

    results = json.loads((out / "gpu_kit.json").read_text(), parse_constant=_strict)
    assert results["mode"] == "dry-run" and results["kit_version"] == 1
    assert [item["id"] for item in results["items"]] == PLANNED
    for item in results["items"]:
        assert item["status"] in ("ok", "reused"), (item["id"], item["status"], item["notes"])
        assert item["measurement"]["status"] == "ok" and item["measurement"]["latency_s"] is not None
        assert item["measured_peak_bytes"] > 0
        if item["part"] != "tune":
            assert item["estimate"]["peak_bytes"] > 0 and "peak" in item["errors"]
    by_id = {item["id"]: item for item in results["items"]}
    assert any("bitsandbytes needs CUDA" in note for note in by_id["seed/quantization"]["notes"])
    assert by_id["recommend/13GB"]["status"] == "reused"  # same pick as 16GB on a CPU: measured once
    tune = by_id["tune/15GB"]["tune"]
    assert tune["trials"] and tune["trials"][0]["source"] == "measured"
    assert results["install"]["result"].startswith(("not installed", "no wheels"))
    assert results["environment"]["torch"] and results["model"]["parameters"]["transformer"] > 0
    assert set(results["offload_calibration"]) >= {"baseline_per_step_s", "offload/group-block"}
    assert (out / "gpu_kit.md").read_text().count("| seed/") == 3
    assert "results:" in (out / "gpu_kit.log").read_text()
