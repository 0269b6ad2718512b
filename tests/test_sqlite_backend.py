"""SQLite-only behaviour: URL forms, durability setting, file errors, several processes on one file, write economy,
and the SQL schema's migrations (`SQLMigrationTests`, which test_postgres_backend.py runs on PostgreSQL too)."""

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
from typing import Any

import aiosqlite
import anyio
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
    async def no_wal(self: SQLiteBackend, conn: aiosqlite.Connection) -> Any:
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


class _ThreadCalls:
    """Counts the awaited calls a backend makes on its aiosqlite connection: one trip to its thread each."""

    METHODS = ("execute", "execute_fetchall", "executemany", "executescript", "commit", "rollback", "cursor")

    def __init__(self, conn: aiosqlite.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in self.METHODS:
            monkeypatch.setattr(conn, name, self._counting(name, getattr(conn, name)))

    def _counting(self, name: str, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)

        return call

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


async def test_sqlite_load_is_one_call_and_an_update_one(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.commit(Commit("s1", 0, {"count": "0"}), now=NOW)
    conn = backend._conn
    assert conn is not None
    counted = _ThreadCalls(conn, monkeypatch)
    record = await backend.load("s1", now=NOW, known_version=1)
    assert record is not None and record.values is None
    assert counted.take() == ["execute_fetchall"]
    # an update of a live session: one statement, whatever keys it writes or deletes, and the stage
    assert await backend.commit(Commit("s1", 1, {"count": "1"}), now=NOW) == 2
    assert counted.take() == ["execute"]
    assert await backend.commit(Commit("s1", 2, {"a": "1", "b": "2", "count": None}, stage="pay"), now=NOW) == 3
    assert counted.take() == ["execute"]
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values, record.stage) == (3, {"a": "1", "b": "2"}, "pay")
    counted.take()
    # a checkpoint, a clear or several sessions: one transaction of several statements
    assert await backend.commit(Commit("s1", 3, {"a": "2"}, clear=True), now=NOW) == 4
    assert counted.take() == ["execute", "execute", "execute", "execute"]
    assert await backend.touch("s1", expires_at=None, now=NOW)
    assert counted.take() == ["execute", "execute"]


async def test_sqlite_one_statement_update_is_all_or_nothing(backend: SQLiteBackend) -> None:
    """A statement that fails after the trigger has bumped the version leaves the session as it was."""
    await backend.commit(Commit("s1", 0, {"a": "1", "b": "1"}), now=NOW)
    conn = backend._conn
    assert conn is not None
    # a NULL value breaks the values table's NOT NULL after the bump and the delete have run
    args = ("s1", 1, NOW, None, True, "paid", '["b"]', '{"a":"2","c":null}')
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        await conn.execute(sqlite_module._COMMIT_IN_ONE, args)
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
    conn = backend._conn
    assert conn is not None
    counted = _ThreadCalls(conn, monkeypatch)
    assert await backend.commit(Commit("s1", 1, {"a": "2", "b": None}), now=NOW) == 2
    # the version bump (with the BEGIN IMMEDIATE sqlite3 sends before it), the delete, the value, COMMIT
    assert counted.take() == ["execute", "execute", "execute", "execute"]
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
    await conn.set_trace_callback(statements.append)
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    await backend.commit(Commit("s1", 1, {"a": "2", "b": None}), now=NOW)
    await backend.commit_all([Commit("s1", 2, {"a": "3"}), Commit("s2", 0, {"a": "1"})], now=NOW)
    await backend.touch("s1", expires_at=NOW + 1, now=NOW)
    assert [s.expires_at for s in await backend.take_expired(now=NOW + 1, limit=10)] == [NOW + 1]
    async with backend._transaction(write=True) as tx:  # a first statement sqlite3 would not open one for
        await tx.fetch("SELECT count(*) FROM concierge_sessions")
    await conn.set_trace_callback(None)
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
    await conn.set_trace_callback(statements.append)
    with pytest.raises(sqlite3.Error):  # several statements: the general path's transaction
        await backend.commit_all([Commit("s1", 1, bad)], now=NOW)  # type: ignore[arg-type]
    await conn.set_trace_callback(None)
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
        rows = await raw.execute_fetchall("SELECT session_id, count(*) FROM concierge_values GROUP BY session_id")
    assert list(rows) == [("s2", 1)]


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
            await blocker.rollback()
            assert await b.commit(Commit("s1", 1, {"a": "2"}), now=NOW) == 2  # nothing left half-open
    finally:
        await blocker.rollback()
        await blocker.close()


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
