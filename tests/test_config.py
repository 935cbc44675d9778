"""The config schema: strict loading, versions, atomic writes, and the documented example."""

import json
import re
from pathlib import Path

import pytest

from advisor.config import (
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
        ({"schema_version": 1, "offload": {"strategy": "group", "record_stream": True}}, "`offload.record_stream` needs `offload.use_stream: true`"),
        ({"schema_version": 1, "offload": {"strategy": "model", "use_stream": True}}, "applies to `strategy: group` only"),
        ({"schema_version": 1, "offload": {"strategy": "none", "components": ["vae"]}}, "`offload.components` applies to `strategy: group` only"),
        ({"schema_version": 1, "offload": {"num_blocks_per_group": 0}}, "num_blocks_per_group"),
        ({"schema_version": 1, "offload": {"num_blocks_per_group": "2"}}, "valid integer"),
        ({"schema_version": 1, "device": "cpu", "offload": {"strategy": "model"}}, "needs `device: cuda`"),
        ({"schema_version": 1, "quantization": {"backend": "torchao", "components": ["t"], "quant_type": "nf4"}}, "is for bitsandbytes_4bit"),
        ({"schema_version": 1, "quantization": {"backend": "bitsandbytes_4bit", "components": ["t"], "scheme": "int8_weight_only"}}, "is for torchao"),
        ({"schema_version": 1, "quantization": {"backend": "gguf", "components": ["t"]}}, "quantization.backend"),
        ({"schema_version": 1, "quantization": {"backend": "torchao", "components": []}}, "quantization.components"),
        (
            {"schema_version": 1, "quantization": {"backend": "torchao", "components": ["transformer"]}, "layerwise_casting": {"components": ["transformer"]}},
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
    assert config.offload.strategy == "model" and config.quantization.backend == "bitsandbytes_4bit"
