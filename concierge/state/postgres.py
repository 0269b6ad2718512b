"""PostgreSQL backend on asyncpg: sessions shared by every process that reaches the server.

One pool per backend, opened by `open()` and closed by `close()`; between
statements the backend keeps the connections it took from it (at most
`max_size`) rather than handing each back, which spares every statement the
pool's acquire and release. Each commit is one transaction; the version check
and bump is a single `UPDATE`, whose row lock makes concurrent writers to one
session queue up and all but the first see a changed version. A dropped
server surfaces as `StateUnavailableError`; the pool replaces dead connections
on its own, so the same backend works again as soon as the server is back.

The change feed (`watch`) is LISTEN/NOTIFY on one more connection, outside
the pool: every commit sends `NOTIFY concierge_changes, '<version> <id>'` in
its own transaction (in the single statement of an update), delivered to
every listener when it commits; a delete sends `'- <id>'`. A listening
connection that drops is reported as "changes may have been missed" and
connected again in the background.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg

from concierge.errors import ConfigurationError, StateUnavailableError
from concierge.state import redact_url, url_secrets
from concierge.state._sql import SQLBackend, Tx
from concierge.state.base import UNCHANGED, ChangeCallback, Commit

__all__ = ["PostgresBackend"]

logger = logging.getLogger("concierge")

CHANNEL = "concierge_changes"
"""The NOTIFY channel of the change feed."""

#: `pg_advisory_xact_lock` key that serialises migrations ("concierg" as a signed 64-bit int).
MIGRATION_LOCK_KEY = int.from_bytes(b"concierg", "big", signed=True)

# Errors meaning the server cannot be reached or used right now: the network,
# the connection (SQLSTATE 08), an operator/shutdown (57), exhausted resources
# (53), authentication (28), a missing database (3D000).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
)


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE):
        return True
    # asyncpg reports a use of a connection it already knows is dead this way.
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


class _PgTx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]:
        return await self._conn.fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(sql, *args)  # e.g. "UPDATE 1", "INSERT 0 1"
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self._conn.executemany(sql, rows)


# The version check, the bump and the changed keys in one statement: the
# data-modifying CTEs run atomically, and the key changes only apply when the
# bump found its row (they join on `bumped`). Parameters: $1 id, $2 now, $3 the
# expected version, $4 expires_at, $5 whether a stage is given, $6 the stage,
# $7 the NOTIFY payload, then the removed keys (when any) and the written keys
# and values (when any; scalars for one key, arrays for several).
_BUMP = (
    "WITH bumped AS ("
    " UPDATE concierge_sessions SET version = version + 1, updated_at = $2, expires_at = $4,"
    " stage = CASE WHEN $5 THEN $6 ELSE stage END"
    " WHERE id = $1 AND version = $3 AND (expires_at IS NULL OR expires_at > $2) RETURNING id)"
)
_REMOVE = (
    ", removed AS (DELETE FROM concierge_values WHERE session_id IN (SELECT id FROM bumped) AND key = ANY(${}::text[]))"
)
_WRITE_ONE = (
    ", written AS (INSERT INTO concierge_values (session_id, key, value) SELECT bumped.id, ${}::text, ${}::text"
    " FROM bumped ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value)"
)
_WRITE_MANY = (
    ", written AS (INSERT INTO concierge_values (session_id, key, value)"
    " SELECT bumped.id, u.key, u.value FROM bumped, unnest(${}::text[], ${}::text[]) AS u(key, value)"
    " ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value)"
)
_ANSWER = f" SELECT count(*), (SELECT pg_notify('{CHANNEL}', $7) FROM bumped) FROM bumped"


def _update_sql(removes: bool, writes: int) -> str:
    """The one statement of an update that removes keys (or not) and writes `writes` keys.

    Each shape has a statement of its own, so the common one (a single key written) carries no array
    and no delete: measurably less work for the server than the general form.
    """
    sql, n = _BUMP, 8
    if removes:
        sql, n = sql + _REMOVE.format(n), n + 1
    if writes:
        sql += (_WRITE_ONE if writes == 1 else _WRITE_MANY).format(n, n + 1)
    return sql + _ANSWER


_UPDATES = {(removes, writes): _update_sql(removes, writes) for removes in (False, True) for writes in (0, 1, 2)}


class PostgresBackend(SQLBackend):
    """Sessions in a PostgreSQL database.

    Args:
        dsn: a `postgresql://` or `postgres://` URL, as asyncpg accepts it.
        min_size, max_size: bounds of the connection pool.
        connect_timeout: seconds to wait for one connection to be established.
        query_timeout: seconds one statement may take (waiting for another
            writer's row lock included) before it is cancelled and the call
            fails with `StateUnavailableError`, its transaction rolled back;
            `None` waits forever. It bounds what a server that stops
            answering without closing the connection (a network partition, a
            hung host) costs a call.
    """

    scheme = "postgresql"
    pushes_changes = True  # LISTEN/NOTIFY
    _clear_expired_sql = (
        # SKIP LOCKED: a row another transaction holds is being revived or
        # deleted right now; two sweepers never wait on (or deadlock with) each other.
        "DELETE FROM concierge_sessions WHERE id IN (SELECT id FROM concierge_sessions"
        " WHERE expires_at <= $1 FOR UPDATE SKIP LOCKED)"
    )
    _expired_ids_sql = (
        "SELECT id FROM concierge_sessions WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED"
    )
    _value_bytes_sql = "octet_length(v.value)"

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        query_timeout: float | None = 30.0,
    ) -> None:
        super().__init__()
        if query_timeout is not None and not query_timeout > 0:
            raise ConfigurationError(
                f"query_timeout must be a positive number of seconds or None, not {query_timeout!r}"
            )
        self._dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self._pool: asyncpg.Pool | None = None
        # Connections taken from the pool and kept between statements (see `_take`).
        self._idle: list[Any] = []
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._lent: dict[Any, Any] = {}  # taken from a pool, in use or idle -> that pool
        self._returning: set[asyncio.Task[None]] = set()
        self.location = _location(dsn)
        self._shown = _display(dsn)
        self._secrets = url_secrets(dsn)
        self._on_change: ChangeCallback | None = None
        self._listener: asyncpg.Connection | None = None
        self._relisten: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str) -> PostgresBackend:
        """The backend for `postgresql://user:password@host:port/db` (or `postgres://`).

        Raises:
            ConfigurationError: the URL is malformed; the message never shows the password.
        """
        try:
            parts = urlsplit(url)
            if "," not in parts.netloc:  # asyncpg's multi-host form has no single port to check
                parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigurationError(
                f"PostgreSQL state URL {_display(url)!r} is malformed ({exc}); "
                "use postgresql://user:password@host:port/database"
            ) from None
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ConfigurationError(f"{_display(url)!r} is not a postgresql:// URL")
        if "@" not in parts.netloc and "@" in parts.path + parts.fragment:
            # e.g. postgresql://app:1234/S3cret@db/shop: "1234" parses as a port and the
            # host would be "app"; connecting there would only puzzle the reader.
            raise ConfigurationError(
                f"PostgreSQL state URL {_display(url)!r} is malformed: its password holds a character "
                "that ends the host part; use postgresql://user:password@host:port/database"
            )
        return cls(url)

    def __repr__(self) -> str:
        return f"PostgresBackend({self._shown!r})"

    def _where(self) -> str:
        return f"PostgreSQL at {self.location}"

    def _unavailable(self, exc: BaseException) -> StateUnavailableError:
        if isinstance(exc, TimeoutError):
            query = "none" if self.query_timeout is None else f"{self.query_timeout:g}s"
            reason = f"no answer in time (connect_timeout={self.connect_timeout:g}s, query_timeout={query})"
        else:
            reason = str(exc) or type(exc).__name__
        for secret in self._secrets:  # belt and braces: no driver message may carry the password out
            reason = reason.replace(secret, "***")
        return StateUnavailableError(
            f"{self._where()} ({self._shown}) is unavailable: {reason}. "
            "Check that the server is running and reachable; concierge reconnects by itself when it is back."
        )

    async def _connect(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout,
                command_timeout=self.query_timeout,
                reset=_keep_connection,
            )
        except Exception as exc:
            if _is_unavailable(exc):
                raise self._unavailable(exc) from None
            raise

    # -- the change feed ---------------------------------------------------------
    async def watch(self, on_change: ChangeCallback) -> bool:
        """LISTEN on a connection of its own; see the module docstring."""
        self._on_change = on_change
        await self._listen()
        return True

    def caught_up(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=self.connect_timeout)
        try:
            await conn.add_listener(CHANNEL, self._heard)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._lost)
        self._listener = conn

    def _heard(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        version, _, session_id = payload.partition(" ")
        if self._on_change is not None and session_id:
            self._on_change(session_id, None if version == "-" else int(version))

    def _lost(self, conn: Any) -> None:
        if conn is not self._listener:
            return
        self._listener = None
        if self._on_change is not None:
            self._on_change(None, None)
            logger.warning("%s: the change feed's connection was lost; listening again", self._where())
            self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        delay = 0.1
        while self._on_change is not None and self._listener is None:
            try:
                await self._listen()
            except Exception:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                if self._on_change is not None:
                    self._on_change(None, None)  # what was committed while nobody listened
                return

    async def _stop_listening(self) -> None:
        self._on_change = None
        task, self._relisten = self._relisten, None
        if task is not None:
            task.cancel()
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            try:
                with anyio.move_on_after(2):
                    await conn.close()
            except Exception:  # a connection that is already gone: terminated below
                logger.debug("%s: closing the change feed's connection failed", self._where(), exc_info=True)
            if not conn.is_closed():
                conn.terminate()

    async def _tell(self, tx: Tx, session_id: str, version: int | None) -> None:
        await tx.fetch(f"SELECT pg_notify('{CHANNEL}', $1)", f"{'-' if version is None else version} {session_id}")

    async def _disconnect(self) -> None:
        await self._stop_listening()
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._hand_back(conn)
        pool, self._pool = self._pool, None  # what is still in use goes back to it when done (`_keep`)
        while self._wake(None):  # statements waiting for a connection find the backend closed
            pass
        if pool is None:
            return
        with anyio.move_on_after(5) as scope:
            try:
                await pool.close()
            except Exception:  # a dead server cannot be said goodbye to
                pool.terminate()
        if scope.cancelled_caught:
            pool.terminate()

    async def commit(self, commit: Commit, *, now: float) -> int:
        """As `StateBackend.commit`; an update of a live session is one statement, one round trip.

        A creation, a clear or a commit that records a checkpoint takes the general path.
        """
        if not commit.is_update:
            return await super().commit(commit, now=now)
        removed = [key for key, value in commit.changes.items() if value is None]
        keys = [key for key, value in commit.changes.items() if value is not None]
        values = [commit.changes[key] for key in keys]
        stage_given = commit.stage is not UNCHANGED
        args: list[Any] = [
            commit.session_id,
            now,
            commit.expected_version,
            commit.expires_at,
            stage_given,
            commit.stage if stage_given else None,
            f"{commit.expected_version + 1} {commit.session_id}",
        ]
        if removed:
            args.append(removed)
        if len(keys) == 1:
            args += (keys[0], values[0])
        elif keys:
            args += (keys, values)
        statement = _UPDATES[bool(removed), min(len(keys), 2)]
        await self._ensure_open()
        conn = await self._take()  # not `_begin`: its context manager costs a commit measurably
        try:
            rows = await conn.fetch(statement, *args)  # a single statement is its own transaction
            if not rows[0][0]:
                raise await self._conflict(_PgTx(conn), commit, now)
        except BaseException as exc:  # noqa: BLE001 - raised again, or as what it means, once `conn` is back
            raise await self._returned(conn, exc)
        self._keep(conn)
        return commit.expected_version + 1

    async def _migration_lock(self, tx: Tx) -> None:
        await tx.fetch("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)

    @asynccontextmanager
    async def _begin(self, *, write: bool) -> AsyncIterator[Tx]:
        conn = await self._take()
        try:
            if write:
                async with conn.transaction():
                    yield _PgTx(conn)
            else:
                yield _PgTx(conn)
        except BaseException as exc:  # noqa: BLE001 - raised again, or as what it means, once `conn` is back
            raise await self._returned(conn, exc)
        self._keep(conn)

    # -- connections -------------------------------------------------------------
    # A statement takes a connection with `_take` and, when it went well, leaves it here (`_keep`) for
    # the next one: to a statement waiting for one, else among the idle. After an error the connection
    # goes back to the pool (`_hand_back`), which checks it and replaces it if it is dead. Keeping
    # connections out of the pool between statements spares each one the pool's acquire and release (a
    # release is a shielded task of its own): about a third of the client-side cost of a commit. The
    # pool still opens and closes them; at most `max_size` are taken from it at once (`_lent`), and a
    # statement that finds them all busy waits here for the first one to come back. At close, the idle
    # ones go back at once and the busy ones as they finish, so the pool's close waits only for those.
    async def _take(self) -> Any:
        while True:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if _usable(conn):
                    return conn
                await self._hand_back(conn)
            pool = self._pool
            if pool is None:
                raise StateUnavailableError(f"{self._where()}: the backend is closed")
            if len(self._lent) < self.max_size:
                placeholder = object()  # holds the room while the pool connects
                self._lent[placeholder] = None
                try:
                    conn = await pool.acquire()
                except BaseException as exc:
                    del self._lent[placeholder]
                    self._wake(None)
                    if self._pool is not pool:  # closed meanwhile
                        raise StateUnavailableError(f"{self._where()}: the backend is closed") from None
                    if isinstance(exc, Exception) and _is_unavailable(exc):
                        raise self._unavailable(exc) from None
                    raise
                del self._lent[placeholder]
                self._lent[conn] = pool
                return conn
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # handed one just as this call was cancelled
                    if waiter.result() is not None:
                        self._keep(waiter.result())
                    else:
                        self._wake(None)
                else:
                    self._waiters.remove(waiter)
                raise
            if conn is not None:
                return conn
            # None: one was handed back to the pool, so the pool has room again

    def _keep(self, conn: Any) -> None:
        """`conn` is free again: to the first statement waiting for one, else among the idle."""
        pool = self._lent.get(conn, _GONE)
        if pool is _GONE:  # already handed back
            return
        if pool is not self._pool:  # its pool is closing (or closed): back to it now, so its close need not wait
            del self._lent[conn]
            task = asyncio.get_running_loop().create_task(self._release(pool, conn))
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)
        elif not self._wake(conn):
            self._idle.append(conn)

    def _wake(self, conn: Any) -> bool:
        """Hand `conn` (or, with `None`, room in the pool) to the first waiting statement; whether one was."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    async def _returned(self, conn: Any, exc: BaseException) -> BaseException:
        """Hand `conn` back to the pool after `exc`; what to raise: `exc`, or the `StateUnavailableError` it means."""
        await self._hand_back(conn)
        if isinstance(exc, Exception) and _is_unavailable(exc):
            unavailable = self._unavailable(exc)
            unavailable.__suppress_context__ = True  # as `raise ... from None`: the driver's error stays out of it
            return unavailable
        return exc

    async def _hand_back(self, conn: Any) -> None:
        """Return `conn` to its pool (shielded: a cancelled caller still returns it)."""
        pool = self._lent.pop(conn, None)
        if pool is None:
            return
        if pool is self._pool:
            self._wake(None)
        await self._release(pool, conn)

    async def _release(self, pool: asyncpg.Pool, conn: Any) -> None:
        try:
            await pool.release(conn)
        except Exception:  # a connection that broke is terminated by the pool, which opens a new one
            logger.debug("%s: returning a connection to the pool failed", self._where(), exc_info=True)


_GONE = object()  # `_keep`'s mark for a connection no longer lent


def _usable(conn: Any) -> bool:
    """Whether a kept connection is still open: one the server closed is taken back by its pool, which
    detaches it (asyncpg then refuses every call on it, this one included)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


async def _keep_connection(conn: asyncpg.Connection) -> None:
    """Hand a connection back to the pool as it is.

    asyncpg's default reset costs a round trip per acquire to undo session
    state (listeners, advisory locks, settings) that this backend never
    creates: its only lock is transaction-scoped (`pg_advisory_xact_lock`).
    """


def _display(dsn: str) -> str:
    """The DSN without its password and without its query (which may carry `password=`)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable URL>"
    return redact_url(urlunsplit(parts._replace(query="", fragment="")))


def _location(dsn: str) -> str:
    """`host:port` of a DSN, for messages (the default port filled in; never the password)."""
    try:
        parts = urlsplit(dsn)
        netloc = parts.netloc.rsplit("@", 1)[-1]
    except ValueError:
        return "<unparseable URL>"
    if not netloc:
        return "localhost:5432"
    has_port = "," in netloc or (":" in netloc and not netloc.endswith("]"))  # "[::1]" is a host alone
    return netloc if has_port else f"{netloc}:5432"
