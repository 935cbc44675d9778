"""Installed distributions' versions, read without importing them or parsing their metadata.

`advisor probe` and the constraints ask for about sixteen versions at every start; reading each
METADATA file through importlib.metadata costs ~1 ms apiece, the folder names nothing.
"""

from __future__ import annotations

import os
import re
import sys
from functools import lru_cache
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
    folders = _metadata_folders(tuple(sys.path))
    found = {name: folders.get(_normalized(name)) for name in distributions}
    return {name: version if version != "" else _version_from_metadata(name) for name, version in found.items()}


@lru_cache(maxsize=4)
def _metadata_folders(path: tuple[str, ...]) -> dict[str, str]:
    """Normalized distribution name -> the version its metadata folder names ("" for none), read once
    per ``sys.path``: what is installed doesn't change under a running command, but the path can
    (importing setuptools appends its ``_vendor`` folder, whose distributions are then installed)."""
    versions: dict[str, str] = {}
    for entry in path:
        try:
            folders = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in folders:
            stem, _, suffix = folder.rpartition(".")
            if suffix in ("dist-info", "egg-info"):
                project, _, version = stem.partition("-")
                versions.setdefault(_normalized(project), version.split("-")[0])  # egg-info: name-1.0-py3.11
    return versions


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_from_metadata(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
