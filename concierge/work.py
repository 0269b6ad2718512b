"""The unit of work: one request's view of one session's state.

A `UnitOfWork` is bound to a contextvar around each request that runs user
code. `get_state`/`set_state`/`delete_state` are synchronous and touch only its
working copy; the `SessionStore` commits the changed keys in one backend call
after the handler returns, or drops them when it failed. Sync tools run in a
worker thread with a copy of the context, which still points at the same
`UnitOfWork` object, so their writes land in it too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel

from concierge.errors import (
    ConciergeError,
    ConfigurationError,
    ConflictError,
    NoSessionError,
    StateKeyError,
    StateScopeError,
    StateTypeError,
    StateValueError,
)
from concierge.state.base import UNCHANGED, Commit, SessionRecord, StateBackend

__all__ = [
    "GLOBAL_BUCKET",
    "MAX_KEY_LENGTH",
    "SCOPES",
    "SessionStore",
    "UnitOfWork",
    "current_unit",
    "decode",
    "encode",
]

logger = logging.getLogger("concierge")

MAX_KEY_LENGTH = 256
"""Longest state key accepted, in characters."""

SCOPES = ("session", "user", "global")
"""Where a key lives: this session, the caller across sessions, or everyone."""

SHARED_SCOPES = ("user", "global")
"""The scopes many sessions write to; always locked and loaded in this order."""

GLOBAL_BUCKET = "global"
"""Storage id of the one bucket every caller shares. User buckets are `user:<principal>`."""

_current: contextvars.ContextVar[UnitOfWork | None] = contextvars.ContextVar("concierge_unit", default=None)


def current_unit(operation: str, scope: str = "session") -> UnitOfWork:
    """The working copy of `scope` in the unit of work bound to this request.

    Raises:
        NoSessionError: called outside a request concierge serves, or in one
            that carries no session (or, for `user`, no identifiable caller).
        StateScopeError: `scope` is not one of `SCOPES`.
    """
    unit = _current.get()
    if unit is None:
        raise NoSessionError(
            f"{operation} was called outside a tool call, resource read or prompt served by Concierge; "
            "state belongs to a session, and only a request has one"
        )
    with unit._recording():
        if unit.session_id is None:
            raise NoSessionError(f"{operation}: {unit.no_session_reason}")
        return unit if scope == "session" else unit.bucket(operation, scope)


def check_key(key: object) -> str:
    """Validate a state key: a non-empty `str` of at most `MAX_KEY_LENGTH` characters.

    NUL and lone surrogates are refused too: PostgreSQL cannot store a NUL in text, and
    no store (nor the JSON on the wire) can carry a lone surrogate.
    """
    if not isinstance(key, str):
        raise StateKeyError(f"state key must be a str, not {type(key).__name__}")
    if not key:
        raise StateKeyError("state key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise StateKeyError(f"state key {key[:32]!r}... is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    if "\x00" in key:  # PostgreSQL text cannot hold it; refused everywhere so tools behave alike on every store
        raise StateKeyError(f"state key {key[:32]!r} contains a NUL character (U+0000), which no store accepts")
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError:  # a lone surrogate: no store can keep it, and it cannot be sent as JSON
            raise StateKeyError(
                f"state key {key[:32]!r} is not valid Unicode text (it contains a lone surrogate)"
            ) from None
    return key


def encode(key: str, value: Any, max_bytes: int | None = None) -> str:
    """Encode `value` as compact JSON text (pydantic models via `model_dump(mode="json")`).

    Raises:
        StateTypeError: the value (or something inside it) is not JSON-serialisable.
        StateValueError: the encoding is longer than `max_bytes`.
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        text = json.dumps(
            value,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_reject,
        )
    except _NotJSON as exc:
        hint = _HINTS.get(
            exc.type_name,
            "convert it to a JSON type (dict, list, str, int, float, bool, None)",
        )
        where = "value" if exc.value is value else "value contains an object that"
        raise StateTypeError(
            f"state key {key!r}: {where} of type {exc.type_name} is not JSON-serialisable; {hint}"
        ) from None
    except ValueError as exc:  # NaN / Infinity, or a circular reference
        raise StateTypeError(f"state key {key!r}: value is not valid JSON ({exc})") from None
    except TypeError as exc:  # e.g. a dict key that is not str, int, float, bool or None
        raise StateTypeError(f"state key {key!r}: value is not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise StateTypeError(f"state key {key!r}: value is nested too deeply to encode as JSON") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise StateTypeError(
            f"state key {key!r}: value contains a str that is not valid Unicode text (a lone surrogate)"
        ) from None
    if max_bytes is not None and size > max_bytes:
        raise StateValueError(
            f"state key {key!r}: value is {size} bytes as JSON; the limit (max_value_bytes) is {max_bytes}"
        )
    return text


def decode(text: str) -> Any:
    """A fresh Python value from stored JSON text."""
    return json.loads(text)


class _NotJSON(TypeError):
    def __init__(self, value: Any) -> None:
        super().__init__(type(value).__name__)
        self.value = value
        self.type_name = type(value).__name__


def _reject(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise _NotJSON(value)


_HINTS = {
    "set": "convert it to a list",
    "frozenset": "convert it to a list",
    "bytes": "decode it to a str (e.g. base64)",
    "datetime": "store value.isoformat()",
    "date": "store value.isoformat()",
    "Decimal": "store it as a str or float",
    "UUID": "store str(value)",
}


@dataclass(eq=False)
class UnitOfWork:
    """One request's working copy of one session's state.

    Attributes:
        session_id: the storage id of the session, `None` when the request has none.
        version: the version loaded (0: the session does not exist yet).
        base: the stored values when loaded (key -> JSON text); never mutated.
        changes: keys written (JSON text) or deleted (`None`) by this request.
    """

    session_id: str | None
    version: int = 0
    base: dict[str, str] = field(default_factory=dict)
    stage: str | None = None
    owner: str | None = None
    expires_at: float | None = None
    created_at: float = 0.0
    changes: dict[str, str | None] = field(default_factory=dict)
    cleared: bool = False
    stage_changed: bool = False
    must_persist: bool = False
    max_value_bytes: int | None = None
    no_session_reason: str = "this request has no session"
    error: Exception | None = None
    """The last concierge error raised to user code in this request, so the
    MCP glue can report its message where the SDK would hide it (prompts)."""
    expiring: bool = True
    """Whether the session's TTL applies (user and global buckets never expire)."""
    scopes: dict[str, UnitOfWork] = field(default_factory=dict)
    """The user and global buckets loaded for this request, by scope."""
    scope_errors: dict[str, str] = field(default_factory=dict)
    """Why a scope cannot be had in this request (e.g. `user` without a caller)."""
    missed: set[str] = field(default_factory=set)
    """Shared scopes user code asked for that were not loaded: the call is re-run with them."""
    detached: bool = False
    """The session is gone from the store (it expired); only its shared buckets are written."""
    tool: str | None = None
    """What runs in this unit (a tool's name), recorded in the checkpoints its commit makes."""
    base_stage: str | None = field(default=None, init=False)
    """The stage when loaded (`stage` as given at construction); never mutated."""

    def __post_init__(self) -> None:
        self.base_stage = self.stage

    def bucket(self, operation: str, scope: str) -> UnitOfWork:
        """The loaded working copy of a shared scope."""
        found = self.scopes.get(scope)
        if found is not None:
            return found
        if scope not in SHARED_SCOPES:
            raise StateScopeError(f"{operation}: scope must be one of {', '.join(map(repr, SCOPES))}, not {scope!r}")
        if scope in self.scope_errors:
            raise NoSessionError(f"{operation}(scope={scope!r}): {self.scope_errors[scope]}")
        self.missed.add(scope)
        raise _ScopeNotLoaded(f"{operation}(scope={scope!r}): {scope} state was not loaded for this call")

    def units(self) -> list[UnitOfWork]:
        """The working copies a commit writes: this session's and the shared buckets', the session first."""
        own = [self] if self.session_id is not None and not self.detached else []
        return own + [self.scopes[s] for s in SHARED_SCOPES if s in self.scopes]

    def checkpoint(
        self,
    ) -> list[tuple[UnitOfWork, dict[str, str | None], bool, str | None, bool]]:
        """What every working copy holds now, for `rollback`."""
        return [(u, dict(u.changes), u.cleared, u.stage, u.stage_changed) for u in self.units()]

    @staticmethod
    def rollback(
        saved: list[tuple[UnitOfWork, dict[str, str | None], bool, str | None, bool]],
    ) -> None:
        """Drop every change made since `checkpoint` (a hook that raised leaves nothing behind)."""
        for unit, changes, cleared, stage, stage_changed in saved:
            unit.changes, unit.cleared, unit.stage, unit.stage_changed = (
                changes,
                cleared,
                stage,
                stage_changed,
            )

    # -- the dict API ---------------------------------------------------------
    def raw(self, key: str) -> str | None:
        if key in self.changes:
            return self.changes[key]
        if self.cleared:
            return None
        return self.base.get(key)

    @contextmanager
    def _recording(self) -> Iterator[None]:
        try:
            yield
        except ConciergeError as exc:
            self.error = exc
            raise

    def get(self, key: str, default: Any = None) -> Any:
        with self._recording():
            text = self.raw(check_key(key))
        return default if text is None else decode(text)

    def set(self, key: str, value: Any) -> None:
        with self._recording():
            key = check_key(key)
            self.changes[key] = encode(key, value, self.max_value_bytes)

    def delete(self, key: str) -> None:
        with self._recording():
            key = check_key(key)
        if self.raw(key) is not None or key in self.changes:
            self.changes[key] = None

    def keys(self) -> Iterator[str]:
        visible = set() if self.cleared else set(self.base)
        for key, value in self.changes.items():
            if value is None:
                visible.discard(key)
            else:
                visible.add(key)
        return iter(sorted(visible))

    def clear(self) -> None:
        """Drop every key (and the stage) of the session, as `terminate_session` does."""
        self.cleared = True
        self.changes.clear()
        self.set_stage(None)

    def set_stage(self, stage: str | None) -> None:
        if stage != self.stage:
            self.stage = stage
            self.stage_changed = True

    @property
    def dirty(self) -> bool:
        return bool(self.changes) or self.cleared or self.stage_changed or self.must_persist

    def overwritten(self) -> dict[str, str | None]:
        """What committing this unit overwrites: each changed key's loaded JSON text (`None`: absent).

        A cleared unit overwrites every key it loaded.
        """
        before: dict[str, str | None] = dict(self.base) if self.cleared else {}
        for key in self.changes:
            before.setdefault(key, self.base.get(key))
        return before

    def committed_values(self) -> dict[str, str]:
        """The session's values as they stand after this unit commits."""
        values = {} if self.cleared else dict(self.base)
        for key, value in self.changes.items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
        return values


class _ScopeNotLoaded(ConciergeError):
    """A shared scope was used that this call did not load; the call is re-run with it."""


class _Snapshots:
    """A bounded LRU of the last committed values per session, tagged with their version.

    With it, a call on a session this process served last only checks the
    stored version instead of reading every key again, so a call costs the same
    whether the session holds one key or a thousand.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[int, float, dict[str, str]]] = OrderedDict()

    def get(self, session_id: str) -> tuple[int, float, dict[str, str]] | None:
        item = self._items.get(session_id)
        if item is not None:
            self._items.move_to_end(session_id)
        return item

    def put(self, session_id: str, version: int, created_at: float, values: dict[str, str]) -> None:
        if self.capacity <= 0:
            return
        self._items[session_id] = (version, created_at, values)
        self._items.move_to_end(session_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def drop(self, session_id: str) -> None:
        self._items.pop(session_id, None)


class _Locks:
    """Per-session locks that exist only while someone holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(session_id, (None, 0))
        if lock is None:
            lock = anyio.Lock(fast_acquire=True)  # no scheduler round trip when uncontended
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)


class SessionStore:
    """Runs units of work against a backend: load, bind, commit, serialise per session.

    Args:
        backend: where sessions persist.
        ttl: seconds of inactivity after which a session expires (`None` = never).
        clock: returns the current time in epoch seconds; inject one in tests.
        max_value_bytes: largest JSON encoding accepted by `set_state`.
        snapshot_capacity: sessions whose last values are cached in this process.
        history: checkpoints kept per session (0: none are recorded); each
            commit records what it changed, with what it overwrote.
    """

    def __init__(
        self,
        backend: StateBackend,
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        max_value_bytes: int | None = None,
        snapshot_capacity: int = 4096,
        history: int = 0,
    ) -> None:
        if max_value_bytes is not None and (
            isinstance(max_value_bytes, bool) or not isinstance(max_value_bytes, int) or max_value_bytes <= 0
        ):
            raise ConfigurationError(
                f"max_value_bytes must be a positive whole number of bytes (or None for no limit), "
                f"got {max_value_bytes!r}"
            )
        self.backend = backend
        self.history = history
        self.ttl = ttl
        self.clock = clock
        self.max_value_bytes = max_value_bytes
        self._snapshots = _Snapshots(snapshot_capacity)
        self._locks = _Locks()
        self._opened = 0
        self._open_lock = anyio.Lock()

    # -- lifecycle --------------------------------------------------------------
    @asynccontextmanager
    async def opened(self) -> AsyncIterator[SessionStore]:
        """Open the backend for the span of a server lifespan.

        Lifespans nest (every in-process client enters one), so the backend is
        opened by the first and closed by the last.
        """
        async with self._open_lock:
            if self._opened == 0:
                await self.backend.open()
            self._opened += 1
        try:
            yield self
        finally:
            with anyio.CancelScope(shield=True):
                async with self._open_lock:
                    self._opened -= 1
                    if self._opened == 0:
                        await self.backend.close()

    def expiry(self, now: float) -> float | None:
        return None if self.ttl is None else now + self.ttl

    # -- units of work ----------------------------------------------------------
    def unbound(self, reason: str) -> UnitOfWork:
        """A unit for a request that has no session: state calls raise `reason`."""
        return UnitOfWork(session_id=None, no_session_reason=reason)

    def detached(self, record: SessionRecord) -> UnitOfWork:
        """A unit over a session that is already gone from the store (for end-of-session hooks).

        Its own values can be read; changes to them are not written anywhere.
        """
        unit = UnitOfWork(session_id=record.session_id, base=record.values or {}, stage=record.stage)
        unit.owner, unit.expires_at, unit.created_at = (
            record.owner,
            record.expires_at,
            record.created_at,
        )
        unit.max_value_bytes = self.max_value_bytes
        unit.detached = True
        return unit

    async def load(self, session_id: str, *, create: bool) -> UnitOfWork | None:
        """Load a session into a fresh unit of work.

        Returns `None` when the session does not exist and `create` is false.
        With `create`, a missing session yields an empty unit at version 0 that
        the commit will create.
        """
        now = self.clock()
        cached = self._snapshots.get(session_id)
        if cached is None:
            record = await self.backend.load(session_id, now=now)
        else:
            record = await self.backend.load(session_id, now=now, known_version=cached[0], known_created_at=cached[1])
        if record is None:
            self._snapshots.drop(session_id)
            if not create:
                return None
            return UnitOfWork(session_id=session_id, max_value_bytes=self.max_value_bytes)
        if record.values is None:
            assert cached is not None
            values = cached[2]
        else:
            values = record.values
            self._snapshots.put(session_id, record.version, record.created_at, values)
        return UnitOfWork(
            session_id=session_id,
            version=record.version,
            base=values,
            stage=record.stage,
            owner=record.owner,
            expires_at=record.expires_at,
            created_at=record.created_at,
            max_value_bytes=self.max_value_bytes,
        )

    @asynccontextmanager
    async def locked(self, session_id: str) -> AsyncIterator[None]:
        """Serialise units of work on one session within this process."""
        async with self._locks.hold(session_id):
            yield

    @staticmethod
    @contextmanager
    def bind(unit: UnitOfWork) -> Iterator[UnitOfWork]:
        """Bind `unit` as the current unit of work for the code run inside."""
        token = _current.set(unit)
        try:
            yield unit
        finally:
            _current.reset(token)

    async def commit(self, unit: UnitOfWork) -> None:
        """Write the changes of the unit and its shared buckets in one atomic backend call.

        Raises:
            ConflictError: another process committed to one of them first.
            StateUnavailableError: the backend could not be reached.
        """
        now = self.clock()
        dirty = [u for u in unit.units() if u.dirty]
        if unit.session_id is not None and not unit.dirty:
            await self._renew(unit, now)
        if not dirty:
            return
        commits = [
            Commit(
                session_id=u.session_id,  # type: ignore[arg-type]
                expected_version=u.version,
                changes=dict(u.changes),
                clear=u.cleared,
                stage=u.stage if u.stage_changed else UNCHANGED,
                owner=u.owner,
                expires_at=self.expiry(now) if u.expiring else None,
                tool=unit.tool,
                history=self.history,
                before=u.overwritten() if self.history > 0 else {},
                stage_before=u.base_stage,
            )
            for u in dirty
        ]
        try:
            if len(commits) == 1:
                versions = [await self.backend.commit(commits[0], now=now)]
            else:
                versions = await self.backend.commit_all(commits, now=now)
        except ConflictError:
            for u in dirty:
                self._snapshots.drop(u.session_id)  # type: ignore[arg-type]
            raise
        for u, version in zip(dirty, versions):
            # A creating commit stamps `now` as the new life's created_at.
            created_at = now if u.version == 0 else u.created_at
            self._snapshots.put(u.session_id, version, created_at, u.committed_values())  # type: ignore[arg-type]

    async def load_shared(
        self,
        unit: UnitOfWork,
        scopes: set[str],
        user: str | None,
        user_error: str,
        stack: AsyncExitStack,
    ) -> None:
        """Lock and load the shared buckets `scopes` into `unit`, in one fixed order.

        Every request takes its session's lock first, then `user`, then
        `global` (`SHARED_SCOPES`), so two requests never wait on each other in
        a cycle. The locks are held until `stack` closes.
        """
        unit.scopes.clear()
        unit.scope_errors.clear()
        unit.missed.clear()
        if user is None:
            unit.scope_errors["user"] = user_error
        for scope in SHARED_SCOPES:
            if scope not in scopes or scope in unit.scope_errors:
                continue
            bucket_id = GLOBAL_BUCKET if scope == "global" else "user:" + user  # type: ignore[operator]
            await stack.enter_async_context(self.locked(bucket_id))
            bucket = await self.load(bucket_id, create=True)
            assert bucket is not None
            bucket.expiring = False
            if bucket.version == 0:
                bucket.owner = user if scope == "user" else None
            unit.scopes[scope] = bucket

    async def expired(self, session_id: str) -> SessionRecord | None:
        """The session as stored if it exists but has expired (not yet swept), else `None`."""
        record = await self.backend.load(session_id, now=float("-inf"))
        if record is None or record.expires_at is None or record.expires_at > self.clock():
            return None
        return record

    async def _renew(self, unit: UnitOfWork, now: float) -> None:
        """Push back the expiry of a session a call only read, at most once a minute.

        Renewing on every read would turn every read into a write; a session
        idle for the full TTL still expires within a minute of it.
        """
        if unit.version == 0 or self.ttl is None or not unit.expiring or unit.detached:
            return
        if unit.expires_at is not None and unit.expires_at - now > self.ttl - min(60.0, self.ttl / 10):
            return
        await self.backend.touch(unit.session_id, expires_at=now + self.ttl, now=now)  # type: ignore[arg-type]

    def forget(self, session_id: str) -> None:
        """Drop what this process caches of a session (it was deleted behind the store's back)."""
        self._snapshots.drop(session_id)

    async def delete(self, session_id: str) -> bool:
        """Delete a session outright."""
        self._snapshots.drop(session_id)
        return await self.backend.delete(session_id)
