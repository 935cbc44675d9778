"""The machine as the kit sees it: versions, the GPU, a bitsandbytes smoke test, the calibration.

`environment_child` runs in a child process (``run_kit.py --internal environment``), so the kit's
own process never initialises CUDA and its memory never counts in a measurement.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from kit import advisor_api


VERSIONS_OF = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "optuna",
    "huggingface_hub",
    "pydantic",
    "torchao",
)


def environment_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Versions of the packages that matter, the GPU, and (on a GPU) whether bitsandbytes runs."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in VERSIONS_OF:
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # a broken optional package is a finding, not a crash
            info[name] = None
            info[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    import torch

    info["cuda_runtime"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, gpu_memory_bytes=props.total_memory, compute_capability=f"{props.major}.{props.minor}"
        )
    if spec.get("bnb_smoke") and info.get("bitsandbytes"):
        try:
            import bitsandbytes.functional as F

            weight = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
            packed, state = F.quantize_4bit(weight, quant_type="nf4")
            error = (F.dequantize_4bit(packed, state) - weight).abs().mean().item()
            info["bitsandbytes_smoke"] = {"ok": True, "nf4_mean_abs_error": error}
        except Exception as exc:
            info["bitsandbytes_smoke"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    try:
        info["calibration"] = advisor_api.calibrate(spec.get("calibrate_s", 0.5))
    except Exception as exc:
        info["calibration"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def torch_cuda_version() -> str | None:
    """torch's CUDA release ("13.0") read from torch/version.py, without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    text = (Path(spec.origin).parent / "version.py").read_text()
    found = re.search(r"^cuda[^=]*=\s*['\"]([\d.]+)['\"]", text, re.M)
    return found.group(1) if found else None


def bitsandbytes_library(cuda: str | None) -> tuple[str | None, str]:
    """The BNB_CUDA_VERSION to set (None: leave it) and a note on bitsandbytes' native library.

    fetch_wheels.py keeps only some CUDA releases' libraries; without one for torch's CUDA,
    bitsandbytes can load the nearest one of the same major release.
    """
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or spec.origin is None:
        return None, "bitsandbytes is not installed"
    if cuda is None:
        return None, "torch has no CUDA"
    libs = {
        m.group(1): p.name
        for p in Path(spec.origin).parent.glob("libbitsandbytes_cuda*.so")
        if (m := re.search(r"cuda(\d+)", p.name))
    }
    wanted = cuda.replace(".", "")
    if wanted in libs:
        return None, f"libbitsandbytes_cuda{wanted}.so matches torch's CUDA {cuda}"
    same_major = sorted((v for v in libs if v[:-1] == wanted[:-1]), key=int)
    if not same_major:
        return None, f"no bitsandbytes library for CUDA {cuda} (carried: {sorted(libs)}); bitsandbytes parts will fail"
    below = [v for v in same_major if int(v) <= int(wanted)]
    chosen = below[-1] if below else same_major[0]
    return (
        chosen,
        f"no library for CUDA {cuda}; BNB_CUDA_VERSION={chosen} (same major release; carried {sorted(libs)})",
    )
