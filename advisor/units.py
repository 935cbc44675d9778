"""Byte sizes in and out: the one parser and formatter used everywhere.

Sizes follow the convention of GPU memory, not of disk drives: **1 GB = 1 GiB = 2**30 bytes**.
That is what ``nvidia-smi`` (MiB), PyTorch and diffusers' benchmarks print ("14.95 GB" on the page
this project grew from is ``max_memory_allocated() / 1024**3``), and why a "24 GB" card has
24 GiB. ``KB``/``KiB``, ``MB``/``MiB``, ``GB``/``GiB`` and ``TB``/``TiB`` are therefore synonyms, and
a single letter (``12G``) means the same. Internally every size is an ``int`` of bytes.
"""

from __future__ import annotations

import math
import re

from advisor.errors import UsageError


GIB = 2**30  # the "GB" of this project (see above)
MAX_SIZE = 2**60  # the largest size read (1024 PB): far past any machine, and every estimate stays a finite number

_UNIT_EXPONENTS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_VALID_FORMS = "a number of bytes or a number with a unit, e.g. 12GB, 12 GiB, 12000MB, 1.5T"


def parse_size(text: str | int, *, name: str = "size") -> int:
    """Parse a human size into bytes (binary units: 1 GB = 2**30 bytes).

    `name` is the flag or key the value came from; it starts the error message.

    >>> parse_size("12GB")
    12884901888
    >>> parse_size("1.5T") == parse_size("1536 GiB")
    True
    """
    if isinstance(text, bool):  # bool is an int subclass; True bytes is a mistake
        raise UsageError(f"{name}: expected a size, got {text!r}; give {_VALID_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{name}: {text} is negative; give {_VALID_FORMS}")
        return text
    match = _SIZE_PATTERN.match(str(text))
    if match is None:
        shown = str(text).strip()
        if shown.startswith("-"):
            raise UsageError(f"{name}: {text!r} is negative; give {_VALID_FORMS}")
        what = "the value is empty" if not shown else f"{text!r} is not a size"
        raise UsageError(f"{name}: {what}; give {_VALID_FORMS}")
    number, prefix, suffix = match.groups()
    value = float(number) * 1024 ** _UNIT_EXPONENTS[prefix.lower()]
    if not math.isfinite(value) or value > MAX_SIZE:
        raise UsageError(f"{name}: {text!r} is too large: the limit is 2^60 bytes (1024PB); give e.g. 12GB or 1.5TB")
    if not prefix and not suffix and 0 < value < 2**20:
        # A bare "12" is 12 bytes, which no GPU or budget means: the unit was forgotten.
        raise UsageError(f"{name}: {text!r} has no unit and is read as bytes; did you mean {number.strip()}GB?")
    return int(value)


def format_size(num_bytes: int | float | None, *, precision: int = 2) -> str:
    """Format bytes for people, in the same binary units `parse_size` reads.

    >>> format_size(16047697920)
    '14.95 GB'
    """
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            break
        value /= 1024
    if unit == "B":
        return f"{sign}{int(value)} B"
    return f"{sign}{value:.{precision}f} {unit}"


def parse_capability(text: str | None) -> float:
    """A CUDA compute capability as a number ("8.9" -> 8.9); 0.0 for none or an unreadable one."""
    try:
        return float(text or 0)
    except (TypeError, ValueError):
        return 0.0
