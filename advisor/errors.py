"""One error root for the project, with a subclass per stage.

Only the CLI turns these into a one-line message and an exit code; library callers catch
`AdvisorError` (or a subclass) like any other exception.
"""

from __future__ import annotations

import re


class AdvisorError(Exception):
    """Root of every error the advisor raises on purpose.

    `exit_code` is what the CLI exits with when this error reaches it.
    """

    exit_code = 1


class UsageError(AdvisorError):
    """A bad argument or option value, e.g. an unparseable size given to ``--budget``."""

    exit_code = 2


class HardwareError(AdvisorError):
    """The machine could not be probed as asked (e.g. ``--calibrate`` without a device)."""


class ModelError(AdvisorError):
    """A model could not be found or inspected (unknown id, corrupt folder, bad header)."""


class EstimateError(AdvisorError):
    """A memory or latency estimate could not be computed for a configuration."""


class ConfigError(AdvisorError):
    """An optimization config file is invalid, or does not suit this pipeline or machine."""


class TuneError(AdvisorError):
    """The tuner could not run or found nothing feasible."""


# What out-of-memory errors say, in Python, torch, C++ and the dynamic loader (``import torch``
# under an address-space limit: "failed to map segment from shared object").
OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "memory allocation",
    "memoryerror",
    "std::bad_alloc",
    "failed to map segment",
)

# Importing a module compiled from source under an address-space limit: CPython's parser passes a
# node whose allocation failed to its AST constructor, which then raises ValueError("field 'target'
# is required for AnnAssign") in place of the MemoryError (the generated _PyAST_* constructors in
# Python/Python-ast.c; the parser never hands them a missing field otherwise).
_PARSER_OUT_OF_MEMORY = re.compile(r"^field '\w+' is required for \w+$")


def is_oom(error: BaseException) -> bool:
    """torch's CUDA/CPU out-of-memory errors and Python's MemoryError, also as the cause of another."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError) or type(current).__name__ == "OutOfMemoryError":
            return True
        if any(marker in str(current).lower() for marker in OOM_MARKERS):
            return True
        if isinstance(current, ValueError) and _PARSER_OUT_OF_MEMORY.match(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


class AdvisorWarning(UserWarning):
    """Something was ignored and the advisor carried on, e.g. an unreadable calibration cache.

    The CLI prints each as one ``advisor: warning: ...`` line on stderr.
    """


class ConfigWarning(UserWarning):
    """A config applies, but not quite as written (made for another pipeline or GPU, a skipped option)."""
