"""One error root for the project, with a subclass per stage.

Only the CLI turns these into a one-line message and an exit code; library callers catch
`AdvisorError` (or a subclass) like any other exception.
"""

from __future__ import annotations


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


class AdvisorWarning(UserWarning):
    """Something was ignored and the advisor carried on, e.g. an unreadable calibration cache.

    The CLI prints each as one ``advisor: warning: ...`` line on stderr.
    """
