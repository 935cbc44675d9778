"""advisor tune --workers and shared storage: workers on a journal file and on PostgreSQL, refused
where they would share a device or an SQLite file, and processes racing to create a new database.
The PostgreSQL tests run where ADVISOR_TEST_POSTGRES_URL is set (CI: scripts/ci_postgres.sh) and
skip elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tuning import (
    ADVISOR,
    POSTGRES_URL,
    advisor,
    complete,
    cpu_target,
    load_study,
    needs_postgres,
    ran_to_its_end,
    space,
    tune_args,
)

from advisor.run.storage import open_storage


pytestmark = pytest.mark.usefixtures("private_cache")


# --- several workers on one study -------------------------------------------------------------------------


def check_shared_study(study, trials: int, points: frozenset[str]) -> None:
    """What several workers must leave behind: every trial once, none lost, the study finished."""
    everything = study.get_trials(deepcopy=False)
    numbers = [t.number for t in everything]
    assert sorted(numbers) == list(range(len(numbers))), f"trial numbers {numbers}"
    assert not [t.number for t in everything if t.state.name == "RUNNING"]  # every worker finished its trial
    finished = complete(study)
    assert all("status" in t.user_attrs and "source" in t.user_attrs for t in finished), (
        "a finished trial lost its result"
    )
    assert ran_to_its_end(study, trials, points)
    # No configuration is measured twice: a worker reuses the measurement of a finished trial, and
    # leaves a configuration another worker is measuring to it.
    measured = [
        json.dumps(t.user_attrs["config"], sort_keys=True) for t in finished if t.user_attrs["source"] == "measured"
    ]
    assert len(measured) == len(set(measured)), [
        (t.number, t.params) for t in finished if t.user_attrs["source"] == "measured"
    ]


@pytest.mark.slow
def test_two_workers_share_a_journal_file(tiny_flux_dir, shared_device_env, tmp_path):
    storage = f"journal:{tmp_path / 'journal.log'}"
    # --workers 2: two `advisor tune` processes started at once on the shared study.
    result = advisor(
        tune_args(tiny_flux_dir, storage, "--study", "shared", "--workers", "2", "--json", trials=2), shared_device_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "advisor: error" not in result.stderr  # no worker failed
    study = load_study(storage, "shared")
    check_shared_study(study, 2, space(tiny_flux_dir))
    data = json.loads(result.stdout)
    assert data["study"] == "shared" and data["fits"] is True
    assert [t["number"] for t in data["trials"]] == [t.number for t in complete(study)]
    assert any("shared one device" in note and "not comparable" in note for note in data["notes"])


def test_workers_that_would_share_one_device_are_refused(tiny_flux_dir, env, tmp_path):
    if not cpu_target():
        pytest.skip("with GPUs, workers get one each")
    storage = tmp_path / "journal.log"
    result = advisor(tune_args(tiny_flux_dir, f"journal:{storage}", "--workers", "2"), env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [
        line for line in result.stderr.strip().splitlines() if not line.startswith("advisor: tracing")
    ]  # first use of the model
    assert len(lines) == 1 and lines[0].startswith(
        "advisor: error: --workers: 2 workers would share this machine's CPU"
    ), result.stderr
    assert "--workers 1" in lines[0]
    assert not storage.exists()  # refused before any study was opened


def test_a_second_tuner_of_one_sqlite_study_is_refused_while_the_first_runs(tiny_flux_dir, env, tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    args = tune_args(tiny_flux_dir, storage, "--study", "one", "--quiet")
    first = subprocess.Popen([ADVISOR, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(t.state.name == "RUNNING" for t in _trials_or_none(storage, "one")):
            assert first.poll() is None and time.monotonic() < deadline, "the first tuner never started a trial"
            time.sleep(0.2)
        second = advisor(args, env, timeout=120)
        assert second.returncode == 1, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert lines == [
            f"advisor: error: --study: another advisor tune (pid {first.pid}) is working study one in "
            f"{tmp_path / 's.db'}; wait for it to finish, or give this one another --study or --storage"
        ], second.stderr
        assert first.poll() is None  # the first one goes on
    finally:
        first.kill()
        first.wait()
    # The lock died with its holder: the same command now runs.
    assert advisor([*args[:-1], "--trials", "1"], env).returncode == 0


def _trials_or_none(storage: str, name: str) -> list:
    try:
        return load_study(storage, name).get_trials()
    except Exception:  # no study yet
        return []


def open_at_once(url: str, go: Path, count: int) -> list[str]:
    """What `count` processes print that open storage `url` together, once all are imported and waiting."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", _OPEN_AT_ONCE, url, str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    for process in processes:  # every one imported and waiting
        assert process.stdout.readline().strip() == "ready"
    go.touch()
    return [process.communicate(timeout=120)[0].strip() for process in processes]


def test_processes_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path):
    assert open_at_once(f"sqlite:///{tmp_path / 'new.db'}", tmp_path / "go", 6) == ["ok"] * 6


@pytest.fixture
def postgres_url():
    """ADVISOR_TEST_POSTGRES_URL with a fresh schema of its own (dropped afterwards), so runs never
    see each other's studies."""
    import sqlalchemy

    schema = f"advisor_test_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    url = sqlalchemy.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@needs_postgres
@pytest.mark.slow
def test_two_processes_share_a_postgres_study(tiny_flux_dir, env, postgres_url):
    # Create optuna's tables first: two processes that both find an empty database race to create
    # them; open_storage retries (see the test below).
    open_storage(postgres_url).engine.dispose()
    args = tune_args(tiny_flux_dir, postgres_url, "--study", "shared", "--quiet", trials=3)
    processes = [
        subprocess.Popen([ADVISOR, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    check_shared_study(load_study(postgres_url, "shared"), 3, space(tiny_flux_dir))


_OPEN_AT_ONCE = """
import os, sys, time
from advisor.run.storage import open_storage
import optuna, sqlalchemy
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
try:
    open_storage(sys.argv[1])
    print("ok")
except Exception as error:
    print(f"failed: {error}"[-300:])
"""


@needs_postgres
def test_processes_opening_an_empty_postgres_database_at_once_all_succeed(postgres_url, tmp_path):
    assert open_at_once(postgres_url, tmp_path / "go", 4) == ["ok"] * 4


def test_several_workers_need_a_shared_storage(tiny_flux_dir, env, tmp_path):
    for storage in ([], ["--storage", f"sqlite:///{tmp_path / 's.db'}"]):
        result = advisor(
            ["tune", "--model", str(tiny_flux_dir), "--budget", "2GB", "--workers", "2", *storage], env, timeout=120
        )
        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("advisor: error: --workers:"), result.stderr
    assert not (Path(env["XDG_CACHE_HOME"]) / "advisor" / "studies.db").exists()


@pytest.mark.slow
def test_workers_from_main_in_process_get_mains_arguments(tiny_flux_dir, tmp_path, capsys, monkeypatch):
    from advisor.cli import main
    from advisor.run.workers import SHARED_DEVICE_ENV

    monkeypatch.setenv(SHARED_DEVICE_ENV, "1")

    storage = f"journal:{tmp_path / 'journal.log'}"
    code = main(tune_args(tiny_flux_dir, storage, "--workers", "2", "--quiet", trials=1))
    assert code == 0, capsys.readouterr().err[-3000:]
