"""Where a file of a hub repo sits in the local Hugging Face cache, without importing huggingface_hub.

The same lookup as ``huggingface_hub.try_to_load_from_cache`` (the cache layout is documented:
https://huggingface.co/docs/huggingface_hub/guides/manage-cache), written out because importing
huggingface_hub pulls in httpx, yaml and tqdm: about 130 ms of every `advisor recommend`, which
never goes to the network. tests/test_models.py checks it against huggingface_hub's own function.
"""

from __future__ import annotations

import os
from pathlib import Path

from advisor.paths import user_cache_dir


def hub_cache_dir() -> Path:
    """HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else HF_HOME/hub (HF_HOME defaults to
    $XDG_CACHE_HOME/huggingface, then ~/.cache/huggingface): huggingface_hub.constants' order."""
    home = os.getenv("HF_HOME", str(user_cache_dir() / "huggingface"))
    legacy = os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub"))
    return Path(os.path.expandvars(os.path.expanduser(os.getenv("HF_HUB_CACHE", legacy))))


def cached_file(repo_id: str, filename: str, revision: str = "main") -> str | None:
    """The cached path of `filename` in model repo `repo_id` at `revision` (a branch, tag or commit),
    or None when it is not in the cache (or is cached as known to be absent)."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    ref = repo / "refs" / revision
    if ref.is_file():
        revision = ref.read_text()
    if (repo / ".no_exist" / revision / filename).is_file():
        return None
    found = repo / "snapshots" / revision / filename
    return str(found) if found.is_file() else None
