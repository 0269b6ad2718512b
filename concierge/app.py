"""`Concierge`: an `MCPServer` whose tools keep per-session state.

The MCP glue lives here: one server middleware wraps every request that runs
user code in a unit of work (see `concierge.work`), resolves its session (see
`concierge.sessions`), enforces stages (see `concierge.stages`) and decorates
results with the session handle where the wire has no session of its own.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import random
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import replace
from datetime import timedelta
from typing import Any, Literal, TypeVar

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    SERVER_INFO_META_KEY,
    CallToolResult,
    Implementation,
    TextContent,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from concierge import history as _history
from concierge import sessions
from concierge._sdk import connection_of, enable_roaming
from concierge.errors import (
    ConfigurationError,
    ConflictError,
    SessionExpiredError,
    StageError,
    StateUnavailableError,
    UnknownSessionError,
)
from concierge.live import LiveObjects
from concierge.roaming import HTTP_PREFIX, Roaming
from concierge.sessions import HANDLE_META_KEY, HANDLE_PREFIX, Identity
from concierge.stages import StageGraph
from concierge.state import ENV_STATE_URL, SessionRecord, StateBackend, backend_from_url
from concierge.work import SHARED_SCOPES, SessionStore, UnitOfWork, current_unit

__all__ = ["Concierge"]

logger = logging.getLogger("concierge")

_F = TypeVar("_F", bound=Callable[..., Any])

START_SESSION = "start_session"
PROCEED = "proceed_to_next_stage"
TERMINATE = "terminate_session"
SESSION_ARG = "session_id"
DEFAULT_TTL = timedelta(hours=24)
ENV_TTL = "CONCIERGE_SESSION_TTL"
DEFAULT_MAX_VALUE_BYTES = 1_000_000
DEFAULT_SWEEP_INTERVAL = 60.0

Scope = Literal["session", "user", "global"]
EndReason = Literal["terminated", "expired", "closed"]

# Keys under which the shared scopes a piece of user code needs are remembered.
_START = "hook:start"
_END = "hook:end"
#: Attempts of a call whose shared (user/global) buckets another process wrote first.
_ATTEMPTS = 8
_CLOSE_REGISTERED = "concierge.close_registered"

_SESSION_ARG_SCHEMA = {
    "type": "string",
    "description": (
        "The session handle from start_session or from an earlier result's "
        "_meta['concierge/session_id']. Omit it to start a new session."
    ),
}


def _seconds(
    ttl: float | timedelta | None,
    *,
    what: str = "session_ttl",
    none: str = " for never",
    error: type[Exception] = ConfigurationError,
) -> float | None:
    """A positive duration in seconds from seconds or a `timedelta`; `None` stays `None` (no limit)."""
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if seconds <= 0:
        raise error(f"{what} must be positive (or None{none}), got {ttl!r}")
    return seconds


def _ttl_from_env() -> float | None:
    raw = os.environ.get(ENV_TTL)
    if raw is None or not raw.strip():
        return DEFAULT_TTL.total_seconds()
    if raw.strip().lower() in ("none", "never", "0"):
        return None
    try:
        return _seconds(float(raw))
    except ValueError:
        raise ConfigurationError(f"{ENV_TTL}={raw!r} is not a number of seconds (or 'none')") from None


@contextmanager
def _as_protocol_error() -> Iterator[None]:
    """Report a store failure outside `tools/call` (which has no error result) as a JSON-RPC error."""
    try:
        yield
    except (ConflictError, StateUnavailableError) as exc:
        raise MCPError(code=INTERNAL_ERROR, message=str(exc)) from exc


class Concierge(MCPServer[Any]):
    """An MCP server whose tools remember things per session.

    Every `MCPServer` argument passes through. The extra keyword arguments:

    Args:
        state: a `StateBackend` instance to store sessions in.
        state_url: a state URL (`memory://`, `sqlite:///path.db`,
            `postgresql://...`); used when `state` is not given. Without either,
            `CONCIERGE_STATE_URL` is read, and memory is the default.
        session_ttl: inactivity after which a session expires: seconds or a
            `timedelta`; `None` never expires. Default: `CONCIERGE_SESSION_TTL`,
            else 24 hours.
        max_value_bytes: the largest JSON encoding `set_state` accepts.
        clock: returns the time in epoch seconds (inject one in tests).
        initial_state: what a new session starts with: a dict, or a callable
            (sync or async) returning one; applied once, before the session's
            first tool runs.
        sweep_interval: seconds between background sweeps that delete expired
            sessions (and run `on_session_end(..., "expired")`); `None` turns
            the sweep off (`await app.sweep_expired()` still works).
        keep_closed_sessions: whether a session whose legacy connection closed
            keeps its stored state (default) or is deleted after its end hooks.
        max_live_objects: live objects (`app.resource`) this process keeps at
            most; past it the least recently used is closed.
        history: checkpoints kept per session (default 0: history is off).
            Each committed call records one (its tool and changed keys); the
            oldest are pruned. See `history()` and `revert()`.
        roaming: whether a legacy streamable-HTTP session (`mcp-session-id`)
            outlives the process that opened it: it is recorded in the store
            at `initialize`, and any process sharing the store serves that id
            again - after a restart, or on another replica without sticky
            sessions. Default: on with a persistent store (SQLite, PostgreSQL,
            Redis), off with memory. Such a session ends when the client
            deletes it (HTTP DELETE) or when it expires, not when a process
            stops or the SDK's idle timeout drops its transport.
    """

    def __init__(
        self,
        name: str | None = None,
        *args: Any,
        state: StateBackend | None = None,
        state_url: str | None = None,
        session_ttl: float | timedelta | None | type[Ellipsis] = ...,  # type: ignore[valid-type]
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        clock: Callable[[], float] | None = None,
        initial_state: Mapping[str, Any] | Callable[[], Any] | None = None,
        sweep_interval: float | None = DEFAULT_SWEEP_INTERVAL,
        keep_closed_sessions: bool = True,
        max_live_objects: int = 1024,
        history: int = 0,
        roaming: bool | None = None,
        lifespan: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if initial_state is not None and not (isinstance(initial_state, Mapping) or callable(initial_state)):
            raise ConfigurationError(
                f"initial_state must be a dict or a callable returning one, not {type(initial_state).__name__}"
            )
        if sweep_interval is not None and sweep_interval <= 0:
            raise ConfigurationError(f"sweep_interval must be positive (or None for no sweep), got {sweep_interval!r}")
        if state is not None and state_url is not None:
            raise ConfigurationError("pass either state= or state_url=, not both")
        backend = state if state is not None else backend_from_url(state_url or os.environ.get(ENV_STATE_URL))
        ttl = _ttl_from_env() if session_ttl is ... else _seconds(session_ttl)  # type: ignore[arg-type]
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ConfigurationError(f"history must be a whole number of checkpoints (0 = off), got {history!r}")
        if history and not backend.supports_history:
            raise ConfigurationError(
                f"history={history} needs a store that records history (every built-in store does); "
                f"{type(backend).__name__} does not"
            )
        store_kwargs: dict[str, Any] = {"ttl": ttl, "max_value_bytes": max_value_bytes, "history": history}
        if clock is not None:
            store_kwargs["clock"] = clock
        self._store = SessionStore(backend, **store_kwargs)
        self._user_lifespan = lifespan
        self.stages: dict[str, list[str]] = {}
        self.transitions: dict[str, list[str]] | None = None
        self._graph = StageGraph({}, None)
        self._fn_names: dict[int, str] = {}
        self._stage_fns: list[tuple[str, Callable[..., Any]]] = []
        self._initial_state = initial_state
        self._sweep_interval = sweep_interval
        self._keep_closed = keep_closed_sessions
        self._start_hooks: list[Callable[..., Any]] = []
        self._end_hooks: list[Callable[..., Any]] = []
        self._scopes: dict[str, set[str]] = {}  # what each tool and hook kind is known to use
        self._sweeping = False
        self._live = LiveObjects(max_live_objects, self._store.clock)
        self._lifespans = 0
        roams = backend.persistent if roaming is None else bool(roaming)
        self._roaming = Roaming(self._store, self._close_session) if roams else None
        super().__init__(name, *args, lifespan=self._lifespan, **kwargs)
        self.middleware.append(self._middleware)
        self._add_builtin_tools()

    # -- public state API -------------------------------------------------------
    def get_state(self, key: str, default: Any = None, *, scope: Scope = "session") -> Any:
        """A fresh copy of the value stored under `key`, or `default`.

        Args:
            scope: `"session"` (this session), `"user"` (the authenticated caller,
                across all their sessions) or `"global"` (shared by every caller).

        Raises:
            NoSessionError: called outside a request, or the request has no
                session (or, for `"user"`, no identifiable caller).
            StateKeyError: `key` is not a non-empty string of at most 256 characters.
            StateScopeError: `scope` is not one of the three.
        """
        return current_unit("get_state", scope).get(key, default)

    def set_state(self, key: str, value: Any, *, scope: Scope = "session") -> None:
        """Store `value` (JSON-serialisable, or a pydantic model) under `key`.

        The write becomes durable when the tool returns; if the tool raises, it
        is dropped - in every scope the call wrote to, together.

        Raises:
            StateTypeError: the value is not JSON-serialisable (a `TypeError` naming the key).
            StateValueError: the value is larger than `max_value_bytes` as JSON.
            StateKeyError: `key` is not a non-empty string of at most 256 characters.
            StateScopeError: `scope` is not "session", "user" or "global".
            NoSessionError: called outside a request, or the request has no session.
        """
        current_unit("set_state", scope).set(key, value)

    def delete_state(self, key: str, *, scope: Scope = "session") -> None:
        """Remove `key` from `scope` (no error if it is absent)."""
        current_unit("delete_state", scope).delete(key)

    # -- live objects and cache (this process, this session) -------------------------
    def resource(  # type: ignore[override]
        self,
        key: str,
        factory: Callable[[], Any] | None = None,
        *,
        close: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """This session's live object `key`, created by the sync `factory()` on first use.

        Held in this process's memory, never persisted. `close(obj)` (sync or
        async; default: the object's own `aclose()` or `close()`) runs when the
        session ends (terminated, expired, connection closed), at shutdown, or
        when `max_live_objects` evicts it. Use `aresource` for an async factory.

        Without a `factory`, this is `MCPServer.resource(uri, ...)`, the
        decorator that registers an MCP resource: `@app.resource("data://x")`.
        """
        if factory is None:
            if close is not None:
                raise ConfigurationError("app.resource(key, factory, close=...): close needs a factory")
            return super().resource(key, **kwargs)
        if kwargs:
            raise ConfigurationError(f"app.resource(key, factory): unexpected arguments {sorted(kwargs)}")
        return self._live.get(self._session_of("resource"), key, factory, close)

    async def aresource(
        self, key: str, factory: Callable[[], Any], *, close: Callable[[Any], Any] | None = None
    ) -> Any:
        """`resource` for a sync or async `factory`; concurrent first use creates it once."""
        return await self._live.aget(self._session_of("aresource"), key, factory, close)

    def cached(self, key: str, ttl: float | timedelta | None, factory: Callable[[], Any]) -> Any:
        """This session's cached JSON value `key`, computed by `factory()` when absent or older than `ttl`.

        Kept in this process's memory, not part of the session's state and
        never written to the backend; gone when the session ends. Each call
        returns a fresh copy. `ttl=None` keeps it until the session ends.
        """
        session_id = self._session_of("cached")
        hit, value = self._live.cache_get(session_id, key)
        if hit:
            return value
        return self._live.cache_put(session_id, key, factory(), _cache_ttl(ttl))

    async def acached(self, key: str, ttl: float | timedelta | None, factory: Callable[[], Any]) -> Any:
        """`cached` for a sync or async `factory`."""
        session_id = self._session_of("acached")
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

    @staticmethod
    def _session_of(operation: str) -> str:
        session_id = current_unit(operation).session_id
        assert session_id is not None
        return session_id

    # -- lifecycle hooks -----------------------------------------------------------
    def on_session_start(self, fn: _F) -> _F:
        """Register `fn` (sync or async) to run when a session starts.

        It runs inside the session's first unit of work, after `initial_state`
        is applied and before the first tool, so it may `set_state` (in any
        scope). It is called with the session's storage id if it takes an
        argument. If it raises, the error is logged and its writes are dropped;
        the call goes on.
        """
        self._start_hooks.append(fn)
        self._learn(_START, _scopes_named_in(fn))
        return fn

    def on_session_end(self, fn: _F) -> _F:
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
        self._end_hooks.append(fn)
        self._learn(_END, _scopes_named_in(fn))
        return fn

    async def sweep_expired(self) -> int:
        """Delete every expired session now, running the end hooks for each; return how many.

        The background sweep calls this every `sweep_interval` seconds; it
        also works outside a running server (it opens the store for the call).
        """
        if self._store.ttl is not None:
            await self._live.end_idle(self._store.ttl)  # what this process holds for sessions idle that long
        async with self._store.opened():
            backend = self._store.backend
            now = self._store.clock()
            if not self._end_hooks and self._roaming is None:
                return await backend.clear_expired(now=now)
            swept = 0
            while batch := await backend.take_expired(now=now, limit=100):
                for record in batch:
                    self._store.forget(record.session_id)
                    if self._end_hooks:
                        await self._end_outside_request(record.session_id, "expired", record)
                    await self._live.end_session(record.session_id)
                    if self._roaming is not None:
                        await self._roaming.forget(record.session_id)
                swept += len(batch)
            return swept

    @property
    def state_backend(self) -> StateBackend:
        """The backend sessions are stored in."""
        return self._store.backend

    async def history(self, session_id: str) -> list[_history.Checkpoint]:
        """The checkpoints kept for a session, oldest first (needs `history=N`).

        `session_id` is a storage id (`h:<handle>`, `http:...`, `user:<principal>`,
        `global`) or a bare handle. Works outside a running server too.

        Raises:
            HistoryError: history is off for this app.
            UnknownSessionError: no live session has that id.
        """
        return await _history.checkpoints(self._store, session_id)

    async def revert(self, session_id: str, version: int) -> _history.Reverted:
        """Restore a session's state and stage as of `version`, as a new commit (itself revertible).

        It waits for any call running on the session in this process and
        commits with the usual version check. Versions from (the oldest kept
        checkpoint's version - 1) to the current one can be restored.

        Raises:
            HistoryError: history is off, or `version` cannot be restored (the
                message names the oldest version that can).
            UnknownSessionError: no live session has that id.
            ConflictError: another process committed to the session meanwhile.
        """
        return await _history.revert(self._store, session_id, version)

    # -- stages -----------------------------------------------------------------
    def stage(self, name: str) -> Callable[[_F], _F]:
        """Put a tool in stage `name`; usable above or below `@app.tool()`.

        Stages are ordered by first mention; the first is where sessions start.
        When `app.stages` is also assigned, its order comes first and stages
        named only by decorators follow it.
        """

        def decorator(fn: _F) -> _F:
            self.stages.setdefault(name, [])
            self._stage_fns.append((name, fn))
            return fn

        return decorator

    def _build_graph(self) -> StageGraph:
        """The graph from `app.stages`, `app.transitions` and the `@app.stage` decorators."""
        stages = {stage: list(tools) for stage, tools in self.stages.items()}
        for stage, fn in self._stage_fns:
            tool_name = self._fn_names.get(id(fn), getattr(fn, "__name__", repr(fn)))
            if tool_name not in stages.setdefault(stage, []):
                stages[stage].append(tool_name)
        return StageGraph(stages, self.transitions)

    def add_tool(self, fn: Callable[..., Any], name: str | None = None, *args: Any, **kwargs: Any) -> None:
        """Register a tool, as `MCPServer.add_tool`.

        Raises:
            ConfigurationError: the tool declares a parameter named `session_id`,
                which concierge reserves for session handles.
        """
        if SESSION_ARG in inspect.signature(fn).parameters:
            raise ConfigurationError(
                f"tool {name or fn.__name__!r} has a parameter named {SESSION_ARG!r}; concierge reserves that "
                "argument for session handles - rename the parameter"
            )
        super().add_tool(fn, name, *args, **kwargs)
        self._fn_names[id(fn)] = name or fn.__name__
        self._learn("tool:" + (name or fn.__name__), _scopes_named_in(fn))

    def _learn(self, key: str, scopes: set[str]) -> None:
        """Remember that the code under `key` uses these shared scopes: they are loaded before it runs."""
        self._scopes.setdefault(key, set()).update(scopes)
        if key == _END:  # terminate_session runs the end hooks inside its own call
            self._scopes.setdefault("tool:" + TERMINATE, set()).update(scopes)

    def _scopes_of(self, key: str) -> set[str]:
        return self._scopes.get(key, set())

    # -- lifespan -----------------------------------------------------------------
    @asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[Any]:
        graph = self._build_graph()
        graph.validate(t.name for t in await self.list_tools())
        for builtin in (START_SESSION, PROCEED, TERMINATE):
            if graph.stages_of(builtin):
                raise ConfigurationError(f"{builtin!r} is a built-in tool and cannot be put in a stage")
        self._graph = graph
        self._lifespans += 1
        async with self._store.opened(), anyio.create_task_group() as tg:
            sweeping = self._store.ttl is not None and self._sweep_interval is not None and not self._sweeping
            if sweeping:  # one sweeper per process, however many lifespans are entered
                self._sweeping = True
                tg.start_soon(self._sweep_forever, self._sweep_interval)
            try:
                if self._user_lifespan is None:
                    yield {}
                else:
                    async with self._user_lifespan(app) as value:
                        yield value
            finally:
                stdio = sessions.process_session.get()
                if stdio is not None:  # the stdio client is gone: its session's connection closed
                    with anyio.move_on_after(10, shield=True):
                        await self._close_session("stdio:" + stdio)
                if sweeping:
                    self._sweeping = False
                self._lifespans -= 1
                if self._lifespans == 0:  # the server is shutting down: nothing live outlives it
                    with anyio.move_on_after(10, shield=True):
                        await self._live.close_all()
                tg.cancel_scope.cancel()

    async def _sweep_forever(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                swept = await self.sweep_expired()
            except Exception:  # the store may be down; the next round tries again
                logger.warning("concierge: sweeping expired sessions failed", exc_info=True)
            else:
                if swept:
                    logger.info("concierge: swept %d expired session(s)", swept)

    def streamable_http_app(self, **kwargs: Any) -> Any:
        """`MCPServer.streamable_http_app`, with legacy sessions that roam (see `roaming=`).

        Every keyword argument passes through; the SDK's defaults apply.
        """
        app = super().streamable_http_app(**kwargs)
        if self._roaming is not None and not kwargs.get("stateless_http", False):
            enable_roaming(self.session_manager, self._roaming)
        return app

    async def run_stdio_async(self) -> None:
        """Serve over stdio: one session for the life of the process."""
        token = sessions.process_session.set(sessions.new_handle())
        try:
            await super().run_stdio_async()
        finally:
            sessions.process_session.reset(token)

    # -- built-in tools -------------------------------------------------------------
    def _add_builtin_tools(self) -> None:
        def start_session() -> dict[str, str]:
            """Start a new session and return its handle.

            Pass the returned session_id to every later tool call to keep this session's state.
            """
            unit = current_unit("start_session")
            assert unit.session_id is not None
            return {"session_id": unit.session_id.removeprefix(HANDLE_PREFIX)}

        def proceed_to_next_stage(target_stage: str) -> dict[str, Any]:
            """Move this session to another workflow stage; the tools available change with it."""
            unit = current_unit(PROCEED)
            graph = self._graph
            here = graph.current(unit.stage)
            allowed = graph.targets(here)
            if target_stage not in allowed:
                raise StageError(
                    f"cannot move from stage {here!r} to {target_stage!r}; "
                    + (f"allowed targets: {allowed}" if allowed else f"{here!r} is a terminal stage")
                )
            unit.set_stage(target_stage)
            return {
                "stage": target_stage,
                "tools": graph.tools_in(target_stage),
                "next": graph.targets(target_stage),
            }

        async def terminate_session() -> dict[str, Any]:
            """End this session's workflow: clear its state and return it to the first stage."""
            unit = current_unit(TERMINATE)
            await self._run_end_hooks(unit, "terminated")
            await self._live.end_session(unit.session_id)  # type: ignore[arg-type]
            unit.clear()
            return {"terminated": True, "stage": self._graph.start}

        for fn in (start_session, proceed_to_next_stage, terminate_session):
            super().add_tool(fn)

    def _builtin_visible(self, name: str, via_handle: bool) -> bool:
        if name == START_SESSION:
            return via_handle
        if name == PROCEED:
            return bool(self._graph)
        return True

    # -- the middleware ---------------------------------------------------------------
    async def _middleware(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        method = ctx.method
        if method == "tools/call":
            return await self._call_tool(ctx, call_next)
        if method in ("resources/read", "prompts/get"):
            return await self._read(ctx, call_next)
        if method == "tools/list":
            return await self._list_tools(ctx, call_next)
        result = await call_next(ctx)
        if method == "initialize" and isinstance(result, dict):
            tools = result.get("capabilities", {}).get("tools")
            if isinstance(tools, dict):
                tools["listChanged"] = True  # stages change the tool list per session
            if self._roaming is not None:
                with _as_protocol_error():
                    await self._record_wire_session(ctx, result)
        return result

    async def _record_wire_session(self, ctx: ServerRequestContext[Any, Any], result: dict[str, Any]) -> None:
        """Record a new legacy streamable-HTTP session so any process sharing the store can serve it.

        Runs inside `initialize`, before the response carrying the session id is
        sent, so a client never holds an id the store does not know. The
        session's state is created here too (its start hooks run now), and it
        expires and renews like any session; `roaming.Roaming.find` needs both.
        """
        assert self._roaming is not None
        session_id = connection_of(ctx).session_id
        version = result.get("protocolVersion")
        if not session_id or ctx.request is None or not isinstance(version, str):
            return  # not a streamable-HTTP session: nothing can roam
        owner = sessions.principal()
        identity = Identity(session_id=HTTP_PREFIX + session_id, via_handle=False, owner=owner)

        async def run(unit: UnitOfWork) -> None:
            return None

        await self._in_unit(identity, _START, run, user=lambda unit: sessions.user_of(ctx, owner), persist=True)
        await self._roaming.record(session_id, owner, version, dict(ctx.params or {}))

    def _error(self, ctx: ServerRequestContext[Any, Any], message: str) -> dict[str, Any]:
        """A `tools/call` error result in its wire form, for calls refused before the tool runs."""
        result = CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)
        dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            dumped["resultType"] = "complete"
            info = Implementation(
                name=self.name,
                version=self.version,
                title=self.title,
                description=self.description,
                website_url=self.website_url,
                icons=self.icons,
            )
            dumped["_meta"] = {SERVER_INFO_META_KEY: info.model_dump(by_alias=True, mode="json", exclude_none=True)}
        return dumped

    @staticmethod
    def _unknown_session(identity: Identity) -> str:
        shown = identity.supplied or ""
        return (
            f"unknown or expired session_id {shown!r}: no such session exists for you. "
            "Call start_session (or call the tool without session_id) to start a new session."
        )

    async def _missing_session(self, identity: Identity) -> UnknownSessionError:
        """Why a handle found no session: it expired (and is not yet swept), or it is unknown."""
        assert identity.session_id is not None
        try:
            record = await self._store.expired(identity.session_id)
        except StateUnavailableError:
            record = None
        if record is not None and record.owner == identity.owner:
            ttl = self._store.ttl or 0
            return SessionExpiredError(
                f"session_id {identity.supplied!r} has expired: it was idle for more than {_duration(ttl)} "
                "and its state is gone. Call start_session (or call the tool without session_id) "
                "to start a new session."
            )
        return UnknownSessionError(self._unknown_session(identity))

    async def _in_unit(
        self,
        identity: Identity,
        key: str,
        run: Callable[[UnitOfWork], Awaitable[Any]],
        *,
        user: Callable[[UnitOfWork], str | None],
        keep: Callable[[Any], bool] = lambda result: True,
        load: Callable[[], Awaitable[UnitOfWork | None]] | None = None,
        persist: bool = False,
    ) -> tuple[Any, UnitOfWork | None]:
        """Run `run(unit)` in a unit of work on the identity's session, and commit it if `keep(result)`.

        Takes the session's lock, loads it (or `load()`), locks and loads the
        shared buckets the code under `key` is known to use, runs, commits. A
        run that reached for a shared scope it had not loaded is re-run with
        it (and `key` remembers it); one whose shared buckets another process
        committed to first is re-run on fresh values. Returns `(None, None)`
        when the session is unknown (`run` was not called).

        Raises:
            ConflictError: the session itself changed in another process, or
                the shared buckets kept changing for `_ATTEMPTS` runs.
            StateUnavailableError: the store could not be reached.
        """
        session_id = identity.session_id
        assert session_id is not None
        create = not identity.via_handle or identity.is_new
        async with self._store.locked(session_id):
            for attempt in range(_ATTEMPTS):
                unit = await (load() if load is not None else self._store.load(session_id, create=create))
                if unit is not None:
                    unit.tool = key.removeprefix("tool:")
                if unit is None or (identity.via_handle and not identity.is_new and unit.owner != identity.owner):
                    return None, None
                new = unit.version == 0 and not unit.detached
                if new:
                    unit.owner = identity.owner
                    # A session that was started (hooks ran, a handle was handed out) must exist.
                    unit.must_persist = (
                        persist or identity.via_handle or bool(self._start_hooks) or self._initial_state is not None
                    )
                scopes = self._scopes_of(key) | (self._scopes_of(_START) if new else set())
                async with AsyncExitStack() as stack:
                    await self._store.load_shared(unit, scopes, user(unit), sessions.NO_USER, stack)
                    with SessionStore.bind(unit):
                        if new:
                            await self._begin_session(unit)
                        result = await run(unit)
                    if unit.missed:
                        self._learn(
                            key,
                            unit.missed - (self._scopes_of(_START) if new else set()),
                        )
                        continue
                    if not keep(result):
                        return result, unit
                    try:
                        await self._store.commit(unit)
                    except ConflictError:
                        shared_written = any(b.dirty for b in unit.scopes.values())
                        if not shared_written or attempt + 1 == _ATTEMPTS:
                            raise
                        await anyio.sleep(random.uniform(0, 0.002 * 2 ** min(attempt, 6)))
                        continue
                    return result, unit
        raise ConflictError(f"gave up on session {session_id!r} after {_ATTEMPTS} attempts")

    async def _begin_session(self, unit: UnitOfWork) -> None:
        """Seed a new session with `initial_state`, then run the start hooks (inside its first unit)."""
        seed = self._initial_state
        if seed is not None:
            values = seed() if callable(seed) else seed
            if inspect.isawaitable(values):
                values = await values
            if not isinstance(values, Mapping):
                raise ConfigurationError(f"initial_state returned {type(values).__name__}, not a dict")
            for key, value in values.items():
                unit.set(key, value)
        missed = set(unit.missed)
        for hook in self._start_hooks:
            await self._call_hook(hook, unit, "start", session_id=unit.session_id)
        self._learn(_START, unit.missed - missed)

    async def _run_end_hooks(self, unit: UnitOfWork, reason: EndReason) -> None:
        for hook in self._end_hooks:
            await self._call_hook(hook, unit, "end", session_id=unit.session_id, reason=reason)

    async def _call_hook(self, hook: Callable[..., Any], unit: UnitOfWork, kind: str, **given: Any) -> None:
        """Call a lifecycle hook; if it raises, log it and drop whatever it wrote."""
        saved = unit.checkpoint()
        missed = set(unit.missed)
        try:
            result = hook(*_hook_args(hook, given))
            if inspect.isawaitable(result):
                await result
        except Exception:
            UnitOfWork.rollback(saved)
            if unit.missed != missed:
                return  # it reached for a shared scope that was not loaded: the call is re-run with it
            logger.exception(
                "concierge: on_session_%s hook %s raised for session %r; its changes were dropped",
                kind,
                getattr(hook, "__qualname__", hook),
                unit.session_id,
            )

    async def _end_outside_request(self, session_id: str, reason: EndReason, record: SessionRecord | None) -> None:
        """Run the end hooks for a session that ended outside a tool call (expired, or its connection closed).

        With `record` (an expired session already deleted), the hooks read its
        last state and only their shared-scope writes are kept; otherwise the
        session is loaded from the store, and its own writes are kept too.
        """
        identity = Identity(
            session_id=session_id,
            via_handle=False,
            owner=record.owner if record else None,
        )

        async def load() -> UnitOfWork | None:
            if record is not None:
                return self._store.detached(record)
            return await self._store.load(session_id, create=False)

        async def run(unit: UnitOfWork) -> None:
            await self._run_end_hooks(unit, reason)

        try:
            await self._in_unit(
                identity,
                _END,
                run,
                user=lambda unit: sessions.user_of_stored(session_id, unit.owner),
                load=load,
            )
        except (ConflictError, StateUnavailableError):
            logger.warning(
                "concierge: could not save what the end hooks of session %r wrote",
                session_id,
                exc_info=True,
            )

    async def _close_session(self, session_id: str) -> None:
        """A legacy connection (or the stdio client) went away: end its session with reason "closed"."""
        try:
            if self._end_hooks:
                await self._end_outside_request(session_id, "closed", None)
            await self._live.end_session(session_id)
            if not self._keep_closed:
                await self._store.delete(session_id)
                if self._roaming is not None:
                    await self._roaming.forget(session_id)
        except Exception:
            logger.warning("concierge: ending closed session %r failed", session_id, exc_info=True)

    def _watch_close(self, ctx: ServerRequestContext[Any, Any], session_id: str) -> None:
        """Arrange for `_close_session` when the legacy connection that carries `session_id` closes."""
        if not sessions.closes_with_connection(session_id):
            return
        connection = connection_of(ctx)
        if connection.state.get(_CLOSE_REGISTERED) == session_id:
            return
        connection.state[_CLOSE_REGISTERED] = session_id
        if self._roaming is not None and session_id.startswith(HTTP_PREFIX):
            # A roaming session outlives its connection here (a restart, the SDK's idle timeout, another
            # replica): only what this process holds for it ends now; an HTTP DELETE ends the session.
            connection.exit_stack.push_async_callback(self._live.end_session, session_id)
            return
        connection.exit_stack.push_async_callback(self._close_session, session_id)

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = dict(ctx.params or {})
        name = params.get("name")
        arguments = params.get("arguments")
        supplied: object = None
        if isinstance(arguments, Mapping) and SESSION_ARG in arguments:
            arguments = dict(arguments)
            supplied = arguments.pop(SESSION_ARG)
            params["arguments"] = arguments
            ctx = replace(ctx, params=params)
        if name == START_SESSION:
            supplied = None  # always a fresh session
        identity = sessions.resolve(ctx, supplied, start=True)
        if not isinstance(name, str):
            return await call_next(ctx)  # the SDK rejects the malformed call
        if name in (START_SESSION, PROCEED) and not self._builtin_visible(name, identity.via_handle):
            reason = (
                "this connection already has a session; start_session is only for transports without one"
                if name == START_SESSION
                else f"{name} is only available when the server defines stages"
            )
            return self._error(ctx, reason)
        if identity.session_id is None:
            return self._error(ctx, self._unknown_session(identity))
        self._watch_close(ctx, identity.session_id)
        stage_before: list[str | None] = []

        async def run(unit: UnitOfWork) -> Any:
            stage_before[:] = [unit.stage]
            refusal = self._stage_refusal(unit, name)
            if refusal is not None:
                return self._error(ctx, refusal)
            return await call_next(ctx)

        # A first call that fails creates nothing, so it hands out no handle.
        unsaved = self._with_handle if not identity.is_new else lambda result, _: result
        key = "tool:" + name
        try:
            result, unit = await self._in_unit(
                identity,
                key,
                run,
                user=lambda unit: sessions.user_of(ctx, identity.owner),
                keep=lambda result: isinstance(result, dict) and not result.get("isError"),
            )
        except ConflictError as exc:
            return unsaved(self._error(ctx, f"conflict: {exc}; nothing was saved, retry"), identity)
        except StateUnavailableError as exc:
            return unsaved(self._error(ctx, str(exc)), identity)
        except MCPError:
            raise  # the SDK's own protocol errors stay protocol errors
        except Exception as exc:
            # A store failure of a kind no backend maps (a driver bug, an unexpected server reply): still
            # a tool error the model can read, and the unit of work was not committed.
            logger.exception("concierge: tool %r failed outside the tool itself; nothing was saved", name)
            message = f"the state store failed ({type(exc).__name__}); nothing this call wrote was saved"
            return unsaved(self._error(ctx, message), identity)
        if unit is None:
            return self._error(ctx, str(await self._missing_session(identity)))
        if not isinstance(result, dict) or result.get("isError"):
            return unsaved(result, identity)
        if unit.stage != stage_before[0] and not identity.via_handle and self._filters_list(ctx):
            await self._notify_tools_changed(ctx)
        return self._with_handle(result, identity)

    def _stage_refusal(self, unit: UnitOfWork, tool: str) -> str | None:
        graph = self._graph
        if not graph or tool in (START_SESSION, PROCEED, TERMINATE):
            return None
        here = graph.current(unit.stage)
        if graph.allows(here, tool):
            return None
        return (
            f"tool {tool!r} is not available in the current stage {here!r} "
            f"(it belongs to stage {', '.join(map(repr, graph.stages_of(tool)))}). "
            f"Tools in {here!r}: {graph.tools_in(here)}; "
            f"call {PROCEED} with one of {graph.targets(here)} to move on."
        )

    @staticmethod
    def _failed(result: dict[str, Any], message: str) -> dict[str, Any]:
        failed = {k: v for k, v in result.items() if k != "structuredContent"}
        failed["content"] = [{"type": "text", "text": message}]
        failed["isError"] = True
        return failed

    @staticmethod
    def _with_handle(result: dict[str, Any], identity: Identity) -> dict[str, Any]:
        if not identity.via_handle or identity.handle is None:
            return result
        handle = identity.handle
        meta = dict(result.get("_meta") or {})
        meta[HANDLE_META_KEY] = handle
        result["_meta"] = meta
        note = f"[session_id: {handle}] Pass session_id={handle!r} in your next tool calls to keep this session."
        result["content"] = [*result.get("content", []), {"type": "text", "text": note}]
        return result

    def _filters_list(self, ctx: ServerRequestContext[Any, Any]) -> bool:
        """tools/list varies per session only on legacy connections that carry a session."""
        return ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS and not sessions.uses_handles(ctx)

    async def _notify_tools_changed(self, ctx: ServerRequestContext[Any, Any]) -> None:
        from mcp_types import ToolListChangedNotification

        try:
            await ctx.session.send_notification(ToolListChangedNotification(), related_request_id=ctx.request_id)
        except Exception:  # advisory: a lost notification must not fail the committed call
            logger.warning("could not send notifications/tools/list_changed", exc_info=True)

    async def _read(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """resources/read and prompts/get: the handle, if any, comes in `_meta`."""
        meta = (ctx.params or {}).get("_meta")
        supplied = meta.get(HANDLE_META_KEY) if isinstance(meta, Mapping) else None
        identity = sessions.resolve(ctx, supplied, start=False)
        if identity.session_id is None:
            reason = (
                self._unknown_session(identity)
                if identity.malformed
                else "this request has no session: on this transport, pass the session's handle in "
                f"_meta[{HANDLE_META_KEY!r}] of the request"
            )
            return await self._surfaced(self._store.unbound(reason), ctx, call_next)
        self._watch_close(ctx, identity.session_id)
        key = f"{ctx.method}:{(ctx.params or {}).get('uri') or (ctx.params or {}).get('name')}"
        with _as_protocol_error():
            result, unit = await self._in_unit(
                identity,
                key,
                lambda unit: self._surfaced(unit, ctx, call_next),
                user=lambda unit: sessions.user_of(ctx, identity.owner),
            )
            if unit is None:
                missing = await self._missing_session(identity)
                return await self._surfaced(self._store.unbound(str(missing)), ctx, call_next)
        return result

    @staticmethod
    async def _surfaced(unit: UnitOfWork, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Run a resource read or prompt in `unit`, keeping the message of a concierge error it raised.

        mcp 2.3 re-wraps an exception raised while rendering a prompt, so the
        client would only see "Internal server error".
        """
        with SessionStore.bind(unit):
            try:
                return await call_next(ctx)
            except MCPError:
                raise
            except Exception as exc:
                if unit.error is None:
                    raise
                raise MCPError(code=INVALID_PARAMS, message=str(unit.error)) from exc

    async def _list_tools(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return result
        via_handle = sessions.uses_handles(ctx)
        graph = self._graph
        stage: str | None = None
        filtering = bool(graph) and self._filters_list(ctx)
        if filtering:
            session_id = sessions.wire_session(ctx)
            assert session_id is not None
            with _as_protocol_error():
                unit = await self._store.load(session_id, create=True)
            stage = graph.current(unit.stage if unit else None)
        tools = []
        for tool in result["tools"]:
            name = tool.get("name")
            if not self._builtin_visible(name, via_handle):
                continue
            if filtering and not graph.allows(stage, name):
                continue
            tool = dict(tool)
            homes = graph.stages_of(name)
            if homes:
                tool["description"] = f"[{', '.join(homes)}] {tool.get('description') or ''}".rstrip()
            if name == PROCEED and graph:
                targets = graph.targets(stage) if filtering else list(graph.stages)
                schema = dict(tool.get("inputSchema") or {})
                props = dict(schema.get("properties") or {})
                props["target_stage"] = {
                    **props.get("target_stage", {}),
                    "enum": targets,
                }
                schema["properties"] = props
                tool["inputSchema"] = schema
            if via_handle and name != START_SESSION:
                schema = dict(tool.get("inputSchema") or {"type": "object"})
                props = dict(schema.get("properties") or {})
                props[SESSION_ARG] = dict(_SESSION_ARG_SCHEMA)
                schema["properties"] = props
                tool["inputSchema"] = schema
            tools.append(tool)
        result["tools"] = tools
        return result


def _duration(seconds: float) -> str:
    """`90061` -> "1d 1h 1m 1s", for messages."""
    parts, rest = [], int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size or (unit == "s" and not parts):
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return " ".join(parts)


def _scopes_named_in(fn: Callable[..., Any]) -> set[str]:
    """The shared scopes `fn`'s own code names next to a `scope` keyword, found in its bytecode.

    A guess made ahead of the first call so that the buckets are loaded before
    the code runs: what it misses (a helper function that takes the scope as a
    parameter) is learned on the first call, which is then re-run.
    """
    code = getattr(inspect.unwrap(fn), "__code__", None)
    found: set[str] = set()
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        current = stack.pop()
        constants = set()
        for const in current.co_consts:
            if isinstance(const, types.CodeType):
                stack.append(const)
            elif isinstance(const, str):
                constants.add(const)
            elif isinstance(const, tuple):
                constants.update(c for c in const if isinstance(c, str))
        if "scope" in constants or "scope" in current.co_names:  # keyword names are constant tuples
            found.update(s for s in SHARED_SCOPES if s in constants)
    return found


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


def _cache_ttl(ttl: float | timedelta | None) -> float | None:
    return _seconds(ttl, what="cache ttl", none=": until the session ends", error=ValueError)
