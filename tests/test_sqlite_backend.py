"""SQLite-only behaviour: URL forms, durability setting, file errors, several processes on one file, write economy,
where statements run (event loop or worker thread), the change feed, and the SQL schema's migrations
(`SQLMigrationTests`, which test_postgres_backend.py runs on PostgreSQL too)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from concierge.errors import ConfigurationError, ConflictError, StateUnavailableError
from concierge.state import Commit, StateBackend, backend_from_url
from concierge.state import _sql_schema as sql_schema
from concierge.state import sqlite as sqlite_module
from concierge.state._sql import SQLBackend
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
    [
        "sqlite://",
        "sqlite:///",
        "sqlite:relative.db",
        "sqlite://host/state.db",
        "sqlite:///dir/",
        "sqlite:///x.db?mode=ro",
        "sqlite:///x.db#top",
        "sqlite:///?synchronous=full",
    ],
)
def test_sqlite_malformed_url_is_a_configuration_error_naming_the_forms(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"sqlite:///relative/path\.db .* sqlite:////absolute/path\.db"):
        backend_from_url(url)


# -- durability: synchronous ----------------------------------------------------------


def test_sqlite_synchronous_defaults_to_normal(tmp_path: Path) -> None:
    assert SQLiteBackend(tmp_path / "state.db").synchronous == "normal"
    b = backend_from_url(f"sqlite:///{tmp_path}/state.db")
    assert isinstance(b, SQLiteBackend) and b.synchronous == "normal"


@pytest.mark.parametrize(
    ("query", "expected"),
    [("synchronous=full", "full"), ("synchronous=normal", "normal"), ("synchronous=FULL", "full")],
)
def test_sqlite_url_sets_synchronous(tmp_path: Path, query: str, expected: str) -> None:
    b = backend_from_url(f"sqlite:///{tmp_path}/state.db?{query}")
    assert isinstance(b, SQLiteBackend)
    assert (b.synchronous, b.path) == (expected, tmp_path / "state.db")


@pytest.mark.parametrize(
    "query",
    [
        "synchronous=off",
        "synchronous=extra",
        "synchronous=",
        "synchronous",
        "synchronous=full&synchronous=normal",
        "synchronous=full&mode=ro",
        "Synchronous=full",
        "journal_mode=delete",
    ],
)
def test_sqlite_url_with_any_other_query_is_a_configuration_error(tmp_path: Path, query: str) -> None:
    with pytest.raises(ConfigurationError, match=r"synchronous=normal .* synchronous=full") as caught:
        backend_from_url(f"sqlite:///{tmp_path}/state.db?{query}")
    assert "sqlite:////absolute/path.db" in str(caught.value)


def test_sqlite_synchronous_argument_is_checked(tmp_path: Path) -> None:
    assert SQLiteBackend(tmp_path / "state.db", synchronous="full").synchronous == "full"
    with pytest.raises(ConfigurationError, match=r"synchronous='off'.*'normal' or 'full'"):
        SQLiteBackend(tmp_path / "state.db", synchronous="off")  # type: ignore[arg-type]


async def _synchronous_in_effect(b: SQLiteBackend) -> int:
    async with b._transaction(write=False) as tx:
        (level,) = (await tx.fetch("PRAGMA synchronous"))[0]
    return level


@pytest.mark.parametrize(("setting", "pragma"), [("normal", 1), ("full", 2)])
async def test_sqlite_synchronous_is_in_effect_on_the_connection(tmp_path: Path, setting: str, pragma: int) -> None:
    async with SQLiteBackend(tmp_path / "kwarg.db", synchronous=setting) as b:  # type: ignore[arg-type]
        assert await _synchronous_in_effect(b) == pragma
    from_url = backend_from_url(f"sqlite:///{tmp_path}/url.db?synchronous={setting}")
    assert isinstance(from_url, SQLiteBackend)
    async with from_url as b:
        assert await _synchronous_in_effect(b) == pragma
        await b.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
        assert await _synchronous_in_effect(b) == pragma  # still so after a write transaction


async def test_sqlite_without_wal_every_commit_is_flushed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # NORMAL is crash-safe only with WAL: on a file that stays in rollback-journal mode, FULL is used.
    def no_wal(self: SQLiteBackend, conn: sqlite3.Connection) -> Any:
        return ("delete",)

    monkeypatch.setattr(SQLiteBackend, "_enable_wal", no_wal)
    async with SQLiteBackend(tmp_path / "state.db") as b:
        assert await _synchronous_in_effect(b) == 2
        await b.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
        assert (await b.load("s1", now=NOW)).values == {"a": "1"}  # type: ignore[union-attr]


# -- file errors ----------------------------------------------------------------------


async def test_sqlite_missing_directory_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    b = backend_from_url(f"sqlite:///{tmp_path}/missing/state.db")
    with pytest.raises(StateUnavailableError, match=r"directory '.*/missing' does not exist"):
        await b.open()
    assert not (tmp_path / "missing").exists()
    await b.close()


async def test_sqlite_file_is_created_on_first_open_in_wal_mode_and_never_waits_on_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with SQLiteBackend(path) as b:
        assert path.exists()
        async with b._transaction(write=False) as tx:
            (mode,) = (await tx.fetch("PRAGMA journal_mode"))[0]
            (timeout,) = (await tx.fetch("PRAGMA busy_timeout"))[0]
            (autocheckpoint,) = (await tx.fetch("PRAGMA wal_autocheckpoint"))[0]
    # busy_timeout (5 s) applies in the worker thread only; the backend checkpoints the log itself
    assert (mode, timeout, autocheckpoint) == ("wal", 0, 0)


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
    with anyio.fail_after(30):
        done = await anyio.run_process([*_python_without_root_powers(), "-c", probe], cwd=REPO, check=False)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stderr
    assert str(path) in stdout and "read-only" in stdout, stdout


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


class _Seen:
    """The statements a backend's connection runs - each with whether it ran on the event loop's thread - and
    the hops to a worker thread (`anyio.to_thread.run_sync` calls, with the function sent)."""

    def __init__(self) -> None:
        self.loop = threading.get_ident()
        self.statements: list[tuple[str, bool]] = []
        self.hops: list[Any] = []

    def trace(self, statement: str) -> None:
        self.statements.append((statement, threading.get_ident() == self.loop))

    def take(self) -> tuple[list[str], list[str], int]:
        """The first words of the statements run on the loop and of those run in a thread (a trigger's
        statement is traced once per statement of its trigger: counted once), and the number of hops."""
        statements, self.statements = self.statements, []
        hops, self.hops = self.hops, []
        on_loop: list[str] = []
        in_thread: list[str] = []
        previous = None
        for statement, loop in statements:
            if statement != previous:
                (on_loop if loop else in_thread).append(statement.split()[0].upper())
            previous = statement
        return on_loop, in_thread, len(hops)


@contextmanager
def _seeing(b: SQLiteBackend, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Seen]:
    seen = _Seen()
    real = anyio.to_thread.run_sync

    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        seen.hops.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)
    conn = b._conn
    assert conn is not None
    conn.set_trace_callback(seen.trace)
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)
        monkeypatch.setattr(anyio.to_thread, "run_sync", real)


async def test_sqlite_load_and_update_are_one_statement_each_run_on_the_event_loop(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.commit(Commit("s1", 0, {"count": "0"}), now=NOW)
    with _seeing(backend, monkeypatch) as seen:
        record = await backend.load("s1", now=NOW, known_version=1)
        assert record is not None and record.values is None
        assert seen.take() == (["SELECT"], [], 0)
        # an update of a live session: one statement, whatever keys it writes or deletes, and the stage
        assert await backend.commit(Commit("s1", 1, {"count": "1"}), now=NOW) == 2
        assert seen.take() == (["WITH"], [], 0)
        assert await backend.commit(Commit("s1", 2, {"a": "1", "b": "2", "count": None}, stage="pay"), now=NOW) == 3
        assert seen.take() == (["WITH"], [], 0)
        record = await backend.load("s1", now=NOW)
        assert record is not None and (record.version, record.values, record.stage) == (3, {"a": "1", "b": "2"}, "pay")
        seen.take()
        # a checkpoint, a clear or several sessions: one transaction of several statements, on the loop too
        assert await backend.commit(Commit("s1", 3, {"a": "2"}, clear=True), now=NOW) == 4
        assert seen.take() == (["BEGIN", "UPDATE", "DELETE", "INSERT", "COMMIT"], [], 0)
        assert await backend.touch("s1", expires_at=None, now=NOW)
        assert seen.take() == (["BEGIN", "UPDATE", "COMMIT"], [], 0)


async def test_sqlite_one_statement_update_is_all_or_nothing(backend: SQLiteBackend) -> None:
    """A statement that fails after the trigger has bumped the version leaves the session as it was."""
    await backend.commit(Commit("s1", 0, {"a": "1", "b": "1"}), now=NOW)
    conn = backend._conn
    assert conn is not None
    # a NULL value breaks the values table's NOT NULL after the bump and the delete have run
    args = ("s1", 1, NOW, None, True, "paid", '["b"]', '{"a":"2","c":null}')
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        conn.execute(sqlite_module._COMMIT_IN_ONE, args)
    assert not conn.in_transaction
    record = await backend.load("s1", now=NOW)
    assert record is not None
    assert (record.version, record.values, record.stage) == (1, {"a": "1", "b": "1"}, None)
    assert await backend.commit(Commit("s1", 1, {"a": "2", "b": None}), now=NOW) == 2
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values) == (2, {"a": "2"})


async def test_sqlite_one_statement_update_reports_conflicts_and_writes_nothing(backend: SQLiteBackend) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    with pytest.raises(ConflictError, match="at version 1, expected 5"):
        await backend.commit(Commit("s1", 5, {"a": "2"}), now=NOW)
    await backend.commit(Commit("gone", 0, {"a": "1"}, expires_at=NOW + 1), now=NOW)
    with pytest.raises(ConflictError, match="no longer exists"):
        await backend.commit(Commit("gone", 1, {"a": "2"}), now=NOW + 1)
    with pytest.raises(ConflictError, match="no longer exists"):
        await backend.commit(Commit("never", 3, {"a": "2"}), now=NOW)
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values) == (1, {"a": "1"})
    assert await backend.load("never", now=NOW) is None


async def test_sqlite_without_json_functions_updates_take_the_general_path(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "_one_statement", False)
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    with _seeing(backend, monkeypatch) as seen:
        assert await backend.commit(Commit("s1", 1, {"a": "2", "b": None}), now=NOW) == 2
        # the version bump (with the BEGIN IMMEDIATE sqlite3 sends before it), the delete, the value, COMMIT
        assert seen.take() == (["BEGIN", "UPDATE", "DELETE", "INSERT", "COMMIT"], [], 0)
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values) == (2, {"a": "2"})


def _transactions(statements: list[str]) -> list[list[str]]:
    """Trace lines grouped by transaction; fails on a statement run outside one."""
    groups: list[list[str]] = []
    current: list[str] | None = None
    previous = ""
    for statement in statements:
        word = statement.split()[0].upper()
        if statement.startswith("WITH commit_row") and current is None:
            # the one-statement update: atomic on its own (traced once per statement of its trigger)
            if not groups or groups[-1] != ["ONE STATEMENT"] or statement != previous:
                groups.append(["ONE STATEMENT"])
            previous = statement
            continue
        previous = ""
        if word == "BEGIN":
            assert current is None and statement == "BEGIN IMMEDIATE", statements
            current = []
        elif word in ("COMMIT", "ROLLBACK"):
            assert current is not None, statements
            groups.append([*current, word])
            current = None
        else:
            assert current is not None, f"{statement!r} ran outside a transaction: {statements}"
            current.append(word)
    assert current is None, statements
    return groups


async def test_sqlite_every_write_runs_inside_one_begin_immediate_transaction(backend: SQLiteBackend) -> None:
    conn = backend._conn
    assert conn is not None
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    await backend.commit(Commit("s1", 1, {"a": "2", "b": None}), now=NOW)
    await backend.commit_all([Commit("s1", 2, {"a": "3"}), Commit("s2", 0, {"a": "1"})], now=NOW)
    await backend.touch("s1", expires_at=NOW + 1, now=NOW)
    assert [s.expires_at for s in await backend.take_expired(now=NOW + 1, limit=10)] == [NOW + 1]
    async with backend._transaction(write=True) as tx:  # a first statement sqlite3 would not open one for
        await tx.fetch("SELECT count(*) FROM concierge_sessions")
    conn.set_trace_callback(None)
    groups = _transactions(statements)
    assert len(groups) == 6, groups
    assert groups[1] == ["ONE STATEMENT"]
    assert groups[2][0] == "UPDATE" and groups[2][-1] == "COMMIT"  # commit_all: one transaction
    assert groups[4][0] == "SELECT"
    assert groups[5] == ["SELECT", "COMMIT"]


@pytest.mark.parametrize("bad", [{"c": object()}, {"b": "2", "c": object()}], ids=["one row", "two rows"])
async def test_sqlite_failed_write_is_rolled_back_and_the_connection_stays_usable(
    backend: SQLiteBackend, bad: dict[str, object]
) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    conn = backend._conn
    assert conn is not None
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    with pytest.raises(sqlite3.Error):  # several statements: the general path's transaction
        await backend.commit_all([Commit("s1", 1, bad)], now=NOW)  # type: ignore[arg-type]
    conn.set_trace_callback(None)
    assert _transactions(statements)[-1][-1] == "ROLLBACK"
    assert not conn.in_transaction
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values) == (1, {"a": "1"})
    assert await backend.commit(Commit("s1", 1, {"b": "2"}), now=NOW) == 2


async def test_sqlite_load_with_current_known_version_runs_one_query_on_sessions_only(backend: SQLiteBackend) -> None:
    await backend.commit(Commit("big", 0, {f"k{i}": str(i) for i in range(1000)}), now=NOW)
    conn = backend._conn
    assert conn is not None
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    record = await backend.load("big", now=NOW, known_version=1)
    stale = await backend.load("big", now=NOW, known_version=0)
    conn.set_trace_callback(None)
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
    raw = sqlite3.connect(tmp_path / "state.db")
    try:
        rows = raw.execute("SELECT session_id, count(*) FROM concierge_values GROUP BY session_id").fetchall()
    finally:
        raw.close()
    assert rows == [("s2", 1)]


async def test_sqlite_rolled_back_commit_leaves_no_trace(backend: SQLiteBackend) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    # a value the driver cannot bind fails mid-transaction, after the version bump and one value row
    # (several statements, as commit_all always sends; an update's single statement is tested above)
    with pytest.raises(sqlite3.Error):
        await backend.commit_all([Commit("s1", 1, {"b": "2", "c": object()})], now=NOW)  # type: ignore[dict-item]
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values) == (1, {"a": "1"})
    assert await backend.commit(Commit("s1", 1, {"b": "2"}), now=NOW) == 2


async def test_sqlite_busy_file_is_reported_as_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    async with SQLiteBackend(path) as b:
        await b.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        async with SQLiteBackend(path, busy_timeout=0.2) as b:
            blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            started = time.monotonic()
            with pytest.raises(StateUnavailableError, match=r"busy_timeout=0\.2s"):
                await b.commit(Commit("s1", 1, {"a": "2"}), now=NOW)
            assert 0.15 < time.monotonic() - started < 5  # it waited out busy_timeout, in the thread
            record = await b.load("s1", now=NOW)  # WAL: readers are not blocked by the writer
            assert record is not None and record.values == {"a": "1"}
            blocker.rollback()
            assert await b.commit(Commit("s1", 1, {"a": "2"}), now=NOW) == 2  # nothing left half-open
    finally:
        blocker.rollback()
        blocker.close()


# -- where statements run: the event loop, or a worker thread when they might wait ------------------


@contextmanager
def _write_lock_held(path: Path, seconds: float) -> Iterator[threading.Thread]:
    """Another connection to `path` holds its write lock from now, for `seconds` (released from a thread)."""
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(seconds, blocker.rollback)
    release.start()
    try:
        yield release
    finally:
        release.join()
        blocker.close()


class _Ticker:
    """The longest the event loop went without running a task that sleeps 10 ms at a time."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def run(self) -> None:
        last = time.perf_counter()
        while True:
            await anyio.sleep(0.01)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now


async def test_sqlite_commit_waiting_for_another_process_lock_waits_in_the_thread_without_stalling_the_loop(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    await backend.commit(Commit("s2", 0, {"a": "1"}), now=NOW)
    ticker = _Ticker()
    with _seeing(backend, monkeypatch) as seen:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await anyio.sleep(0.05)
            for commit in (Commit("s1", 1, {"a": "2"}), Commit("s2", 1, {"a": "2"}, clear=True)):
                ticker.longest = 0.0
                with _write_lock_held(backend.path, 0.2):
                    started = time.monotonic()
                    assert await backend.commit(commit, now=NOW) == 2
                    waited = time.monotonic() - started
                await anyio.sleep(0.03)  # the ticker's next wake-up measures a stall, if there was one
                assert waited > 0.15, waited  # it did wait for the lock
                assert ticker.longest < 0.1, ticker.longest  # ... and the loop kept running meanwhile
            tg.cancel_scope.cancel()
        on_loop, in_thread, hops = seen.take()
    # refused at once on the loop, then run again in the thread: the one statement; the general
    # path's transaction, from its first statement to its COMMIT
    assert on_loop.count("WITH") == 1 and in_thread.count("WITH") == 1
    assert in_thread[-4:] == ["UPDATE", "DELETE", "INSERT", "COMMIT"], in_thread
    assert hops == 5
    async with backend._transaction(write=False) as tx:
        assert await tx.fetch("PRAGMA busy_timeout") == [(0,)]  # never waiting on the loop again
    for sid in ("s1", "s2"):
        record = await backend.load(sid, now=NOW)
        assert record is not None and (record.version, record.values) == (2, {"a": "2"})


async def test_sqlite_commit_cancelled_while_waiting_for_the_lock_leaves_no_transaction_open(
    backend: SQLiteBackend,
) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    conn = backend._conn
    assert conn is not None
    for commit in (Commit("s2", 0, {"a": "1"}), Commit("s1", 1, {"a": "2"})):  # a creation, an update
        with _write_lock_held(backend.path, 0.2):
            with anyio.move_on_after(0.05):
                # waits in the thread for its first statement; cancelled at the next
                await backend.commit_all([commit], now=NOW)
                pytest.fail("the commit was not cancelled")
        assert not conn.in_transaction and not backend._lock.locked()
        assert conn.execute("PRAGMA busy_timeout").fetchone() == (0,)
    assert await backend.load("s2", now=NOW) is None
    other = sqlite3.connect(backend.path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock is free at once
        other.rollback()
    finally:
        other.close()
    assert await backend.commit(Commit("s1", 1, {"a": "3"}), now=NOW) == 2
    assert await backend.commit(Commit("s2", 0, {"a": "1"}), now=NOW) == 1
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.values == {"a": "3"}


async def test_sqlite_one_statement_commit_cancelled_in_the_thread_lands_whole_or_not_at_all(
    backend: SQLiteBackend,
) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1", "b": "1"}), now=NOW)
    with _write_lock_held(backend.path, 0.2):
        with anyio.move_on_after(0.05):
            await backend.commit(Commit("s1", 1, {"a": "2", "b": None}), now=NOW)
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values) in [(1, {"a": "1", "b": "1"}), (2, {"a": "2"})]
    assert await backend.commit(Commit("s1", record.version, {"c": "1"}), now=NOW) == record.version + 1


@pytest.mark.parametrize(("synchronous", "thread"), [("normal", []), ("full", ["WITH", "COMMIT"])])
async def test_sqlite_commits_run_in_the_thread_exactly_when_they_wait_for_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str, thread: list[str]
) -> None:
    async with SQLiteBackend(tmp_path / "state.db", synchronous=synchronous) as b:  # type: ignore[arg-type]
        await b.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
        with _seeing(b, monkeypatch) as seen:
            assert await b.commit(Commit("s1", 1, {"a": "2"}), now=NOW) == 2  # one statement
            assert await b.commit(Commit("s1", 2, {"a": "3"}, clear=True), now=NOW) == 3  # statements, COMMIT
            record = await b.load("s1", now=NOW, known_version=3)
            assert record is not None and record.values is None
            on_loop, in_thread, hops = seen.take()
    assert in_thread == thread
    assert hops == len(thread)
    assert on_loop[-1] == "SELECT"  # reads stay on the loop


async def test_sqlite_log_is_checkpointed_in_the_thread_after_about_1000_pages(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.commit(Commit("s1", 0, {"a": "0"}), now=NOW)
    with _seeing(backend, monkeypatch) as seen:
        for version in range(1, 401):  # 3 pages each, about 1200 in all
            await backend.commit(Commit("s1", version, {"a": str(version)}), now=NOW)
        on_loop, in_thread, hops = seen.take()
    assert in_thread == ["PRAGMA"] and hops == 1
    assert "PRAGMA" not in on_loop
    conn = backend._conn
    assert conn is not None
    busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert frames < 1000 and busy == 0  # the log was restarted after the checkpoint


# -- the change feed: PRAGMA data_version -----------------------------------------------------------


class _Changes:
    def __init__(self) -> None:
        self.calls: list[tuple[str | None, int | None]] = []

    def __call__(self, session_id: str | None, version: int | None) -> None:
        self.calls.append((session_id, version))

    def take(self) -> list[tuple[str | None, int | None]]:
        calls, self.calls = self.calls, []
        return calls


async def test_sqlite_feed_reports_another_connections_commit_once_and_its_own_never(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with SQLiteBackend(path) as first, SQLiteBackend(path) as second:
        changes = _Changes()
        assert await first.watch(changes) is True
        assert first.caught_up() and changes.take() == []
        await second.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
        assert first.caught_up() and changes.take() == [(None, None)]
        assert first.caught_up() and changes.take() == []  # once
        # its own commits, deletes and sweeps: nothing, whichever path and thread they took
        await first.commit(Commit("s2", 0, {"a": "1"}, expires_at=NOW + 1), now=NOW)
        await first.commit(Commit("s2", 1, {"a": "2"}, expires_at=NOW + 1), now=NOW)
        with _write_lock_held(path, 0.1):
            await first.commit(Commit("s2", 2, {"a": "3"}, expires_at=NOW + 1), now=NOW)  # in the thread
        assert [r.session_id for r in await first.take_expired(now=NOW + 1, limit=10)] == ["s2"]
        await first.commit(Commit("s3", 0, {"a": "1"}), now=NOW)
        assert await first.delete("s3")
        assert first.caught_up() and changes.take() == []
        # a change its own read has seen first is still reported
        await second.commit(Commit("s1", 1, {"a": "2"}), now=NOW)
        assert (await first.load("s1", now=NOW)).values == {"a": "2"}  # type: ignore[union-attr]
        assert first.caught_up() and changes.take() == [(None, None)]
        # a plain sqlite3 connection (another program) counts too
        raw = sqlite3.connect(path)
        try:
            raw.execute("DELETE FROM concierge_sessions WHERE id = 's1'")
            raw.commit()
        finally:
            raw.close()
        assert first.caught_up() and changes.take() == [(None, None)]


async def test_sqlite_feed_with_synchronous_full_reports_only_other_connections(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with SQLiteBackend(path, synchronous="full") as first, SQLiteBackend(path) as second:
        changes = _Changes()
        await first.watch(changes)
        await first.commit(Commit("s1", 0, {"a": "1"}), now=NOW)  # its COMMIT runs in the thread
        await first.commit(Commit("s1", 1, {"a": "2"}), now=NOW)  # the one statement too
        assert first.caught_up() and changes.take() == []
        await second.commit(Commit("s1", 2, {"a": "3"}), now=NOW)
        assert first.caught_up() and changes.take() == [(None, None)]


async def test_sqlite_not_caught_up_while_the_connection_is_busy_closed_or_unwatched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    b = SQLiteBackend(path)
    changes = _Changes()
    assert not b.caught_up()  # never opened
    async with b, SQLiteBackend(path) as other:
        assert not b.caught_up()  # not watched
        await b.watch(changes)
        await other.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
        async with b._connection():  # a task is using the connection
            assert not b.caught_up()
        assert changes.take() == []
        assert b.caught_up() and changes.take() == [(None, None)]  # delivered once it is idle
    assert not b.caught_up()  # closed: the feed has ended
    assert changes.take() == []


async def test_sqlite_connections_switching_a_new_file_to_wal_at_once_all_open(tmp_path: Path) -> None:
    # SQLite answers the WAL pragma with SQLITE_BUSY at once (no busy_timeout) when two
    # connections switch one new file together; the backend must wait it out, not fail.
    # (Three connections per file, 200 files: without the retry about 1 open in 30 fails.)
    failures: list[BaseException] = []

    async def connect(backend: SQLiteBackend) -> None:
        try:
            await backend._connect()
        except Exception as exc:  # noqa: BLE001 - collected, so every failure is reported at once
            failures.append(exc)
        finally:
            await backend._disconnect()

    for attempt in range(200):
        path = tmp_path / f"new{attempt}.db"
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(connect, SQLiteBackend(path))
    assert failures == []


# -- the SQL schema's migrations (PostgreSQL's tests run them too: test_postgres_backend.py) ----------


async def applied_migrations(b: StateBackend) -> list[int]:
    """The versions the store's migrations table records, in order."""
    assert isinstance(b, SQLBackend)
    async with b._transaction(write=False) as tx:
        rows = await tx.fetch("SELECT version FROM concierge_migrations ORDER BY version")
    return [int(r[0]) for r in rows]


_WORKER = """
import asyncio, os, sys, time
from concierge.state import Commit, backend_from_url
url, name, ready, go = sys.argv[1:5]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
async def main():
    async with backend_from_url(url) as b:
        await b.commit(Commit(name, 0, {"who": '"' + name + '"'}), now=1.0)
asyncio.run(main())
"""


def start_together(url: str, names: list[str], tmp: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run one worker per name, released at the same instant once all have imported."""
    go = tmp / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, name, str(tmp / f"ready-{name}"), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    deadline = time.monotonic() + 30
    while not all((tmp / f"ready-{n}").exists() for n in names) and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


class SQLMigrationTests:
    """`MIGRATIONS` on a SQL backend: applied once, safely when processes start at once, onto an older store.

    A subclass supplies `sql_url`: a state URL naming a fresh, empty store of its backend.
    """

    async def test_migrations_apply_once_however_often_the_store_is_opened(self, sql_url: str) -> None:
        expected = list(range(1, len(sql_schema.MIGRATIONS) + 1))
        for attempt in range(2):
            b = backend_from_url(sql_url)
            async with b:
                await b.open()  # a second open on the same object is a no-op too
                assert await applied_migrations(b) == expected
                await b.commit(Commit(f"s{attempt}", 0, {"a": "1"}), now=NOW)
                if attempt == 1:  # the schema was not recreated: the first run's data is still there
                    assert await b.load("s0", now=NOW) is not None

    async def test_processes_starting_at_once_on_one_empty_store_all_succeed(
        self, sql_url: str, tmp_path: Path
    ) -> None:
        names = [f"p{i}" for i in range(3)]
        for done in start_together(sql_url, names, tmp_path):
            assert done.returncode == 0, done.stderr
        async with backend_from_url(sql_url) as b:
            assert await applied_migrations(b) == list(range(1, len(sql_schema.MIGRATIONS) + 1))
            for name in names:
                record = await b.load(name, now=NOW)
                assert record is not None and record.values == {"who": f'"{name}"'}

    async def test_a_store_made_before_checkpoints_existed_is_migrated_and_keeps_its_sessions(
        self, sql_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        migrations = sql_schema.MIGRATIONS
        with monkeypatch.context() as patched:
            patched.setattr(sql_schema, "MIGRATIONS", migrations[:1])
            async with backend_from_url(sql_url) as old:  # the schema and data of a store before checkpoints
                assert isinstance(old, SQLBackend)
                async with old._transaction(write=True) as tx:
                    await tx.execute(
                        "INSERT INTO concierge_sessions (id, version, created_at, updated_at) VALUES ('s1', 1, $1, $1)",
                        NOW,
                    )
                    await tx.execute("INSERT INTO concierge_values (session_id, key, value) VALUES ('s1', 'a', '1')")
        async with backend_from_url(sql_url) as new:
            assert await applied_migrations(new) == list(range(1, len(migrations) + 1))
            assert await new.checkpoints("s1") == []
            record = await new.load("s1", now=NOW)
            assert record is not None and (record.version, record.values) == (1, {"a": "1"})
            await new.commit(Commit("s1", 1, {"a": "2"}, before={"a": "1"}, keep_checkpoints=10, tool="t"), now=NOW)
            assert [(c.version, c.previous) for c in await new.checkpoints("s1")] == [(2, {"a": "1"})]


class TestSQLiteMigrations(SQLMigrationTests):
    @pytest.fixture
    def sql_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'state.db'}"
