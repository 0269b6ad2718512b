"""SQLite backend on aiosqlite: one file, shared safely by every process on the machine.

One connection per backend, used by one task at a time (an anyio lock), in
WAL mode so readers in other processes never block on a writer. Every write
is a `BEGIN IMMEDIATE` transaction: it takes the file's write lock up front
(waiting up to `busy_timeout` for another process), so two writers never
deadlock upgrading a read lock, and migrations run one process at a time.
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
from typing import Any
from urllib.parse import unquote, urlsplit

import aiosqlite
import anyio

from concierge.errors import ConfigurationError, StateUnavailableError
from concierge.state._sql import SQLBackend, Tx

__all__ = ["SQLiteBackend"]

logger = logging.getLogger("concierge")

# Primary result codes that mean "the file cannot be used right now", as
# opposed to a bug in a statement: BUSY, LOCKED, READONLY, IOERR, CORRUPT,
# FULL, CANTOPEN, PERM, NOTADB.
_UNAVAILABLE_CODES = {5, 6, 8, 10, 11, 13, 14, 3, 26}
_FORMS = "sqlite:///relative/path.db (relative to the working directory) or sqlite:////absolute/path.db"


@lru_cache(maxsize=64)
def _q(sql: str) -> str:
    """The shared `$n` placeholders as SQLite's numbered `?n`."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


class _SQLiteTx:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]:
        async with self._conn.execute(_q(sql), args) as cursor:
            return list(await cursor.fetchall())

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._conn.execute(_q(sql), args) as cursor:
            return max(cursor.rowcount, 0)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self._conn.executemany(_q(sql), rows)


class SQLiteBackend(SQLBackend):
    """Sessions in a SQLite file.

    Args:
        path: the database file; created on first use, its directory must exist.
        busy_timeout: seconds to wait for another process's write lock before
            giving up with `StateUnavailableError`.
    """

    scheme = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        super().__init__()
        self.path = Path(os.path.abspath(path))  # fixed now: a later chdir must not move the store
        self.busy_timeout = busy_timeout
        self._conn: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteBackend:
        """The backend for `sqlite:///relative.db` or `sqlite:////abs/path.db`.

        Raises:
            ConfigurationError: the URL is not one of those two forms.
        """
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(f"SQLite state URL {url!r} is malformed ({exc}); use {_FORMS}") from None
        if parts.scheme.lower() != "sqlite" or not url.lower().startswith("sqlite:///"):
            raise ConfigurationError(
                f"SQLite state URL {url!r} is malformed (it must start with 'sqlite:///' and name no host); use {_FORMS}"
            )
        if parts.query or parts.fragment:
            raise ConfigurationError(f"SQLite state URL {url!r}: query and fragment are not supported; use {_FORMS}")
        path = unquote(parts.path[1:])  # drop the '/' that ends the empty authority
        if not path or path.endswith("/"):
            raise ConfigurationError(f"SQLite state URL {url!r} names no database file; use {_FORMS}")
        return cls(path)

    def _where(self) -> str:
        return f"SQLite state file {str(self.path)!r}"

    def _unavailable(self, exc: sqlite3.Error) -> StateUnavailableError:
        hint = ""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (8, 14, 3):  # READONLY, CANTOPEN, PERM
            hint = "; check that the file and its directory exist and are writable by this process"
        elif code in (5, 6):  # BUSY, LOCKED
            hint = f"; another process held the write lock for more than busy_timeout={self.busy_timeout:g}s"
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
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await conn.execute("PRAGMA foreign_keys = ON")  # the values table cascades on delete
            row = await self._enable_wal(conn)
            if row is None or str(row[0]).lower() != "wal":
                logger.warning("%s: journal mode is %s, not WAL", self._where(), row[0] if row else "unknown")
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await conn.close()
            if isinstance(exc, sqlite3.Error) and self._is_unavailable(exc):
                raise self._unavailable(exc) from exc
            raise
        self._conn = conn

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
                async with conn.execute("PRAGMA journal_mode = WAL") as cursor:
                    return await cursor.fetchone()
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
    async def _begin(self, *, write: bool) -> AsyncIterator[Tx]:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StateUnavailableError(f"{self._where()} is closed")
            try:
                if write:
                    await conn.execute("BEGIN IMMEDIATE")
                committed = False
                try:
                    yield _SQLiteTx(conn)
                    if write:
                        await conn.execute("COMMIT")
                    committed = True
                finally:
                    if write and not committed and conn.in_transaction:
                        with anyio.CancelScope(shield=True):
                            try:
                                await conn.execute("ROLLBACK")
                            except sqlite3.Error:  # keep the error that got us here
                                logger.warning("%s: rollback failed", self._where(), exc_info=True)
            except sqlite3.Error as exc:
                if self._is_unavailable(exc):
                    raise self._unavailable(exc) from exc
                raise
