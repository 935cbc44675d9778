"""Stopping a study: SIGTERM handled as Ctrl-C (so the running trial is failed and its process
killed, the finished trials reported), and optuna's log kept quiet about either."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where it arrives (`terminate_as_interrupt`)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM stops the work as Ctrl-C does (so the trial is failed and its process killed,
    the finished trials reported) instead of killing this process where it stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(_signum, _frame) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
