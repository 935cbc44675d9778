"""Download the wheels the GPU kit needs on the lent GPU machine, which has no network.

Run on a development machine (PyPI reachable)::

    python benchmarks/gpu/fetch_wheels.py            # into benchmarks/gpu/wheels/ (git-ignored)
    python benchmarks/gpu/fetch_wheels.py --list     # print the pinned list, download nothing

The GPU machine runs Python 3.12 on manylinux x86_64, with PyTorch (CUDA), transformers,
accelerate, nvidia-ml-py, psutil and many more already there (the image's package list is in the
workplace's device notes, read 2026-11-17: torch 2.11.0+cu130, transformers 5.17.0,
huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors 0.8.0, numpy 2.5.2, typer, rich, pillow...).
It lacks diffusers, bitsandbytes, optuna and optuna's and pydantic's dependencies.

The list is resolved by hand, deliberately, and pinned to the versions this project is tested with
on the development machines (`.venv`):

- ``required``: what the image lacks and ``import advisor.cli, advisor.run.apply, advisor.run.tune,
  diffusers, bitsandbytes, optuna`` needs;
- ``fallback``: small packages the image has, carried in case its copy is missing or too old for a
  requirement. The kit installs with pip into a virtual environment over the image's packages
  (``kit/bootstrap.py``: ``pip install --no-index --find-links wheels -e .``); pip keeps every
  installed package that satisfies the requirements, so a fallback is installed only where the
  image's copy falls short and the image's own torch/transformers stack is never shadowed without need.

pip checks every requirement, so each dependency of the project and of each wheel it installs must
be installed in the image or carried here; ``tests/test_gpu_kit.py`` checks the project's side.
From the image, on purpose: matplotlib (pyproject; only ``advisor tune --report`` uses it, and it
would cost about 15 MiB with its dependencies), and setuptools and wheel, which build the editable
project (``--no-build-isolation``: an isolated build would download setuptools).

Not carried, on purpose: torch (never reinstalled: the image's CUDA build is the point), numpy
(16 MB; torch and transformers in the image need it anyway), transformers and tokenizers (the
image's 5.17 satisfies ``transformers>=4.56``), torchao (optional; its build must match torch),
and huggingface_hub 2.x (transformers 5.17 requires ``huggingface-hub<2.0``: the fallback is the
image's own 1.33.0, which also satisfies diffusers 0.42.1's ``>=1.32,<3``).

bitsandbytes ships one native library per CUDA and ROCm release (43 MB for 0.50.2); the wheel is
repacked keeping only the CUDA releases in ``--bnb-cuda`` (default 12.6, 12.8, 13.0, 13.2: the image
has torch built for CUDA 13.0) so that everything fits the 64 MiB that may travel. The kit checks
that a library for the machine's CUDA is there and skips the bitsandbytes parts, saying so, if not.

Writes ``wheels/manifest.json`` (file, size, sha256, role of every wheel) and fails loudly when the
wheels and the working tree together exceed 64 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WHEELS = HERE / "wheels"
LIMIT_BYTES = 64 * 2**20  # what travels to the GPU machine: working tree + carried paths
PYTHON_VERSION = "3.12"
# bitsandbytes 0.50 is tagged manylinux_2_24; pip matches each manylinux_2_N tag exactly.
PLATFORMS = (
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
)
DEFAULT_BNB_CUDA = ("126", "128", "130", "132")


@dataclass(frozen=True)
class Pin:
    """One wheel to carry: distribution name, exact version, role and why it is there."""

    name: str
    version: str
    role: str  # required | fallback
    why: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


PINNED: tuple[Pin, ...] = (
    # --- required: the image lacks these ---------------------------------------------------------
    Pin("diffusers", "0.42.1", "required", "the pipelines under test (pyproject: diffusers>=0.42)"),
    Pin(
        "bitsandbytes",
        "0.50.2",
        "required",
        "nf4 quantization of the seed page's combinations (repacked, see --bnb-cuda)",
    ),
    Pin("optuna", "5.0.0", "required", "advisor tune"),
    Pin("peft", "0.22.0", "required", "LoRAs: diffusers' load_lora_weights needs it (advisor.levers.lora)"),
    Pin("alembic", "1.20.1", "required", "optuna: RDB storage migrations"),
    Pin("SQLAlchemy", "2.1.9", "required", "optuna: RDB storage (no greenlet needed without asyncio)"),
    Pin("Mako", "1.4.3", "required", "alembic"),
    Pin("colorlog", "6.12.0", "required", "optuna"),
    Pin("pydantic", "2.14.4", "required", "advisor.config"),
    Pin("pydantic_core", "2.50.5", "required", "pydantic (exact pin)"),
    Pin("annotated-types", "0.8.0", "required", "pydantic"),
    Pin("typing-inspection", "0.4.5", "required", "pydantic"),
    Pin("importlib_metadata", "10.2.0", "required", "diffusers declares it"),
    Pin("lazy-importer", "0.1.0", "required", "importlib_metadata 10 on Python < 3.15"),
    Pin(
        "pytorch-msssim",
        "1.0.0",
        "required",
        "the quality guard's SSIM (advisor/run/quality.py); pure Python, needs torch only",
    ),
    Pin(
        "gguf",
        "0.19.0",
        "required",
        "GGUF checkpoints (advisor.levers.gguf; diffusers loads them with it); pure Python",
    ),
    # --- fallback: the image has these; installed only where its copy falls short ----------------
    Pin("typing_extensions", "4.16.0", "fallback", "pydantic 2.14 needs >=4.16.0"),
    Pin("typer", "0.29.2", "fallback", "transformers (its CLI); the advisor itself no longer uses it"),
    Pin("annotated-doc", "0.0.7", "fallback", "typer"),
    Pin("shellingham", "1.5.4", "fallback", "typer"),
    Pin("click", "8.5.1", "fallback", "typer, huggingface_hub"),
    Pin("rich", "15.0.0", "fallback", "advisor.cli tables"),
    Pin("markdown-it-py", "4.3.0", "fallback", "rich"),
    Pin("mdurl", "0.1.2", "fallback", "markdown-it-py"),
    Pin("Pygments", "2.21.0", "fallback", "rich"),
    Pin(
        "huggingface_hub", "1.33.0", "fallback", "diffusers needs >=1.32,<3; the image's transformers 5.17 needs <2.0"
    ),
    Pin("safetensors", "0.8.0", "fallback", "diffusers needs >=0.8.0"),
    Pin("filelock", "4.3.1", "fallback", "diffusers, huggingface_hub"),
    Pin("fsspec", "2026.9.0", "fallback", "huggingface_hub"),
    Pin("PyYAML", "6.0.4", "fallback", "optuna, huggingface_hub"),
    Pin("tqdm", "4.70.1", "fallback", "optuna, huggingface_hub"),
    Pin("packaging", "26.4", "fallback", "optuna, bitsandbytes"),
    Pin("regex", "2026.11.19", "fallback", "diffusers"),
    Pin("requests", "2.34.2", "fallback", "diffusers"),
    Pin("urllib3", "2.8.0", "fallback", "requests"),
    Pin("certifi", "2026.10.19.post1", "fallback", "requests"),
    Pin("charset-normalizer", "3.5.3", "fallback", "requests"),
    Pin("idna", "3.20", "fallback", "requests"),
    Pin("zipp", "4.1.2", "fallback", "importlib_metadata"),
    Pin("MarkupSafe", "3.0.4", "fallback", "Mako"),
    Pin("pillow", "13.0.0", "fallback", "diffusers imports PIL"),
    Pin("accelerate", "1.15.0", "fallback", "model/sequential CPU offload (pyproject: accelerate>=1.0)"),
    Pin("psutil", "7.2.2", "fallback", "advisor.probe.hardware"),
    Pin("nvidia-ml-py", "13.615.71", "fallback", "advisor.probe.hardware (NVML)"),
)


def pinned_requirements(role: str | None = None) -> list[str]:
    """``name==version`` for every pinned wheel (of one role, if given), in list order."""
    return [p.requirement for p in PINNED if role is None or p.role == role]


def download_command(requirements: list[str], dest: Path, *, python: str = sys.executable) -> list[str]:
    """The ``pip download`` command line for the GPU machine's interpreter and platform."""
    command = [python, "-m", "pip", "download", "--only-binary=:all:", "--python-version", PYTHON_VERSION]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += ["--implementation", "cp", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    return command + list(requirements)


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(normalized distribution name, version) from a wheel file name."""
    parts = filename[: -len(".whl")].split("-")
    return normalize(parts[0]), parts[1]


def slim_bitsandbytes(wheel: Path, keep_cuda: tuple[str, ...]) -> dict[str, object]:
    """Rewrite the bitsandbytes wheel in place without the native libraries of other CUDA/ROCm/XPU releases.

    Keeps ``libbitsandbytes_cuda<v>.so`` for each ``v`` in `keep_cuda` and the CPU library; RECORD
    loses the dropped files' lines so pip installs the rest unchanged.
    """
    keep = {f"libbitsandbytes_cuda{v}.so" for v in keep_cuda} | {"libbitsandbytes_cpu.so"}
    dropped, kept = [], []
    handle, tmp_name = tempfile.mkstemp(suffix=".whl", dir=wheel.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base.endswith(".so") and base not in keep:
                dropped.append(info.filename)
                continue
            if base.startswith("libbitsandbytes_"):
                kept.append(base)
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if line.split(",")[0] not in dropped) + "\n").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(wheel)
    return {"kept_libraries": sorted(kept), "dropped_libraries": sorted(Path(d).name for d in dropped)}


def working_tree_bytes() -> int:
    """Bytes of what `run` sends besides carried paths: tracked and untracked-not-ignored files."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for name in filter(None, listing.split("\0")):
        path = REPO / name
        if path.is_file():
            total += path.stat().st_size
    return total


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(dest: Path, *, bnb_cuda: tuple[str, ...]) -> dict[str, object]:
    """Download every pinned wheel into `dest` (emptied of other wheels); return the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="advisor-wheels-") as staging:
        command = download_command(pinned_requirements(), Path(staging))
        print("$ " + " ".join(command[:12]) + f" ... ({len(PINNED)} pinned wheels)", flush=True)
        subprocess.run(command, check=True)
        found = {wheel_name_version(p.name): p for p in Path(staging).glob("*.whl")}
        missing = [p.requirement for p in PINNED if (normalize(p.name), p.version) not in found]
        if missing:
            raise SystemExit(f"fetch_wheels: pip did not deliver {missing}")
        for old in dest.glob("*.whl"):
            old.unlink()
        for path in found.values():
            shutil.move(str(path), dest / path.name)
    entries = []
    for pin in PINNED:
        path = next(p for p in dest.glob("*.whl") if wheel_name_version(p.name) == (normalize(pin.name), pin.version))
        entry = {**asdict(pin), "file": path.name, "original_bytes": path.stat().st_size}
        if normalize(pin.name) == "bitsandbytes":
            entry["slimmed"] = slim_bitsandbytes(path, bnb_cuda)
        entry["bytes"] = path.stat().st_size
        entry["sha256"] = sha256(path)
        entries.append(entry)
    manifest = {
        "python_version": PYTHON_VERSION,
        "platforms": list(PLATFORMS),
        "bitsandbytes_cuda": list(bnb_cuda),
        "wheels": entries,
        "total_bytes": sum(e["bytes"] for e in entries),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=WHEELS, help="where the wheels go (default: %(default)s)")
    parser.add_argument(
        "--bnb-cuda",
        default=",".join(DEFAULT_BNB_CUDA),
        help="CUDA releases whose bitsandbytes library to keep, e.g. 126,128,130,132 (default: %(default)s)",
    )
    parser.add_argument("--list", action="store_true", help="print the pinned list and exit")
    args = parser.parse_args(argv)
    if args.list:
        for pin in PINNED:
            print(f"{pin.requirement:32} {pin.role:9} {pin.why}")
        return 0
    bnb_cuda = tuple(v.strip() for v in args.bnb_cuda.split(",") if v.strip())
    manifest = fetch(args.dest, bnb_cuda=bnb_cuda)
    tree = working_tree_bytes()
    print(f"\n{'wheel':60} {'MiB':>7}  role")
    for entry in sorted(manifest["wheels"], key=lambda e: -e["bytes"]):
        print(f"{entry['file']:60} {entry['bytes'] / 2**20:7.2f}  {entry['role']}")
    total = manifest["total_bytes"]
    print(
        f"\nwheels: {len(manifest['wheels'])} files, {total / 2**20:.2f} MiB; working tree {tree / 2**20:.2f} MiB; "
        f"together {(total + tree) / 2**20:.2f} MiB of the {LIMIT_BYTES / 2**20:.0f} MiB that may travel"
    )
    if total + tree > LIMIT_BYTES:
        print(
            f"fetch_wheels: TOO BIG: {(total + tree - LIMIT_BYTES) / 2**20:.2f} MiB over the limit; "
            "keep fewer bitsandbytes CUDA libraries (--bnb-cuda) or drop fallback wheels",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
