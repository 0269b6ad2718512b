"""Redis backend on redis-py's asyncio client (`pip install "concierge[redis]"`).

One connection pool per backend, opened by `open()`; it reconnects by itself,
so a backend that lost its server works again as soon as the server is back.
`concierge.state._redis_layout` describes the keys a session is stored in and
how they expire; `concierge.state._redis_scripts` holds the Lua scripts.

An update of one live session's keys (the commit of most calls) is a Lua
script, `UPDATE`: the version check and the writes, one round trip. Any other
commit WATCHes the metadata of every session it writes, checks the versions
and applies everything in one MULTI/EXEC. If a watched key changed meanwhile,
the versions are read again: a moved version is a `ConflictError`; anything
else (a `touch`) is retried. `touch` and the sweep are Lua scripts too: a
check and a conditional write, atomic in one round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from concierge.errors import ConfigurationError, ConflictError, StateUnavailableError
from concierge.state import _redis_layout as layout
from concierge.state import _redis_scripts as scripts
from concierge.state import redact_url, url_secrets
from concierge.state.base import (
    UNCHANGED,
    ChangeCallback,
    Commit,
    SessionRecord,
    SessionSummary,
    StateBackend,
    StoredCheckpoint,
    check_page,
    update_conflict,
)

__all__ = ["DEFAULT_PREFIX", "RedisBackend"]

_logger = logging.getLogger("concierge")

DEFAULT_PREFIX = "concierge:"
# Error replies meaning the server cannot serve us now (loading, a replica, persistence failing, ...).
_UNAVAILABLE_REPLIES = {"LOADING", "READONLY", "MISCONF", "OOM", "MASTERDOWN", "NOPERM", "NOAUTH", "WRONGPASS"}
_WATCH_ATTEMPTS = 50  # re-runs of a commit whose watched keys changed without a version moving
_SWEEP_BATCH = 500  # sessions per script run of `clear_expired`: no run blocks the server for long


class RedisBackend(StateBackend):
    """Sessions in a Redis database.

    Args:
        url: a `redis://` or `rediss://` URL as redis-py takes it (without `prefix=`).
        prefix: what every key of this store starts with; two stores in one
            database need prefixes neither of which starts the other.
        expiry_grace: the least time, in seconds, Redis keeps an expired
            session's keys for the sweep to take it first.
        connect_timeout, socket_timeout: seconds to wait for a connection, for a reply.
        max_connections: bound of the connection pool.
    """

    scheme = "redis"
    supports_checkpoints = True
    pushes_changes = True  # pub/sub

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        expiry_grace: float = 300.0,
        connect_timeout: float = 10.0,
        socket_timeout: float = 30.0,
        max_connections: int = 100,
    ) -> None:
        self._url = url
        self.prefix = prefix
        self.expiry_grace = expiry_grace
        self.connect_timeout = connect_timeout
        self.socket_timeout = socket_timeout
        self.max_connections = max_connections
        self.location = _location(url)
        self._shown = redact_url(url)
        self._secrets = url_secrets(url)
        self._client: aioredis.Redis | None = None
        self._open_lock = anyio.Lock()
        self._expiry_key, self._sessions_key = f"{prefix}expiry", f"{prefix}sessions"
        self._channel = f"{self._sessions_key}:changes"  # what the UPDATE script publishes to, too
        self._on_change: ChangeCallback | None = None
        self._follower: asyncio.Task[None] | None = None
        self._subscribed = False

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        """The backend for `redis[s]://[[user]:password@]host[:port][/db][?prefix=...]`.

        Raises:
            ConfigurationError: the URL is malformed; the message never shows the password.
        """
        usage = "use redis://[:password@]host:port/db (or rediss:// for TLS), optionally ?prefix=name:"
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigurationError(f"Redis state URL {redact_url(url)!r} is malformed ({exc}); {usage}") from None
        if parts.scheme.lower() not in ("redis", "rediss"):
            raise ConfigurationError(f"{redact_url(url)!r} is not a redis:// or rediss:// URL")
        db = unquote(parts.path).strip("/")
        if db and not db.isdigit():
            raise ConfigurationError(f"Redis state URL {redact_url(url)!r}: database {db!r} is not a number; {usage}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((value for key, value in reversed(query) if key == "prefix"), DEFAULT_PREFIX)
        rest = urlencode([(key, value) for key, value in query if key != "prefix"])
        return cls(urlunsplit(parts._replace(query=rest)), prefix=prefix)

    def __repr__(self) -> str:
        return f"RedisBackend({self._shown!r}, prefix={self.prefix!r})"

    def _unavailable(self, exc: BaseException) -> StateUnavailableError:
        reason = str(exc) or type(exc).__name__
        for secret in self._secrets:  # no driver message may carry the password out
            reason = reason.replace(secret, "***")
        return StateUnavailableError(
            f"Redis at {self.location} ({self._shown}) is unavailable: {reason.rstrip('.')}. "
            "Check that the server is running and reachable; concierge reconnects by itself when it is back."
        )

    def _keys(self, session_id: str) -> tuple[str, str]:
        """The metadata and values keys of a session."""
        return f"{self.prefix}s:{session_id}", f"{self.prefix}v:{session_id}"

    def _checkpoints_key(self, session_id: str) -> str:
        """The sorted set of a session's checkpoints."""
        return f"{self.prefix}h:{session_id}"

    def _session_keys(self, session_id: str) -> list[str]:
        """The keys a commit or `touch` of a session writes, in the scripts' order of KEYS."""
        meta_key, values_key = self._keys(session_id)
        return [meta_key, values_key, self._expiry_key, self._sessions_key, self._checkpoints_key(session_id)]

    def _ttl_ms(self, expires_at: float, now: float) -> int:
        """Redis' TTL for a session's metadata: the time left after `now`, plus the grace."""
        return layout.ttl_ms(expires_at, now, self.expiry_grace)

    # -- lifecycle --------------------------------------------------------------
    async def open(self) -> None:
        async with self._open_lock:
            if self._client is not None:
                return
            client = None
            try:
                client = aioredis.Redis.from_url(
                    self._url,
                    decode_responses=True,
                    socket_connect_timeout=self.connect_timeout,
                    socket_timeout=self.socket_timeout,
                    max_connections=self.max_connections,
                    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),  # replaces connections a restart broke
                )
                await client.ping()
            except Exception as exc:
                if client is not None:
                    await _close(client)
                if isinstance(exc, (TypeError, ValueError)):  # an option redis-py does not take
                    raise ConfigurationError(f"Redis state URL {self._shown!r}: {exc}") from None
                if _is_unavailable(exc):
                    raise self._unavailable(exc) from None
                raise
            self._touch_script = client.register_script(scripts.TOUCH)
            self._update_script = client.register_script(scripts.UPDATE)
            self._sweep_script = client.register_script(scripts.SWEEP)
            self._summary_script = client.register_script(scripts.SUMMARY)
            self._client = client

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            async with self._open_lock:
                self._on_change, self._subscribed = None, False
                follower, self._follower = self._follower, None
                if follower is not None:
                    follower.cancel()
                    await asyncio.gather(follower, return_exceptions=True)
                client, self._client = self._client, None
                if client is not None:
                    await _close(client)

    # -- the change feed ----------------------------------------------------------
    async def watch(self, on_change: ChangeCallback) -> bool:
        """Pub/sub: every commit publishes `'<version> <id>'` to `<prefix>sessions:changes`, a delete `'- <id>'`."""
        self._on_change = on_change
        if self._follower is None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())
        return True

    def caught_up(self) -> bool:
        return self._subscribed

    async def _follow(self) -> None:
        """Read the channel until `close`; a dropped subscription is told as "changes may be missed" and renewed."""
        delay = 0.05
        while self._on_change is not None:
            client = self._client
            if client is None:
                await asyncio.sleep(delay)
                continue
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while self._on_change is not None:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._subscribed, delay = True, 0.05
                        self._on_change(None, None)  # what was committed before this subscription
                    elif message["type"] == "message":
                        version, _, session_id = str(message["data"]).partition(" ")
                        if session_id:
                            self._on_change(session_id, None if version == "-" else int(version))
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._subscribed:
                    _logger.warning("%s: the change feed's subscription was lost; subscribing again", self._shown)
                    if self._on_change is not None:
                        self._on_change(None, None)
                self._subscribed = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._subscribed = False
                with anyio.CancelScope(shield=True):
                    try:
                        await pubsub.aclose()
                    except Exception:  # a connection that is already gone: nothing to close
                        _logger.debug("%s: closing the change feed's subscription failed", self._shown, exc_info=True)

    @asynccontextmanager
    async def _redis(self) -> AsyncIterator[aioredis.Redis]:
        """The client (opening on first use); a server failure leaves as `StateUnavailableError`."""
        if self._client is None:
            await self.open()
        assert self._client is not None
        try:
            yield self._client
        except Exception as exc:
            if _is_unavailable(exc):
                raise self._unavailable(exc) from None
            raise

    # -- the contract -----------------------------------------------------------
    async def load(
        self,
        session_id: str,
        *,
        now: float,
        known_version: int | None = None,
        known_created_at: float | None = None,
    ) -> SessionRecord | None:
        meta_key, values_key = self._keys(session_id)
        async with self._redis() as client:
            if known_version is not None:  # the metadata alone, when the caller's values are current
                meta = await client.hgetall(meta_key)
                if not layout.live(meta, now):
                    return None
                record = layout.record(session_id, meta, None)
                if record.version == known_version and known_created_at in (None, record.created_at):
                    return record
            async with client.pipeline(transaction=True) as pipe:  # both from one snapshot
                meta, values = await pipe.hgetall(meta_key).hgetall(values_key).execute()
        return layout.record(session_id, meta, values) if layout.live(meta, now) else None

    async def commit(self, commit: Commit, *, now: float) -> int:
        """As `StateBackend.commit`; an update of a live session's keys is one script, one round trip.

        A creation, a clear, a commit that records a checkpoint or one of more
        than `UPDATE_MAX_KEYS` keys takes the general path (WATCH, MULTI/EXEC).
        """
        if not commit.is_update or len(commit.changes) > scripts.UPDATE_MAX_KEYS:
            return (await self.commit_all([commit], now=now))[0]
        sid = commit.session_id
        version = commit.expected_version + 1
        if commit.expires_at is None:
            expires, ttl = "", 0
        else:
            expires, ttl = repr(float(commit.expires_at)), self._ttl_ms(commit.expires_at, now)
        stage_mode = "" if commit.stage is UNCHANGED else "n" if commit.stage is None else "s"
        removed = [key for key, value in commit.changes.items() if value is None]
        written = [item for key, value in commit.changes.items() if value is not None for item in (key, value)]
        keys = self._session_keys(sid)
        args = [
            repr(now),
            str(commit.expected_version),
            str(version),
            expires,
            ttl,
            ttl + 1000,
            sid,
            repr(-now),
            stage_mode,
            commit.stage if isinstance(commit.stage, str) else "",
            len(removed),
            *removed,
            *written,
        ]
        async with self._redis():
            outcome = await self._update_script(keys, args)
        if outcome[0] != 2:
            raise update_conflict(commit, outcome[1] if outcome[0] == 1 else None)
        return version

    async def commit_all(self, commits: Sequence[Commit], *, now: float) -> list[int]:
        if not commits:
            return []
        meta_keys = [self._keys(c.session_id)[0] for c in commits]
        async with self._redis() as client:
            for _ in range(_WATCH_ATTEMPTS):
                async with client.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(*meta_keys)
                        metas = [await pipe.hmget(key, "version", "expires_at") for key in meta_keys]
                        versions = [layout.checked_version(c, m, now) for c, m in zip(commits, metas)]
                        pipe.multi()
                        for commit, version in zip(commits, versions):
                            ttl = None if commit.expires_at is None else self._ttl_ms(commit.expires_at, now)
                            layout.queue_commit(pipe, commit, version, now, self._session_keys(commit.session_id), ttl)
                            pipe.publish(self._channel, f"{version} {commit.session_id}")
                        await pipe.execute()
                        return versions
                    except WatchError:  # nothing was written; read the versions again
                        continue
        raise ConflictError(f"session {commits[0].session_id!r} kept changing during this commit; retry")

    async def touch(self, session_id: str, *, expires_at: float | None, now: float) -> bool:
        ttl = 0 if expires_at is None else self._ttl_ms(expires_at, now)
        expires = "" if expires_at is None else repr(float(expires_at))
        keys = self._session_keys(session_id)
        async with self._redis():
            found = await self._touch_script(keys, [repr(now), expires, ttl, ttl + 1000, session_id, repr(-now)])
        return bool(found)

    async def delete(self, session_id: str) -> bool:
        meta_key, values_key = self._keys(session_id)
        async with self._redis() as client, client.pipeline(transaction=True) as pipe:
            pipe.delete(meta_key).delete(values_key, self._checkpoints_key(session_id))
            pipe.publish(self._channel, f"- {session_id}")
            existed, *_ = await pipe.zrem(self._expiry_key, session_id).zrem(self._sessions_key, session_id).execute()
        return bool(existed)

    async def checkpoints(self, session_id: str) -> list[StoredCheckpoint]:
        """As `StateBackend.checkpoints`; a session Redis' own expiry has dropped has none."""
        meta_key, _ = self._keys(session_id)
        async with self._redis() as client, client.pipeline(transaction=True) as pipe:
            # The metadata decides whether the session exists, as everywhere: the checkpoints' key
            # outlives it by a second when Redis' expiry drops them.
            exists, members = await pipe.exists(meta_key).zrange(self._checkpoints_key(session_id), 0, -1).execute()
        return [layout.checkpoint_from_json(member) for member in members] if exists else []

    async def clear_expired(self, *, now: float) -> int:
        total = 0
        while True:
            count, _ = await self._swept(now, _SWEEP_BATCH, want=False)
            total += count
            if count < _SWEEP_BATCH:
                return total

    async def take_expired(self, *, now: float, limit: int) -> list[SessionRecord]:
        if limit <= 0:
            return []
        _, taken = await self._swept(now, limit, want=True)
        return [layout.record(sid, layout.pairs(meta), layout.pairs(values)) for sid, meta, values in taken]

    async def _swept(self, now: float, limit: int, *, want: bool) -> tuple[int, list[Any]]:
        async with self._redis():
            keys = [self._expiry_key, self._sessions_key]
            count, taken = await self._sweep_script(keys, [repr(now), limit, self.prefix, int(want)])
        return int(count), taken

    async def list_sessions(
        self,
        *,
        now: float,
        prefix: str | None = None,
        include_expired: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> list[SessionSummary]:
        """As `StateBackend.list_sessions`, walking the `sessions` index; not one snapshot of the store."""
        check_page(limit, offset)
        found: list[SessionSummary] = []
        chunk, position, skip = min(max(offset + limit, 100), 1000), 0, offset
        async with self._redis() as client:
            while len(found) < limit:
                batch = await client.zrange(self._sessions_key, position, position + chunk - 1)
                position += len(batch)
                ids = [sid for sid in batch if not prefix or sid.startswith(prefix)]
                async with client.pipeline(transaction=False) as pipe:
                    for sid in ids:
                        await self._summary_script(self._keys(sid), client=pipe)
                    replies = await pipe.execute() if ids else []
                for sid, reply in zip(ids, replies):
                    if not reply or not (include_expired or layout.live(layout.pairs(reply[0]), now)):
                        continue  # gone meanwhile, or expired
                    if skip:
                        skip -= 1
                    elif len(found) < limit:
                        found.append(layout.summary(sid, layout.pairs(reply[0]), int(reply[1]), int(reply[2])))
                if len(batch) < chunk:
                    break
        return found


async def _close(client: aioredis.Redis) -> None:
    with anyio.move_on_after(5):
        try:
            await client.aclose()
        except (OSError, RedisConnectionError, RedisTimeoutError):  # a dead server cannot be said goodbye to
            pass


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
        return True
    return isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0].upper() in _UNAVAILABLE_REPLIES


def _location(url: str) -> str:
    """`host:port` of a Redis URL, defaults filled in (never the password)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or 6379
    except ValueError:
        return "<unparseable URL>"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
