"""SQLite backend on the standard `sqlite3` module: one file, shared safely by every process on the machine.

One connection per backend, used by one task at a time (an anyio lock), in
WAL mode so readers in other processes never block on a writer. Every write
is a `BEGIN IMMEDIATE` transaction: it takes the file's write lock up front,
so two writers never deadlock upgrading a read lock, and migrations run one
process at a time.

Where statements run. In WAL mode a statement that does not wait for a lock
takes microseconds - a commit with `synchronous=NORMAL` writes to the OS page
cache and does not wait for the disk - less than a hop to a worker thread and
back, so statements run on the event loop, with the connection's busy timeout
at 0: SQLite then answers SQLITE_BUSY at once instead of waiting when another
process holds the write lock (or a reader meets a checkpoint resetting the
log). SQLite answers so only when a statement cannot take a lock, before it
has changed anything, and in WAL mode only at a statement that starts a
transaction or is one on its own. From that statement on, the transaction
runs in a worker thread with the configured `busy_timeout`, which waits as
SQLite itself would have waited, and the timeout goes back to 0 when it ends.
What may block always runs in the thread: opening and closing the file,
every commit with `synchronous="full"` (an fsync), and the WAL checkpoints.
The automatic checkpoint, which can take milliseconds inside a commit, is off
on the connection; the backend runs a PASSIVE checkpoint in the thread once
its own commits have written about `_CHECKPOINT_PAGES` pages to the log.
Reads still read the file: a page that is not in the OS cache is read from
disk on the loop.

Durability: by default the connection runs with `synchronous = NORMAL`, so a
commit does not wait for an fsync; an acknowledged commit survives the server
process crashing or being killed (it is in the WAL, in the OS page cache), but
the last commits before a power loss or OS crash may be lost (the file stays
consistent). `synchronous="full"` (or `?synchronous=full` in the URL) fsyncs
every commit and makes it survive power loss too, at about one disk flush per
call.

Statements are few per call: a read is one statement, and the commonest
write - an update of a live session's keys, with no checkpoint - is a single
statement (see `_COMMIT_IN_ONE`).

The change feed (`watch`, `caught_up`): SQLite sends no notifications, but
`PRAGMA data_version` on a connection changes exactly when another connection
has committed to the file since it last looked - never for the connection's
own commits. Every statement of the backend runs on its one connection, so
`caught_up` polls that pragma on the loop and reports a change as
`on_change(None, None)`: another process wrote, anything cached may be stale.
The backend's own commits and deletes are not fed; the process that made
them knows of them already.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
from anyio import to_thread

from concierge.errors import ConfigurationError, StateUnavailableError
from concierge.state._sql import SQLBackend, compact_json
from concierge.state.base import UNCHANGED, ChangeCallback, Commit

__all__ = ["SQLiteBackend"]

logger = logging.getLogger("concierge")

# Primary result codes that mean "the file cannot be used right now", as
# opposed to a bug in a statement: BUSY, LOCKED, READONLY, IOERR, CORRUPT,
# FULL, CANTOPEN, PERM, NOTADB.
_UNAVAILABLE_CODES = {5, 6, 8, 10, 11, 13, 14, 3, 26}
_WAITS = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_FORMS = "sqlite:///relative/path.db (relative to the working directory) or sqlite:////absolute/path.db"
_SYNCHRONOUS = ("normal", "full")
_OPTIONS = "the only query parameter is synchronous=normal (the default) or synchronous=full"
# SQLite's own automatic checkpoint runs at 1000 pages in the log; an update
# of one key adds 3 (measured: the pages of the session row, the value row and
# its primary key's index), each 4 KiB of bound text about one more.
_CHECKPOINT_PAGES = 1000
_PAGES_PER_COMMIT = 3
_PAGE_BYTES = 4096

Synchronous = Literal["normal", "full"]
T = TypeVar("T")

# The statements before which Python's sqlite3 module opens the transaction
# itself (with the connection's isolation level), within the same call. This
# test is stricter than the module's own (recent Pythons also skip leading
# comments there), so a statement it matches always opens one.
_OPENS_TRANSACTION = re.compile(r"[ \t\r\n]*(?:insert|update|delete|replace)", re.IGNORECASE)


# The version check, the bump and the changed keys as one statement instead
# of three (statement, statement, COMMIT). SQLite has no data-modifying CTEs,
# so the statement is an INSERT into a view whose INSTEAD OF trigger does the
# work. Both are TEMP, created on each connection: nothing is added to the
# file's schema, and a TEMP trigger may write the main database's tables
# (unqualified names resolve to them, as no TEMP table shares their names).
# The RAISE(ABORT) undoes the whole statement, trigger included.
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
# as `BEGIN IMMEDIATE` does.
_COMMIT_IN_ONE = (
    "WITH commit_row AS (SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) INSERT INTO concierge_commit SELECT * FROM commit_row"
)


@lru_cache(maxsize=128)
def _prepare(sql: str) -> tuple[str, bool]:
    """The shared `$n` placeholders as SQLite's numbered `?n`, and whether the statement opens a transaction."""
    return re.sub(r"\$(\d+)", r"?\1", sql), _OPENS_TRANSACTION.match(sql) is not None


def _fetchall(conn: sqlite3.Connection, text: str, args: Sequence[Any]) -> list[Any]:
    return conn.execute(text, args).fetchall()


def _chars(args: Sequence[Any]) -> int:
    return sum(len(arg) for arg in args if type(arg) is str)


class _Opened(NamedTuple):
    """A connection ready for use, as the worker thread hands it to the loop."""

    conn: sqlite3.Connection
    wal: bool
    synchronous: Synchronous
    one_statement: bool
    data_version: int


class _SQLiteTx:
    """The statements of one `_begin`: on the event loop until SQLite would make one wait, then in the thread.

    The connection's isolation level is IMMEDIATE, so the sqlite3 module sends
    `BEGIN IMMEDIATE` itself, in the same call, before the first INSERT,
    UPDATE, DELETE or REPLACE. A write transaction whose first statement is
    anything else (a migration's CREATE, a SELECT) sends `BEGIN IMMEDIATE`
    first. A read that runs only SELECTs never opens a transaction: each one
    is its own snapshot.
    """

    __slots__ = ("_backend", "_conn", "_write", "began", "threaded", "written")

    def __init__(self, backend: SQLiteBackend, conn: sqlite3.Connection, *, write: bool) -> None:
        self._backend = backend
        self._conn = conn
        self._write = write
        #: A transaction may be open: it must end with COMMIT or ROLLBACK.
        self.began = False
        #: The rest of the transaction runs in the worker thread, with the configured busy timeout.
        self.threaded = False
        #: Characters of text bound to this transaction's write statements: what it adds to the log.
        self.written = 0

    async def run(self, call: Callable[..., T], *args: Any, blocks: bool = False) -> T:
        """`call(*args)` on the connection: on the loop, unless it `blocks` or SQLite would make it wait.

        SQLite answers SQLITE_BUSY (or LOCKED) only when a statement could not
        take a lock, before the statement changed anything; a busy handler
        would wait and try it again. So would the thread: the statement is run
        there again, and so is every later one of this transaction.
        """
        if not (blocks or self.threaded):
            try:
                return call(*args)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _WAITS:
                    raise
        if not self.threaded:
            self.threaded = True
            self._conn.execute(f"PRAGMA busy_timeout = {self._backend._busy_ms}")  # sets a field: no I/O
        return await to_thread.run_sync(call, *args, limiter=self._backend._limiter)

    def settle(self) -> None:
        """Back to never waiting on the loop, before the connection is handed to the next task."""
        if self.threaded:
            self._conn.execute("PRAGMA busy_timeout = 0")

    async def _start(self, opens: bool) -> None:
        self.began = True  # before running it: a failure may still leave it open
        if not opens:
            await self.run(self._conn.execute, "BEGIN IMMEDIATE")

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]:
        text, opens = _prepare(sql)
        if not self.began and (opens or self._write):
            await self._start(opens)
        return await self.run(_fetchall, self._conn, text, args)

    async def execute(self, sql: str, *args: Any) -> int:
        text, opens = _prepare(sql)
        if not self.began and (opens or self._write):
            await self._start(opens)
        self.written += _chars(args)
        return max((await self.run(self._conn.execute, text, args)).rowcount, 0)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        text, opens = _prepare(sql)
        if not self.began and (opens or self._write):
            await self._start(opens)
        self.written += sum(_chars(row) for row in rows)
        if len(rows) == 1:
            await self.run(self._conn.execute, text, rows[0])
        else:
            await self.run(self._conn.executemany, text, rows)

    async def execute_alone(self, text: str, args: Sequence[Any]) -> None:
        """Run a write statement that commits on its own (autocommit), and count it as a commit."""
        self.written += _chars(args)
        await self.run(self._conn.execute, text, args, blocks=self._backend._flushes)
        self._backend._unchecked += _PAGES_PER_COMMIT + self.written // _PAGE_BYTES


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
        self._busy_ms = int(busy_timeout * 1000)
        self._conn: sqlite3.Connection | None = None
        self._lock = anyio.Lock(fast_acquire=True)
        # The connection's own: it never waits behind other work in anyio's shared thread pool.
        self._limiter = anyio.CapacityLimiter(1)
        #: Whether this connection has `_COMMIT_IN_ONE`'s view and trigger.
        self._one_statement = False
        #: Whether commits run in the thread: they wait for an fsync (`synchronous = FULL` in effect).
        self._flushes = False
        #: Whether the file is in WAL mode, whose checkpoints the backend runs itself.
        self._wal = False
        #: Pages this connection's commits added to the log since its last checkpoint (an estimate).
        self._unchecked = 0
        self._on_change: ChangeCallback | None = None
        self._data_version = 0

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

    # -- the connection ------------------------------------------------------------
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
        try:
            # Not abandoned when cancelled: the call returns the connection, and the
            # cancellation arrives at the next checkpoint, after it is stored.
            opened = await to_thread.run_sync(self._open_connection, limiter=self._limiter)
        except sqlite3.Error as exc:
            if self._is_unavailable(exc):
                raise self._unavailable(exc) from exc
            raise
        self._conn = opened.conn
        self._wal = opened.wal
        self._flushes = opened.synchronous == "full"
        self._one_statement = opened.one_statement
        self._data_version = opened.data_version
        self._unchecked = 0

    def _open_connection(self) -> _Opened:
        """Open and set up the connection (in the worker thread: this waits for other processes)."""
        # The sqlite3 module's own transaction handling, pinned where Python
        # lets it be chosen: `_SQLiteTx` relies on its implicit BEGIN IMMEDIATE.
        legacy = getattr(sqlite3, "LEGACY_TRANSACTION_CONTROL", None)
        options: dict[str, Any] = {} if legacy is None else {"autocommit": legacy}
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level="IMMEDIATE",
                timeout=self.busy_timeout,
                check_same_thread=False,  # used by one task at a time, on the loop or in the thread
                **options,
            )
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            conn.execute("PRAGMA foreign_keys = ON")  # the values table cascades on delete
            row = self._enable_wal(conn)
            wal = row is not None and str(row[0]).lower() == "wal"
            synchronous = self.synchronous
            if not wal:
                logger.warning("%s: journal mode is %s, not WAL", self._where(), row[0] if row else "unknown")
                synchronous = "full"  # NORMAL is only crash-safe with WAL
            conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            if wal:
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # `_checkpoint_log` runs them, in the thread
            one_statement = self._create_commit_trigger(conn)
            (data_version,) = conn.execute("PRAGMA data_version").fetchone()
            conn.execute("PRAGMA busy_timeout = 0")  # on the loop it never waits; `_SQLiteTx.run` sets it
        except BaseException:
            conn.close()
            raise
        return _Opened(conn, wal, synchronous, one_statement, data_version)

    def _create_commit_trigger(self, conn: sqlite3.Connection) -> bool:
        """Create `_COMMIT_IN_ONE`'s view and trigger on `conn`; False when this SQLite has no `json_each`."""
        try:
            conn.execute("SELECT count(*) FROM json_each('[]')").fetchall()
        except sqlite3.OperationalError:
            logger.info(
                "%s: SQLite %s has no JSON functions; commits take 3 statements", self._where(), sqlite3.sqlite_version
            )
            return False
        conn.execute(_COMMIT_VIEW)
        conn.execute(_COMMIT_TRIGGER)
        return True

    def _enable_wal(self, conn: sqlite3.Connection) -> Any:
        """Switch the file to WAL, retrying while another process holds it.

        SQLite answers SQLITE_BUSY to this pragma at once, without waiting out
        busy_timeout, when another process is switching the same new file
        at the same moment; so the wait is done here.
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                if code not in _WAITS or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _disconnect(self) -> None:
        self._on_change = None  # the feed ends with close
        async with self._lock:  # after the transaction under way, if any
            conn, self._conn = self._conn, None
            if conn is not None:
                try:  # the last connection to close checkpoints the log: in the thread
                    await to_thread.run_sync(conn.close, limiter=self._limiter)
                except sqlite3.Error:
                    logger.warning("%s: error while closing", self._where(), exc_info=True)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[sqlite3.Connection]:
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
    async def _begin(self, *, write: bool) -> AsyncIterator[_SQLiteTx]:
        async with self._connection() as conn:
            tx = _SQLiteTx(self, conn, write=write)
            try:
                yield tx
                if tx.began:
                    await tx.run(conn.commit, blocks=self._flushes)
                    self._unchecked += _PAGES_PER_COMMIT + tx.written // _PAGE_BYTES
            except BaseException:
                if tx.began:
                    # On the loop this cannot be interrupted; in the thread it is not abandoned.
                    with anyio.CancelScope(shield=True):
                        try:
                            await tx.run(conn.rollback)  # a no-op when no transaction is open
                        except sqlite3.Error:  # keep the error that got us here
                            logger.warning("%s: rollback failed", self._where(), exc_info=True)
                raise
            finally:
                tx.settle()
            await self._checkpoint_log(conn)

    async def _checkpoint_log(self, conn: sqlite3.Connection) -> None:
        """Copy the log back into the file once this connection's commits have grown it by about 1000 pages.

        PASSIVE: it waits for no reader or writer and leaves what they still
        need. In the thread, and shielded: the commit before it has landed, so
        its caller must hear so.
        """
        if not self._wal or self._unchecked < _CHECKPOINT_PAGES:
            return
        self._unchecked = 0
        with anyio.CancelScope(shield=True):
            try:
                await to_thread.run_sync(_fetchall, conn, "PRAGMA wal_checkpoint(PASSIVE)", (), limiter=self._limiter)
            except sqlite3.Error:  # another connection's checkpoint is under way: the next one catches up
                logger.debug("%s: checkpoint skipped", self._where(), exc_info=True)

    # -- the change feed -------------------------------------------------------------
    async def watch(self, on_change: ChangeCallback) -> bool:
        """As `StateBackend.watch`, polled: `caught_up` reports other processes' commits as `on_change(None, None)`.

        This backend's own commits and deletes are not fed: the process that
        made them knows of them already.
        """
        self._on_change = on_change
        return True

    def caught_up(self) -> bool:
        """As `StateBackend.caught_up`: polls `PRAGMA data_version` on the loop (microseconds) when the connection is idle.

        When another connection committed to the file since the last poll,
        calls `on_change(None, None)` first. `False` while a task is using the
        connection, when it is closed, without `watch`, or when the poll
        fails.
        """
        conn, on_change = self._conn, self._on_change
        if conn is None or on_change is None or self._lock.locked():
            return False
        try:
            (version,) = conn.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:  # BUSY included: it never waits here
            return False
        if version != self._data_version:
            self._data_version = version
            on_change(None, None)
        return True

    # -- the contract ------------------------------------------------------------------
    async def commit(self, commit: Commit, *, now: float) -> int:
        """As `StateBackend.commit`; an update of a live session's keys is one statement.

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
            async with self._begin(write=False) as tx:  # the statement is its own transaction
                await tx.execute_alone(_COMMIT_IN_ONE, args)
        except sqlite3.IntegrityError as exc:
            if _CONFLICT_MARK not in str(exc):
                raise
            async with self._transaction(write=False) as tx:
                raise await self._conflict(tx, commit, now) from None
        return commit.expected_version + 1
