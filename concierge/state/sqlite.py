"""SQLite backend on aiosqlite: one file, shared safely by every process on the machine.

One connection per backend, used by one task at a time (an anyio lock), in
WAL mode so readers in other processes never block on a writer. Every write
is a `BEGIN IMMEDIATE` transaction: it takes the file's write lock up front
(waiting up to `busy_timeout` for another process), so two writers never
deadlock upgrading a read lock, and migrations run one process at a time.

Durability: by default the connection runs with `synchronous = NORMAL`, so a
commit does not wait for an fsync; an acknowledged commit survives the server
process crashing or being killed (it is in the WAL, in the OS page cache), but
the last commits before a power loss or OS crash may be lost (the file stays
consistent). `synchronous="full"` (or `?synchronous=full` in the URL) fsyncs
every commit and makes it survive power loss too, at about one disk flush per
call.

Each awaited aiosqlite call is one round trip to the connection's thread, the
main cost of a transaction, so statements are sent as few calls as possible:
a read is one call, a write transaction's `BEGIN IMMEDIATE` travels with its
first statement (see `_SQLiteTx`), and the commonest write - an update of a
live session's keys, with no checkpoint - is a single statement, one call (see
`_COMMIT_IN_ONE`).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosqlite
import anyio

from concierge.errors import ConfigurationError, StateUnavailableError
from concierge.state._sql import SQLBackend, Tx, compact_json
from concierge.state.base import UNCHANGED, Commit

__all__ = ["SQLiteBackend"]

logger = logging.getLogger("concierge")

# Primary result codes that mean "the file cannot be used right now", as
# opposed to a bug in a statement: BUSY, LOCKED, READONLY, IOERR, CORRUPT,
# FULL, CANTOPEN, PERM, NOTADB.
_UNAVAILABLE_CODES = {5, 6, 8, 10, 11, 13, 14, 3, 26}
_FORMS = "sqlite:///relative/path.db (relative to the working directory) or sqlite:////absolute/path.db"
_SYNCHRONOUS = ("normal", "full")
_OPTIONS = "the only query parameter is synchronous=normal (the default) or synchronous=full"

Synchronous = Literal["normal", "full"]

# The statements before which Python's sqlite3 module opens the transaction
# itself (with the connection's isolation level), within the same call. This
# test is stricter than the module's own (recent Pythons also skip leading
# comments there), so a statement it matches always opens one.
_OPENS_TRANSACTION = re.compile(r"[ \t\r\n]*(?:insert|update|delete|replace)", re.IGNORECASE)


# The version check, the bump and the changed keys as one statement, so that
# an update is one call to the connection's thread instead of three
# (statement, statement, COMMIT). SQLite has no data-modifying CTEs, so the
# statement is an INSERT into a view whose INSTEAD OF trigger does the work.
# Both are TEMP, created on each connection: nothing is added to the file's
# schema, and a TEMP trigger may write the main database's tables (unqualified
# names resolve to them, as no TEMP table shares their names). The
# RAISE(ABORT) undoes the whole statement, trigger included.
_COMMIT_VIEW = (
    "CREATE TEMP VIEW IF NOT EXISTS concierge_commit"
    " (session_id, expected, now, expires_at, stage_given, stage, removed, written)"
    " AS SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
)
_CONFLICT_MARK = "concierge: the version moved"
_COMMIT_TRIGGER = (
    "CREATE TEMP TRIGGER IF NOT EXISTS concierge_commit_apply INSTEAD OF INSERT ON concierge_commit BEGIN"
    f" SELECT RAISE(ABORT, '{_CONFLICT_MARK}') WHERE NOT EXISTS (SELECT 1 FROM concierge_sessions"
    "  WHERE id = NEW.session_id AND version = NEW.expected AND (expires_at IS NULL OR expires_at > NEW.now));"
    " UPDATE concierge_sessions SET version = version + 1, updated_at = NEW.now, expires_at = NEW.expires_at,"
    "  stage = CASE WHEN NEW.stage_given THEN NEW.stage ELSE stage END WHERE id = NEW.session_id;"
    " DELETE FROM concierge_values WHERE session_id = NEW.session_id"
    "  AND key IN (SELECT value FROM json_each(NEW.removed));"
    " INSERT INTO concierge_values (session_id, key, value)"
    "  SELECT NEW.session_id, key, value FROM json_each(NEW.written) WHERE true"
    "  ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value;"
    " END"
)
# It starts with WITH, not INSERT, so the sqlite3 module opens no transaction
# before it (it does so only before INSERT, UPDATE, DELETE and REPLACE): the
# statement runs on its own in autocommit mode, atomically, and commits as it
# ends. A write statement asks for the write lock before it reads anything,
# waiting out `busy_timeout` like `BEGIN IMMEDIATE` does.
_COMMIT_IN_ONE = (
    "WITH commit_row AS (SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) INSERT INTO concierge_commit SELECT * FROM commit_row"
)


@lru_cache(maxsize=128)
def _prepare(sql: str) -> tuple[str, bool]:
    """The shared `$n` placeholders as SQLite's numbered `?n`, and whether the statement opens a transaction."""
    return re.sub(r"\$(\d+)", r"?\1", sql), _OPENS_TRANSACTION.match(sql) is not None


class _SQLiteTx:
    """The statements of one `_begin`, each one awaited aiosqlite call.

    The connection's isolation level is IMMEDIATE, so the sqlite3 module sends
    `BEGIN IMMEDIATE` itself, in the same call, before the first INSERT,
    UPDATE, DELETE or REPLACE. A write transaction whose first statement is
    anything else (a migration's CREATE, a SELECT) sends `BEGIN IMMEDIATE`
    first. A read that runs only SELECTs never opens a transaction: each one
    is its own snapshot.
    """

    __slots__ = ("_conn", "_write", "began")

    def __init__(self, conn: aiosqlite.Connection, *, write: bool) -> None:
        self._conn = conn
        self._write = write
        #: A transaction may be open: it must end with COMMIT or ROLLBACK.
        self.began = False

    async def _start(self, opens: bool) -> None:
        self.began = True  # before the await: a cancelled call may still open it
        if not opens:
            await self._conn.execute("BEGIN IMMEDIATE")

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]:
        text, opens = _prepare(sql)
        if not self.began and (opens or self._write):
            await self._start(opens)
        return await self._conn.execute_fetchall(text, args)  # type: ignore[return-value]

    async def execute(self, sql: str, *args: Any) -> int:
        text, opens = _prepare(sql)
        if not self.began and (opens or self._write):
            await self._start(opens)
        # Not closed through the thread: a statement that returns no rows is
        # reset and released by sqlite3 as soon as it has run.
        cursor = await self._conn.execute(text, args)
        return max(cursor.rowcount, 0)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        text, opens = _prepare(sql)
        if not self.began and (opens or self._write):
            await self._start(opens)
        if len(rows) == 1:
            await self._conn.execute(text, rows[0])
        else:
            await self._conn.executemany(text, rows)


class SQLiteBackend(SQLBackend):
    """Sessions in a SQLite file.

    Args:
        path: the database file; created on first use, its directory must exist.
        busy_timeout: seconds to wait for another process's write lock before
            giving up with `StateUnavailableError`.
        synchronous: `"normal"` (default): a commit survives a crash or kill of
            the process but not a power loss or OS crash; `"full"`: every commit
            is flushed to disk before it is acknowledged (survives power loss,
            costs one fsync per commit). Without WAL mode the backend always
            uses `"full"`.

    Raises:
        ConfigurationError: `synchronous` is not `"normal"` or `"full"`.
    """

    scheme = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        synchronous: Synchronous = "normal",
    ) -> None:
        super().__init__()
        level = synchronous.lower() if isinstance(synchronous, str) else synchronous
        if level not in _SYNCHRONOUS:
            raise ConfigurationError(f"SQLite synchronous={synchronous!r} is not supported; use 'normal' or 'full'")
        self.path = Path(os.path.abspath(path))  # fixed now: a later chdir must not move the store
        self.busy_timeout = busy_timeout
        self.synchronous: Synchronous = level
        self._conn: aiosqlite.Connection | None = None
        self._lock = anyio.Lock(fast_acquire=True)
        #: Whether this connection has `_COMMIT_IN_ONE`'s view and trigger.
        self._one_statement = False

    @classmethod
    def from_url(cls, url: str) -> SQLiteBackend:
        """The backend for `sqlite:///relative.db` or `sqlite:////abs/path.db`, optionally `?synchronous=full`.

        Raises:
            ConfigurationError: the URL is not one of those forms, or its query
                is anything but `synchronous=normal` or `synchronous=full`.
        """
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(f"SQLite state URL {url!r} is malformed ({exc}); use {_FORMS}") from None
        if parts.scheme.lower() != "sqlite" or not url.lower().startswith("sqlite:///"):
            raise ConfigurationError(
                f"SQLite state URL {url!r} is malformed (it must start with 'sqlite:///' and name no host); use {_FORMS}"
            )
        if parts.fragment or url.endswith("#"):
            raise ConfigurationError(f"SQLite state URL {url!r}: a fragment is not supported; use {_FORMS}")
        synchronous = cls._synchronous_from_query(url, parts.query)
        path = unquote(parts.path[1:])  # drop the '/' that ends the empty authority
        if not path or path.endswith("/"):
            raise ConfigurationError(f"SQLite state URL {url!r} names no database file; use {_FORMS}")
        return cls(path, synchronous=synchronous)

    @staticmethod
    def _synchronous_from_query(url: str, query: str) -> Synchronous:
        if not query:
            return "normal"
        try:
            items = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            items = []
        if len(items) != 1 or items[0][0] != "synchronous":
            raise ConfigurationError(f"SQLite state URL {url!r}: unsupported query {query!r}; {_OPTIONS}; use {_FORMS}")
        value = items[0][1].lower()
        if value not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"SQLite state URL {url!r}: synchronous={items[0][1]!r} is not supported; {_OPTIONS}; use {_FORMS}"
            )
        return value  # type: ignore[return-value]

    def _where(self) -> str:
        return f"SQLite state file {str(self.path)!r}"

    def _unavailable(self, exc: sqlite3.Error) -> StateUnavailableError:
        hint = ""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (8, 14, 3):  # READONLY, CANTOPEN, PERM
            hint = "; check that the file and its directory exist and are writable by this process"
        elif code in (5, 6):  # BUSY, LOCKED
            hint = f"; another process held the write lock for more than busy_timeout={self.busy_timeout:g}s"
        elif code == 10:  # IOERR: also what a file made read-only (immutable) under an open connection gives
            hint = "; check the disk and that the file and its directory are writable by this process"
        elif code == 13:  # FULL
            hint = "; free space on its disk"
        return StateUnavailableError(f"{self._where()} is unavailable: {exc}{hint}")

    @staticmethod
    def _is_unavailable(exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNAVAILABLE_CODES

    async def _connect(self) -> None:
        if self._conn is not None:
            return
        if not self.path.parent.is_dir():
            raise StateUnavailableError(
                f"{self._where()} cannot be created: directory {str(self.path.parent)!r} does not exist; "
                "create it or point CONCIERGE_STATE_URL elsewhere"
            )
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise StateUnavailableError(
                f"{self._where()} is not readable and writable by this process (read-only file?); "
                "fix its permissions or point CONCIERGE_STATE_URL elsewhere"
            )
        # The sqlite3 module's own transaction handling, pinned where Python
        # lets it be chosen: `_SQLiteTx` relies on its implicit BEGIN IMMEDIATE.
        legacy = getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", None)
        options: dict[str, Any] = {} if legacy is None else {"autocommit": legacy}
        try:
            conn = await aiosqlite.connect(self.path, isolation_level="IMMEDIATE", timeout=self.busy_timeout, **options)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await conn.execute("PRAGMA foreign_keys = ON")  # the values table cascades on delete
            row = await self._enable_wal(conn)
            synchronous = self.synchronous
            if row is None or str(row[0]).lower() != "wal":
                logger.warning("%s: journal mode is %s, not WAL", self._where(), row[0] if row else "unknown")
                synchronous = "full"  # NORMAL is only crash-safe with WAL
            await conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._one_statement = await self._create_commit_trigger(conn)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await conn.close()
            if isinstance(exc, sqlite3.Error) and self._is_unavailable(exc):
                raise self._unavailable(exc) from exc
            raise
        self._conn = conn

    async def _create_commit_trigger(self, conn: aiosqlite.Connection) -> bool:
        """Create `_COMMIT_IN_ONE`'s view and trigger on `conn`; False when this SQLite has no `json_each`."""
        try:
            await conn.execute_fetchall("SELECT count(*) FROM json_each('[]')")
        except sqlite3.OperationalError:
            logger.info(
                "%s: SQLite %s has no JSON functions; commits take 3 calls", self._where(), sqlite3.sqlite_version
            )
            return False
        await conn.execute(_COMMIT_VIEW)
        await conn.execute(_COMMIT_TRIGGER)
        return True

    async def _enable_wal(self, conn: aiosqlite.Connection) -> Any:
        """Switch the file to WAL, retrying while another process holds it.

        SQLite answers SQLITE_BUSY to this pragma at once, without waiting out
        busy_timeout, when another process is switching the same new file
        at the same moment; so the wait is done here.
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            try:
                rows = await conn.execute_fetchall("PRAGMA journal_mode = WAL")
                return next(iter(rows), None)
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or time.monotonic() > deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except sqlite3.Error:
                logger.warning("%s: error while closing", self._where(), exc_info=True)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, this task's alone; driver errors that mean the file is unusable as `StateUnavailableError`."""
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StateUnavailableError(f"{self._where()} is closed")
            try:
                yield conn
            except sqlite3.Error as exc:
                if self._is_unavailable(exc):
                    raise self._unavailable(exc) from exc
                raise

    @asynccontextmanager
    async def _begin(self, *, write: bool) -> AsyncIterator[Tx]:
        async with self._connection() as conn:
            tx = _SQLiteTx(conn, write=write)
            try:
                yield tx
                if tx.began:
                    await conn.execute("COMMIT")
            except BaseException:
                if tx.began:
                    with anyio.CancelScope(shield=True):
                        try:
                            await conn.rollback()  # a no-op when no transaction is open
                        except sqlite3.Error:  # keep the error that got us here
                            logger.warning("%s: rollback failed", self._where(), exc_info=True)
                raise

    async def commit(self, commit: Commit, *, now: float) -> int:
        """As `StateBackend.commit`; an update of a live session's keys is one statement, one call.

        A creation, a clear or a commit that records a checkpoint takes the
        general path, a transaction of several statements.
        """
        if not commit.is_update or not self._one_statement:
            return await super().commit(commit, now=now)
        await self._ensure_open()
        stage_given = commit.stage is not UNCHANGED
        args = (
            commit.session_id,
            commit.expected_version,
            now,
            commit.expires_at,
            stage_given,
            commit.stage if stage_given else None,
            compact_json([key for key, value in commit.changes.items() if value is None]),
            compact_json({key: value for key, value in commit.changes.items() if value is not None}),
        )
        try:
            async with self._connection() as conn:
                await conn.execute(_COMMIT_IN_ONE, args)
        except sqlite3.IntegrityError as exc:
            if _CONFLICT_MARK not in str(exc):
                raise
            async with self._transaction(write=False) as tx:
                raise await self._conflict(tx, commit, now) from None
        return commit.expected_version + 1
