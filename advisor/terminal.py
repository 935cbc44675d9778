"""The terminal the advisor prints to, as far as every command must care before it prints anything."""

from __future__ import annotations

import sys


def escape_what_the_terminal_cannot_show() -> None:
    """A terminal or pipe whose encoding lacks a character (PYTHONIOENCODING=ascii; a non-ASCII
    path, the ± of a latency) gets it as ``\\xe4``, not a UnicodeEncodeError after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
