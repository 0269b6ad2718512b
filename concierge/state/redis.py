"""Redis backend on redis-py's asyncio client (`pip install "concierge[redis]"`).

One connection pool per backend, opened by `open()`; it reconnects by itself,
so a backend that lost its server works again as soon as the server is back.
Every key starts with one prefix (default `concierge:`), so a database can be shared:

- `{prefix}s:{id}` hash: `version`, `created_at`, `updated_at`, and `stage`,
  `owner`, `expires_at` when not None (an absent field is None);
- `{prefix}v:{id}` hash: state key -> JSON text;
- `{prefix}h:{id}` sorted set: the session's checkpoints (`Commit.history`),
  each a JSON object of `StoredCheckpoint`'s fields scored by its version; a
  commit adds its checkpoint and prunes those older than its `history` window
  in the MULTI/EXEC of its changes; absent while the session has none;
- `{prefix}expiry` sorted set: id by `expires_at` (never-expiring ids are not in it);
- `{prefix}sessions` sorted set: id by `-updated_at`, so a forward range is
  newest first with ties in id order, as `list_sessions` wants.

Expiry is judged against the caller's `now`, as in every backend. Redis' own
key expiry only frees the memory: a session's keys get a TTL relative to `now`
of the time left plus a grace (`expiry_grace`, or 10% of the time left when
longer), so the sweep normally takes an expired session, with its state, before
Redis drops it; the values key outlives the metadata by a second, so a visible
session always has its values (and its checkpoints, which share the values' TTL).
The sweep prunes index entries of dropped keys. Every path that ends a session's
life - `delete`, the sweep, the creation of a new life of its id - removes its
three keys together, atomically.

An update of one live session's keys (the commit of most calls) is a Lua
script, `_UPDATE`: the version check and the writes, one round trip. Any other
commit WATCHes the metadata of every session it writes, checks the versions
and applies everything in one MULTI/EXEC. If a watched key changed meanwhile,
the versions are read again: a moved version is a `ConflictError`; anything
else (a `touch`) is retried. `touch` and the sweep are Lua scripts instead: a
check and a conditional write, atomic in one round trip, where a WATCH loop
would take several and could starve behind busy sessions. The scripts build
keys from ids, so this needs one Redis server (or primary), not Redis Cluster.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
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
from concierge.state import redact_url, url_secrets
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

__all__ = ["DEFAULT_PREFIX", "RedisBackend"]

DEFAULT_PREFIX = "concierge:"
# Error replies meaning the server cannot serve us now (loading, a replica, persistence failing, ...).
_UNAVAILABLE_REPLIES = {"LOADING", "READONLY", "MISCONF", "OOM", "MASTERDOWN", "NOPERM", "NOAUTH", "WRONGPASS"}
_WATCH_ATTEMPTS = 50  # re-runs of a commit whose watched keys changed without a version moving
_SWEEP_BATCH = 500  # sessions per script run of `clear_expired`: no run blocks the server for long
_TEN_YEARS = 10 * 365 * 86400.0

# Lua that sets a session's expiry, given the locals `expires` (epoch seconds as text, "" = never),
# `ttl_meta` and `ttl_values` (Redis TTLs in ms: the metadata's, the values' and history's) and `id`.
# KEYS: metadata, values, expiry, sessions, history (as in both scripts below).
_SET_EXPIRY = """
if expires == '' then
  redis.call('HDEL', KEYS[1], 'expires_at')
  redis.call('ZREM', KEYS[3], id)
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[5])
else
  redis.call('HSET', KEYS[1], 'expires_at', expires)
  redis.call('ZADD', KEYS[3], expires, id)
  redis.call('PEXPIRE', KEYS[1], ttl_meta)
  redis.call('PEXPIRE', KEYS[2], ttl_values)
  redis.call('PEXPIRE', KEYS[5], ttl_values)
end
"""

# KEYS: metadata, values, expiry, sessions, history. ARGV: now, expires_at ("" = never), TTL ms of the
# metadata, of the values (and history), id, -now. Renewing is activity: `updated_at` moves forward, never back.
_TOUCH = f"""
local now = tonumber(ARGV[1])
local exp = redis.call('HGET', KEYS[1], 'expires_at')
if redis.call('EXISTS', KEYS[1]) == 0 or (exp and tonumber(exp) <= now) then return 0 end
local expires, ttl_meta, ttl_values, id = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
{_SET_EXPIRY}
if tonumber(redis.call('HGET', KEYS[1], 'updated_at')) < now then
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[6], id)
end
return 1
"""

# The commonest commit - an update of one live session's keys, no creation, clear or checkpoint - in one
# round trip: the version check and the writes `_queue` would send in MULTI/EXEC, atomic as a script.
# KEYS: metadata, values, expiry, sessions, history. ARGV: now, expected version, new version, expires_at
# ("" = never), TTL ms of the metadata, of the values (and history), id, -now, stage ("" unchanged, "n"
# None, "s" the next argument), the stage, the number N of removed keys, N removed keys, then key, value
# pairs written. Returns {2} when applied, {1, version} when the version moved, {0} when gone or expired.
_UPDATE = f"""
local meta = redis.call('HMGET', KEYS[1], 'version', 'expires_at')
if not meta[1] or (meta[2] and tonumber(meta[2]) <= tonumber(ARGV[1])) then return {{0}} end
if meta[1] ~= ARGV[2] then return {{1, meta[1]}} end
if ARGV[9] == 'n' then redis.call('HDEL', KEYS[1], 'stage') end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1], 'version', ARGV[3])
if ARGV[9] == 's' then redis.call('HSET', KEYS[1], 'stage', ARGV[10]) end
local removed = tonumber(ARGV[11])
if removed > 0 then redis.call('HDEL', KEYS[2], unpack(ARGV, 12, 11 + removed)) end
if #ARGV > 11 + removed then redis.call('HSET', KEYS[2], unpack(ARGV, 12 + removed, #ARGV)) end
redis.call('ZADD', KEYS[4], ARGV[8], ARGV[7])
local expires, ttl_meta, ttl_values, id = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
{_SET_EXPIRY}
return {{2}}
"""
# Keys one `_UPDATE` may carry: Lua's `unpack` is bounded by its stack; larger commits use MULTI/EXEC.
_UPDATE_MAX_KEYS = 1000

# KEYS: expiry, sessions. ARGV: now, limit, prefix, "1" to return the sessions. Deletes up to `limit`
# sessions expired at `now`, oldest expiry first; returns {count, {{id, metadata, values}, ...}}.
_SWEEP = """
local now, limit, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local taken, skipped, out = 0, 0, {}
while taken < limit do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', skipped, limit - taken)
  if #batch == 0 then break end
  for _, id in ipairs(batch) do
    local meta, vals, hist = prefix .. 's:' .. id, prefix .. 'v:' .. id, prefix .. 'h:' .. id
    local exp = redis.call('HGET', meta, 'expires_at')
    if exp and tonumber(exp) > now then
      skipped = skipped + 1
    else
      if exp and ARGV[4] == '1' then
        out[#out + 1] = {id, redis.call('HGETALL', meta), redis.call('HGETALL', vals)}
      end
      if exp or redis.call('EXISTS', meta) == 0 then
        -- expired, or already dropped by Redis' own expiry (then only the index remembers it)
        if exp then taken = taken + 1 end
        redis.call('DEL', meta, vals, hist)
        redis.call('ZREM', KEYS[2], id)
      end
      redis.call('ZREM', KEYS[1], id)
    end
  end
end
return {taken, out}
"""

# KEYS: metadata, values. {metadata, number of keys, UTF-8 bytes of the values}, or nil when gone:
# counted in the server, so a listing never transfers the values.
_SUMMARY = """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return false end
local size = 0
for _, value in ipairs(redis.call('HVALS', KEYS[2])) do size = size + #value end
return {meta, redis.call('HLEN', KEYS[2]), size}
"""


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
    supports_history = True

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

    def _history_key(self, session_id: str) -> str:
        """The key of a session's checkpoints."""
        return f"{self.prefix}h:{session_id}"

    def _ttl_ms(self, expires_at: float, now: float) -> int:
        """Redis' TTL for a session's metadata: the time left after `now`, plus the grace."""
        left = min(max(expires_at - now, 0.0), _TEN_YEARS)
        return max(1, math.ceil((left + max(self.expiry_grace, 0.1 * left)) * 1000))

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
            self._touch_script = client.register_script(_TOUCH)
            self._update_script = client.register_script(_UPDATE)
            self._sweep_script = client.register_script(_SWEEP)
            self._summary_script = client.register_script(_SUMMARY)
            self._client = client

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            async with self._open_lock:
                client, self._client = self._client, None
                if client is not None:
                    await _close(client)

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
    async def create(self, session_id: str, *, owner: str | None, expires_at: float | None, now: float) -> None:
        await self._commit_all([Commit(session_id, 0, owner=owner, expires_at=expires_at)], now, "already exists")

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
                if not _live(meta, now):
                    return None
                record = _record(session_id, meta, None)
                if record.version == known_version and known_created_at in (None, record.created_at):
                    return record
            async with client.pipeline(transaction=True) as pipe:  # both from one snapshot
                meta, values = await pipe.hgetall(meta_key).hgetall(values_key).execute()
        return _record(session_id, meta, values) if _live(meta, now) else None

    async def commit(self, commit: Commit, *, now: float) -> int:
        """As `StateBackend.commit`; an update of a live session's keys is one script, one round trip.

        A creation, a clear, a commit that records a checkpoint or one of more
        than `_UPDATE_MAX_KEYS` keys takes the general path (WATCH, MULTI/EXEC).
        """
        if not commit.is_update or len(commit.changes) > _UPDATE_MAX_KEYS:
            return (await self._commit_all([commit], now))[0]
        sid = commit.session_id
        version = commit.expected_version + 1
        if commit.expires_at is None:
            expires, ttl = "", 0
        else:
            expires, ttl = repr(float(commit.expires_at)), self._ttl_ms(commit.expires_at, now)
        stage_mode = "" if commit.stage is UNCHANGED else "n" if commit.stage is None else "s"
        removed = [key for key, value in commit.changes.items() if value is None]
        written = [item for key, value in commit.changes.items() if value is not None for item in (key, value)]
        keys = [*self._keys(sid), self._expiry_key, self._sessions_key, self._history_key(sid)]
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
        return await self._commit_all(commits, now)

    async def _commit_all(
        self, commits: Sequence[Commit], now: float, exists: str = "was created concurrently"
    ) -> list[int]:
        if not commits:
            return []
        meta_keys = [self._keys(c.session_id)[0] for c in commits]
        async with self._redis() as client:
            for _ in range(_WATCH_ATTEMPTS):
                async with client.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(*meta_keys)
                        metas = [await pipe.hmget(key, "version", "expires_at") for key in meta_keys]
                        versions = [_checked(c, m, now, exists) for c, m in zip(commits, metas)]
                        pipe.multi()
                        for commit in commits:
                            self._queue(pipe, commit, now)
                        await pipe.execute()
                        return versions
                    except WatchError:  # nothing was written; read the versions again
                        continue
        raise ConflictError(f"session {commits[0].session_id!r} kept changing during this commit; retry")

    def _queue(self, pipe: Any, commit: Commit, now: float) -> None:
        """Queue the writes of one checked commit inside MULTI."""
        sid = commit.session_id
        meta_key, values_key = self._keys(sid)
        history_key = self._history_key(sid)
        meta = {"updated_at": repr(now)}
        if commit.expected_version == 0:
            version = 1
            # What an expired predecessor left: a new life never sees the old one's state or checkpoints.
            pipe.delete(meta_key, values_key, history_key)
            meta.update(version="1", created_at=repr(now))
            if commit.owner is not None:
                meta["owner"] = commit.owner
        else:
            version = commit.expected_version + 1
            meta["version"] = str(version)
            pipe.hdel(meta_key, "expires_at", *(["stage"] if commit.stage is None else []))  # set again below
            removed = [key for key, value in commit.changes.items() if value is None]
            if commit.clear:
                pipe.delete(values_key)
            elif removed:
                pipe.hdel(values_key, *removed)
        if isinstance(commit.stage, str):
            meta["stage"] = commit.stage
        if commit.expires_at is not None:
            meta["expires_at"] = repr(float(commit.expires_at))
        pipe.hset(meta_key, mapping=meta)
        written = {key: value for key, value in commit.changes.items() if value is not None}
        if written:
            pipe.hset(values_key, mapping=written)
        if commit.history > 0:
            pipe.zadd(history_key, {_checkpoint_json(checkpoint_of(commit, version, now)): version})
            if version > commit.history:
                pipe.zremrangebyscore(history_key, "-inf", version - commit.history)
        pipe.zadd(self._sessions_key, {sid: -now})
        # The history key's TTL moves with every commit, one with `history` 0 included: checkpoints
        # recorded earlier stay as long as their session (on a key that does not exist these are no-ops).
        if commit.expires_at is None:
            pipe.zrem(self._expiry_key, sid).persist(meta_key).persist(values_key).persist(history_key)
        else:
            ttl = self._ttl_ms(commit.expires_at, now)
            pipe.zadd(self._expiry_key, {sid: commit.expires_at})
            pipe.pexpire(meta_key, ttl).pexpire(values_key, ttl + 1000).pexpire(history_key, ttl + 1000)

    async def touch(self, session_id: str, *, expires_at: float | None, now: float) -> bool:
        ttl = 0 if expires_at is None else self._ttl_ms(expires_at, now)
        expires = "" if expires_at is None else repr(float(expires_at))
        keys = [*self._keys(session_id), self._expiry_key, self._sessions_key, self._history_key(session_id)]
        async with self._redis():
            found = await self._touch_script(keys, [repr(now), expires, ttl, ttl + 1000, session_id, repr(-now)])
        return bool(found)

    async def delete(self, session_id: str) -> bool:
        meta_key, values_key = self._keys(session_id)
        async with self._redis() as client, client.pipeline(transaction=True) as pipe:
            pipe.delete(meta_key).delete(values_key, self._history_key(session_id))
            existed, *_ = await pipe.zrem(self._expiry_key, session_id).zrem(self._sessions_key, session_id).execute()
        return bool(existed)

    async def history(self, session_id: str) -> list[StoredCheckpoint]:
        """As `StateBackend.history`; a session Redis' own expiry has dropped has none."""
        meta_key, _ = self._keys(session_id)
        async with self._redis() as client, client.pipeline(transaction=True) as pipe:
            # The metadata decides whether the session exists, as everywhere: the checkpoints' key
            # outlives it by a second when Redis' expiry drops them.
            exists, members = await pipe.exists(meta_key).zrange(self._history_key(session_id), 0, -1).execute()
        return [_checkpoint(member) for member in members] if exists else []

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
        return [_record(sid, _pairs(meta), _pairs(values)) for sid, meta, values in taken]

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
                    if not reply or not (include_expired or _live(_pairs(reply[0]), now)):
                        continue  # gone meanwhile, or expired
                    if skip:
                        skip -= 1
                    elif len(found) < limit:
                        found.append(_summary(sid, _pairs(reply[0]), int(reply[1]), int(reply[2])))
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


def _live(meta: Mapping[str, str], now: float) -> bool:
    return bool(meta) and ("expires_at" not in meta or float(meta["expires_at"]) > now)


def _checked(commit: Commit, meta: Sequence[str | None], now: float, exists: str) -> int:
    """The version `commit` brings its session to (given HMGET version, expires_at), or `ConflictError`."""
    version, expires_at = meta
    live = version is not None and (expires_at is None or float(expires_at) > now)
    sid = commit.session_id
    if commit.expected_version == 0:
        if live:
            raise ConflictError(f"session {sid!r} {exists}")
        return 1
    if not live or int(version) != commit.expected_version:  # type: ignore[arg-type]
        raise update_conflict(commit, version if live else None)
    return commit.expected_version + 1


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    """A hash as a script returns it: field, value, field, value, ..."""
    return dict(zip(flat[::2], flat[1::2]))


def _checkpoint_json(checkpoint: StoredCheckpoint) -> str:
    """A checkpoint as its history key holds it: the version inside keeps two equal changes distinct members."""
    document = {
        "version": checkpoint.version,
        "at": float(checkpoint.at),
        "tool": checkpoint.tool,
        "changes": checkpoint.changes,
        "previous": checkpoint.previous,
        "stage_changed": checkpoint.stage_changed,
        "stage": checkpoint.stage,
        "previous_stage": checkpoint.previous_stage,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def _checkpoint(member: str) -> StoredCheckpoint:
    """A checkpoint from its history key's member (`_checkpoint_json`)."""
    d = json.loads(member)
    return StoredCheckpoint(
        int(d["version"]),
        float(d["at"]),
        d["tool"],
        d["changes"],
        d["previous"],
        bool(d["stage_changed"]),
        d["stage"],
        d["previous_stage"],
    )


def _record(session_id: str, meta: Mapping[str, str], values: Mapping[str, str] | None) -> SessionRecord:
    expires_at = meta.get("expires_at")
    return SessionRecord(
        session_id,
        int(meta["version"]),
        None if values is None else dict(values),
        meta.get("stage"),
        meta.get("owner"),
        None if expires_at is None else float(expires_at),
        float(meta["created_at"]),
    )


def _summary(session_id: str, meta: Mapping[str, str], keys: int, size: int) -> SessionSummary:
    r = _record(session_id, meta, None)
    updated_at = float(meta["updated_at"])
    return SessionSummary(session_id, r.version, r.stage, r.owner, keys, size, r.created_at, updated_at, r.expires_at)


def _location(url: str) -> str:
    """`host:port` of a Redis URL, defaults filled in (never the password)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or 6379
    except ValueError:
        return "<unparseable URL>"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
