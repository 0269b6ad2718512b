"""Live per-session objects and a per-session cache, held in this process only.

Some things a tool keeps between calls are not data: a database connection, an
HTTP client logged in as the user, a browser page. `LiveObjects` holds them per
(session, key), creates each once, and closes it when its session ends
(terminated, expired, connection closed), when the server shuts down, or when
the per-process bound `max_objects` evicts the least recently used one. The
cache keeps JSON values per session with an expiry. Neither is ever written to
the state backend: they are this process's, for this session, for now.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import anyio

from concierge.config import seconds
from concierge.errors import LiveObjectError, StateTypeError
from concierge.work import current_unit, working_copy

__all__ = ["LiveMethods", "LiveObjects", "session_of"]

_F = TypeVar("_F", bound=Callable[..., Any])

logger = logging.getLogger("concierge")


@dataclass(slots=True)
class _Live:
    value: Any
    close: Callable[[Any], Any] | None


def _default_close(value: Any) -> Callable[[Any], Any] | None:
    """The object's own `aclose()` or `close()`, if it has one."""
    for name in ("aclose", "close"):
        method = getattr(value, name, None)
        if callable(method):
            return lambda _value, method=method: method()
    return None


class LiveObjects:
    """This process's live objects and cached values, per session.

    Args:
        max_objects: live objects kept in this process at most; past it the
            least recently used one is closed and dropped.
        clock: epoch seconds, for cache expiry and idleness.
    """

    def __init__(self, max_objects: int, clock: Callable[[], float]) -> None:
        if max_objects < 1:
            raise ValueError(f"max_live_objects must be at least 1, got {max_objects}")
        self.max_objects = max_objects
        self.clock = clock
        self._objects: OrderedDict[tuple[str, str], _Live] = OrderedDict()
        self._cache: dict[str, dict[str, tuple[float | None, str]]] = {}
        self._last_used: dict[str, float] = {}
        self._creating: dict[tuple[str, str], anyio.Lock] = {}
        self._mutex = threading.Lock()  # sync tools reach this from worker threads
        self._to_close: list[tuple[str, str, _Live]] = []

    def __len__(self) -> int:
        return len(self._objects)

    def sessions(self) -> set[str]:
        """Sessions that hold live objects or cached values here."""
        return {sid for sid, _ in self._objects} | set(self._cache)

    # -- live objects -----------------------------------------------------------------
    def _hit(self, session_id: str, key: str) -> _Live | None:
        self._last_used[session_id] = self.clock()
        live = self._objects.get((session_id, key))
        if live is not None:
            self._objects.move_to_end((session_id, key))
        return live

    def _keep(self, session_id: str, key: str, value: Any, close: Callable[[Any], Any] | None) -> None:
        self._objects[(session_id, key)] = _Live(value, close if close is not None else _default_close(value))
        while len(self._objects) > self.max_objects:
            (sid, old_key), evicted = self._objects.popitem(last=False)
            logger.warning(
                "concierge: max_live_objects=%d reached; closing the least recently used live object %r of session %r",
                self.max_objects,
                old_key,
                sid,
            )
            self._to_close.append((sid, old_key, evicted))

    def get(self, session_id: str, key: str, factory: Callable[[], Any], close: Callable[[Any], Any] | None) -> Any:
        """The live object, created with the sync `factory()` on first use."""
        if inspect.iscoroutinefunction(factory):
            raise LiveObjectError(f"live object {key!r}: the factory is async; use `await app.alive(...)`")
        with self._mutex:
            live = self._hit(session_id, key)
            if live is not None:
                return live.value
            value = factory()
            if inspect.isawaitable(value):
                raise LiveObjectError(
                    f"live object {key!r}: the factory returned an awaitable; use `await app.alive(...)`"
                )
            self._keep(session_id, key, value, close)
            return value

    async def aget(
        self, session_id: str, key: str, factory: Callable[[], Any], close: Callable[[Any], Any] | None
    ) -> Any:
        """The live object, created with `factory()` (sync or async) on first use, once however many ask at once."""
        lock = self._creating.setdefault((session_id, key), anyio.Lock())
        async with lock:
            with self._mutex:
                live = self._hit(session_id, key)
            if live is not None:
                return live.value
            value = factory()
            if inspect.isawaitable(value):
                value = await value
            with self._mutex:
                self._keep(session_id, key, value, close)
        self._creating.pop((session_id, key), None)
        await self.drain()
        return value

    async def drain(self) -> None:
        """Close what eviction dropped (sync code cannot await an async close)."""
        while self._to_close:
            sid, key, live = self._to_close.pop()
            await _close(sid, key, live)

    async def end_session(self, session_id: str) -> int:
        """Close every live object of a session and drop its cache; return how many objects were closed."""
        with self._mutex:
            mine = [(k, self._objects.pop((s, k))) for (s, k) in list(self._objects) if s == session_id]
            self._cache.pop(session_id, None)
            self._last_used.pop(session_id, None)
        for key, live in reversed(mine):  # newest first, like an exit stack
            await _close(session_id, key, live)
        await self.drain()
        return len(mine)

    async def end_idle(self, idle_for: float) -> int:
        """End the sessions not used here for `idle_for` seconds (they have expired); return how many."""
        cutoff = self.clock() - idle_for
        idle = [sid for sid, used in list(self._last_used.items()) if used <= cutoff]
        for sid in idle:
            await self.end_session(sid)
        return len(idle)

    async def close_all(self) -> None:
        """Close everything (server shutdown)."""
        for sid in list(self.sessions()):
            await self.end_session(sid)
        await self.drain()

    # -- cache -------------------------------------------------------------------------
    def cache_get(self, session_id: str, key: str) -> tuple[bool, Any]:
        """`(True, value)` for a fresh entry, else `(False, None)`."""
        with self._mutex:
            self._last_used[session_id] = now = self.clock()
            entry = self._cache.get(session_id, {}).get(key)
            if entry is None:
                return False, None
            expires, text = entry
            if expires is not None and expires <= now:
                del self._cache[session_id][key]
                return False, None
        return True, json.loads(text)

    def cache_put(self, session_id: str, key: str, value: Any, ttl: float | None) -> Any:
        """Keep a JSON copy of `value` for `ttl` seconds (`None`: until the session ends); return a fresh copy."""
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StateTypeError(f"cached value {key!r} is not JSON-serialisable ({exc})") from None
        with self._mutex:
            now = self.clock()
            self._cache.setdefault(session_id, {})[key] = (None if ttl is None else now + ttl, text)
        return json.loads(text)


async def _close(session_id: str, key: str, live: _Live) -> None:
    if live.close is None:
        return
    try:
        result = live.close(live.value)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("concierge: closing live object %r of session %r raised", key, session_id)


def session_of(operation: str) -> str:
    """The storage id of this request's session (`NoSessionError` when it has none)."""
    working_copy(operation)  # raises NoSessionError when the request has no session
    session_id = current_unit(operation).session_id
    assert session_id is not None
    return session_id


def _cache_ttl(ttl: float | timedelta | None) -> float | None:
    return seconds(ttl, what="cache ttl", none=": until the session ends", error=ValueError)


class LiveMethods:
    """The app's API over `LiveObjects`: `live`, `alive`, `cached`, `acached`, `cache` (mixed into `Concierge`)."""

    _live: LiveObjects

    def live(self, key: str, factory: Callable[[], Any], *, close: Callable[[Any], Any] | None = None) -> Any:
        """This session's live object `key`, created by the sync `factory()` on first use.

        Held in this process's memory, never persisted. `close(obj)` (sync or
        async; default: the object's own `aclose()` or `close()`) runs when the
        session ends (terminated, expired, connection closed), at shutdown, or
        when `max_live_objects` evicts it. Use `alive` for an async factory.
        """
        return self._live.get(session_of("live"), key, factory, close)

    async def alive(self, key: str, factory: Callable[[], Any], *, close: Callable[[Any], Any] | None = None) -> Any:
        """`live` for a sync or async `factory`; concurrent first use creates it once."""
        return await self._live.aget(session_of("alive"), key, factory, close)

    def cached(self, key: str, ttl: float | timedelta | None, factory: Callable[[], Any]) -> Any:
        """This session's cached JSON value `key`, computed by `factory()` when absent or older than `ttl`.

        Kept in this process's memory, not part of the session's state and
        never written to the backend; gone when the session ends. Each call
        returns a fresh copy. `ttl=None` keeps it until the session ends.
        """
        session_id = session_of("cached")
        hit, value = self._live.cache_get(session_id, key)
        if hit:
            return value
        return self._live.cache_put(session_id, key, factory(), _cache_ttl(ttl))

    async def acached(self, key: str, ttl: float | timedelta | None, factory: Callable[[], Any]) -> Any:
        """`cached` for a sync or async `factory`."""
        session_id = session_of("acached")
        hit, value = self._live.cache_get(session_id, key)
        if hit:
            return value
        value = factory()
        if inspect.isawaitable(value):
            value = await value
        return self._live.cache_put(session_id, key, value, _cache_ttl(ttl))

    def cache(self, *, ttl: float | timedelta | None) -> Callable[[_F], _F]:
        """Decorate a function (sync or async): its JSON results are cached per session and arguments for `ttl`."""

        def decorator(fn: _F) -> _F:
            def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
                return f"{fn.__module__}.{fn.__qualname__}:" + json.dumps([args, kwargs], sort_keys=True, default=repr)

            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def cached_async(*args: Any, **kwargs: Any) -> Any:
                    return await self.acached(key_of(args, kwargs), ttl, lambda: fn(*args, **kwargs))

                return cached_async  # type: ignore[return-value]

            @functools.wraps(fn)
            def cached_sync(*args: Any, **kwargs: Any) -> Any:
                return self.cached(key_of(args, kwargs), ttl, lambda: fn(*args, **kwargs))

            return cached_sync  # type: ignore[return-value]

        return decorator

    async def aresource(
        self, key: str, factory: Callable[[], Any], *, close: Callable[[Any], Any] | None = None
    ) -> Any:
        """Deprecated: the old name of `alive`."""
        warnings.warn("app.aresource is deprecated; use app.alive", DeprecationWarning, 2)
        return await self._live.aget(session_of("aresource"), key, factory, close)
