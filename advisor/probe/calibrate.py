"""`advisor probe --calibrate`: a few seconds of real measurement for the latency estimate.

Measures this machine's matmul throughput (bf16 on CUDA, fp32 on CPU) and, on CUDA, the pinned
host->device copy bandwidth, and stores them per device name in ``~/.cache/advisor/calibration.json``
where `advisor.probe.target` finds them. Imports torch, so it is never on the fast path.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

from advisor.errors import AdvisorWarning
from advisor.files import os_error_reason, write_text_atomic
from advisor.probe.target import calibration_path, read_calibrations


def _time(fn, *, min_seconds: float, sync) -> float:
    """Seconds per call of `fn`, repeated for at least `min_seconds` after one warm-up call."""
    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def calibrate(*, seconds: float = 1.0) -> dict[str, Any]:
    """Measure matmul FLOP/s (and H2D bytes/s on CUDA); save and return the result."""
    import torch

    if torch.cuda.is_available():
        device, name, dtype, size = "cuda", torch.cuda.get_device_name(0), torch.bfloat16, 8192
        sync = torch.cuda.synchronize
    else:
        device, name, dtype, size = "cpu", "cpu", torch.float32, 1024
        sync = lambda: None  # noqa: E731 - CPU work is synchronous
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    per_matmul = _time(lambda: torch.mm(a, b), min_seconds=seconds, sync=sync)
    result: dict[str, Any] = {
        "device": device,
        "matmul_flops": 2 * size**3 / per_matmul,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
    }
    if device == "cuda":
        host = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
        target = torch.empty_like(host, device="cuda")
        per_copy = _time(lambda: target.copy_(host, non_blocking=True), min_seconds=seconds, sync=sync)
        result["h2d_bytes_per_s"] = host.numel() / per_copy
    path = calibration_path()
    stored = read_calibrations()  # an unusable file or entry is warned about and replaced
    stored[name] = result
    try:
        write_text_atomic(path, json.dumps(stored, indent=2) + "\n")
    except OSError as exc:  # the measurement stands; only the next command won't find it
        warnings.warn(
            f"{path}: could not save the calibration ({os_error_reason(exc)}); estimates won't use it",
            AdvisorWarning,
            stacklevel=2,
        )
    return {"name": name, "path": str(path), **result}
