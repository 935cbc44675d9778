"""The planner's `--json` output for fixed scenarios is pinned (tests/golden/cli_json.json).

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
