"""`Concierge`: an `MCPServer` whose tools keep per-session state.

The MCP glue lives here: one server middleware wraps every request that runs
user code in a unit of work (see `concierge.work`), resolves its session (see
`concierge.sessions`), enforces stages (see `concierge.stages`) and decorates
results with the session handle where the wire has no session of its own.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, SERVER_INFO_META_KEY, CallToolResult, Implementation, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from concierge import sessions
from concierge.errors import (
    ConfigurationError,
    ConflictError,
    StageError,
    StateUnavailableError,
)
from concierge.sessions import HANDLE_META_KEY, HANDLE_PREFIX, Identity
from concierge.stages import StageGraph
from concierge.state import ENV_STATE_URL, StateBackend, backend_from_url
from concierge.work import SessionStore, UnitOfWork, current_unit

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

_SESSION_ARG_SCHEMA = {
    "type": "string",
    "description": (
        "The session handle from start_session or from an earlier result's "
        "_meta['concierge/session_id']. Omit it to start a new session."
    ),
}


def _seconds(ttl: float | timedelta | None) -> float | None:
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if seconds <= 0:
        raise ConfigurationError(f"session_ttl must be positive (or None for never), got {ttl!r}")
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
        lifespan: Callable[[Any], AbstractAsyncContextManager[Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if state is not None and state_url is not None:
            raise ConfigurationError("pass either state= or state_url=, not both")
        backend = state if state is not None else backend_from_url(state_url or os.environ.get(ENV_STATE_URL))
        ttl = _ttl_from_env() if session_ttl is ... else _seconds(session_ttl)  # type: ignore[arg-type]
        store_kwargs: dict[str, Any] = {"ttl": ttl, "max_value_bytes": max_value_bytes}
        if clock is not None:
            store_kwargs["clock"] = clock
        self._store = SessionStore(backend, **store_kwargs)
        self._user_lifespan = lifespan
        self.stages: dict[str, list[str]] = {}
        self.transitions: dict[str, list[str]] | None = None
        self._graph = StageGraph({}, None)
        self._fn_names: dict[int, str] = {}
        self._stage_fns: list[tuple[str, Callable[..., Any]]] = []
        super().__init__(name, *args, lifespan=self._lifespan, **kwargs)
        self.middleware.append(self._middleware)
        self._add_builtin_tools()

    # -- public state API -------------------------------------------------------
    def get_state(self, key: str, default: Any = None) -> Any:
        """A fresh copy of the value stored under `key` in this session, or `default`.

        Raises:
            NoSessionError: called outside a request, or the request has no session.
            StateKeyError: `key` is not a non-empty string of at most 256 characters.
        """
        return current_unit("get_state").get(key, default)

    def set_state(self, key: str, value: Any) -> None:
        """Store `value` (JSON-serialisable, or a pydantic model) under `key` in this session.

        The write becomes durable when the tool returns; if the tool raises, it is dropped.

        Raises:
            StateTypeError: the value is not JSON-serialisable (a `TypeError` naming the key).
            StateValueError: the value is larger than `max_value_bytes` as JSON.
            StateKeyError: `key` is not a non-empty string of at most 256 characters.
            NoSessionError: called outside a request, or the request has no session.
        """
        current_unit("set_state").set(key, value)

    def delete_state(self, key: str) -> None:
        """Remove `key` from this session (no error if it is absent)."""
        current_unit("delete_state").delete(key)

    @property
    def state_backend(self) -> StateBackend:
        """The backend sessions are stored in."""
        return self._store.backend

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

    # -- lifespan -----------------------------------------------------------------
    @asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[Any]:
        graph = self._build_graph()
        graph.validate(t.name for t in await self.list_tools())
        for builtin in (START_SESSION, PROCEED, TERMINATE):
            if graph.stages_of(builtin):
                raise ConfigurationError(f"{builtin!r} is a built-in tool and cannot be put in a stage")
        self._graph = graph
        async with self._store.opened():
            if self._user_lifespan is None:
                yield {}
            else:
                async with self._user_lifespan(app) as value:
                    yield value

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
            return {"stage": target_stage, "tools": graph.tools_in(target_stage), "next": graph.targets(target_stage)}

        def terminate_session() -> dict[str, Any]:
            """End this session's workflow: clear its state and return it to the first stage."""
            unit = current_unit(TERMINATE)
            unit.clear()
            return {"terminated": True, "stage": self._graph.start}

        for fn in (start_session, proceed_to_next_stage, terminate_session):
            super().add_tool(fn)

    def _builtin_visible(self, name: str, via_handle: bool) -> bool:
        if name == START_SESSION:
            return via_handle
        if name in (PROCEED, TERMINATE):
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
        return result

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
        if name in (START_SESSION, PROCEED, TERMINATE) and not self._builtin_visible(name, identity.via_handle):
            reason = (
                "this connection already has a session; start_session is only for transports without one"
                if name == START_SESSION
                else f"{name} is only available when the server defines stages"
            )
            return self._error(ctx, reason)
        if identity.session_id is None:
            return self._error(ctx, self._unknown_session(identity))
        session_id = identity.session_id

        async with self._store.locked(session_id):
            try:
                unit = await self._store.load(session_id, create=not identity.via_handle or identity.is_new)
            except StateUnavailableError as exc:
                return self._error(ctx, str(exc))
            if unit is None or (identity.via_handle and not identity.is_new and unit.owner != identity.owner):
                return self._error(ctx, self._unknown_session(identity))
            if unit.version == 0:
                unit.owner = identity.owner
                unit.must_persist = identity.via_handle
            # A first call that fails creates nothing, so it hands out no handle.
            unsaved = self._with_handle if not identity.is_new else lambda result, _: result
            refusal = self._stage_refusal(unit, name)
            if refusal is not None:
                return unsaved(self._error(ctx, refusal), identity)
            stage_before = unit.stage
            with SessionStore.bind(unit):
                result = await call_next(ctx)
            if not isinstance(result, dict) or result.get("isError"):
                return unsaved(result, identity)
            try:
                await self._store.commit(unit)
            except ConflictError as exc:
                return unsaved(self._failed(result, f"conflict: {exc}; nothing was saved, retry"), identity)
            except StateUnavailableError as exc:
                return unsaved(self._failed(result, str(exc)), identity)
        if unit.stage != stage_before and not identity.via_handle and self._filters_list(ctx):
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
        async with self._store.locked(identity.session_id):
            with _as_protocol_error():
                unit = await self._store.load(identity.session_id, create=not identity.via_handle)
            if unit is None or (identity.via_handle and unit.owner != identity.owner):
                return await self._surfaced(self._store.unbound(self._unknown_session(identity)), ctx, call_next)
            if unit.version == 0:
                unit.owner = identity.owner
            result = await self._surfaced(unit, ctx, call_next)
            with _as_protocol_error():
                await self._store.commit(unit)
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
                props["target_stage"] = {**props.get("target_stage", {}), "enum": targets}
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

