"""The planner's output for fixed scenarios is pinned: `--json` (tests/golden/cli_json.json), and the
text and `--emit python` script people read (tests/golden/cli_text.json).

Recorded by `scripts/record_golden.py` before code moves; a difference here is either a bug of the
move or a deliberate change, re-recorded and explained in its commit.
"""

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("record_golden", ROOT / "scripts" / "record_golden.py")
record_golden = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record_golden)

GOLDEN = json.loads(record_golden.GOLDEN.read_text())
GOLDEN_TEXT = json.loads(record_golden.GOLDEN_TEXT.read_text())


def test_golden_file_covers_the_scenarios():
    assert sorted(GOLDEN) == sorted(record_golden.scenarios())
    kinds = {GOLDEN[name]["output"].get("workload", {}).get("kind") for name in GOLDEN}
    assert kinds == {"image", "video"}
    assert len(GOLDEN) >= 15


@pytest.mark.parametrize("name", sorted(record_golden.scenarios()))
def test_cli_json_matches_the_golden_file(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, data = record_golden.run_cli(record_golden.scenarios()[name])
    assert code == GOLDEN[name]["exit"]
    assert record_golden.normalise(data) == GOLDEN[name]["output"]


def test_golden_text_covers_the_scenarios():
    assert sorted(GOLDEN_TEXT) == sorted(record_golden.text_scenarios())
    assert {name.split("/")[0] for name in GOLDEN_TEXT} == {"recommend-text", "estimate-text", "emit"}


@pytest.mark.parametrize("name", sorted(record_golden.text_scenarios()))
def test_cli_text_matches_the_golden_file(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", record_golden.COLUMNS)
    code, text = record_golden.run_cli(record_golden.text_scenarios()[name], as_json=False)
    assert code == GOLDEN_TEXT[name]["exit"]
    assert record_golden.normalise_text(text) == GOLDEN_TEXT[name]["output"]
