"""The README's commands and code are what users copy: they must work as written."""

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_use_it_in_code_snippet_runs_verbatim(tiny_flux_dir, tmp_path):
    snippet = re.search(r"## Use it in code\s+```python\n(.*?)```", README, re.S).group(1)
    advisor_cli = Path(sys.executable).with_name("advisor")
    made = subprocess.run(
        # Planned for this machine: its GPU, or CPU inference where it has none.
        [str(advisor_cli), "recommend", "-m", str(tiny_flux_dir), "--no-compile", "-o", "advisor.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert made.returncode == 0, made.stderr[-500:]
    script = snippet + "\nprint(type(image).__name__, image.size)\n"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("Image (")


def test_setup_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"# the test suite\n(.+)\n", README).group(1).strip()
    assert test_command in ci


def test_the_config_example_is_what_recommend_writes():
    """docs/config.md's example is a fresh run's output (scripts/build_config_example.py), the
    machine-dependent values aside: it once showed nf4 and model offload long after the advisor
    stopped writing them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_config_example", ROOT / "scripts" / "build_config_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.block(module.written_example()) in module.PAGE.read_text(), (
        "run python scripts/build_config_example.py"
    )
