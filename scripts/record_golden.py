"""Record what `advisor recommend` and `advisor estimate` print for fixed scenarios.

The golden files pin the planner's behaviour before code moves: tests/golden/cli_json.json holds
the `--json` outputs, tests/golden/cli_text.json what a person reads (the text of recommend and
estimate at `COLUMNS` columns, and recommend's `--emit python` script). `tests/test_golden.py`
re-runs every scenario and compares. Every scenario names its GPU and RAM, so the output does not
depend on the machine that runs it. Re-record only for a deliberate change, and say in the commit
which scenarios changed and why:

    python scripts/record_golden.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path


GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "cli_json.json"
GOLDEN_TEXT = GOLDEN.with_name("cli_text.json")
CONFIGS = GOLDEN.parent / "configs"
COLUMNS = "100"  # the width the text outputs are recorded at (the advisor honours COLUMNS, piped too)

RECOMMEND = {
    "flux-dev-4090": ["-m", "black-forest-labs/FLUX.1-dev", "--gpu", "RTX 4090", "--ram", "64GB"],
    "flux-dev-24gb-budget16": ["-m", "flux-dev", "--vram", "24GB", "--budget", "16GB", "--ram", "64GB"],
    "flux-dev-24gb-budget13": ["-m", "flux-dev", "--vram", "24GB", "--budget", "13GB", "--ram", "64GB"],
    "flux-dev-24gb-no-compile": ["-m", "flux-dev", "--vram", "24GB", "--ram", "64GB", "--no-compile"],
    "flux-dev-768-batch2": "-m flux-dev --vram 24GB --ram 64GB --height 768 --width 768 --batch 2".split(),
    "flux-dev-4gb-nothing-fits": ["-m", "flux-dev", "--vram", "4GB", "--ram", "8GB"],
    "flux-schnell-3060": ["-m", "black-forest-labs/FLUX.1-schnell", "--gpu", "RTX 3060", "--ram", "32GB"],
    "flux-dev-h100": ["-m", "flux-dev", "--gpu", "H100", "--ram", "256GB"],
    "sd35-large-16gb": ["-m", "stabilityai/stable-diffusion-3.5-large", "--vram", "16GB", "--ram", "32GB"],
    "sdxl-8gb": ["-m", "stabilityai/stable-diffusion-xl-base-1.0", "--vram", "8GB", "--ram", "16GB"],
    "qwen-image-4090": ["-m", "Qwen/Qwen-Image", "--gpu", "RTX 4090", "--ram", "64GB"],
    "wan14b-24gb": ["-m", "wan2.1-t2v-14b", "--vram", "24GB", "--ram", "64GB"],
    "wan1.3b-4060ti": ["-m", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--gpu", "RTX 4060 Ti", "--ram", "32GB"],
    "wan22-a100": ["-m", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "--gpu", "A100 80GB", "--ram", "128GB"],
    "hunyuan-h100-121f": "-m hunyuanvideo-community/HunyuanVideo --gpu H100 --ram 128GB --height 512 --width 768 --frames 121".split(),
    "cogvideox-12gb": ["-m", "THUDM/CogVideoX-5b", "--vram", "12GB", "--ram", "32GB"],
    "ltx-l4": ["-m", "Lightricks/LTX-Video", "--gpu", "L4", "--ram", "32GB"],
    # 24 GB of RAM: nothing loads (bitsandbytes fills the T4 while loading; fp16 weights overflow the RAM)
    "wan14b-t4-low-ram": ["-m", "wan2.1-t2v-14b", "--gpu", "T4", "--ram", "24GB"],
    "wan14b-t4-32gb": ["-m", "wan2.1-t2v-14b", "--gpu", "T4", "--ram", "32GB"],
    # LoRAs (issue 32): a fixed one and swapped ones; the lora-fast blog's card
    "flux-dev-4090-lora32": "-m flux-dev --gpu 4090 --ram 64GB --lora-rank 32".split(),
    "flux-dev-4090-lora32-swap": "-m flux-dev --gpu 4090 --ram 64GB --lora-rank 32 --lora-swap".split(),
    "flux-dev-h100-lora-exact": "-m flux-dev --gpu H100 --ram 256GB --lora-rank 16 --quality exact".split(),
}

ESTIMATE = {
    "flux-dev-4090-bf16": ["flux-dev", "--gpu", "RTX 4090", "--ram", "64GB"],
    "flux-dev-nf4-model-offload": "flux-dev --vram 24GB --ram 64GB --config flux-nf4-model-offload.json".split(),
    "flux-dev-leaf-offload": ["flux-dev", "--gpu", "RTX 4090", "--ram", "64GB", "--config", "group-leaf-stream.json"],
    "wan14b-group-offload": "wan2.1-t2v-14b --vram 24GB --ram 64GB --config group-leaf-stream.json".split(),
    "hunyuan-121f-h100": "hunyuanvideo --gpu H100 --ram 128GB --height 512 --width 768 --frames 121".split(),
    "sdxl-8gb-fp16": ["sdxl", "--vram", "8GB", "--ram", "16GB"],
    "ltx-4090-sequential": ["ltx-video", "--gpu", "RTX 4090", "--ram", "32GB", "--config", "sequential.json"],
}


def run_cli(argv: list[str], *, as_json: bool = True) -> tuple[int, object]:
    """Run the real CLI in this process; return its exit status and the JSON (or text) it printed."""
    from advisor.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, json.loads(out.getvalue()) if as_json else out.getvalue()


def normalise(data: object) -> object:
    """Drop what legitimately changes between runs: the creation time and the advisor version."""
    if isinstance(data, dict):
        provenance = (data.get("config") or {}).get("provenance")
        if isinstance(provenance, dict):
            provenance.pop("created", None)
            (provenance.get("packages") or {}).pop("advisor", None)
    return data


def normalise_text(text: str) -> str:
    """Drop the advisor version, which the script's header names."""
    from advisor import __version__

    return text.replace(f"advisor {__version__}", "advisor <version>")


def scenarios() -> dict[str, list[str]]:
    found = {f"recommend/{name}": ["recommend", *argv, "--json"] for name, argv in RECOMMEND.items()}
    for name, argv in ESTIMATE.items():
        argv = [str(CONFIGS / a) if a.endswith(".json") else a for a in argv]
        found[f"estimate/{name}"] = ["estimate", *argv, "--json"]
    return found


def text_scenarios() -> dict[str, list[str]]:
    """The same scenarios as people read them: recommend's and estimate's text, recommend's script."""
    found = {}
    for name, argv in scenarios().items():
        found[name.replace("/", "-text/", 1)] = argv[:-1]  # without --json
        if name.startswith("recommend/"):
            found[name.replace("recommend/", "emit/", 1)] = [*argv[:-1], "--emit", "python"]
    return found


def record() -> dict[str, object]:
    results = {}
    for name, argv in scenarios().items():
        code, data = run_cli(argv)
        results[name] = {"exit": code, "output": normalise(data)}
    return results


def record_text() -> dict[str, object]:
    os.environ["COLUMNS"] = COLUMNS
    results = {}
    for name, argv in text_scenarios().items():
        code, text = run_cli(argv, as_json=False)
        results[name] = {"exit": code, "output": normalise_text(text)}
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    GOLDEN.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
    GOLDEN_TEXT.write_text(json.dumps(record_text(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(scenarios())} scenarios to {GOLDEN}, {len(text_scenarios())} to {GOLDEN_TEXT}", file=sys.stderr)
