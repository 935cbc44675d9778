"""A new lever is one module, its config field and one entry: everything else sees it.

The made-up lever (`tests/made_up_lever.py`) is installed in a copy of the package the way a real one
would be added (the module, a field in `advisor/config/__init__.py` and the schema version that field makes,
the step from the version before in `advisor/migrations.py`, a line in `advisor/levers/__init__.py`),
and followed through `advisor recommend` (it is proposed and explained), `advisor estimate` (its
term changes the prediction), `--emit python` (its line is in the script) and `apply_config` on a
tiny pipeline (its step runs); the config files today's advisor wrote still load. Nothing else in
the package is edited.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_migrations import WRITTEN

from advisor.config import SCHEMA_VERSION, load_config
from advisor.errors import ConfigError


ROOT = Path(__file__).resolve().parent.parent
MADE_UP_VERSION = SCHEMA_VERSION + 1  # the schema version the made-up lever's config field makes
FLUX_4090 = ["--gpu", "RTX 4090", "--ram", "64GB"]


def _edit(path: Path, anchor: str, added: str, *, replacing: bool = False) -> None:
    text = path.read_text()
    assert text.count(anchor) == 1, f"{path.name}: {anchor!r} is not where a lever's entry goes"
    path.write_text(text.replace(anchor, added if replacing else anchor + added))


@pytest.fixture(scope="module")
def with_made_up_lever(tmp_path_factory):
    """An environment whose `advisor` is a copy of the package with the made-up lever added."""
    root = tmp_path_factory.mktemp("package")
    package = root / "advisor"
    shutil.copytree(ROOT / "advisor", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "made_up_lever.py", package / "levers" / "made_up.py")
    _edit(package / "config" / "__init__.py", "    cache: Cache | None = None\n", "    made_up: float | None = None\n")
    # A new key is a new schema version; a file without it is valid as it is.
    _edit(
        package / "config" / "__init__.py",
        f"SCHEMA_VERSION = {SCHEMA_VERSION}\n",
        f"SCHEMA_VERSION = {MADE_UP_VERSION}\n",
        replacing=True,
    )
    _edit(
        package / "migrations.py",
        "MIGRATIONS: dict[int, Migration] = {",
        f'\n    {SCHEMA_VERSION}: Migration("made_up: the made-up lever\'s setting", unchanged),\n',
    )
    _edit(
        package / "levers" / "__init__.py",
        "register(StepCache())\n",
        "from advisor.levers.made_up import MadeUp  # noqa: E402\n\nregister(MadeUp())\n",
    )
    # Run from the copy's folder: `python -m` puts the working directory first on sys.path.
    return {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PWD": str(root)}


def python(env: dict, *args: str) -> subprocess.CompletedProcess:
    """Python with the copy's package, which must succeed."""
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=env["PWD"], timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def advisor(env: dict, *args: str) -> subprocess.CompletedProcess:
    return python(env, "-m", "advisor", *args)


def test_recommend_proposes_and_explains_the_new_lever(with_made_up_lever):
    result = json.loads(advisor(with_made_up_lever, "recommend", "-m", "flux-dev", *FLUX_4090, "--json").stdout)
    assert result["config"]["made_up"] == 0.5  # halving the denoiser's work is the fastest choice
    assert any(reason.startswith("made-up lever: predicted") for reason in result["reasons"])


def test_the_estimate_counts_its_term(with_made_up_lever, tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"schema_version": MADE_UP_VERSION, "device": "cuda"}))
    halved = tmp_path / "halved.json"
    halved.write_text(json.dumps({"schema_version": MADE_UP_VERSION, "device": "cuda", "made_up": 0.5}))
    estimates = [
        json.loads(
            advisor(with_made_up_lever, "estimate", "flux-dev", *FLUX_4090, "--config", str(f), "--json").stdout
        )
        for f in (plain, halved)
    ]
    before, after = (e["estimate"]["latency_breakdown"] for e in estimates)
    assert after["step_compute_s"] == pytest.approx(before["step_compute_s"] / 2)  # the denoiser's compute, halved
    assert after["text_encoding_s"] == before["text_encoding_s"] and after["vae_decode_s"] == before["vae_decode_s"]


def test_the_script_and_apply_config_run_its_step(with_made_up_lever, tiny_flux_dir, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"schema_version": MADE_UP_VERSION, "device": "cpu", "dtype": "float32", "made_up": 0.5})
    )
    recommended = advisor(with_made_up_lever, "recommend", "-m", "flux-dev", *FLUX_4090, "--emit", "python").stdout
    assert "pipe.set_progress_bar_config(disable=True)" in recommended

    applied = (
        "import advisor, json\n"
        "from diffusers import DiffusionPipeline\n"
        f"config = advisor.load_config({str(config)!r})\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tiny_flux_dir)!r}, **advisor.pipeline_kwargs(config))\n"
        "advisor.apply_config(pipe, config)\n"
        "print(json.dumps(pipe._progress_bar_config))\n"
    )
    run = python(with_made_up_lever, "-c", applied)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"disable": True}


def test_files_written_before_the_lever_still_load_and_its_files_ask_older_advisors_to_upgrade(
    with_made_up_lever, tmp_path
):
    loads = (
        "import advisor, json, sys\n"
        "print(json.dumps([advisor.load_config(path).schema_version for path in sys.argv[1:]]))\n"
    )
    run = python(with_made_up_lever, "-c", loads, *map(str, WRITTEN))
    assert json.loads(run.stdout) == [MADE_UP_VERSION] * len(WRITTEN)

    written = tmp_path / "made-up.json"
    advisor(with_made_up_lever, "recommend", "-m", "flux-dev", *FLUX_4090, "-o", str(written))
    assert json.loads(written.read_text())["made_up"] == 0.5
    with pytest.raises(ConfigError, match=f"schema_version {MADE_UP_VERSION} is newer .*; upgrade advisor"):
        load_config(written)  # today's advisor, which has no made-up lever
