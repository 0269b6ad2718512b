"""`Concierge`: an `MCPServer` whose tools keep per-session state.

This module is the wiring: it checks the options (`concierge.config`), builds
the parts (the store and unit of work in `concierge.work`, session lifecycle in
`concierge.lifecycle`, the request path in `concierge.serve`), and offers the
public API: the state calls, the decorators, live objects, checkpoints.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any, Literal, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp_types import Implementation

from concierge import identity
from concierge._sdk import enable_roaming
from concierge.checkpoints import CheckpointMethods
from concierge.config import (
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_LIVE_SESSIONS,
    DEFAULT_MAX_SESSION_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_NEW_SESSIONS_PER_MINUTE,
    DEFAULT_SWEEP_INTERVAL,
    UNSET,
    Handles,
    Settings,
)
from concierge.errors import ConfigurationError
from concierge.handles import HandleSigner, signer_for
from concierge.lifecycle import HookMethods, Lifecycle
from concierge.live import LiveMethods, LiveObjects, session_of
from concierge.request_state import SharedKeys, derived
from concierge.roaming import Roaming
from concierge.serve import BUILTINS, SESSION_ARG, Middleware, Runtime, builtin_tools
from concierge.serve.health import DEFAULT_HEALTH_TIMEOUT, health_endpoint
from concierge.serve.held import HeldSessions
from concierge.serve.limits import StartLimit
from concierge.serve.process import tune_collector
from concierge.stages import StageGraph
from concierge.state import StateBackend
from concierge.work import Plans, SessionStore, current_unit
from concierge.work.scopes import OnConflict

__all__ = ["Concierge"]

_F = TypeVar("_F", bound=Callable[..., Any])
Scope = Literal["session", "user", "global"]


class Concierge(LiveMethods, HookMethods, CheckpointMethods, MCPServer[Any]):
    """An MCP server whose tools remember things per session.

    Every `MCPServer` argument passes through. The extra keyword arguments:

    Args:
        state: a `StateBackend` instance to store sessions in.
        state_url: a state URL (`memory://`, `sqlite:///path.db`,
            `postgresql://...`, `redis://...`); used when `state` is not given.
            Without either, `CONCIERGE_STATE_URL` is read; memory is the default.
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
        max_live_objects: live objects (`app.live`) this process keeps at most;
            past it the least recently used is closed.
        keep_checkpoints: checkpoints kept per session (default 0: off). Each
            committed call records one (its tool and changed keys); the oldest
            are pruned. See `checkpoints()` and `revert()`. (`history=` is its
            deprecated old name.)
        on_conflict: what a call does when another process committed to its
            session or shared buckets first: `"error"` (default) reports it as
            a tool error with nothing saved; `"retry"` runs the tool again on
            the new state. A tool's own `on_conflict=` overrides it.
        handle_keys: keys that sign session handles (the first signs, all
            verify); default `CONCIERGE_HANDLE_KEYS`, else a key kept in the
            store (shared by every replica), else one per process (memory).
        request_state_keys: keys that seal the `requestState` of multi-round
            requests on the 2026-07-28 wire (elicitation, sampling), so the
            client's next round may reach any replica: the first seals, all
            unseal; each at least 32 bytes; needs a named app (the name is the
            audience sealed in). Default `CONCIERGE_REQUEST_STATE_KEYS`, else,
            on a persistent store, keys derived from the handle keys (the
            store's, shared by every replica, unless `handle_keys` are given),
            else the SDK's key of the process (memory). The SDK's own
            `request_state_security=`, if given, is left as it is.
        max_new_sessions_per_minute: sessions one caller (principal, or client
            address on unauthenticated HTTP) may start per minute in this
            process; `None`: no limit. Default 120.
        max_live_sessions_per_caller: live sessions one such caller may hold,
            counted in the store (so across processes and restarts); a call
            that would start one more is refused, nothing saved, until one
            ends (`end_session`) or expires. Connections local to the machine
            are not limited. `None`: no limit. Default 1000.
        max_keys_per_session, max_session_bytes: how many keys, and how many
            bytes of JSON, one session (or shared bucket) may hold; a call that
            would go past either is refused, nothing saved. Defaults 10,000 and 16 MB.
        handles: on wires without a session of their own (2026-07-28, stateless
            HTTP), every tool that uses session state takes a `session_id`
            argument: `"required"` (default; `"new"` starts a session, a
            missing one is an error telling the model what to pass) or
            `"optional"` (a missing one starts a new session).
        roaming: whether a legacy streamable-HTTP session (`mcp-session-id`)
            outlives the process that opened it: recorded in the store at
            `initialize` (for the idle timeout, permanently once it writes), and
            served again by any process sharing the store.
            Default: on with a persistent store, off with memory.
        health_path: the HTTP route answering whether the store is reachable
            (200 or 503, JSON); `None` turns it off. Default `/healthz`.
        health_timeout: seconds the health route waits for the store.
        tune_gc: when the app runs the server itself (`app.run()`, `python -m
            concierge`), it first freezes what start-up made out of the
            garbage collector's sight (`gc.freeze()`) and raises the young
            generation's threshold to 10,000 (CPython's default is 700):
            shorter and fewer collection pauses, which stall every request of
            the process. `False` leaves the collector as it is. An app
            embedded in another program (`Client(app)`, a mounted
            `streamable_http_app()`) never touches it.
    """

    def __init__(
        self,
        name: str | None = None,
        *args: Any,
        state: StateBackend | None = None,
        state_url: str | None = None,
        session_ttl: float | timedelta | None = UNSET,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        clock: Callable[[], float] | None = None,
        initial_state: Mapping[str, Any] | Callable[[], Any] | None = None,
        sweep_interval: float | None = DEFAULT_SWEEP_INTERVAL,
        keep_closed_sessions: bool = True,
        max_live_objects: int = 1024,
        keep_checkpoints: int = UNSET,
        on_conflict: OnConflict = "error",
        handles: Handles = "required",
        handle_keys: str | bytes | list[str | bytes] | None = None,
        request_state_keys: str | bytes | list[str | bytes] | None = None,
        max_new_sessions_per_minute: int | None = DEFAULT_NEW_SESSIONS_PER_MINUTE,
        max_live_sessions_per_caller: int | None = DEFAULT_MAX_LIVE_SESSIONS,
        max_keys_per_session: int | None = DEFAULT_MAX_KEYS,
        max_session_bytes: int | None = DEFAULT_MAX_SESSION_BYTES,
        roaming: bool | None = None,
        health_path: str | None = "/healthz",
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        tune_gc: bool = True,
        history: int = UNSET,
        lifespan: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        settings = Settings.of(
            state=state,
            state_url=state_url,
            session_ttl=session_ttl,
            max_value_bytes=max_value_bytes,
            clock=clock,
            initial_state=initial_state,
            sweep_interval=sweep_interval,
            keep_closed_sessions=keep_closed_sessions,
            max_live_objects=max_live_objects,
            keep_checkpoints=keep_checkpoints,
            history=history,
            roaming=roaming,
            on_conflict=on_conflict,
            handles=handles,
            handle_keys=handle_keys,
            request_state_keys=request_state_keys,
            sdk_request_state=kwargs.get("request_state_security") is not None,
            max_new_sessions_per_minute=max_new_sessions_per_minute,
            max_live_sessions_per_caller=max_live_sessions_per_caller,
            max_keys_per_session=max_keys_per_session,
            max_session_bytes=max_session_bytes,
            tune_gc=tune_gc,
        )
        self._settings = settings
        self._store = SessionStore(
            settings.backend,
            ttl=settings.ttl,
            clock=settings.clock,
            max_value_bytes=settings.max_value_bytes,
            keep_checkpoints=settings.keep_checkpoints,
            max_keys=settings.max_keys_per_session,
            max_record_bytes=settings.max_session_bytes,
        )
        self._plans = Plans(settings.on_conflict)
        self._live = LiveObjects(settings.max_live_objects, settings.clock)
        self._lifecycle = Lifecycle(
            self._store,
            self._live,
            self._plans,
            initial_state=settings.initial_state,
            keep_closed=settings.keep_closed,
        )
        roams = Roaming(self._store, self._lifecycle.close_session) if settings.roaming else None
        if roams is not None:
            self._lifecycle.forget_wire = roams.forget
        self._rt = Runtime(
            self._store,
            self._lifecycle,
            self._live,
            self._plans,
            self._info,
            roams,
            handles=settings.handles,
            limits=StartLimit(settings.max_new_sessions_per_minute, settings.clock),
            held=HeldSessions(settings.max_live_sessions_per_caller, self._store),
            signer=HandleSigner(settings.handle_keys) if settings.handle_keys else None,
        )
        self._user_lifespan = lifespan
        self.stages: dict[str, list[str]] = {}
        self.transitions: dict[str, list[str]] | None = None
        self._fn_names: dict[int, str] = {}
        self._stage_fns: list[tuple[str, Callable[..., Any]]] = []
        self._sealer: SharedKeys | None = None
        if not settings.sdk_request_state:
            self._sealer = SharedKeys.for_app(
                settings.request_state_keys, persistent=settings.backend.persistent, name=name
            )
            if self._sealer is not None:
                kwargs["request_state_security"] = self._sealer.security(name)
        super().__init__(name, *args, lifespan=self._lifespan, **kwargs)
        self._rt.authenticated = self.settings.auth is not None
        self.middleware.append(Middleware(self._rt))
        for fn in builtin_tools(self._rt):
            super().add_tool(fn)
        if health_path is not None:
            self.custom_route(health_path, methods=["GET"], include_in_schema=False)(
                health_endpoint(self._store, health_timeout)
            )

    # -- the state API ------------------------------------------------------------
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
            UndeclaredScopeError: async code used a shared scope it did not
                declare (`@app.tool(scopes={...})`).
        """
        unit = current_unit("get_state")
        with unit.recording():
            return unit.copy_for("get_state", scope).get(key, default)

    def set_state(self, key: str, value: Any, *, scope: Scope = "session") -> None:
        """Store `value` (JSON-serialisable, or a pydantic model) under `key`.

        The write becomes durable when the tool returns; if the tool raises, it
        is dropped - in every scope the call wrote to, together.

        Raises:
            StateTypeError: the value is not JSON-serialisable (a `TypeError` naming the key).
            StateValueError: the value is larger than `max_value_bytes` as JSON.
            StateKeyError, StateScopeError, NoSessionError: as for `get_state`.
        """
        unit = current_unit("set_state")
        with unit.recording():
            unit.copy_for("set_state", scope).set(key, value)

    def delete_state(self, key: str, *, scope: Scope = "session") -> None:
        """Remove `key` from `scope` (no error if it is absent)."""
        unit = current_unit("delete_state")
        with unit.recording():
            unit.copy_for("delete_state", scope).delete(key)

    # -- tools --------------------------------------------------------------------
    def tool(  # type: ignore[override]
        self,
        name: str | None = None,
        *args: Any,
        scopes: Iterable[Scope] | None = None,
        on_conflict: OnConflict | None = None,
        **kwargs: Any,
    ) -> Callable[[_F], _F]:
        """Register a tool, as `MCPServer.tool`, plus:

        Args:
            scopes: the shared scopes the tool uses (`{"user"}`, `{"global"}`):
                loaded and locked before it runs. A sync tool may leave a scope
                out (it is loaded on first use); an async one must declare any
                scope it does not name literally in `scope="..."`.
            on_conflict: `"error"` or `"retry"`; default: the app's `on_conflict`.
                Only ask for `"retry"` when running the tool twice is harmless.
        """
        if callable(name):
            raise TypeError("The @tool decorator was used incorrectly. Use @app.tool() instead of @app.tool")

        def decorator(fn: _F) -> _F:
            self.add_tool(fn, name, *args, scopes=scopes, on_conflict=on_conflict, **kwargs)
            return fn

        return decorator

    def add_tool(  # type: ignore[override]
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        *args: Any,
        scopes: Iterable[Scope] | None = None,
        on_conflict: OnConflict | None = None,
        **kwargs: Any,
    ) -> None:
        """Register a tool, as `MCPServer.add_tool` (with `scopes` and `on_conflict` as in `tool`).

        Raises:
            ConfigurationError: the tool declares a parameter named `session_id`
                (reserved for session handles), or a bad `scopes`/`on_conflict`.
        """
        tool_name = name or fn.__name__
        if SESSION_ARG in inspect.signature(fn).parameters:
            raise ConfigurationError(
                f"tool {tool_name!r} has a parameter named {SESSION_ARG!r}; concierge reserves that "
                "argument for session handles - rename the parameter"
            )
        self._plans.register("tool:" + tool_name, fn, scopes=scopes, on_conflict=on_conflict)
        super().add_tool(fn, name, *args, **kwargs)
        self._fn_names[id(fn)] = tool_name

    # -- resources and prompts ---------------------------------------------------------
    def resource(self, key: str, factory: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """`MCPServer.resource(uri, ...)`, the decorator that registers an MCP resource.

        `scopes=` declares the shared scopes it uses, as for tools.

        Deprecated form: `app.resource(key, factory)` is the old name of `app.live`.
        """
        if factory is None:
            if "close" in kwargs:
                raise ConfigurationError("app.resource(key, factory, close=...): close needs a factory")
            scopes = kwargs.pop("scopes", None)
            return self._planned(f"resources/read:{key}", super().resource(key, **kwargs), scopes)
        warnings.warn("app.resource(key, factory) is deprecated; use app.live(key, factory)", DeprecationWarning, 2)
        close = kwargs.pop("close", None)
        if kwargs:
            raise ConfigurationError(f"app.resource(key, factory): unexpected arguments {sorted(kwargs)}")
        return self._live.get(session_of("resource"), key, factory, close)

    def prompt(  # type: ignore[override]
        self, name: str | None = None, *args: Any, scopes: Iterable[Scope] | None = None, **kwargs: Any
    ) -> Callable[[_F], _F]:
        """`MCPServer.prompt`, with `scopes=` declaring the shared scopes it uses, as for tools."""
        decorator = super().prompt(name, *args, **kwargs)

        def register(fn: _F) -> _F:
            return self._planned(f"prompts/get:{name or fn.__name__}", decorator, scopes)(fn)

        return register

    def _planned(self, key: str, decorator: Callable[[_F], _F], scopes: Iterable[Scope] | None) -> Callable[[_F], _F]:
        def register(fn: _F) -> _F:
            self._plans.register(key, fn, scopes=scopes)
            return decorator(fn)

        return register

    @property
    def state_backend(self) -> StateBackend:
        """The backend sessions are stored in."""
        return self._store.backend

    # -- stages ---------------------------------------------------------------------
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
        stages = {stage: list(tools) for stage, tools in self.stages.items()}
        for stage, fn in self._stage_fns:
            tool_name = self._fn_names.get(id(fn), getattr(fn, "__name__", repr(fn)))
            if tool_name not in stages.setdefault(stage, []):
                stages[stage].append(tool_name)
        return StageGraph(stages, self.transitions)

    # -- serving ----------------------------------------------------------------------
    @asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[Any]:
        graph = self._build_graph()
        graph.validate(t.name for t in await self.list_tools())
        for builtin in BUILTINS:
            if graph.stages_of(builtin):
                raise ConfigurationError(f"{builtin!r} is a built-in tool and cannot be put in a stage")
        self._rt.graph = graph
        async with self._lifecycle.serving(self._settings.sweep_interval):
            if self._rt.signer is None:
                self._rt.signer = await signer_for(self._store)
            if self._sealer is not None and not self._sealer.ready:  # from the handle keys: known only now
                self._sealer.install(derived(self._rt.signer.keys))
            if self._user_lifespan is None:
                yield {}
            else:
                async with self._user_lifespan(app) as value:
                    yield value

    def streamable_http_app(self, **kwargs: Any) -> Any:
        """`MCPServer.streamable_http_app`, with legacy sessions that roam (see `roaming=`)."""
        app = super().streamable_http_app(**kwargs)
        if self._rt.roaming is not None and not kwargs.get("stateless_http", False):
            idle = self.session_manager.session_idle_timeout
            if idle:  # a session unwritten that long is dropped by the SDK here too
                self._rt.roaming.idle = float(idle)
            enable_roaming(self.session_manager, self._rt.roaming)
        return app

    def run(self, transport: Literal["stdio", "sse", "streamable-http"] = "stdio", **kwargs: Any) -> None:
        """`MCPServer.run`: serve over `transport` until the client leaves (stdio) or the process is stopped.

        With `tune_gc` (the default) the garbage collector is tuned first; see `Concierge`.
        """
        self.before_serving()
        super().run(transport, **kwargs)

    def before_serving(self) -> None:
        """What the process is made ready with when this app runs the server itself (the `tune_gc` option).

        `run()` and `python -m concierge` call it; a program that starts the
        server its own way (`run_streamable_http_async`, its own uvicorn) may
        call it once before.
        """
        if self._settings.tune_gc:
            tune_collector()

    async def run_stdio_async(self) -> None:
        """Serve over stdio: one session for the life of the process."""
        token = identity.process_session.set(identity.new_handle())
        try:
            await super().run_stdio_async()
        finally:
            identity.process_session.reset(token)

    def _info(self) -> Implementation:
        return Implementation(
            name=self.name,
            version=self.version,
            title=self.title,
            description=self.description,
            website_url=self.website_url,
            icons=self.icons,
        )
