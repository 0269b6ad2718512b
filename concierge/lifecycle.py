"""How sessions begin and end: `initial_state`, the start and end hooks, closing, the expiry sweep.

A session begins inside its first unit of work: `initial_state` is applied,
then the start hooks run, before the first tool. It ends in one of three ways,
each running the end hooks with a reason:

- `"terminated"`: the `terminate_session` tool (inside that call's unit);
- `"expired"`: the sweep deleted it (the hooks read its last state, detached);
- `"closed"`: its legacy connection closed, or its HTTP session was deleted.

Sync hooks run in a worker thread, like sync tools, so a shared scope they
reach without declaring it can still be loaded on first use.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar, overload

import anyio
import anyio.to_thread

from concierge import identity, ids
from concierge.errors import ConfigurationError, ConflictError, StateUnavailableError
from concierge.live import LiveObjects
from concierge.state import SessionRecord
from concierge.work import Job, Plans, Runner, SessionStore, UnitOfWork, WorkingCopy
from concierge.work.scopes import END, START
from concierge.work.telemetry import INSTRUMENTS

__all__ = ["EndReason", "HookMethods", "Lifecycle"]

_F = TypeVar("_F", bound=Callable[..., Any])
Scope = Literal["session", "user", "global"]

logger = logging.getLogger("concierge")

EndReason = Literal["terminated", "expired", "closed"]


class Lifecycle:
    """The beginning and end of every session of one app.

    Args:
        store: the app's session store.
        live: the app's live objects (closed when a session ends).
        plans: the app's plans; the hooks' scopes live under `hook:start` / `hook:end`.
        initial_state: a dict, or a callable (sync or async) returning one.
        keep_closed: whether a session whose connection closed keeps its state.
    """

    def __init__(
        self,
        store: SessionStore,
        live: LiveObjects,
        plans: Plans,
        *,
        initial_state: Mapping[str, Any] | Callable[[], Any] | None,
        keep_closed: bool,
    ) -> None:
        self.store = store
        self.live = live
        self.plans = plans
        self.initial_state = initial_state
        self.keep_closed = keep_closed
        self.start = plans.of(START)
        self.end = plans.of(END)
        self.start_hooks: list[Callable[..., Any]] = []
        self.end_hooks: list[Callable[..., Any]] = []
        self.runner = Runner(store, self)
        self._lifespans = 0
        self._sweeping = False
        self.forget_wire: Callable[[str], Any] | None = None
        """Set by the app when legacy HTTP sessions roam: drops a session's wire record."""

    @property
    def seeds(self) -> bool:
        return bool(self.start_hooks) or self.initial_state is not None

    # -- registration -----------------------------------------------------------
    def add_hook(self, kind: Literal["start", "end"], fn: Callable[..., Any], scopes: Any) -> None:
        (self.start_hooks if kind == "start" else self.end_hooks).append(fn)
        self.plans.register(START if kind == "start" else END, fn, scopes=scopes)

    # -- beginning ----------------------------------------------------------------
    async def begin(self, unit: UnitOfWork) -> None:
        """Seed a new session with `initial_state`, then run the start hooks (inside its first unit)."""
        session = unit.session
        assert session is not None
        seed = self.initial_state
        if seed is not None:
            values = seed() if callable(seed) else seed
            if inspect.isawaitable(values):
                values = await values
            if not isinstance(values, Mapping):
                raise ConfigurationError(f"initial_state returned {type(values).__name__}, not a dict")
            for key, value in values.items():
                session.set(key, value)
        before = set(unit.loaded_on_use)
        for hook in self.start_hooks:
            await self._call_hook(hook, unit, "start", session_id=unit.session_id)
        self.start.scopes |= unit.loaded_on_use - before

    # -- ending -------------------------------------------------------------------
    async def run_end_hooks(self, unit: UnitOfWork, reason: EndReason) -> None:
        before = set(unit.loaded_on_use)
        for hook in self.end_hooks:
            await self._call_hook(hook, unit, "end", session_id=unit.session_id, reason=reason)
        self.end.scopes |= unit.loaded_on_use - before

    async def _call_hook(self, hook: Callable[..., Any], unit: UnitOfWork, kind: str, **given: Any) -> None:
        """Call a lifecycle hook; if it raises, log it and drop whatever it wrote."""
        saved = unit.save()
        args = _hook_args(hook, given)
        try:
            if inspect.iscoroutinefunction(inspect.unwrap(hook)):
                await hook(*args)
            else:
                result = await anyio.to_thread.run_sync(lambda: hook(*args))
                if inspect.isawaitable(result):
                    await result
        except Exception:
            UnitOfWork.restore(saved)
            logger.exception(
                "concierge: on_session_%s hook %s raised for session %r; its changes were dropped",
                kind,
                getattr(hook, "__qualname__", hook),
                unit.session_id,
            )

    async def end_outside_request(self, session_id: str, reason: EndReason, record: SessionRecord | None) -> None:
        """Run the end hooks for a session that ended outside a tool call (expired, or its connection closed).

        With `record` (an expired session already deleted), the hooks read its
        last state and only their shared-scope writes are kept; otherwise the
        session is loaded from the store, and its own writes are kept too.
        """

        async def load() -> WorkingCopy | None:
            if record is not None:
                return self.store.detached(record)
            return await self.store.load(session_id, create=False)

        async def run(unit: UnitOfWork) -> None:
            await self.run_end_hooks(unit, reason)

        job = Job(
            session_id,
            END,
            [self.end],
            user=lambda copy: identity.user_of_stored(session_id, copy.owner),
            owner=record.owner if record else None,
            load=load,
        )
        try:
            await self.runner.run(job, run)
        except (ConflictError, StateUnavailableError):
            logger.warning(
                "concierge: could not save what the end hooks of session %r wrote", session_id, exc_info=True
            )

    async def close_session(self, session_id: str) -> None:
        """A legacy connection (or the stdio client) went away: end its session with reason "closed"."""
        try:
            if self.end_hooks:
                await self.end_outside_request(session_id, "closed", None)
            await self.live.end_session(session_id)
            if not self.keep_closed:
                await self.store.delete(session_id)
                if self.forget_wire is not None:
                    await self.forget_wire(session_id)
        except Exception:
            logger.warning("concierge: ending closed session %r failed", session_id, exc_info=True)

    # -- serving --------------------------------------------------------------------
    @asynccontextmanager
    async def serving(self, sweep_interval: float | None) -> AsyncIterator[None]:
        """The store open, and the sweep running, for the span of one server lifespan.

        Lifespans nest (every in-process client enters one): one sweeper runs per
        process, and live objects are closed when the last lifespan ends.
        """
        self._lifespans += 1
        async with self.store.opened(), anyio.create_task_group() as tg:
            sweeping = self.store.ttl is not None and sweep_interval is not None and not self._sweeping
            if sweeping:
                self._sweeping = True
                tg.start_soon(self.sweep_forever, sweep_interval)
            try:
                yield
            finally:
                stdio = identity.process_session.get()
                if stdio is not None:  # the stdio client is gone: its session's connection closed
                    with anyio.move_on_after(10, shield=True):
                        await self.close_session(ids.STDIO + stdio)
                if sweeping:
                    self._sweeping = False
                self._lifespans -= 1
                if self._lifespans == 0:  # the server is shutting down: nothing live outlives it
                    with anyio.move_on_after(10, shield=True):
                        await self.live.close_all()
                tg.cancel_scope.cancel()

    # -- the expiry sweep -----------------------------------------------------------
    async def sweep_expired(self) -> int:
        """Delete every expired session now, running the end hooks for each; return how many."""
        store = self.store
        if store.ttl is not None:
            await self.live.end_idle(store.ttl)  # what this process holds for sessions idle that long
        async with store.opened():
            backend = store.backend
            now = store.clock()
            if not self.end_hooks and self.forget_wire is None:
                cleared = await backend.clear_expired(now=now)
                INSTRUMENTS.swept.add(cleared)
                return cleared
            swept = 0
            while batch := await backend.take_expired(now=now, limit=100):
                for record in batch:
                    store.forget(record.session_id)
                    if self.end_hooks and ids.kind_of(record.session_id) == "session":
                        await self.end_outside_request(record.session_id, "expired", record)
                    await self.live.end_session(record.session_id)
                    if self.forget_wire is not None:
                        await self.forget_wire(record.session_id)
                swept += len(batch)
            INSTRUMENTS.swept.add(swept)
            return swept

    async def sweep_forever(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                swept = await self.sweep_expired()
            except Exception:  # the store may be down; the next round tries again
                logger.warning("concierge: sweeping expired sessions failed", exc_info=True)
            else:
                if swept:
                    logger.info("concierge: swept %d expired session(s)", swept)


def _hook_args(hook: Callable[..., Any], given: dict[str, Any]) -> list[Any]:
    """The arguments for a lifecycle hook: by parameter name where the names match, else in order.

    End hooks are given `session_id` and `reason`: a hook with one parameter
    gets the reason, one with two gets both. Start hooks get `session_id`.
    """
    try:
        params = [
            p
            for p in inspect.signature(hook).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if params and all(p.name in given for p in params):
        return [given[p.name] for p in params]
    order = list(given.values())
    if len(params) == 1 and "reason" in given:
        return [given["reason"]]
    return order[: len(params)]


class HookMethods:
    """The app's lifecycle API: `on_session_start`, `on_session_end`, `sweep_expired` (mixed into `Concierge`)."""

    _lifecycle: Lifecycle

    @overload
    def on_session_start(self, fn: _F, /) -> _F: ...
    @overload
    def on_session_start(self, *, scopes: Iterable[Scope] | None = None) -> Callable[[_F], _F]: ...
    def on_session_start(self, fn: Any = None, /, *, scopes: Iterable[Scope] | None = None) -> Any:
        """Register `fn` (sync or async) to run when a session starts; `@app.on_session_start(scopes=...)` too.

        It runs inside the session's first unit of work, after `initial_state`
        is applied and before the first tool, so it may `set_state` (in any
        scope; declare the shared ones an async hook uses). It is called with
        the session's storage id if it takes an argument. If it raises, the
        error is logged and its writes are dropped; the call goes on.
        """
        return self._hook("start", fn, scopes)

    @overload
    def on_session_end(self, fn: _F, /) -> _F: ...
    @overload
    def on_session_end(self, *, scopes: Iterable[Scope] | None = None) -> Callable[[_F], _F]: ...
    def on_session_end(self, fn: Any = None, /, *, scopes: Iterable[Scope] | None = None) -> Any:
        """Register `fn` (sync or async) to run when a session ends, with the reason.

        Reasons: `"terminated"` (the `terminate_session` tool), `"expired"`
        (the sweep deleted it), `"closed"` (its legacy connection closed or
        its HTTP session was deleted; the stored state is kept unless
        `keep_closed_sessions=False`). `fn` takes `reason`, or `session_id`
        and `reason` (by those names, or in that order). It reads the
        session's last state with `get_state` and may write the `user` and
        `global` scopes. If it raises, the error is logged and its writes
        are dropped.
        """
        return self._hook("end", fn, scopes)

    def _hook(self, kind: Literal["start", "end"], fn: Any, scopes: Iterable[Scope] | None) -> Any:
        def register(hook: _F) -> _F:
            self._lifecycle.add_hook(kind, hook, scopes)
            return hook

        return register if fn is None else register(fn)

    async def sweep_expired(self) -> int:
        """Delete every expired session now, running the end hooks for each; return how many.

        The background sweep calls this every `sweep_interval` seconds; it
        also works outside a running server (it opens the store for the call).
        """
        return await self._lifecycle.sweep_expired()
