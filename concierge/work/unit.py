"""`UnitOfWork`: one request's working copies and bookkeeping, bound to a contextvar.

A unit holds the working copy of the request's session and of each shared
bucket (`user`, `global`) it loaded, plus why a scope cannot be had here. The
MCP glue binds it around the user code it runs; `app.get_state` and friends
find it with `current_unit`. Sync tools run in a worker thread with a copy of
the context, which still points at the same unit, so their writes land in it.
"""

from __future__ import annotations

import contextvars
import threading

import anyio
import anyio.from_thread

from concierge import ids
from concierge.errors import ConciergeError, ConflictError, NoSessionError, StateScopeError, UndeclaredScopeError
from concierge.work.record import Saved, WorkingCopy
from concierge.work.scopes import SCOPES, SHARED_SCOPES
from concierge.work.store import SessionStore

__all__ = ["BucketLoader", "UnitOfWork", "bind", "current_unit", "working_copy"]

LOCK_WAIT_OUT_OF_ORDER = 5.0
"""Seconds a bucket loaded on first use, after a bucket that comes later in the lock order, waits for its lock."""

_current: contextvars.ContextVar[UnitOfWork | None] = contextvars.ContextVar("concierge_unit", default=None)


class UnitOfWork:
    """One request's view of the state it may use.

    Attributes:
        session: the working copy of the request's session; `None` when the
            request has none (`no_session_reason` says why).
        buckets: the shared buckets loaded for this request, by scope.
        scope_errors: why a scope cannot be had here (`user` without a caller).
        tool: what runs in this unit (a tool's name), recorded in checkpoints.
        error: the last concierge error raised to user code, so the MCP glue
            can report its message where the SDK would hide it (prompts).
        loaded_on_use: shared scopes loaded while the code ran (not up front).
    """

    def __init__(
        self,
        session: WorkingCopy | None,
        *,
        tool: str | None = None,
        no_session_reason: str = "this request has no session",
    ) -> None:
        self.session = session
        self.tool = tool
        self.no_session_reason = no_session_reason
        self.buckets: dict[str, WorkingCopy] = {}
        self.scope_errors: dict[str, str] = {}
        self.error: Exception | None = None
        self.loaded_on_use: set[str] = set()
        self.loader: BucketLoader | None = None

    @property
    def session_id(self) -> str | None:
        return None if self.session is None else self.session.session_id

    def recording(self) -> UnitOfWork:
        """`with unit.recording():` remembers a concierge error raised to user code (see `error`)."""
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, ConciergeError):
            self.error = exc
        return False

    def copy_for(self, operation: str, scope: str) -> WorkingCopy:
        """The working copy that holds `scope` for this request, loading a shared bucket on first use.

        Raises:
            NoSessionError: the request has no session, or `scope` cannot be
                had here (`user` without an identifiable caller).
            StateScopeError: `scope` is not one of `SCOPES`.
            UndeclaredScopeError: a shared scope that was not loaded up front,
                used where the code cannot wait for it (on the event loop).
        """
        if self.session is None:
            raise NoSessionError(f"{operation}: {self.no_session_reason}")
        if scope == "session":
            return self.session
        found = self.buckets.get(scope)
        if found is not None:
            return found
        if scope not in SHARED_SCOPES:
            raise StateScopeError(f"{operation}: scope must be one of {', '.join(map(repr, SCOPES))}, not {scope!r}")
        if scope in self.scope_errors:
            raise NoSessionError(f"{operation}(scope={scope!r}): {self.scope_errors[scope]}")
        if self.loader is None:
            raise UndeclaredScopeError(self._undeclared(operation, scope, "it was not loaded for this request"))
        return self.loader.load_now(operation, scope)

    def copies(self) -> list[WorkingCopy]:
        """Every working copy a commit writes: the session's first, then the buckets in lock order."""
        own = [self.session] if self.session is not None else []
        return own + [self.buckets[s] for s in SHARED_SCOPES if s in self.buckets]

    def save(self) -> list[Saved]:
        return [c.save() for c in self.copies()]

    @staticmethod
    def restore(saved: list[Saved]) -> None:
        for item in saved:
            WorkingCopy.restore(item)

    def _undeclared(self, operation: str, scope: str, why: str) -> str:
        what = f"tool {self.tool!r}" if self.tool and ":" not in self.tool else repr(self.tool or "this code")
        return (
            f"{operation}(scope={scope!r}): {scope} state is used by {what}, but {why}. "
            f"Declare it: @app.tool(scopes={{{scope!r}}}) (or scopes= on the hook), "
            "so it is loaded before the code runs"
        )


class BucketLoader:
    """Locks and loads the shared buckets of one unit of work, up front or on first use.

    Every request takes its session's lock first, then `user`, then `global`
    (`SHARED_SCOPES`), so two requests never wait on each other in a cycle. A
    bucket loaded on first use after a later one may break that order, so it
    waits only `LOCK_WAIT_OUT_OF_ORDER` seconds. The locks are held until
    `release` (after the commit).
    """

    def __init__(self, store: SessionStore, unit: UnitOfWork, user: str | None) -> None:
        self.store = store
        self.unit = unit
        self.user = user
        self._loop_thread = threading.get_ident()
        self._locked: list[str] = []

    def release(self) -> None:
        """Release the bucket locks taken, the last first."""
        while self._locked:
            self.store.release(self._locked.pop())

    async def preload(self, scopes: set[str]) -> None:
        """Lock and load `scopes` (those this request can have), in lock order."""
        for scope in SHARED_SCOPES:
            if scope in scopes and scope not in self.unit.scope_errors and scope not in self.unit.buckets:
                await self.load(scope)

    async def load(self, scope: str) -> WorkingCopy:
        record_id = ids.bucket(scope, self.user)  # type: ignore[arg-type]
        later = any(SHARED_SCOPES.index(held) > SHARED_SCOPES.index(scope) for held in self.unit.buckets)
        if later:
            try:
                with anyio.fail_after(LOCK_WAIT_OUT_OF_ORDER):
                    await self.store.acquire(record_id)
            except TimeoutError:
                raise ConflictError(
                    self.unit._undeclared(
                        "get_state", scope, f"another call held the {scope} bucket while this one held a later one"
                    )
                ) from None
        else:
            await self.store.acquire(record_id)
        self._locked.append(record_id)
        copy = await self.store.load(record_id, create=True)
        assert copy is not None
        copy.expiring = False
        copy.rebasable = True
        if copy.version == 0:
            copy.owner = self.user if scope == "user" else None
        self.unit.buckets[scope] = copy
        return copy

    async def _boxed(self, scope: str) -> tuple[WorkingCopy | None, BaseException | None]:
        try:
            return await self.load(scope), None
        except Exception as exc:
            return None, exc

    def load_now(self, operation: str, scope: str) -> WorkingCopy:
        """Load `scope` from sync code running in a worker thread, waiting for it.

        Raises:
            UndeclaredScopeError: the code runs on the event loop (async code),
                which cannot wait inside a synchronous call.
        """
        if threading.get_ident() == self._loop_thread:
            raise UndeclaredScopeError(
                self.unit._undeclared(operation, scope, "async code cannot wait for it to load mid-call")
            )
        try:
            copy, error = anyio.from_thread.run(self._boxed, scope)
        except RuntimeError:  # not a worker thread of this event loop (a thread the code started itself)
            raise UndeclaredScopeError(
                self.unit._undeclared(operation, scope, "it cannot be loaded from a thread of the code's own")
            ) from None
        if error is not None:
            raise error
        assert copy is not None
        self.unit.loaded_on_use.add(scope)
        return copy


def current_unit(operation: str) -> UnitOfWork:
    """The unit of work bound to this request.

    Raises:
        NoSessionError: called outside a request concierge serves.
    """
    unit = _current.get()
    if unit is None:
        raise NoSessionError(
            f"{operation} was called outside a tool call, resource read or prompt served by Concierge; "
            "state belongs to a session, and only a request has one"
        )
    return unit


def working_copy(operation: str, scope: str = "session") -> WorkingCopy:
    """The working copy of `scope` in the unit bound to this request (what the state API touches)."""
    unit = current_unit(operation)
    with unit.recording():
        return unit.copy_for(operation, scope)


def bind(unit: UnitOfWork) -> _Bound:
    """`with bind(unit):` binds `unit` as the current unit of work for the code run inside."""
    return _Bound(unit)


class _Bound:
    __slots__ = ("_token", "unit")

    def __init__(self, unit: UnitOfWork) -> None:
        self.unit = unit

    def __enter__(self) -> UnitOfWork:
        self._token = _current.set(self.unit)
        return self.unit

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)
