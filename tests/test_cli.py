"""The command line through its real entry points (console script and ``python -m advisor``)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from advisor.cli import main
from advisor.probe.layout import catalog_names


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
    assert lines == ["advisor: error: no such option: --bogus (see 'advisor probe --help')"]


def test_unknown_command_suggests_the_right_one():
    result = run("probee")
    assert result.returncode == 2
    assert "Did you mean 'probe'" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    assert "probe" in capsys.readouterr().out


def test_advisor_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from advisor.errors import HardwareError
    from advisor.probe import hardware

    def broken():
        raise HardwareError("--calibrate: no CUDA device to calibrate; run it on the GPU machine")

    monkeypatch.setattr(hardware, "probe_machine", broken)
    assert main(["probe"]) == 1
    assert (
        capsys.readouterr().err
        == "advisor: error: --calibrate: no CUDA device to calibrate; run it on the GPU machine\n"
    )
    with pytest.raises(HardwareError):
        main(["--debug", "probe"])


# --- inspect, estimate, recommend ---------------------------------------------------------------


def test_inspect_catalog_model_offline_as_json():
    result = run("inspect", "black-forest-labs/FLUX.1-dev", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == "catalog" and data["workload"] == "image"
    transformer = next(c for c in data["components"] if c["name"] == "transformer")
    assert transformer["parameters"] == pytest.approx(11.9e9, rel=0.01)


def test_inspect_unknown_model_is_one_line():
    result = run("inspect", "nobody/nothing", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "or in the catalog" in result.stderr and "Traceback" not in result.stderr


def test_estimate_shows_phases(capsys):
    assert main(["estimate", "flux-dev", "--gpu", "RTX 4090"]) == 0
    out = capsys.readouterr().out
    assert "denoising" in out and "vae_decode" in out and "predicted latency" in out


def test_estimate_warns_when_the_config_was_made_for_another_pipeline(capsys, tmp_path):
    wan = tmp_path / "wan.json"
    assert main(["recommend", "-m", "wan2.1-t2v-1.3b", "--gpu", "RTX 4090", "--no-compile", "-o", str(wan)]) == 0
    capsys.readouterr()
    assert main(["estimate", "flux-dev", "--gpu", "RTX 4090", "--config", str(wan)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"advisor: warning: --config {wan}: made for a WanPipeline"), err
    assert "FluxPipeline" in err[0]


def test_recommend_json_has_the_documented_keys(capsys):
    # The seed page's pick is the fastest (--quality fast); balanced takes a lossless partial offload within 20% of it.
    assert (
        main("recommend --model black-forest-labs/FLUX.1-dev --vram 24GB --budget 16GB --quality fast --json".split())
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert {"model", "workload", "hardware", "budget_bytes", "config", "estimate", "reasons", "alternatives"} <= set(
        data
    )
    assert data["budget_bytes"] == 16 * 2**30
    assert data["estimate"]["peak_vram_bytes"] <= data["budget_bytes"]
    assert data["estimate"]["peak_ram_bytes"] > 0
    assert data["config"]["quantization"]["backend"] == "bitsandbytes_4bit"
    assert 2 <= len(data["alternatives"]) <= 3


def test_recommend_writes_a_config_that_loads(tmp_path, capsys):
    from advisor.config import load_config

    path = tmp_path / "advisor.json"
    # The seed page's pick under its no-offload peak (quantization + model offload; see
    # tests/test_rules.py's 11 GB case) is the fastest: --quality fast.
    assert (
        main(
            ["recommend", "-m", "flux-dev", "--vram", "24GB", "--budget", "11GB", "--quality", "fast", "-o", str(path)]
        )
        == 0
    )
    config = load_config(path)
    assert config.offload.strategy == "model"
    assert config.provenance.made_by == "recommend" and config.provenance.budget_bytes == 11 * 2**30
    assert str(path) in capsys.readouterr().out


def test_recommend_nothing_fits_exits_3_with_advice(capsys):
    assert main(["recommend", "-m", "flux-dev", "--vram", "4GB", "--budget", "1GB", "--ram", "8GB"]) == 3
    out = capsys.readouterr().out
    assert "Nothing fits" in out and "smallest predicted peak" in out


def _has_gpu() -> bool:
    from advisor.probe.hardware import probe_machine

    return bool(probe_machine().gpus)


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_recommend_without_gpu_says_so_and_plans_cpu(tiny_flux_dir, capsys):
    assert main(["recommend", "-m", str(tiny_flux_dir), "--height", "64", "--width", "64"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU found" in out and "--vram" in out
    assert "Recommended:" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "twelve"], "--budget: 'twelve' is not a size"),
        (["--vram", "-3GB"], "--vram: '-3GB' is negative"),
        (["--ram", "12XB"], "--ram: '12XB' is not a size"),
        (["--gpu", "Voodoo 5"], "--gpu: 'Voodoo 5' is not a known GPU"),
        (["--emit", "rust"], "--emit: 'rust' is not supported"),
        (
            ["--height", "1001"],
            "--height: 1001 is not a multiple of 16 (FluxPipeline needs it)",
        ),  # pipeline_flux.py check_inputs
        (["--workload", "movie"], "--workload: 'movie' is not a workload"),
        (["--model", "./missing-folder"], "no such folder"),
        (["--vram", "24GB", "--budget", "0"], "--budget: must be larger than 0"),
        (["--gpu", "4060 super"], "'RTX 4060'"),
        (
            ["--gpu", "H100", "--quality", "perfect"],
            "--quality: 'perfect' is not a quality policy; use one of exact, balanced, fast",
        ),
        (["--gpu", "H100", "--json", "--emit", "python"], "--emit: prints a script, --json an object; choose one"),
        (["--gpu", "H100", "--height", "99999999"], "--height: 99999999 is larger than any pipeline generates"),
    ],
)
def test_recommend_bad_input_is_one_line_naming_the_flag(args, message):
    result = run("recommend", *args, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode in (1, 2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "command",
    [
        ["recommend", "--model", "black-forest-labs/FLUX.1-dev", "--vram", "24GB"],
        ["recommend", "--model", "black-forest-labs/FLUX.1-dev", "--vram", "24GB", "--json"],
        ["probe"],
        ["probe", "--json"],
    ],
)
def test_probe_and_recommend_import_neither_torch_nor_diffusers(command):
    """Nor, on the instant paths, what would take their start-up over 0.05 of importing diffusers
    (benchmarks/cli_latency.py): optuna, pydantic (config files only), rich (tables of the other
    views), importlib.metadata (versions come from folder names)."""
    if command[0] == "probe" and _has_gpu():
        pytest.skip("on a GPU machine the probe may ask torch when NVML can't answer")
    heavy = ("torch", "diffusers", "optuna", "pydantic", "rich", "importlib.metadata")
    code = (
        "import sys, io, contextlib; from advisor.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main({command!r})\n"
        f"sys.stderr.write(str(sorted(m for m in {heavy!r} if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.stderr.strip().endswith("[]"), result.stderr[-300:]


def test_tune_refuses_a_model_it_cannot_run_with_one_line(tmp_path):
    # FLUX.1-dev, known to the catalog but not downloaded (an empty HF cache).
    result = run("tune", "flux-dev", "--budget", "12GB", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not downloaded and the hub can't be reached" in lines[0] and "--model" in lines[0]


@pytest.mark.parametrize("command", [["inspect"], ["estimate", "--gpu", "H100"], ["recommend", "--gpu", "H100"]])
def test_the_model_comes_first_or_as_the_model_option(command, capsys):
    """`advisor estimate flux-dev` and `advisor estimate --model flux-dev` are the same command, in
    every command that reads a pipeline; given twice differently, or not at all where it is needed, one line."""
    name, *rest = command
    outputs = []
    for model in (["sdxl"], ["--model", "sdxl"], ["-m", "sdxl"], ["sdxl", "--model", "sdxl"]):
        assert main([name, *model, *rest, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        out.get("config", {}).get("provenance", {}).pop("created", None)  # recommend's config says when it was made
        outputs.append(out)
    assert all(out == outputs[0] for out in outputs[1:])
    assert all(
        (out.get("model") or out.get("model_id")) == "stabilityai/stable-diffusion-xl-base-1.0" for out in outputs
    )

    assert main([name, "sdxl", "--model", "flux-dev", *rest]) == 2
    assert capsys.readouterr().err.strip() == (
        "advisor: error: --model: the model is given twice, as 'sdxl' and as --model 'flux-dev'; give it once"
    )
    assert main([name, "sdxl", "extra", *rest]) == 2
    assert capsys.readouterr().err.strip() == f"advisor: error: no such argument: extra (see 'advisor {name} --help')"
    if name != "recommend":  # recommend alone has a default, said as an assumption (above)
        assert main([name, *rest]) == 2
        assert (
            capsys.readouterr()
            .err.strip()
            .startswith(f"advisor: error: MODEL: none given; name the pipeline first (advisor {name} ")
        )


def test_tune_needs_a_model_before_anything_else(capsys):
    assert main(["tune", "--budget", "12GB"]) == 2
    assert capsys.readouterr().err.strip().startswith("advisor: error: MODEL: none given")


def test_recommend_json_is_strict_json_even_for_a_cpu_plan():
    """A CPU target's host->device bandwidth is infinite; JSON has no Infinity, so it is null."""
    result = run("recommend", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode in (0, 3), result.stderr

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    data = json.loads(result.stdout, parse_constant=refuse)
    assert "assumptions" in data and data["quality"] == "balanced"


def test_planning_for_another_gpu_says_what_it_assumed_and_records_it(tmp_path):
    result = run("recommend", "--gpu", "H100", "-o", str(tmp_path / "a.json"), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "assumed host RAM" in result.stdout and "pass --ram" in result.stdout
    # No model given: recommend plans FLUX.1-dev, and says so like every other assumed value.
    assert "assumed model: black-forest-labs/FLUX.1-dev (none given; pass MODEL or --model)" in result.stdout
    saved = json.loads((tmp_path / "a.json").read_text())
    assert any("host RAM" in line for line in saved["provenance"]["assumptions"])
    assert any(line.startswith("model: black-forest-labs/FLUX.1-dev") for line in saved["provenance"]["assumptions"])
    assert saved["provenance"]["quality"] == "balanced"


@pytest.mark.parametrize("command", ["recommend --gpu H100", "recommend --gpu H100 --json", "probe"])
def test_a_closed_pipe_ends_quietly(command):
    advisor_cli = Path(sys.executable).with_name("advisor")
    # `true` exits before the advisor has started (hundreds of ms), so its first write meets a closed
    # pipe every time: with `head -1` a small output could be written whole before head went away.
    result = subprocess.run(
        f"'{advisor_cli}' {command} | true; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_recommend_refuses_workloads_it_does_not_plan():
    result = run("recommend", "--gpu", "H100", "--workload", "audio", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "--workload: audio pipelines are not planned" in result.stderr


# --- bad input of every kind: one line naming the flag or file, a documented exit status ------------


BAD_CALIBRATIONS = {
    "array": "[]",
    "object of arrays": '{"cpu": []}',
    "string rate": '{"cpu": {"matmul_flops": "fast"}}',
    "zero rate": '{"cpu": {"matmul_flops": 0}}',
    "null rate": '{"cpu": {"matmul_flops": null}}',
    "infinite rate": '{"cpu": {"matmul_flops": 1e400}}',
    "boolean bandwidth": '{"cpu": {"matmul_flops": 1e12, "h2d_bytes_per_s": true}}',
    "garbage": "garbage",
    "truncated": '{"cpu": {"matmul_fl',
    "deep": "[" * 100_000 + "]" * 100_000,
}


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """An empty XDG cache for the advisor (where calibration.json lives)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "advisor").mkdir(parents=True)
    return tmp_path / "cache" / "advisor"


@pytest.mark.parametrize("name", list(BAD_CALIBRATIONS))
def test_a_bad_calibration_cache_is_ignored_with_a_warning(cache_home, name):
    import warnings

    from advisor.errors import AdvisorWarning
    from advisor.probe.target import load_calibration

    path = cache_home / "calibration.json"
    path.write_text(BAD_CALIBRATIONS[name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_calibration("cpu") is None
    assert [w.category for w in caught] == [AdvisorWarning]
    message = str(caught[0].message)
    assert message.startswith(f"{path}: ") and "advisor probe --calibrate" in message and "\n" not in message


def test_a_good_calibration_entry_survives_a_bad_neighbour(cache_home):
    import warnings

    from advisor.probe.target import load_calibration

    (cache_home / "calibration.json").write_text('{"cpu": {"matmul_flops": 3e11}, "other": {"matmul_flops": "x"}}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_calibration("cpu") == {"matmul_flops": 3e11}
    assert len(caught) == 1 and "'other'" in str(caught[0].message)


def test_calibrating_replaces_an_unusable_cache(cache_home):
    import warnings

    from advisor.probe.calibrate import calibrate

    path = cache_home / "calibration.json"
    path.write_text("[]")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = calibrate(seconds=0.01)
    stored = json.loads(path.read_text())
    assert list(stored) == [result["name"]] and stored[result["name"]]["matmul_flops"] > 0


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advisor: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("advisor: error: ")


def _no_trials(monkeypatch):
    """Make measuring anything fail the test: output checks must come before the first trial."""
    import advisor.run.tune
    import advisor.run.workers

    def measured(*args, **kwargs):
        raise AssertionError("a trial was started before the bad argument was refused")

    monkeypatch.setattr(advisor.run.tune, "run_study", measured)
    monkeypatch.setattr(advisor.run.workers, "run_workers", measured)


@pytest.fixture
def plain_file(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("command", ["recommend", "tune"])
def test_output_paths_that_cannot_be_files_are_refused_before_any_work(
    command, tmp_path, plain_file, tiny_flux_dir, monkeypatch, capsys
):
    _no_trials(monkeypatch)
    base = (
        ["recommend", "-m", "flux-dev", "--gpu", "H100"]
        if command == "recommend"
        else ["tune", "--budget", "4GB", "-m", str(tiny_flux_dir)]
    )
    long_name = "a" * 300 + ".json"
    cases = [
        (str(tmp_path), f"-o {tmp_path}: is a folder; give a file name inside it"),
        (str(plain_file / "x.json"), f"-o {plain_file / 'x.json'}: {plain_file} is a file, not a folder"),
        (str(tmp_path / long_name), "is 305 bytes long; this file system allows at most 255"),
        ("", "-o: the file name is empty"),
    ]
    for output, message in cases:
        assert main([*base, "-o", output]) == 2, output  # a bad argument: usage error
        out, err = capsys.readouterr()
        line = _one_error_line(err)
        assert line.startswith("-o") and message in line, line
        assert out == ""


def test_tune_report_must_be_a_folder_it_can_write_before_any_trial(
    tmp_path, plain_file, tiny_flux_dir, monkeypatch, capsys
):
    _no_trials(monkeypatch)
    base = ["tune", "--budget", "4GB", "-m", str(tiny_flux_dir)]
    for report, message in [
        (str(plain_file), f"--report {plain_file}: is a file, not a folder"),
        (str(plain_file / "sub"), f"--report {plain_file / 'sub'}: {plain_file} is a file, not a folder"),
        (str(tmp_path / ("r" * 300)), "this file system allows at most 255"),
    ]:
        assert main([*base, "--report", report]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("--report") and message in line, line


def test_an_output_folder_that_is_read_only_is_refused_up_front(tmp_path, monkeypatch, capsys):
    import advisor.files

    # Simulated: this test may run as root, which writes into a chmod 0555 folder anyway.
    monkeypatch.setattr(advisor.files.os, "access", lambda path, mode: False)
    monkeypatch.setattr(advisor.files.os, "statvfs", lambda path: type("vfs", (), {"f_flag": os.ST_RDONLY})())
    assert main(["recommend", "-m", "flux-dev", "--gpu", "H100", "-o", str(tmp_path / "advisor.json")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"-o {tmp_path / 'advisor.json'}: {tmp_path} is on a read-only file system"
    monkeypatch.setattr(advisor.files.os, "statvfs", lambda path: type("vfs", (), {"f_flag": 0})())
    assert main(["recommend", "-m", "flux-dev", "--gpu", "H100", "-o", str(tmp_path / "advisor.json")]) == 2
    assert (
        _one_error_line(capsys.readouterr().err)
        == f"-o {tmp_path / 'advisor.json'}: permission denied: can't create files in {tmp_path}"
    )


def test_a_config_that_fails_to_write_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys):
    import advisor.files

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(advisor.files.os, "replace", denied)  # past the up-front check, which creates a file there
    path = tmp_path / "advisor.json"
    assert main(["recommend", "-m", "flux-dev", "--gpu", "H100", "-o", str(path)]) == 1
    assert _one_error_line(capsys.readouterr().err) == f"-o {path}: could not write the config (permission denied)"


def test_an_unreadable_config_file_names_the_flag_and_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "locked.json"
    path.write_text('{"schema_version": 1}')
    real_open = Path.open

    def open_(self, *args, **kwargs):
        if self.name == "locked.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    assert main(["estimate", "flux-dev", "--gpu", "H100", "--config", str(path)]) == 1
    assert _one_error_line(capsys.readouterr().err) == f"--config {path}: permission denied"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested more than 64 levels deep"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested more than 64 levels deep"),
        (
            '{"schema_version": 1, "offload": {"num_blocks_per_group": ' + "9" * 5000 + "}}",
            "an integer of more than 4300 digits",
        ),
        ('{"schema_version": 1, "device": "banana"}', "'banana'"),
        ('{"schema_version": true}', "schema_version true is not a version number"),
        (None, "is a folder, not a file"),
    ],
    ids=["deep-array", "deep-object", "5000-digits", "banana", "version-true", "folder"],
)
def test_bad_config_files_through_the_cli(tmp_path, capsys, content, message):
    path = tmp_path / "advisor.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    assert main(["estimate", "flux-dev", "--gpu", "H100", "--config", str(path)]) == 1  # ConfigError
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"--config {path}: ") and message in line, line


@pytest.mark.parametrize(
    ("args", "flag", "limit"),
    [
        (["estimate", "flux-dev", "--steps", str(10**30)], "--steps", 10000),
        (["estimate", "wan2.1-t2v-1.3b", "--frames", str(10**30 + 1)], "--frames", 1025),
        (["estimate", "flux-dev", "--height", str(10**30)], "--height", 32768),
        (["recommend", "--gpu", "H100", "--width", str(10**30)], "--width", 32768),
        (["recommend", "--gpu", "H100", "--batch", str(10**30)], "--batch", 256),
        (["recommend", "-m", "wan2.1-t2v-1.3b", "--gpu", "H100", "--frames", "1029"], "--frames", 1025),
        (["recommend", "--gpu", "H100", "--steps", "10001"], "--steps", 10000),
    ],
)
def test_huge_workload_values_name_the_flag_and_the_limit(args, flag, limit, capsys):
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"{flag}: ") and line.endswith(f"use at most {limit}"), line


@pytest.mark.parametrize("flag", ["--height", "--width", "--frames", "--steps", "--batch"])
def test_tune_refuses_huge_workload_values_before_measuring(flag, tiny_wan_dir, monkeypatch, capsys):
    _no_trials(monkeypatch)
    assert main(["tune", "--budget", "4GB", "-m", str(tiny_wan_dir), flag, str(10**30)]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(f"{flag}: ")


def test_the_largest_allowed_workload_still_has_a_finite_estimate(capsys):
    args = "--height 32768 --width 32768 --frames 1025 --steps 10000 --batch 256 --gpu H100 --json".split()
    assert main(["estimate", "hunyuanvideo", *args]) == 0
    estimate = json.loads(capsys.readouterr().out)["estimate"]
    assert 0 < estimate["latency_s"] < float("inf") and estimate["peak_vram_bytes"] > 0


def test_ram_of_nothing_blames_ram_not_budget(capsys):
    for args in (
        ["recommend", "--ram", "0"],
        ["estimate", "flux-dev", "--ram", "0"],
        ["recommend", "--gpu", "H100", "--ram", "0"],
    ):
        assert main(args) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("--ram: ") and "--budget" not in line, line


def test_a_default_budget_of_nothing_says_which_memory_left_nothing(capsys):
    assert main(["recommend", "--vram", "1GB"]) == 2  # 1 GiB minus the 1 GiB + 5% reserve
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("--budget: not given") and "--vram" in line and "give --budget SIZE" in line


@pytest.mark.parametrize("name", ["array", "string rate", "garbage", "truncated"])
def test_commands_keep_working_with_a_bad_calibration_cache(cache_home, name, capsys):
    (cache_home / "calibration.json").write_text(BAD_CALIBRATIONS[name])
    assert main(["estimate", "flux-dev", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["estimate"]["latency_s"] > 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"advisor: warning: {cache_home / 'calibration.json'}: "), err


def test_unexpected_exceptions_are_one_line_and_debug_shows_them(monkeypatch, capsys):
    from advisor.probe import hardware

    def broken():
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(hardware, "probe_machine", broken)
    assert main(["probe"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("unexpected RuntimeError: boom second line") and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["--debug", "probe"])


def test_os_errors_no_check_caught_name_the_file(monkeypatch, capsys):
    from advisor.probe import hardware

    def missing():
        raise FileNotFoundError(2, "No such file or directory", "/sys/gone")

    monkeypatch.setattr(hardware, "probe_machine", missing)
    assert main(["probe"]) == 1
    assert _one_error_line(capsys.readouterr().err) == "/sys/gone: no such file or folder"


# --- estimate: fit, constraints, the config's workload, assumptions ----------------------------------


def _config_file(tmp_path, name: str = "config.json", **sections) -> str:
    from advisor.config import OptimizationConfig

    path = tmp_path / name
    OptimizationConfig(**sections).save(path)
    return str(path)


def test_estimate_says_whether_the_peak_fits_the_card(tmp_path, capsys):
    """FLUX.1-dev in plain bf16 is 31 GB of weights: it can't fit a 24 GB card, and estimate must
    say so; the config recommend picks for that card must be judged to fit it, against the same budget."""
    assert main(["estimate", "flux-dev", "--gpu", "RTX 4090", "--ram", "64GB", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    card = plain["hardware"]["vram_total_bytes"]
    assert plain["fits"] is False and plain["estimate"]["peak_vram_bytes"] > card
    # recommend's default budget: the free memory less 1 GiB + 5% of the card (advisor.plan.scenario.default_budget)
    assert plain["budget_bytes"] == int(card - 2**30 - 0.05 * card)
    assert "VRAM" in plain["why_not"]

    assert main(["estimate", "flux-dev", "--gpu", "RTX 4090", "--ram", "64GB"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "fits RTX 4090: NO, peak VRAM" in text and "budget" in text

    picked = tmp_path / "picked.json"
    assert (
        main(["recommend", "-m", "flux-dev", "--gpu", "RTX 4090", "--ram", "64GB", "--json", "-o", str(picked)]) == 0
    )
    recommended = json.loads(capsys.readouterr().out)
    assert main(["estimate", "flux-dev", "--gpu", "RTX 4090", "--ram", "64GB", "--config", str(picked), "--json"]) == 0
    judged = json.loads(capsys.readouterr().out)
    assert judged["fits"] is True and judged["why_not"] is None
    assert judged["budget_bytes"] == recommended["budget_bytes"]
    assert main(["estimate", "flux-dev", "--gpu", "RTX 4090", "--ram", "64GB", "--config", str(picked)]) == 0
    assert "fits RTX 4090: yes" in capsys.readouterr().out


def test_estimate_says_when_the_host_ram_is_what_does_not_fit(tmp_path, capsys):
    # Model offload keeps the 31 GB of bf16 weights in host RAM between uses: 8 GB can't hold them,
    # whatever the card.
    from advisor.config import Offload

    model_offload = _config_file(tmp_path, offload=Offload(strategy="model"))
    assert main(["estimate", "flux-dev", "--gpu", "H100", "--ram", "8GB", "--config", model_offload, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and "host RAM" in data["why_not"]
    # Nothing offloaded: it loads straight onto the card, and needs little RAM of its own.
    assert main(["estimate", "flux-dev", "--gpu", "H100", "--ram", "8GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


@pytest.mark.parametrize(("gpu", "capability"), [("RTX 3060", "8.6"), ("T4", "7.5")])
def test_estimate_warns_about_what_the_target_cannot_run(gpu, capability, tmp_path, capsys):
    """fp8 matmuls need compute capability 8.9 and FlashAttention-3 a Hopper: a config asking for
    either on a card without it gets one warning line per problem, naming the key and why."""
    from advisor.config import Quantization

    fp8 = Quantization(backend="torchao", scheme="float8_dynamic", components=["transformer"])
    path = _config_file(tmp_path, quantization=fp8, attention_backend="_flash_3")
    assert main(["estimate", "flux-dev", "--gpu", gpu, "--config", path]) == 0
    captured = capsys.readouterr()
    warned = captured.err.strip().splitlines()
    assert len(warned) == 2 and all(line.startswith(f"advisor: warning: --config {path}: ") for line in warned), warned
    fp8_line = next(line for line in warned if "quantization.scheme" in line)
    assert "float8_dynamic" in fp8_line and "8.9" in fp8_line and capability in fp8_line
    assert any("attention_backend" in line and "9.0" in line for line in warned)
    assert "predicted latency" in captured.out  # still estimated: a warning, not a refusal

    assert (
        main(
            ["estimate", "flux-dev", "--gpu", "H100", "--config", _config_file(tmp_path, "fp8.json", quantization=fp8)]
        )
        == 0
    )
    assert capsys.readouterr().err == ""  # a Hopper runs fp8 matmuls


def test_estimate_uses_the_workload_the_config_records(tmp_path, capsys):
    """A config recommend made for 1280x720 is estimated at 1280x720 (not the model's 832x480), said
    in one line; a flag still wins for its own value; a config for another pipeline records nothing usable."""
    made = tmp_path / "wan.json"
    assert (
        main(
            [
                "recommend",
                "-m",
                "wan2.1-t2v-1.3b",
                "--gpu",
                "RTX 4090",
                "--ram",
                "64GB",
                "--no-compile",
                "--width",
                "1280",
                "--height",
                "720",
                "--frames",
                "33",
                "--steps",
                "20",
                "-o",
                str(made),
            ]
        )
        == 0
    )
    capsys.readouterr()
    estimate = ["estimate", "wan2.1-t2v-1.3b", "--gpu", "RTX 4090", "--ram", "64GB", "--config", str(made)]
    assert main([*estimate, "--json"]) == 0
    job = json.loads(capsys.readouterr().out)["workload"]
    assert (job["width"], job["height"], job["frames"], job["steps"]) == (1280, 720, 33, 20)

    assert main(estimate) == 0
    out = capsys.readouterr().out
    assert out.count("workload from --config") == 1  # one line (wrapped where the path is long)
    assert f"workload from --config {made}: video 1280x720, 33 frames, 20 steps" in " ".join(out.split())
    assert "assumed steps" not in out and "assumed size" not in out  # they came from the config

    assert main([*estimate, "--steps", "8", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)["workload"]
    assert (job["width"], job["height"], job["frames"], job["steps"]) == (1280, 720, 33, 8)

    assert main(["estimate", "flux-dev", "--gpu", "RTX 4090", "--config", str(made), "--json"]) == 0
    captured = capsys.readouterr()
    assert (
        json.loads(captured.out)["workload"]["height"] == 1024
    )  # FLUX.1-dev's own default, after the other-pipeline warning
    assert "made for a WanPipeline" in captured.err


def test_a_recorded_workload_that_does_not_suit_the_model_names_the_config(tmp_path, capsys):
    from advisor.config import Provenance

    path = _config_file(
        tmp_path, provenance=Provenance(pipeline_class="FluxPipeline", workload={"kind": "image", "height": 1001})
    )
    assert main(["estimate", "flux-dev", "--gpu", "H100", "--config", path]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"advisor: error: --config {path}: ") and "1001" in err[0], err
    assert (
        main(["estimate", "flux-dev", "--gpu", "H100", "--config", path, "--height", "1024", "--json"]) == 0
    )  # the flag wins


def test_estimate_prints_what_it_assumed(capsys):
    assert main(["estimate", "flux-dev", "--gpu", "H100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assumed = [line for line in lines if line.startswith("assumed ")]
    assert any(line.startswith("assumed host RAM: ") and "pass --ram" in line for line in assumed), lines
    assert any(line.startswith("assumed steps: 28") for line in assumed) and any(
        line.startswith("assumed size: 1024x1024") for line in assumed
    )
    assert (
        main("estimate flux-dev --gpu H100 --ram 64GB --os linux --steps 28 --width 1024 --height 1024".split()) == 0
    )
    assert "assumed" not in capsys.readouterr().out  # everything given: nothing assumed


# --- usage errors: the model, --workload, numbers, commands ---------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["recommend", "-m", ""],
        ["recommend", "--model", " "],
        ["recommend", ""],
        ["estimate", "", "--gpu", "H100"],
        ["inspect", "--model", ""],
    ],
)
def test_an_empty_model_is_a_usage_error(args, capsys):
    """`-m ""` is a slip (an unset shell variable), not a request for recommend's default model."""
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("advisor: error: ") and "--model" in err[0] and "empty" in err[0], err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["recommend", "-m", "flux-dev", "--gpu", "H100", "--workload", "video"], "image"),
        (["estimate", "flux-dev", "--gpu", "H100", "--workload", "video"], "image"),
        (["inspect", "flux-dev", "--workload", "video"], "image"),
        (["inspect", "flux-dev", "--workload", "audio"], "image"),
        (["recommend", "-m", "wan2.1-t2v-1.3b", "--gpu", "H100", "--workload", "image"], "video"),
    ],
)
def test_a_workload_that_contradicts_a_known_pipeline_is_refused(args, kind, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("advisor: error: --workload: ") and f"{kind} pipeline" in err[0], err
    assert captured.out == ""


def test_workload_still_sets_the_kind_of_a_pipeline_the_advisor_does_not_know(tiny_flux_dir, tmp_path, capsys):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_flux_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyCustomPipeline"}))
    assert main(["inspect", str(folder), "--workload", "Video", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"] == "video"


def test_workload_is_read_in_any_case_and_planning_commands_list_what_they_plan(capsys):
    assert main(["recommend", "-m", "wan2.1-t2v-1.3b", "--gpu", "H100", "--workload", "Video", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"]["kind"] == "video"
    for command in (["recommend", "--gpu", "H100"], ["estimate", "flux-dev", "--gpu", "H100"]):
        assert main([*command, "--workload", "movie"]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err == "advisor: error: --workload: 'movie' is not a workload; use one of image, video"
        )  # audio is not planned
    assert main(["inspect", "flux-dev", "--workload", "movie"]) == 2
    assert capsys.readouterr().err.strip().endswith("use one of image, video, audio")  # inspect can be told audio


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recommend", "--gpu", "H100", "--steps", "2.5"], "--steps: '2.5' is not a whole number; give e.g. 28"),
        (
            ["recommend", "--gpu", "H100", "--height", "1024.0"],
            "--height: '1024.0' is not a whole number; give e.g. 1024",
        ),
        (["estimate", "flux-dev", "--batch", "two"], "--batch: 'two' is not a whole number"),
        (["tune", "-m", "flux-dev", "--budget", "12GB", "--trials", "2.5"], "--trials: '2.5' is not a whole number"),
        (
            ["tune", "-m", "flux-dev", "--budget", "12GB", "--tolerance", "tight"],
            "--tolerance: 'tight' is not a number",
        ),
    ],
)
def test_numbers_that_do_not_parse_are_one_line_naming_the_flag(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"advisor: error: {message}"), err


def test_an_unknown_command_with_no_near_one_lists_the_commands(capsys):
    assert main(["bogus"]) == 2
    assert capsys.readouterr().err.strip() == (
        "advisor: error: no such command: 'bogus'; the commands are probe, inspect, estimate, recommend, check, tune"
    )


def test_an_unknown_model_lists_the_aliases_people_type(capsys):
    assert main(["inspect", "nobody/nothing"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for alias in ("flux-dev", "sd3", "wan2.1-t2v-14b", "sdxl", "qwen-image"):
        assert f" {alias}," in err[0] or f" {alias} (" in err[0], err[0]  # the aliases; hub ids: docs/models.md
    # brief: an alias per model (about 20 characters each), never the hub ids
    brief = 250 + 20 * len(catalog_names())
    assert "black-forest-labs" not in err[0] and "docs/models.md" in err[0] and len(err[0]) < brief
    assert main(["recommend", "-m", "flux-deev"]) == 1
    assert "did you mean 'flux-dev'?" in capsys.readouterr().err


def test_a_local_folder_is_recorded_absolute(tiny_flux_dir, tmp_path, monkeypatch, capsys):
    """A config made for ./tiny-flux must load from any folder: `load_pipeline(config.provenance.model,
    config)` and the emitted script's from_pretrained name the folder absolute, and the output says so."""
    monkeypatch.chdir(tiny_flux_dir.parent)
    relative = f"./{tiny_flux_dir.name}"
    written = tmp_path / "config.json"
    assert main(["recommend", "-m", relative, "-o", str(written)]) == 0
    assert f"the local folder {relative}, recorded as {tiny_flux_dir.resolve()}" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    recorded = json.loads(written.read_text())["provenance"]["model"]
    assert recorded == str(tiny_flux_dir.resolve()) and (Path(recorded) / "model_index.json").is_file()


# Where each command's options are documented.
DOCUMENTED_IN = {
    "tune": "docs/tune.md",
    "recommend": "docs/cli.md",
    "estimate": "docs/cli.md",
    "probe": "docs/cli.md",
    "check": "docs/cli.md",
}


@pytest.mark.parametrize("command", sorted(DOCUMENTED_IN))
def test_every_option_of_a_command_is_documented(command):
    """The docs can't drift from the parser: each long option a command takes is in its page (tune's
    synopsis once missed --quality, --min-psnr and --quiet)."""
    from advisor.arguments import build_parser, long_options
    from advisor.cli import COMMANDS

    page = (Path(__file__).resolve().parent.parent / DOCUMENTED_IN[command]).read_text()
    options = set(long_options(build_parser(COMMANDS), command)) - {"--help", "--debug"}
    assert sorted(o for o in options if o not in page) == []


def test_estimate_judges_a_config_against_what_it_was_planned_for(tmp_path, capsys):
    """A config records the budget, host RAM, system and generations it was planned for (schema 2);
    `estimate --config` on the same card judges it against that budget and RAM, --budget and --ram win,
    and another card gets its own default budget."""
    GB = 2**30  # sizes are binary: 32GB is 32 GiB
    picked = tmp_path / "planned.json"
    assert (
        main(["recommend", "flux-dev", "--gpu", "RTX 4090", "--ram", "32GB", "--budget", "14GB", "-o", str(picked)])
        == 0
    )
    capsys.readouterr()
    provenance = json.loads(picked.read_text())["provenance"]
    assert provenance["ram_bytes"] == 32 * GB and provenance["os"] == "linux" and provenance["generations"] == 10

    def judged(*flags):
        assert main(["estimate", "flux-dev", "--config", str(picked), "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    same = judged("--gpu", "RTX 4090")
    assert same["budget_bytes"] == 14 * GB and "planned for" in same["budget_source"]
    assert same["hardware"]["ram_total_bytes"] == 32 * GB
    given = judged("--gpu", "RTX 4090", "--budget", "12GB", "--ram", "64GB")
    assert given["budget_bytes"] == 12 * GB and given["budget_source"] == "--budget"
    assert given["hardware"]["ram_total_bytes"] == 64 * GB
    other = judged("--gpu", "H100")
    assert other["budget_source"] == "default" and other["budget_bytes"] > 70 * GB
