"""The `advisor` command line: parsing and rendering only; the work lives in the modules.

Every error ends as one line on stderr (``advisor: error: ...``) and a non-zero exit status: the
advisor's own errors with their exit codes (usage errors 2, the rest 1), an OS error on a file
with the file's name, and anything unexpected as one line that says it is a bug; ``--debug``
shows the traceback instead. Warnings (`AdvisorWarning`) are one ``advisor: warning: ...`` line each.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import warnings

from advisor.arguments import Exit, build_parser, long_options, take_model, values_may_start_with_a_dash
from advisor.cli.check import check
from advisor.cli.commands import estimate, inspect, probe, recommend_command
from advisor.cli.common import PLANNING_COMMANDS, state, take_request
from advisor.cli.tune import tune
from advisor.errors import AdvisorError, AdvisorWarning, UsageError, is_oom
from advisor.files import os_error_reason
from advisor.terminal import escape_what_the_terminal_cannot_show


COMMANDS = {
    "probe": probe,
    "inspect": inspect,
    "estimate": estimate,
    "recommend": recommend_command,
    "check": check,
    "tune": tune,
}


def _stdout_gone() -> bool:
    """Whether stdout's reader went away: rich has pointed it at /dev/null."""
    try:
        here, null = os.fstat(sys.__stdout__.fileno()), os.stat(os.devnull)
    except (OSError, ValueError):
        return False
    return (here.st_dev, here.st_ino) == (null.st_dev, null.st_ino)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _show_warning(previous, message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, AdvisorWarning):
        print(f"advisor: warning: {_one_line(message)}", file=sys.stderr)
    else:
        previous(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    state["argv"] = args  # what `tune --workers` hands on to its worker processes
    # pydantic looks for plugins in every installed distribution's entry points when the config
    # schema is built: ~80 ms of each command in a full environment, for plugins the advisor has no use for.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    escape_what_the_terminal_cannot_show()
    with warnings.catch_warnings():
        warnings.simplefilter("default", AdvisorWarning)  # each distinct warning once per command
        warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
        return _run(args)


def _run(args: list[str]) -> int:
    debug = "--debug" in args
    try:
        parser = build_parser(COMMANDS)
        if not args:
            parser.print_help()
            return 0
        parsed, unknown = parser.parse_known_args(values_may_start_with_a_dash(parser, args))
        if unknown:  # said by the subcommand, whose help lists what it takes
            where = f"advisor {parsed.command}" if parsed.command else "advisor"
            what = "option" if unknown[0].startswith("-") else "argument"
            near = difflib.get_close_matches(unknown[0].split("=")[0], long_options(parser, parsed.command), n=1)
            meant = f"; did you mean {near[0]}?" if what == "option" and near else ""
            raise UsageError(f"no such {what}: {unknown[0]}{meant} (see '{where} --help')")
        namespace = vars(parsed)
        take_model(namespace)
        state["debug"] = namespace.pop("debug")
        run = namespace.pop("run", None)
        if run is None:  # `advisor --debug` alone
            parser.print_help()
            return 0
        command = namespace.pop("command")
        if command in PLANNING_COMMANDS:
            namespace["request"] = take_request(namespace, command)
        run(**namespace)
    except Exit as exc:
        return exc.code
    except KeyboardInterrupt:
        print("advisor: interrupted", file=sys.stderr)
        return 130
    except (BrokenPipeError, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not _stdout_gone():
            return exc.code if isinstance(exc.code, int) else 0  # --help printed its text
        # `advisor ... | head` closed the pipe: what was read was what was wanted. rich turns the
        # EPIPE into exit 1 after pointing stdout at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())  # the final flush must not fail again
        return 0
    except Exception as exc:
        if state["debug"] or debug:
            raise
        if isinstance(exc, AdvisorError):
            message, code = _one_line(exc), exc.exit_code
        elif is_oom(exc):  # the advisor's own process (a trial's is a result): not a bug, a machine too full
            said = f"{type(exc).__name__}: {_one_line(exc)[:200]}".rstrip(": ")
            message, code = (
                f"out of memory in the advisor's own process ({said}); free some memory, or raise its limit, and run again",
                1,
            )
        elif isinstance(exc, OSError):  # a file no check named a flag for: name the file
            message, code = (f"{exc.filename}: " if exc.filename else "") + os_error_reason(exc), 1
        else:  # a bug: still one line, and the way to see more
            message = f"unexpected {type(exc).__name__}: {_one_line(exc)[:300]} (a bug in the advisor; --debug shows the traceback)"
            code = 1
        print(f"advisor: error: {message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
