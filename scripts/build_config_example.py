"""Write docs/config.md's example from what `advisor recommend ... -o` writes today, so it can't drift.

python scripts/build_config_example.py

The installed versions and the time it was written vary by machine: they are shown as placeholders
(`tests/test_readme.py` compares the rest with a fresh run).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "config.md"
COMMAND = ["recommend", "-m", "flux-dev", "--vram", "24GB", "--ram", "64GB", "--budget", "13GB", "--generations", "10"]
START = "<!-- example: scripts/build_config_example.py -->\n"
END = "<!-- end of the example -->\n"


def written_example() -> dict:
    """The config the example's command writes, the machine-dependent values as placeholders."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from advisor.cli import main

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "advisor.json"
        if main([*COMMAND, "-o", str(path)]) != 0:
            raise SystemExit(f"advisor {' '.join(COMMAND)} failed")
        data = json.loads(path.read_text())
    data["provenance"]["packages"] = {"advisor": "...", "torch": "...", "diffusers": "...", "...": "..."}
    data["provenance"]["created"] = "..."
    return data


def block(data: dict) -> str:
    return (
        f"{START}`advisor {' '.join(COMMAND)} -o advisor.json` writes:\n\n```json\n"
        f"{json.dumps(data, indent=2)}\n```\n{END}"
    )


def main() -> None:
    text = PAGE.read_text()
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    PAGE.write_text(before + block(written_example()) + after)
    print(f"wrote the example of {PAGE}")


if __name__ == "__main__":
    main()
