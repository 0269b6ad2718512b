"""The server middleware: every request that runs user code goes through here.

| method                           | handled by                  |
|----------------------------------|-----------------------------|
| `tools/call`                     | `concierge.serve.call`      |
| `resources/read`, `prompts/get`  | `concierge.serve.read`      |
| `tools/list`                     | `concierge.serve.listing`   |
| `initialize`                     | here: advertise `tools.listChanged`; record a roaming HTTP session |
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext

from concierge import identity
from concierge._sdk import connection_of
from concierge.serve.call import call_tool
from concierge.serve.envelope import as_protocol_error
from concierge.serve.listing import list_tools
from concierge.serve.read import read
from concierge.serve.runtime import Runtime

__all__ = ["Middleware"]


class Middleware:
    """The `MCPServer` middleware of one app (see the module docstring)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> Awaitable[HandlerResult]:
        # A plain function handing back the handler's coroutine: one frame less on every resumption of a call.
        method = ctx.method
        if method == "tools/call":
            return call_tool(self.rt, ctx, call_next)
        if method in ("resources/read", "prompts/get"):
            return read(self.rt, ctx, call_next)
        if method == "tools/list":
            return list_tools(self.rt, ctx, call_next)
        return self._other(ctx, call_next)

    async def _other(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        method = ctx.method
        result = await call_next(ctx)
        if method == "initialize" and isinstance(result, dict):
            tools = result.get("capabilities", {}).get("tools")
            if isinstance(tools, dict):
                tools["listChanged"] = True  # stages change the tool list per session
            if self.rt.roaming is not None:
                with as_protocol_error():
                    await self._record(ctx, result)
        return result

    async def _record(self, ctx: ServerRequestContext[Any, Any], result: dict[str, Any]) -> None:
        """Record a new legacy streamable-HTTP session before the response carrying its id is sent."""
        assert self.rt.roaming is not None
        session_id = connection_of(ctx).session_id
        version = result.get("protocolVersion")
        if not session_id or ctx.request is None or not isinstance(version, str):
            return  # not a streamable-HTTP session: nothing can roam
        await self.rt.roaming.initialized(session_id, identity.principal(), version, dict(ctx.params or {}))
