"""Installed distributions' versions, read without importing them or parsing their metadata.

`advisor probe` and the constraints ask for about sixteen versions at every start; reading each
METADATA file through importlib.metadata costs ~1 ms apiece, the folder names nothing.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterable


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, from its metadata (nothing is imported)."""
    return installed_versions((distribution,))[distribution]


def installed_versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each distribution (None where it isn't), nothing imported.

    The version comes from the name of the distribution's metadata folder on ``sys.path``, which
    the packaging spec fixes as ``{name}-{version}.dist-info`` (what importlib.metadata finds
    too, before it parses every METADATA file, ~1 ms each); the first on ``sys.path`` wins, as
    at import. An ``.egg-info`` folder without a version is asked of importlib.metadata.
    """
    wanted = {_normalized(name): name for name in distributions}
    found: dict[str, str | None] = {}
    for entry in sys.path:
        try:
            folders = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in folders:
            stem, _, suffix = folder.rpartition(".")
            if suffix not in ("dist-info", "egg-info"):
                continue
            project, _, version = stem.partition("-")
            name = wanted.get(_normalized(project))
            if name is not None and name not in found:
                found[name] = version.split("-")[0] or _version_from_metadata(name)  # egg-info: name-1.0-py3.11
    return {name: found.get(name) for name in wanted.values()}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_from_metadata(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
