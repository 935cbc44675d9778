"""Stopping a study: SIGTERM handled as Ctrl-C (so the running trial is failed and its process
killed, the finished trials reported), no interrupt lost while a child process starts, and optuna's
log kept quiet about either."""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where it arrives (`terminate_as_interrupt`)."""


# The interrupts received inside `terminate_as_interrupt`, and the last one's kind (`raise_if_lost`).
_received = {"count": 0, "kind": KeyboardInterrupt}


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM stops the work as Ctrl-C does (so the trial is failed and its process killed,
    the finished trials reported) instead of killing this process where it stands; both are
    counted, so that one a child's start swallowed is raised again (`raise_if_lost`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raising(kind: type[KeyboardInterrupt]):
        def handler(_signum, _frame) -> None:
            _received["count"] += 1
            _received["kind"] = kind
            raise kind()

        return handler

    def quiet_lost_interrupts(unraisable) -> None:
        # An interrupt raised inside an at-fork handler is dropped and printed, traceback and all,
        # as "Exception ignored in ..."; it was counted, and `raise_if_lost` raises it again.
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, raising(KeyboardInterrupt)),
        signal.SIGTERM: signal.signal(signal.SIGTERM, raising(Terminated)),
    }
    previous_hook, sys.unraisablehook = sys.unraisablehook, quiet_lost_interrupts
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupts() -> int:
    """How many interrupts this process has received (inside `terminate_as_interrupt`)."""
    return _received["count"]


def raise_if_lost(before: int) -> None:
    """Raise the interrupt received since `interrupts()` was `before`, if any: call it right after
    starting a child process. With a ``preexec_fn``, ``subprocess.Popen`` forks through Python's
    at-fork handlers (logging releases its lock in one), and an interrupt raised inside one is
    printed as "Exception ignored in ..." and dropped (CPython's ``PyOS_AfterFork_Parent``): the
    study would go on as if Ctrl-C had never been pressed."""
    if _received["count"] != before:
        raise _received["kind"]()


def quiet_interrupts() -> None:
    """optuna logs a trial that raised, traceback included, then "Trial N failed with value None.";
    Ctrl-C is worth neither (a real error keeps its traceback)."""
    import logging

    class DropInterrupts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if (
                record.exc_info
                and record.exc_info[0] is not None
                and issubclass(record.exc_info[0], KeyboardInterrupt)
            ):
                return False
            return not re.fullmatch(r"Trial \d+ failed with value None\.", record.getMessage())

    for handler in logging.getLogger("optuna").handlers:
        if not any(type(f).__name__ == "DropInterrupts" for f in handler.filters):
            handler.addFilter(DropInterrupts())
