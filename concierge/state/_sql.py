"""What the SQL backends share: the contract of `StateBackend`, run as SQL statements.

The schema, its migrations and the statements themselves are text in
`concierge.state._sql_schema`. A backend module only supplies a connection:
`_connect`, `_disconnect` and `_begin` (one transaction, driver errors mapped
to `StateUnavailableError`).
"""

from __future__ import annotations

import json
import logging
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import anyio

from concierge.errors import ConflictError, StateUnavailableError
from concierge.state import _sql_schema as sql
from concierge.state.base import (
    UNCHANGED,
    Commit,
    SessionRecord,
    SessionSummary,
    StateBackend,
    StoredCheckpoint,
    check_page,
    checkpoint_of,
    update_conflict,
)

logger = logging.getLogger("concierge")


class Tx(Protocol):
    """One open transaction (or, for reads, one connection) of a SQL backend."""

    async def fetch(self, statement: str, *args: Any) -> Sequence[Sequence[Any]]:
        """Run `statement` and return all its rows."""

    async def execute(self, statement: str, *args: Any) -> int:
        """Run `statement` and return how many rows it changed."""

    async def executemany(self, statement: str, rows: list[tuple[Any, ...]]) -> None:
        """Run `statement` once per parameter tuple."""


class SQLBackend(StateBackend):
    """The contract of `StateBackend` in SQL; subclasses supply the connection."""

    #: Deletes every session expired at `$1`; a dialect may refine it.
    _clear_expired_sql = "DELETE FROM concierge_sessions WHERE expires_at <= $1"
    #: Up to `$2` ids of sessions expired at `$1`, locked for this transaction where the dialect can.
    _expired_ids_sql = "SELECT id FROM concierge_sessions WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2"
    #: The length of `v.value` in UTF-8 bytes (SQLite: a text cast to a blob keeps its UTF-8 bytes).
    _value_bytes_sql = "length(CAST(v.value AS BLOB))"
    supports_checkpoints = True

    def __init__(self) -> None:
        self._open_lock = anyio.Lock()
        self._opened = False

    # -- what a backend module supplies ----------------------------------------
    @abstractmethod
    async def _connect(self) -> None:
        """Open the connection or pool (no schema work). Raises `StateUnavailableError`."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Release the connection or pool; must not raise."""

    @abstractmethod
    def _begin(self, *, write: bool) -> AbstractAsyncContextManager[Tx]:
        """A transaction, committed on normal exit and rolled back on any exception.

        `write=False` may skip the transaction for a single read statement.
        Driver errors that mean the store cannot be reached leave as
        `StateUnavailableError`; `ConflictError` raised inside passes unchanged.
        """

    async def _migration_lock(self, tx: Tx) -> None:
        """Serialise migrations across processes, inside `tx` (no-op where `_begin` already does)."""

    @abstractmethod
    def _where(self) -> str:
        """Where the store is, for messages (never a password)."""

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        async with self._open_lock:
            if self._opened:
                return
            await self._connect()
            try:
                await self._migrate()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._disconnect()
                raise
            self._opened = True

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            async with self._open_lock:
                self._opened = False
                await self._disconnect()

    async def _ensure_open(self) -> None:
        """A backend used without `open()` opens itself on first use."""
        if not self._opened:
            await self.open()

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[Tx]:
        await self._ensure_open()
        async with self._begin(write=write) as tx:
            yield tx

    async def _migrate(self) -> None:
        """Apply the pending steps of `MIGRATIONS`, each in its own transaction with its version row."""
        while True:
            async with self._begin(write=True) as tx:
                await self._migration_lock(tx)
                await tx.execute(sql.MIGRATIONS_TABLE)
                rows = await tx.fetch("SELECT COALESCE(MAX(version), 0) FROM concierge_migrations")
                current = int(rows[0][0])
                if current > len(sql.MIGRATIONS):
                    raise StateUnavailableError(
                        f"{self._where()} has schema version {current}, newer than this concierge knows "
                        f"({len(sql.MIGRATIONS)}); upgrade concierge"
                    )
                if current == len(sql.MIGRATIONS):
                    return
                for statement in sql.MIGRATIONS[current]:
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO concierge_migrations (version, applied_at) VALUES ($1, $2)", current + 1, time.time()
                )
            logger.info("%s: applied schema migration %d", self._where(), current + 1)

    # -- the contract ----------------------------------------------------------
    async def load(
        self,
        session_id: str,
        *,
        now: float,
        known_version: int | None = None,
        known_created_at: float | None = None,
    ) -> SessionRecord | None:
        async with self._transaction(write=False) as tx:
            if known_version is not None:
                rows = await tx.fetch(sql.LOAD_ROW, session_id, now)
                if not rows:
                    return None
                version, stage, owner, expires_at, created_at = rows[0]
                if version == known_version and known_created_at in (None, created_at):
                    return SessionRecord(session_id, int(version), None, stage, owner, expires_at, created_at)
            rows = await tx.fetch(sql.LOAD_ALL, session_id, now)
        return _record(session_id, rows) if rows else None

    async def commit(self, commit: Commit, *, now: float) -> int:
        async with self._transaction(write=True) as tx:
            return await self._apply(tx, commit, now)

    async def commit_all(self, commits: Sequence[Commit], *, now: float) -> list[int]:
        versions: dict[str, int] = {}
        async with self._transaction(write=True) as tx:
            # One order for every writer: two transactions locking the same
            # session rows never wait on each other in a cycle.
            for commit in sorted(commits, key=lambda c: c.session_id):
                versions[commit.session_id] = await self._apply(tx, commit, now)
        return [versions[commit.session_id] for commit in commits]

    async def _apply(self, tx: Tx, commit: Commit, now: float) -> int:
        """Write one commit inside `tx`; return the session's new version."""
        sid = commit.session_id
        if commit.expected_version == 0:
            stage = None if commit.stage is UNCHANGED else commit.stage
            if not await tx.execute(sql.CREATE, sid, stage, commit.owner, now, commit.expires_at):
                raise ConflictError(f"session {sid!r} was created concurrently")
            await tx.execute(sql.CLEAR_VALUES, sid)
            await tx.execute(sql.CLEAR_CHECKPOINTS, sid)
            version = 1
        else:
            if commit.stage is UNCHANGED:
                bumped = await tx.execute(
                    sql.BUMP.format(stage=""), sid, now, commit.expected_version, commit.expires_at
                )
            else:
                bumped = await tx.execute(
                    sql.BUMP.format(stage=", stage = $5"),
                    sid,
                    now,
                    commit.expected_version,
                    commit.expires_at,
                    commit.stage,
                )
            if not bumped:
                raise await self._conflict(tx, commit, now)
            version = commit.expected_version + 1
            if commit.clear:
                await tx.execute(sql.CLEAR_VALUES, sid)
        # Only the keys this unit touched: the cost follows the change, not the session's size.
        removed = [(sid, key) for key, value in commit.changes.items() if value is None]
        written = [(sid, key, value) for key, value in commit.changes.items() if value is not None]
        if removed:
            await tx.executemany(sql.DELETE_VALUE, removed)
        if written:
            await tx.executemany(sql.PUT_VALUE, written)
        if commit.keep_checkpoints > 0:
            await self._checkpoint(tx, commit, version, now)
        await self._tell(tx, sid, version)
        return version

    async def _tell(self, tx: Tx, session_id: str, version: int | None) -> None:
        """Tell the change feed, inside `tx`, that `session_id` is at `version` (`None`: deleted) once it commits.

        Nothing by default: a dialect with a pushed feed sends its notice here.
        """

    @staticmethod
    async def _checkpoint(tx: Tx, commit: Commit, version: int, now: float) -> None:
        """Write the checkpoint of `commit` and prune what falls out of its `keep_checkpoints` window."""
        c = checkpoint_of(commit, version, now)
        await tx.execute(
            sql.PUT_CHECKPOINT,
            commit.session_id,
            version,
            now,
            c.tool,
            compact_json(c.changes),
            compact_json(c.previous),
            int(c.stage_changed),
            c.stage,
            c.previous_stage,
        )
        if version > commit.keep_checkpoints:
            await tx.execute(sql.PRUNE_CHECKPOINTS, commit.session_id, version - commit.keep_checkpoints)

    async def checkpoints(self, session_id: str) -> list[StoredCheckpoint]:
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(sql.CHECKPOINTS, session_id)
        return [
            StoredCheckpoint(
                version=int(version),
                at=at,
                tool=tool,
                changes=json.loads(changes),
                previous=json.loads(previous),
                stage_changed=bool(stage_changed),
                stage=stage,
                previous_stage=previous_stage,
            )
            for version, at, tool, changes, previous, stage_changed, stage, previous_stage in rows
        ]

    async def touch(self, session_id: str, *, expires_at: float | None, now: float) -> bool:
        async with self._transaction(write=True) as tx:
            return bool(await tx.execute(sql.TOUCH, session_id, now, expires_at))

    async def list_sessions(
        self,
        *,
        now: float,
        prefix: str | None = None,
        include_expired: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> list[SessionSummary]:
        """As `StateBackend.list_sessions`: one statement; `size` counts UTF-8 bytes in every dialect."""
        check_page(limit, offset)
        args: list[Any] = [limit, offset]
        where = []
        if not include_expired:
            args.append(now)
            where.append(f"(expires_at IS NULL OR expires_at > ${len(args)})")
        if prefix:
            # A literal comparison of the id's first characters: no LIKE wildcards to escape.
            args.extend([len(prefix), prefix])
            where.append(f"substr(id, 1, ${len(args) - 1}) = ${len(args)}")
        statement = sql.LIST.format(size=self._value_bytes_sql, where=f"WHERE {' AND '.join(where)}" if where else "")
        async with self._transaction(write=False) as tx:
            rows = await tx.fetch(statement, *args)
        return [
            SessionSummary(
                session_id=sid,
                version=int(version),
                stage=stage,
                owner=owner,
                keys=int(keys),
                size=int(size),
                created_at=created_at,
                updated_at=updated_at,
                expires_at=expires_at,
            )
            for sid, version, stage, owner, created_at, updated_at, expires_at, keys, size in rows
        ]

    @staticmethod
    async def _conflict(tx: Tx, commit: Commit, now: float) -> ConflictError:
        """Why a commit's version check found no row to bump."""
        rows = await tx.fetch(sql.VERSION, commit.session_id, now)
        return update_conflict(commit, rows[0][0] if rows else None)

    async def delete(self, session_id: str) -> bool:
        async with self._transaction(write=True) as tx:
            found = bool(await tx.execute(sql.DELETE, session_id))
            if found:
                await self._tell(tx, session_id, None)
            return found

    async def clear_expired(self, *, now: float) -> int:
        async with self._transaction(write=True) as tx:
            return await tx.execute(self._clear_expired_sql, now)

    async def take_expired(self, *, now: float, limit: int) -> list[SessionRecord]:
        taken = []
        async with self._transaction(write=True) as tx:
            for (sid,) in await tx.fetch(self._expired_ids_sql, now, limit):
                taken.append(_record(sid, await tx.fetch(sql.LOAD_ALL, sid, float("-inf"))))
                await tx.execute(sql.DELETE, sid)
        return taken


def compact_json(document: Any) -> str:
    """`document` as compact JSON text, non-ASCII characters kept as they are."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def _record(session_id: str, rows: Sequence[Sequence[Any]]) -> SessionRecord:
    """A session from the rows of `LOAD_ALL` (one per key; one with a NULL key when it has none)."""
    version, stage, owner, expires_at, created_at = rows[0][:5]
    values = {row[5]: row[6] for row in rows if row[5] is not None}
    return SessionRecord(session_id, int(version), values, stage, owner, expires_at, created_at)
