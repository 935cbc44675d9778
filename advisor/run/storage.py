"""Where studies live: optuna storages from the URLs `--storage` takes, and the guards around them.

SQLite by default (``~/.cache/advisor/studies.db``), a journal file or PostgreSQL to share a study.
A second live tuner of one SQLite study is refused (`sole_tuner`); a trial whose tuner was killed
on this machine is failed (`fail_orphaned_trials`) so that the next run measures it again.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path
from typing import Iterator

from advisor.errors import TuneError, UsageError
from advisor.files import pid_alive
from advisor.paths import advisor_cache_dir
from advisor.run.trials import runner_of


# SQLite: how long a writer waits for another's lock (optuna's heartbeat thread, a second tuner) before
# "database is locked"; Python's default is 5 s (sqlite3.connect's timeout), which a busy machine exceeds.
SQLITE_BUSY_TIMEOUT_S = 60


def default_storage() -> str:
    """SQLite file under the user cache: ``~/.cache/advisor/studies.db`` (honours XDG_CACHE_HOME)."""
    base = advisor_cache_dir()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TuneError(
            f"--storage: the default study storage folder {base} can't be created ({error.strerror}); "
            "pass --storage sqlite:///A/WRITABLE/studies.db or set XDG_CACHE_HOME"
        ) from None
    return f"sqlite:///{base / 'studies.db'}"


def check_storage(url: str) -> str:
    """`url`, or a UsageError naming --storage for an SQLite database that lives in memory
    (``sqlite:///:memory:``, ``sqlite://``): the study would be lost when the tuner ends, and
    optuna's heartbeat thread, which opens its own connection, finds no tables there."""
    if url.startswith("sqlite:") and url.removeprefix("sqlite:").strip("/") in ("", ":memory:"):
        raise UsageError(
            f"--storage {url}: an SQLite database in memory keeps the study nowhere; "
            "give a file, e.g. sqlite:///studies.db, or leave --storage out for the default"
        )
    return url


def open_storage(url: str):
    """An optuna storage from a URL: ``sqlite:///...``, ``postgresql://...``, ``mysql://...``, or
    ``journal:PATH`` for a journal file that several processes may share."""
    import warnings

    import optuna

    check_storage(url)

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url.removeprefix("journal:")
        try:
            return JournalStorage(JournalFileBackend(path))
        except OSError as error:
            raise TuneError(
                f"--storage: cannot open the journal file {path!r} ({error.strerror}); "
                "give a file in an existing, writable folder"
            ) from None
    if not re.match(r"^[a-z0-9+]+://", url):
        raise UsageError(
            f"--storage: {url!r} is not a storage URL; use sqlite:///PATH, journal:PATH or postgresql://..."
        )
    engine = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite:") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180)
        except Exception as exc:  # driver missing, server unreachable, bad URL
            # Tuners opening an empty database together race on CREATE TABLE; the loser retries
            # (PostgreSQL: IntegrityError/ProgrammingError; SQLite: "table studies already exists").
            racing = type(exc).__name__ in {"IntegrityError", "ProgrammingError"} or "already exists" in str(exc)
            if racing and attempt < 4:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise TuneError(
                f"--storage: cannot open {shown_storage(url)!r} ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None


def shown_storage(url: str) -> str:
    """The storage URL as it may be printed: a database password replaced by ***."""
    if "://" not in url or "@" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def this_runner() -> str:
    """``host:pid`` of this tuner, as a trial records it (`advisor.run.trials.set_runner`)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def runner_alive(runner: str | None) -> bool:
    """Whether the tuner a trial names (`advisor.run.trials.runner_of`, ``host:pid``) may still run it: on this machine,
    its process is alive; on another, nothing here can say otherwise."""
    host, _, pid = str(runner or "").rpartition(":")
    return host != socket.gethostname() or not pid.isdigit() or pid_alive(int(pid))


def fail_orphaned_trials(storage, study: str) -> list[int]:
    """Mark failed the RUNNING trials whose tuner ran on this machine and is gone (killed with -9,
    or the machine rebooted); returns their numbers. A later step re-measures their points.

    A trial of a tuner on another machine is left to the storage's heartbeat (RDB storages fail it
    once its heartbeat is stale), since no process table here can say whether it lives."""
    import optuna

    failed = []
    study_id = storage.get_study_id_from_name(study)
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not runner_alive(runner_of(trial)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            if storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL):
                failed.append(trial.number)
    return failed


@contextlib.contextmanager
def sole_tuner(storage_url: str, study: str) -> Iterator[None]:
    """Hold the study's lock file next to an SQLite storage for as long as inside; a second tuner of
    the same study is refused in one line (two tuners on one SQLite study measure the same
    configurations twice, on one machine, and slow each other's timings). The lock is an ``flock``:
    the kernel releases it when the holder dies, however it dies. Journal and PostgreSQL storages
    are meant to be shared, across machines: no lock."""
    path = storage_url.removeprefix("sqlite:///") if storage_url.startswith("sqlite:///") else None
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    lock = Path(f"{path}.{re.sub(r'[^A-Za-z0-9._-]+', '_', study)[:100]}.lock")
    try:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise TuneError(f"--storage: cannot create the study's lock file {lock} ({error.strerror})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
            raise TuneError(
                f"--study: another advisor tune (pid {holder}) is working study {study} in {path}; wait for it to finish, "
                "or give this one another --study or --storage"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(handle)  # releases the lock
