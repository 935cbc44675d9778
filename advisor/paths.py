"""Where the advisor reads its data and keeps its state: package data, and the user's cache folder."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"  # generated tables: GPUs, diffusers classes, pipelines, constants
CATALOG_DIR = PACKAGE_DIR / "catalog"  # one JSON per known pipeline (scripts/build_catalog.py)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (huggingface_hub's truthy spellings): nothing may be fetched from the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME`` or ``~/.cache``: the base under which the advisor and the HF hub keep state."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() if xdg else Path.home() / ".cache"


def advisor_cache_dir() -> Path:
    """``~/.cache/advisor``: calibration results, the default study database, traces of local models."""
    return user_cache_dir() / "advisor"
