"""Config files outlive the schema: every file written so far keeps loading, and the schema cannot change
without a new version and its migration (`advisor.migrations`).

- ``tests/golden/written/v<N>/``: files the advisor wrote at schema version N (``recommend -o`` for the
  golden scenarios and a few more, ``tune -o`` on a tiny pipeline, ``config.save`` of every section).
  They are never re-recorded: a new version adds its own folder beside them.
- ``tests/golden/config_schema.json``: the schema of every version (pydantic's JSON schema of the
  config, less the descriptions and titles that docstrings and names make). The current version's must
  be the schema of today's code; record a new version with ``ADVISOR_RECORD_GOLDEN=1``.

A new version that only adds keys (a new lever's section) still gets its step (`migrations.unchanged`);
`tests/test_levers.py` adds one with its made-up lever and loads these files through it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from advisor.config import SCHEMA_VERSION, OptimizationConfig, config_from_dict, load_config
from advisor.errors import ConfigError
from advisor.migrations import FIRST_VERSION, MIGRATIONS, Migration, upgrade


GOLDEN = Path(__file__).resolve().parent / "golden"
WRITTEN = sorted((GOLDEN / "written").glob("v*/*.json"))
SCHEMA_FILE = GOLDEN / "config_schema.json"
RECORD = os.environ.get("ADVISOR_RECORD_GOLDEN") == "1"


def schema_of_today() -> dict:
    """The config's JSON schema without the words that change with docstrings and field names' casing."""
    from pydantic import TypeAdapter

    def bare(node):
        if isinstance(node, dict):
            return {k: bare(v) for k, v in node.items() if k not in ("description", "title")}
        if isinstance(node, list):
            return [bare(v) for v in node]
        return node

    return bare(TypeAdapter(OptimizationConfig).json_schema())


def recorded_schemas() -> dict[str, dict]:
    recorded = json.loads(SCHEMA_FILE.read_text()) if SCHEMA_FILE.exists() else {}
    if RECORD and str(SCHEMA_VERSION) not in recorded:
        recorded[str(SCHEMA_VERSION)] = schema_of_today()
        SCHEMA_FILE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    return recorded


def test_the_schema_changes_only_with_a_new_version():
    recorded = recorded_schemas()
    assert str(SCHEMA_VERSION) in recorded, (
        f"schema version {SCHEMA_VERSION} is not recorded (ADVISOR_RECORD_GOLDEN=1)"
    )
    assert schema_of_today() == recorded[str(SCHEMA_VERSION)], (
        f"the config schema is no longer version {SCHEMA_VERSION}'s: a file written now could fail to load in an "
        f"advisor that reads {SCHEMA_VERSION}. Make it version {SCHEMA_VERSION + 1} (advisor.config.SCHEMA_VERSION), "
        f"add MIGRATIONS[{SCHEMA_VERSION}] (advisor/migrations.py) and record it (ADVISOR_RECORD_GOLDEN=1)"
    )


def test_every_version_has_its_record_and_its_step_from_the_one_before():
    assert sorted(int(version) for version in recorded_schemas()) == list(range(FIRST_VERSION, SCHEMA_VERSION + 1))
    assert sorted(MIGRATIONS) == list(range(FIRST_VERSION, SCHEMA_VERSION))
    written = {path.parent.name for path in WRITTEN}
    assert f"v{FIRST_VERSION}" in written and written <= {f"v{n}" for n in range(FIRST_VERSION, SCHEMA_VERSION + 1)}


def held_in(data, loaded, where="") -> list[str]:
    """Where `loaded` (a config as today's code writes it) lost or changed a value of `data`; it may add
    keys (a later version's defaults)."""
    if isinstance(data, dict) and isinstance(loaded, dict):
        return [
            problem for key, value in data.items() for problem in held_in(value, loaded.get(key), f"{where}.{key}")
        ]
    return [] if data == loaded else [f"{where}: {data!r} -> {loaded!r}"]


@pytest.mark.parametrize("path", WRITTEN, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_file_written_so_far_loads_with_nothing_lost(path):
    data = json.loads(path.read_text())
    config = load_config(path)
    assert config.schema_version == SCHEMA_VERSION
    assert held_in(upgrade(data, to=SCHEMA_VERSION), config.to_dict()) == []
    assert config_from_dict(config.to_dict()) == config  # and it writes back what it reads
    assert config.provenance.made_by in ("recommend", "tune", "user")


def test_upgrade_runs_every_step_in_order():
    # The steps of a made-up history, laid over the real table for this test only.
    steps = {
        1: Migration("offload.streams renamed offload.use_stream", lambda d: {**d, "log": [*d.get("log", []), 1]}),
        2: Migration("a section added", lambda d: {**d, "log": [*d["log"], 2]}),
    }
    saved = dict(MIGRATIONS)
    MIGRATIONS.clear()
    MIGRATIONS.update(steps)
    try:
        assert upgrade({"schema_version": 1, "dtype": "float16"}, to=3) == {
            "schema_version": 3,
            "dtype": "float16",
            "log": [1, 2],
        }
        assert upgrade({"schema_version": 2, "log": []}, to=3) == {"schema_version": 3, "log": [2]}
        assert upgrade({"schema_version": 3}, to=3) == {"schema_version": 3}
    finally:
        MIGRATIONS.clear()
        MIGRATIONS.update(saved)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (SCHEMA_VERSION + 1, f"schema_version {SCHEMA_VERSION + 1} is newer than this advisor understands"),
        (FIRST_VERSION - 1, f"schema_version {FIRST_VERSION - 1} is not supported (the first is {FIRST_VERSION})"),
    ],
)
def test_a_version_outside_the_known_ones_is_refused_by_name(version, message):
    with pytest.raises(ConfigError, match="^" + re.escape(f"advisor.json: {message}")):
        config_from_dict({"schema_version": version}, source="advisor.json")
