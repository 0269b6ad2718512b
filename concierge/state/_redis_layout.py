"""How the Redis backend lays a session out in keys: how a commit writes them and how they are read back.

Every key starts with one prefix (default `concierge:`), so a database can be shared:

- `{prefix}s:{id}` hash: `version`, `created_at`, `updated_at`, and `stage`,
  `owner`, `expires_at` when not None (an absent field is None);
- `{prefix}v:{id}` hash: state key -> JSON text;
- `{prefix}h:{id}` sorted set: the session's checkpoints (`Commit.keep_checkpoints`),
  each a JSON object of `StoredCheckpoint`'s fields scored by its version; a
  commit adds its checkpoint and prunes those older than its `keep_checkpoints`
  window in the MULTI/EXEC of its changes; absent while the session has none;
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
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from concierge.errors import ConflictError
from concierge.state.base import (
    Commit,
    SessionRecord,
    SessionSummary,
    StoredCheckpoint,
    checkpoint_of,
    update_conflict,
)

_TEN_YEARS = 10 * 365 * 86400.0


def ttl_ms(expires_at: float, now: float, grace: float) -> int:
    """Redis' TTL for a session's metadata: the time left after `now`, plus the grace."""
    left = min(max(expires_at - now, 0.0), _TEN_YEARS)
    return max(1, math.ceil((left + max(grace, 0.1 * left)) * 1000))


def checked_version(commit: Commit, meta: Sequence[str | None], now: float) -> int:
    """The version `commit` brings its session to (given HMGET version, expires_at), or `ConflictError`."""
    version, expires_at = meta
    live = version is not None and (expires_at is None or float(expires_at) > now)
    sid = commit.session_id
    if commit.expected_version == 0:
        if live:
            raise ConflictError(f"session {sid!r} was created concurrently")
        return 1
    if not live or int(version) != commit.expected_version:  # type: ignore[arg-type]
        raise update_conflict(commit, version if live else None)
    return commit.expected_version + 1


def queue_commit(pipe: Any, commit: Commit, version: int, now: float, keys: Sequence[str], ttl: int | None) -> None:
    """Queue inside MULTI the writes of `commit`, checked and bringing its session to `version`.

    `keys` are the session's metadata, values, the expiry and sessions indexes
    and its checkpoints (the scripts' KEYS); `ttl` is the metadata's TTL in ms,
    `None` when the session never expires.
    """
    meta_key, values_key, expiry_key, sessions_key, checkpoints_key = keys
    sid = commit.session_id
    meta = {"updated_at": repr(now)}
    if commit.expected_version == 0:
        # What an expired predecessor left: a new life never sees the old one's state or checkpoints.
        pipe.delete(meta_key, values_key, checkpoints_key)
        meta.update(version="1", created_at=repr(now))
        if commit.owner is not None:
            meta["owner"] = commit.owner
    else:
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
    if commit.keep_checkpoints > 0:
        pipe.zadd(checkpoints_key, {checkpoint_json(checkpoint_of(commit, version, now)): version})
        if version > commit.keep_checkpoints:
            pipe.zremrangebyscore(checkpoints_key, "-inf", version - commit.keep_checkpoints)
    pipe.zadd(sessions_key, {sid: -now})
    # The checkpoints' TTL moves with every commit, one with `keep_checkpoints` 0 included: checkpoints
    # recorded earlier stay as long as their session (on a key that does not exist these are no-ops).
    if commit.expires_at is None or ttl is None:
        pipe.zrem(expiry_key, sid).persist(meta_key).persist(values_key).persist(checkpoints_key)
    else:
        pipe.zadd(expiry_key, {sid: commit.expires_at})
        pipe.pexpire(meta_key, ttl).pexpire(values_key, ttl + 1000).pexpire(checkpoints_key, ttl + 1000)


def live(meta: Mapping[str, str], now: float) -> bool:
    """Whether the metadata hash `meta` (empty when the key is gone) is of a session live at `now`."""
    return bool(meta) and ("expires_at" not in meta or float(meta["expires_at"]) > now)


def pairs(flat: Sequence[str]) -> dict[str, str]:
    """A hash as a script returns it: field, value, field, value, ..."""
    return dict(zip(flat[::2], flat[1::2]))


def checkpoint_json(checkpoint: StoredCheckpoint) -> str:
    """A checkpoint as its sorted set holds it: the version inside keeps two equal changes distinct members."""
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


def checkpoint_from_json(member: str) -> StoredCheckpoint:
    """A checkpoint from its sorted set's member (`checkpoint_json`)."""
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


def record(session_id: str, meta: Mapping[str, str], values: Mapping[str, str] | None) -> SessionRecord:
    """A session from its metadata hash and (unless `None`) its values hash."""
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


def summary(session_id: str, meta: Mapping[str, str], keys: int, size: int) -> SessionSummary:
    """A session's summary from its metadata hash and the count and size of its values."""
    r = record(session_id, meta, None)
    updated_at = float(meta["updated_at"])
    return SessionSummary(session_id, r.version, r.stage, r.owner, keys, size, r.created_at, updated_at, r.expires_at)
