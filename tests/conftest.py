"""Shared test set-up: offline hub, the CUDA marker, and the tiny pipelines built once per session."""

from __future__ import annotations

import os
import shutil

import pytest

# Tests never touch the network; set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    # Cheap check first so a CPU machine never pays for importing torch here.
    if shutil.which("nvidia-smi") is None and not os.path.exists("/proc/driver/nvidia/version"):
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
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
