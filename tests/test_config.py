"""The config schema: strict loading, versions, atomic writes, and the documented example."""

import json
import os
import re
from pathlib import Path

import pytest

from advisor.config import (
    SCHEMA_VERSION,
    Compile,
    LayerwiseCasting,
    Offload,
    OptimizationConfig,
    Quantization,
    config_from_dict,
    load_config,
)
from advisor.errors import ConfigError


def test_round_trip(tmp_path):
    config = OptimizationConfig(
        quantization=Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"]),
        compile=Compile(dynamo_config={"capture_dynamic_output_shape_ops": True}),
        offload=Offload(strategy="model"),
    )
    path = config.save(tmp_path / "sub" / "advisor.json")
    assert load_config(path) == config
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"schema_version": 1, "dtype": "bf16"}, "dtype: Input should be 'bfloat16', 'float16' or 'float32'"),
        ({"schema_version": 1, "turbo": True}, "unknown key 'turbo'"),
        ({"schema_version": 1, "offload": {"use_streams": True}}, "unknown key 'offload.use_streams'"),
        (
            {"schema_version": 1, "offload": {"strategy": "group", "record_stream": True}},
            "`offload.record_stream` needs `offload.use_stream: true`",
        ),
        (
            {"schema_version": 1, "offload": {"strategy": "model", "use_stream": True}},
            "applies to `strategy: group` only",
        ),
        (
            {"schema_version": 1, "offload": {"strategy": "none", "components": ["vae"]}},
            "`offload.components` applies to `strategy: group` only",
        ),
        ({"schema_version": 1, "offload": {"num_blocks_per_group": 0}}, "num_blocks_per_group"),
        ({"schema_version": 1, "offload": {"num_blocks_per_group": "2"}}, "valid integer"),
        ({"schema_version": 1, "device": "cpu", "offload": {"strategy": "model"}}, "needs `device: cuda`"),
        (
            {"schema_version": 1, "quantization": {"backend": "torchao", "components": ["t"], "quant_type": "nf4"}},
            "is for bitsandbytes_4bit",
        ),
        (
            {
                "schema_version": 1,
                "quantization": {"backend": "bitsandbytes_4bit", "components": ["t"], "scheme": "int8_weight_only"},
            },
            "is for torchao",
        ),
        ({"schema_version": 1, "quantization": {"backend": "gguf", "components": ["t"]}}, "quantization.backend"),
        ({"schema_version": 1, "quantization": {"backend": "torchao", "components": []}}, "quantization.components"),
        (
            {
                "schema_version": 1,
                "quantization": {"backend": "torchao", "components": ["transformer"]},
                "layerwise_casting": {"components": ["transformer"]},
            },
            "both quantized and layerwise-cast",
        ),
        ({"dtype": "bfloat16"}, "missing 'schema_version'"),
        ({"schema_version": 99}, "newer than this advisor understands; upgrade advisor"),
        ({"schema_version": 0}, "schema_version 0 is not supported"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(data, source="advisor.json")
    text = str(excinfo.value)
    assert text.startswith("advisor.json: ") and message in text and "\n" not in text


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_summary_lines():
    assert OptimizationConfig().summary() == "bf16, no offload"
    config = OptimizationConfig(
        layerwise_casting=LayerwiseCasting(components=["transformer"]),
        compile=Compile(regional=False),
        offload=Offload(strategy="group", use_stream=True),
    )
    assert config.summary() == "bf16, fp8 storage(transformer), compiled, group offload (block x1, stream)"


def test_documented_example_is_a_valid_config():
    page = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    example = re.search(r"```json\n(.*?)```", page, re.S).group(1)
    config = config_from_dict(json.loads(example), source="docs/config.md")
    # what it holds is a fresh run's (tests/test_readme.py); here: it loads, at today's version
    assert config.schema_version == SCHEMA_VERSION and config.provenance.made_by == "recommend"


def test_device_and_schema_version_are_checked_for_what_they_are():
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict({"schema_version": 1, "device": "banana"}, source="advisor.json")
    text = str(excinfo.value)
    assert text.startswith("advisor.json: ") and "'banana'" in text
    assert all(valid in text for valid in ("cpu", "cuda", "cuda:N"))  # what would be valid
    for device in ("cpu", "cuda", "cuda:0", "cuda:3"):
        assert config_from_dict({"schema_version": 1, "device": device}).device == device
    # JSON true is not the version number 1, though Python's True == 1
    with pytest.raises(
        ConfigError,
        match=rf"advisor.json: schema_version true is not a version number; this advisor writes {SCHEMA_VERSION}",
    ):
        config_from_dict({"schema_version": True}, source="advisor.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested more than 64 levels deep"),  # RecursionError in json before
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested more than 64 levels deep"),
        (
            '{"schema_version": 1, "offload": {"num_blocks_per_group": ' + "9" * 5000 + "}}",
            "an integer of more than 4300 digits",
        ),
        ("[" * 100 + "]" * 100, "nested more than 64 levels deep"),  # parses, but nothing would survive printing it
        (b"\xff\xfe{}".decode("latin-1"), "not UTF-8"),
    ],
)
def test_absurd_config_files_are_one_config_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "advisor.json"
    path.write_text(text, encoding="latin-1" if "\xff" in text else "utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, flag="--config")
    assert str(excinfo.value).startswith(f"--config {path}: ") and message in str(excinfo.value)


def test_config_paths_that_are_not_files(tmp_path):
    (tmp_path / "plain").write_text("{}")
    cases = {
        tmp_path: "is a folder, not a file",
        tmp_path / "plain" / "advisor.json": f"{tmp_path / 'plain'} is a file, not a folder",
        tmp_path / ("a" * 300 + ".json"): "file name too long",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError) as excinfo:
            load_config(path, flag="--config")
        assert str(excinfo.value).startswith(f"--config {path}: {message}"), excinfo.value


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_configs_get_the_mode_a_plain_write_would(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        path = OptimizationConfig().save(tmp_path / "advisor.json")
    finally:
        os.umask(old)
    assert _mode(path) == expected  # 0o666 & ~umask, not mkstemp's 0600


def test_saving_over_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "advisor.json"
    path.write_text("old")
    path.chmod(0o640)
    OptimizationConfig().save(path)
    assert _mode(path) == 0o640 and load_config(path) == OptimizationConfig()


def test_saving_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "configs").mkdir()
    target = tmp_path / "configs" / "real.json"
    target.write_text("old")
    link = tmp_path / "advisor.json"
    link.symlink_to(target)
    OptimizationConfig(dtype="float16").save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert load_config(target).dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["advisor.json", "configs"]  # nothing else left
    dangling = tmp_path / "new.json"
    dangling.symlink_to(tmp_path / "configs" / "made.json")
    OptimizationConfig().save(dangling)
    assert dangling.is_symlink() and load_config(tmp_path / "configs" / "made.json") == OptimizationConfig()


def test_saving_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import advisor.files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(advisor.files.os, "fsync", fsync)
    monkeypatch.setattr(advisor.files.os, "replace", replace)
    OptimizationConfig().save(tmp_path / "advisor.json")
    assert events == [("fsync", "file"), ("replace", "advisor.json"), ("fsync", "folder")]


def test_a_failed_save_leaves_no_temporary_file_and_raises_the_os_error(tmp_path, monkeypatch):
    import advisor.files

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(advisor.files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        OptimizationConfig().save(tmp_path / "advisor.json")
    assert list(tmp_path.iterdir()) == []
