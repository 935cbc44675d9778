"""Render the GPU datasheet table (advisor/data/gpus.json) as docs/gpus.md: the cards --gpu knows.

python scripts/build_gpu_doc.py
"""

from __future__ import annotations

import json
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "advisor" / "data" / "gpus.json"
PAGE = ROOT / "docs" / "gpus.md"
INTRO = """# GPUs `--gpu` knows

The datasheet figures `advisor recommend --gpu NAME` and `advisor estimate --gpu NAME` plan with
({count} cards, from `advisor/data/gpus.json`; regenerate with `python scripts/build_gpu_doc.py`).
Names match loosely (`rtx3060`, `NVIDIA GeForce RTX 3060`); a card not listed can be planned as a
generic card of its size with `--vram`. Throughput is dense tensor-core TFLOP/s with fp32
accumulate, no sparsity; "-" where the card has no such tensor cores. The advisor plans NVIDIA CUDA
GPUs and CPU inference: AMD (ROCm), Apple (Metal) and Intel (XPU) GPUs are refused by name.

| GPU | memory (GiB) | compute capability | generation | bf16 | fp8 | memory bandwidth (GB/s) | PCIe | source |
|---|---|---|---|---|---|---|---|---|
"""


def _figure(value) -> str:
    return "-" if value is None else f"{value:g}"


def main() -> None:
    table = {name: sheet for name, sheet in json.loads(TABLE.read_text()).items() if not name.startswith("_")}
    rows = [
        f"| {name} | {s['memory_gib']:g} | {s['compute_capability']} | {s.get('generation', '-')} | "
        f"{_figure(s.get('bf16_tflops'))} | {_figure(s.get('fp8_tflops'))} | {_figure(s.get('memory_bandwidth_gbs'))} | "
        f"{s['pcie_generation']} x{s['pcie_width']} | {s.get('source', '')} |"
        for name, s in table.items()
    ]
    PAGE.write_text(INTRO.format(count=len(rows)) + "\n".join(rows) + "\n")
    print(f"wrote {len(rows)} GPUs to {PAGE}")


if __name__ == "__main__":
    main()
