"""The files a user names: JSON read with one-line errors, outputs checked before work starts, atomic writes.

Everything here answers in one phrase that a caller puts after the flag and the path
(``--config advisor.json: not valid JSON (...)``), so a bad path never reaches the user as a
traceback. Outputs are checked up front because `advisor tune` finds out it cannot write ``-o``
only after every trial has run otherwise.

>>> check_output_file("/tmp", flag="-o")  # doctest: +SKIP
UsageError: -o /tmp: is a folder; give a file name inside it, e.g. /tmp/advisor.json
"""

from __future__ import annotations

import errno
import glob
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorError, UsageError
from advisor.paths import advisor_cache_dir


# No config the advisor, diffusers or transformers writes nests deeper than a few levels; a limit
# far below Python's recursion limit keeps whatever reads the data later (validation, JSON output)
# from running out of stack on a file that parses.
MAX_JSON_DEPTH = 64
# Config files are kilobytes; this only stops `--config /dev/zero` from reading forever.
MAX_JSON_BYTES = 64 * 2**20


def _limits(folder: Path) -> tuple[int, int]:
    """(longest name, longest path) in bytes on the file system holding `folder`."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or a folder that can't be asked
        return 255, 4096


def os_error_reason(exc: OSError) -> str:
    """One phrase for an OS error on a path the user gave: 'is a folder, not a file', 'permission denied', ..."""
    code = exc.errno
    if code == errno.ENOENT:
        return "no such file or folder"
    if code == errno.EISDIR:
        return "is a folder, not a file"
    if code == errno.ENOTDIR:
        in_the_way = _file_above(exc.filename)
        return f"{in_the_way} is a file, not a folder" if in_the_way else "a part of the path is a file, not a folder"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.EROFS:
        return "the file system is read-only"
    if code == errno.ENAMETOOLONG:
        name_max, path_max = _limits(Path("."))
        return f"file name too long (at most {name_max} bytes per name and {path_max} per path here)"
    if code == errno.ENOSPC:
        return "no space left on the device"
    if code == getattr(errno, "EDQUOT", None):
        return "disk quota exceeded"
    if code == errno.ELOOP:
        return "too many levels of symbolic links"
    return exc.strerror or str(exc)


def json_type(value: Any) -> str:
    """What JSON calls the type of a parsed value: object, array, string, number, boolean, null."""
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def _file_above(filename: object) -> str | None:
    """The regular file that a path goes through as if it were a folder, if any."""
    if not isinstance(filename, (str, os.PathLike)):
        return None
    for parent in Path(filename).parents:
        try:
            if stat.S_ISREG(os.stat(parent).st_mode):
                return str(parent)
        except OSError:
            continue
    return None


def _too_deep(data: Any, limit: int) -> bool:
    """Whether `data` nests lists/objects more than `limit` levels deep (iterative: no recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return False


def read_json(
    path: str | Path,
    *,
    error: type[AdvisorError],
    label: str | None = None,
    missing: str = "no such file",
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """The JSON in `path`, or `error("<label>: <why>")` in one line: missing, a folder, unreadable,
    not UTF-8, not JSON, nested deeper than `max_depth`, or holding an integer too long for Python
    to convert (``sys.get_int_max_str_digits()``). `label` defaults to the path.
    """
    path = Path(path)
    label = label or str(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{label}: {missing}") from None
    except OSError as exc:
        raise error(f"{label}: {os_error_reason(exc)}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"{label}: larger than {MAX_JSON_BYTES // 2**20} MB; not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{label}: not UTF-8 text, so not JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise error(f"{label}: nested more than {max_depth} levels deep, deeper than any config file") from None
    except ValueError:  # the only other one json raises: an integer past the int-string conversion limit
        raise error(
            f"{label}: holds an integer of more than {sys.get_int_max_str_digits()} digits; no config value is that large"
        ) from None
    if _too_deep(data, max_depth):
        raise error(f"{label}: nested more than {max_depth} levels deep, deeper than any config file")
    return data


# --- outputs ------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> tuple[Path, os.stat_result | None, list[str], str | None]:
    """The nearest existing ancestor of `path` (or `path` itself), its stat, the names that would
    have to be created under it, and an OS error that stopped the walk."""
    missing: list[str] = []
    current = path
    while True:
        try:
            return current, os.stat(current), missing, None
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                return current, None, missing, os_error_reason(exc)
        if current.parent == current:
            return current, None, missing, "no such file or folder"
        missing.insert(0, current.name)
        current = current.parent


def _cannot_create(path: Path, found: tuple[Path, os.stat_result | None, list[str], str | None]) -> str | None:
    """Why `path` (symlinks resolved) could not be created, given `_nearest_existing(path)`; None if it can."""
    base, base_stat, missing, problem = found
    if problem:
        return problem
    if base_stat is not None and not stat.S_ISDIR(base_stat.st_mode):
        return f"{base} is a file, not a folder"
    name_max, path_max = _limits(base)
    for name in missing:
        size = len(os.fsencode(name))
        if size > name_max:
            shown = name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}"
            return f"the name {shown!r} is {size} bytes long; this file system allows at most {name_max}"
    if len(os.fsencode(str(path))) >= path_max:
        return f"the path is longer than this file system allows ({path_max} bytes)"
    return _creation_refused(base)


def _creation_refused(folder: Path) -> str | None:
    """Why nothing can be created in `folder`, or None; found by creating (and removing) a file there,
    since ``os.access`` answers yes to root for /proc, which then refuses every new file."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return _not_writable(folder)
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".advisor-probe-")
    except OSError as exc:
        return f"can't create files in {folder} ({os_error_reason(exc)})"
    os.close(handle)
    os.unlink(probe)
    return None


def _not_writable(folder: Path) -> str:
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    return (
        f"{folder} is on a read-only file system"
        if read_only
        else f"permission denied: can't create files in {folder}"
    )


def check_output_file(path: str | Path, *, flag: str) -> Path:
    """`path` as a file the advisor can write later, or a `UsageError` naming `flag` now.

    Refused: an empty name, an existing folder, a path under a regular file, a name longer than
    the file system allows, and a folder this process can't write into. A symlink is followed:
    the file it points to is the one written (`write_text_atomic`).
    """
    text = str(path)
    if not text.strip():
        raise UsageError(f"{flag}: the file name is empty; give a file such as advisor.json")
    path = Path(path)
    try:
        existing = os.stat(path)  # through symlinks
    except OSError:
        existing = None  # missing, or unreachable: the walk below says which
    if existing is not None:
        if stat.S_ISDIR(existing.st_mode):
            raise UsageError(f"{flag} {text}: is a folder; give a file name inside it, e.g. {path / 'advisor.json'}")
        if not stat.S_ISREG(existing.st_mode):  # a device or pipe (/dev/stdout): written into
            if not os.access(path, os.W_OK):
                raise UsageError(f"{flag} {text}: permission denied")
            return path
        folder = Path(os.path.realpath(path)).parent  # the file is replaced by a rename in its folder
        problem = _creation_refused(folder)
        if problem:
            raise UsageError(f"{flag} {text}: {problem}")
        return path
    target = Path(os.path.realpath(path))
    problem = _cannot_create(target, _nearest_existing(target))
    if problem:
        raise UsageError(f"{flag} {text}: {problem}")
    return path


def check_output_folder(path: str | Path, *, flag: str) -> Path:
    """`path` as a folder the advisor can create or write files into later, or a `UsageError` naming `flag`."""
    text = str(path)
    if not text.strip():
        raise UsageError(f"{flag}: the folder name is empty; give a folder such as tune-report")
    path = Path(path)
    target = Path(os.path.realpath(path))
    found = base, base_stat, missing, problem = _nearest_existing(target)
    if not problem and not missing and base_stat is not None:
        if not stat.S_ISDIR(base_stat.st_mode):
            raise UsageError(f"{flag} {text}: is a file, not a folder; give a folder (it is created if missing)")
        problem = _creation_refused(target)
        if problem:
            raise UsageError(f"{flag} {text}: {problem}")
        return path
    problem = _cannot_create(target, found)
    if problem:
        raise UsageError(f"{flag} {text}: {problem}")
    return path


def cache_folder_problem() -> str | None:
    """Why the advisor's cache folder (``~/.cache/advisor``, under XDG_CACHE_HOME) can't be created
    or written, as one phrase that ends in the way out; None when it can."""
    folder = Path(os.path.realpath(advisor_cache_dir()))
    problem = _cannot_create(folder, _nearest_existing(folder))  # an existing folder is its own nearest
    if problem is None:
        return None
    return f"the advisor's cache folder {advisor_cache_dir()}: {problem}; set XDG_CACHE_HOME to a writable folder"


def check_cache_folder(why: str) -> None:
    """A `UsageError` when the cache folder can't be written (`cache_folder_problem`), saying `why` it is needed."""
    problem = cache_folder_problem()
    if problem:
        raise UsageError(f"{problem} ({why})")


def current_umask() -> int:
    """This process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a crash leaves the old file or the new one, never half of one.

    As a plain ``open(path, "w")`` would: a new file gets ``0o666 & ~umask``, an existing one keeps
    its mode, and a symlink stays a symlink (the file it points to is replaced). The data is
    fsynced before the rename and the folder after it, so the new file survives a power cut.
    A device or pipe (``-o /dev/stdout``) is written into directly.
    Raises `OSError` when the file can't be written; the caller names the flag.
    """
    path = Path(path)
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode) and not stat.S_ISDIR(existing.st_mode):
        # /dev/stdout, /dev/null, a named pipe: written into, as by a plain open (renaming over a
        # device node would replace it with a file).
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
        return path
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(existing.st_mode) if existing is not None else 0o666 & ~current_umask()
    # mkstemp makes the file 0600; the short prefix keeps the temporary name within NAME_MAX
    # even when the target's own name is near it. It names this process, so that the next save
    # removes what a save killed half way (kill -9, power cut) left behind.
    prefix = f".{target.name[:32]}."
    _remove_orphaned_temporaries(target.parent, prefix)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f"{prefix}{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return path


def _remove_orphaned_temporaries(folder: Path, prefix: str) -> None:
    """Remove the temporary files of saves to the same file whose process is gone."""
    for leftover in folder.glob(f"{glob.escape(prefix)}*.tmp"):
        owner = leftover.name[len(prefix) :].split(".")[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            leftover.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; best effort (some file systems can't fsync a folder)."""
    try:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
