"""SQLite-only behaviour: URL forms, file errors, several processes on one file, write economy."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import anyio
import pytest

from concierge.errors import ConfigurationError, StateUnavailableError
from concierge.state import Commit, backend_from_url
from concierge.state.sqlite import SQLiteBackend

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
NOW = 1_000_000.0


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    b = SQLiteBackend(tmp_path / "state.db")
    async with b:
        yield b


# -- URLs ---------------------------------------------------------------------------


def test_sqlite_url_with_three_slashes_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    b = backend_from_url("sqlite:///sub/state.db")
    assert isinstance(b, SQLiteBackend)
    assert b.path == tmp_path / "sub" / "state.db"


def test_sqlite_url_with_four_slashes_is_absolute(tmp_path: Path) -> None:
    b = backend_from_url(f"sqlite:///{tmp_path}/state.db")
    assert isinstance(b, SQLiteBackend) and b.path == tmp_path / "state.db"


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///", "sqlite:relative.db", "sqlite://host/state.db", "sqlite:///dir/", "sqlite:///x.db?mode=ro"],
)
def test_sqlite_malformed_url_is_a_configuration_error_naming_the_forms(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"sqlite:///relative/path\.db .* sqlite:////absolute/path\.db"):
        backend_from_url(url)


# -- file errors ----------------------------------------------------------------------


async def test_sqlite_missing_directory_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    b = backend_from_url(f"sqlite:///{tmp_path}/missing/state.db")
    with pytest.raises(StateUnavailableError, match=r"directory '.*/missing' does not exist"):
        await b.open()
    assert not (tmp_path / "missing").exists()
    await b.close()


async def test_sqlite_file_is_created_on_first_open(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with SQLiteBackend(path) as b:
        assert path.exists()
        async with b._transaction(write=False) as tx:
            (mode,) = (await tx.fetch("PRAGMA journal_mode"))[0]
            (timeout,) = (await tx.fetch("PRAGMA busy_timeout"))[0]
    assert mode == "wal" and timeout == 5000


def _python_without_root_powers() -> list[str]:
    """A command prefix under which file permissions apply even to root (who otherwise bypasses them)."""
    if os.geteuid() != 0:
        return [sys.executable]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file read-only to this process")
    drop = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", drop, "--inh-caps", drop, sys.executable]


async def test_sqlite_read_only_file_is_a_clear_error_at_open(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    async with SQLiteBackend(path) as b:
        await b.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    path.chmod(0o444)
    probe = textwrap.dedent(
        f"""
        import asyncio
        from concierge.errors import StateUnavailableError
        from concierge.state import backend_from_url
        async def main():
            try:
                await backend_from_url({f"sqlite:///{path}"!r}).open()
            except StateUnavailableError as exc:
                print(exc)
            else:
                print("OPENED")
        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [*_python_without_root_powers(), "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert str(path) in done.stdout and "read-only" in done.stdout, done.stdout


# -- several processes ------------------------------------------------------------------


# -- what a commit and a load cost -------------------------------------------------------------


async def test_sqlite_commit_of_one_key_writes_one_value_row_in_a_large_session(backend: SQLiteBackend) -> None:
    await backend.commit(Commit("big", 0, {f"k{i}": str(i) for i in range(1000)}), now=NOW)
    conn = backend._conn
    assert conn is not None
    before = conn.total_changes
    await backend.commit(Commit("big", 1, {"k5": "55"}), now=NOW)
    assert conn.total_changes - before == 2  # the session row and one value row
    record = await backend.load("big", now=NOW)
    assert record is not None and record.values is not None and len(record.values) == 1000
    assert record.values["k5"] == "55"


async def test_sqlite_load_with_current_known_version_runs_one_query_on_sessions_only(backend: SQLiteBackend) -> None:
    await backend.commit(Commit("big", 0, {f"k{i}": str(i) for i in range(1000)}), now=NOW)
    conn = backend._conn
    assert conn is not None
    statements: list[str] = []
    await conn.set_trace_callback(statements.append)
    record = await backend.load("big", now=NOW, known_version=1)
    stale = await backend.load("big", now=NOW, known_version=0)
    await conn.set_trace_callback(None)
    assert record is not None and record.values is None
    assert stale is not None and stale.values is not None and len(stale.values) == 1000
    assert len(statements) == 3, statements  # 1 for the current version, 2 for the stale one
    assert "concierge_values" not in statements[0]


async def test_sqlite_deleting_a_session_deletes_its_value_rows(backend: SQLiteBackend, tmp_path: Path) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1", "b": "2"}), now=NOW)
    await backend.commit(Commit("s2", 0, {"a": "1"}), now=NOW)
    await backend.commit(Commit("s3", 0, {"a": "1"}, expires_at=NOW + 1), now=NOW)
    await backend.delete("s1")
    assert await backend.clear_expired(now=NOW + 1) == 1
    async with aiosqlite.connect(tmp_path / "state.db") as raw:
        async with raw.execute("SELECT session_id, count(*) FROM concierge_values GROUP BY session_id") as cur:
            assert await cur.fetchall() == [("s2", 1)]


async def test_sqlite_rolled_back_commit_leaves_no_trace(backend: SQLiteBackend) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    # a value the driver cannot bind fails mid-transaction, after the version bump and one value row
    with pytest.raises(sqlite3.Error):
        await backend.commit(Commit("s1", 1, {"b": "2", "c": object()}), now=NOW)  # type: ignore[dict-item]
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values) == (1, {"a": "1"})
    assert await backend.commit(Commit("s1", 1, {"b": "2"}), now=NOW) == 2


async def test_sqlite_busy_file_is_reported_as_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    async with SQLiteBackend(path) as b:
        await b.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    blocker = await aiosqlite.connect(path, isolation_level=None)
    try:
        async with SQLiteBackend(path, busy_timeout=0.2) as b:
            await blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            started = time.monotonic()
            with pytest.raises(StateUnavailableError, match=r"busy_timeout=0\.2s"):
                await b.commit(Commit("s1", 1, {"a": "2"}), now=NOW)
            assert time.monotonic() - started < 5
            record = await b.load("s1", now=NOW)  # WAL: readers are not blocked by the writer
            assert record is not None and record.values == {"a": "1"}
    finally:
        await blocker.execute("ROLLBACK")
        await blocker.close()



async def test_sqlite_connections_switching_a_new_file_to_wal_at_once_all_open(tmp_path: Path) -> None:
    # SQLite answers the WAL pragma with SQLITE_BUSY at once (no busy_timeout) when two
    # connections switch one new file together; the backend must wait it out, not fail.
    # (Three connections per file, 200 files: without the retry about 1 open in 30 fails.)
    failures: list[BaseException] = []

    async def connect(backend: SQLiteBackend) -> None:
        try:
            await backend._connect()
        except Exception as exc:  # collected, so every failure is reported at once
            failures.append(exc)
        finally:
            await backend._disconnect()

    for attempt in range(200):
        path = tmp_path / f"new{attempt}.db"
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(connect, SQLiteBackend(path))
    assert failures == []
