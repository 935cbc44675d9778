"""Inspection reads headers only: its time must not grow with checkpoint size.

Writes pipeline folders whose transformer checkpoint holds 0.25, 1 and 4 GiB of real tensor data in
the same number of tensors (64; only their shapes grow), sharded like the hub does above 2 GiB, then
times `advisor.probe.models.profile_from_folder` on each (median of several runs) next to the time of
reading every byte of the same files. Header parsing grows with the number of tensors, never with
their size.

    python benchmarks/inspect_speed.py [--sizes 0.25 1 4] [--dir /tmp/advisor-inspect-bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import struct
import time
from pathlib import Path

from advisor.probe.models import profile_from_folder


TENSORS = 64  # bf16 matrices of COLS columns, like the Linear weights of a transformer
COLS = 4096
SHARDS_ABOVE = 2 * 2**30


def write_shard(path: Path, first: int, count: int, rows: int) -> None:
    size = rows * COLS * 2
    header, offset = {}, 0
    for i in range(first, first + count):
        header[f"blocks.{i}.linear.weight"] = {
            "dtype": "BF16",
            "shape": [rows, COLS],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    chunk = bytes(size)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(count):
            out.write(chunk)


def make_pipeline(folder: Path, size_gib: float) -> list[Path]:
    """A one-component pipeline folder with `size_gib` of transformer weights; returns its shards."""
    component = folder / "transformer"
    component.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    (component / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", "num_attention_heads": 24, "attention_head_dim": 128})
    )
    rows = max(1, round(size_gib * 2**30 / (TENSORS * COLS * 2)))
    total = TENSORS * rows * COLS * 2
    shard_count = max(1, -(-total // SHARDS_ABOVE))
    per_shard = -(-TENSORS // shard_count)
    paths = []
    for number, first in enumerate(range(0, TENSORS, per_shard), start=1):
        count = min(per_shard, TENSORS - first)
        name = (
            "diffusion_pytorch_model.safetensors"
            if shard_count == 1
            else f"diffusion_pytorch_model-{number:05d}-of-{shard_count:05d}.safetensors"
        )
        path = component / name
        if not path.exists() or path.stat().st_size < count * rows * COLS * 2:
            write_shard(path, first, count, rows)
        paths.append(path)
    return paths


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_everything(paths: list[Path]) -> None:
    for path in paths:
        with path.open("rb") as handle:
            while handle.read(64 * 2**20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0, 4.0], help="checkpoint sizes in GiB")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/advisor-inspect-bench"))
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    print(f"machine: {platform.node()} {platform.machine()}, Python {platform.python_version()}")
    print(f"{'checkpoint':>11} {'shards':>6} {'inspect (median)':>17} {'read all bytes':>15} {'parameters':>12}")
    for size in args.sizes:
        folder = args.dir / f"{size:g}GiB"
        paths = make_pipeline(folder, size)
        inspect_s = median_seconds(lambda: profile_from_folder(folder), args.runs)
        read_s = median_seconds(lambda: read_everything(paths), 1)
        params = profile_from_folder(folder).parameters
        print(f"{size:>8.2f}GiB {len(paths):>6} {inspect_s * 1000:>14.2f}ms {read_s:>14.2f}s {params / 1e9:>11.2f}B")


if __name__ == "__main__":
    main()
