"""Shared test set-up: offline hub, the CUDA marker, and the tiny pipelines built once per session."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import pytest


# setuptools first, before any test imports anything: its shim makes `distutils` its own copy, and
# where the standard library's got in first (which test did was not found: it depends on which files
# share a worker), `import optimum.quanto` (through torch.utils.cpp_extension -> setuptools) failed
# its check `'_distutils' in core.__file__` in one fresh-clone run of the suite. (torch needs it from
# Python 3.12 on; a 3.11 venv comes with it.)
try:
    import setuptools  # noqa: F401
except ImportError:
    pass


# Tests never touch the network; set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers run with COLUMNS=80 and LINES=24 set; the advisor honours COLUMNS (piped
# too), so every command a test starts would print at 80 columns under xdist and at the piped
# width without it. Tests that care about the width set it themselves.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


def _cuda_available() -> bool:
    # Cheap check first so a CPU machine never pays for importing torch here.
    if shutil.which("nvidia-smi") is None and not os.path.exists("/proc/driver/nvidia/version"):
        return False
    import torch

    return torch.cuda.is_available()


# The files that take longest (minutes each on a 2-core machine), longest first. pytest-xdist
# (`-n auto --dist loadfile`, pyproject.toml) hands whole files to its workers in collection order:
# starting with these lets the short files fill in around them, so the workers finish together.
LONGEST_FIRST = (
    "test_tune.py",
    "test_gpu_kit.py",
    "test_tune_stop.py",
    "test_trace.py",
    "test_tune_workers.py",
    "test_measure.py",
    "test_apply.py",
    "test_every_class.py",
    "test_guard.py",
    "test_caching.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A Flux-like image pipeline with random weights, saved in diffusers layout."""
    from advisor.testing import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A Wan-like video pipeline with random weights, saved in diffusers layout."""
    from advisor.testing import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


# The imports every trial process makes before it loads anything: its address space after these is
# the floor of any RLIMIT_AS that still gets a trial as far as loading the pipeline.
_IMPORTS = """
import torch, diffusers, transformers
from diffusers import DiffusionPipeline, FluxPipeline
from transformers import CLIPTextModel, T5EncoderModel
import advisor.run.apply, advisor.run.measure
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmPeak"].split()[0]) * 1024)
"""
# Above that floor. Measured on the 2-core dev machine with one OpenMP thread (floor ~810 MiB):
# every headroom from 0 to 512 MiB ends in MemoryError while the weights load (safetensors maps
# the 270 MB file, then the weights are copied out of it), and the pipeline loads and runs at
# 640 MiB. 256 MiB sits in the middle of that range.
OOM_HEADROOM = 256 * 2**20


@functools.lru_cache
def address_space_after_imports(omp_threads: str = "1") -> int:
    """Bytes of address space (VmPeak) a fresh interpreter needs for the trial process's imports."""
    env = {**os.environ, "OMP_NUM_THREADS": omp_threads}
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS], capture_output=True, text=True, check=True, timeout=120, env=env
    )
    return int(out.stdout.split()[-1])


@pytest.fixture(scope="session")
def flux_270mb(tmp_path_factory):
    """The tiny Flux at scale=8 (68 M parameters, ~270 MB float32); shared with test_tune."""
    from advisor.testing import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.getbasetemp() / "tiny-flux-scale8", scale=8)


@pytest.fixture
def oom_limit(monkeypatch) -> int:
    """An RLIMIT_AS at which torch and diffusers import but the 270 MB pipeline cannot load.

    One OpenMP thread, so that the address space the trial needs does not grow with the machine's
    core count (each thread reserves a stack and a malloc arena): on a many-core machine, thread
    creation would otherwise fail first, as a crash. The imports need less than the limit by
    construction, so what runs out is loading the weights.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # measure() passes the environment to the trial
    return address_space_after_imports("1") + OOM_HEADROOM


@pytest.fixture
def dynamo_isolated():
    """Fresh dynamo caches for a test, and the dynamo flags that configs set put back after it."""
    import torch._dynamo

    saved = {k: getattr(torch._dynamo.config, k) for k in ("cache_size_limit", "capture_dynamic_output_shape_ops")}
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    for key, value in saved.items():
        setattr(torch._dynamo.config, key, value)


# --- the tune tests (tests/test_tune*.py, helpers in tests/tuning.py) ---------------------------------


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """In-process studies, like the advisor processes, read no calibration from and write nothing to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every advisor process these tests start."""
    base = tmp_path_factory.mktemp("tune-env")
    (base / "tmp").mkdir()
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(base / "cache"),
        # A killed `advisor tune` leaves its trial's scratch folder behind: keep it in tmp.
        "TMPDIR": str(base / "tmp"),
    }


@pytest.fixture(scope="module")
def shared_device_env(env):
    """Workers may share this machine's one device: only to test the worker machinery."""
    from advisor.run.workers import SHARED_DEVICE_ENV

    return {**env, SHARED_DEVICE_ENV: "1"}
