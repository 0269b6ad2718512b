"""`tools/list`: the built-ins offered here, stage labels, the handle argument, per-session filtering.

On the 2026-07-28 wire, and wherever handles are in use, the list is the same
for every caller (stages are enforced when a tool is called). On legacy
connections that carry a session, it shows only the tools of the session's
current stage, and a transition sends `notifications/tools/list_changed`.
"""

from __future__ import annotations

import logging
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp_types import ToolListChangedNotification
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from concierge import identity
from concierge.serve.builtins import visible
from concierge.serve.envelope import as_protocol_error
from concierge.serve.runtime import PROCEED, SESSION_ARG, Runtime

__all__ = ["filters_list", "list_tools", "notify_tools_changed"]

logger = logging.getLogger("concierge")

_SESSION_ARG = {
    "required": {
        "type": "string",
        "description": (
            'This session\'s handle: the session_id of an earlier result (or of start_session), or "new" '
            "to start a new session."
        ),
    },
    "optional": {
        "type": "string",
        "description": (
            "This session's handle: the session_id of an earlier result (or of start_session). "
            'Omit it (or pass "new") to start a new session.'
        ),
    },
}


def filters_list(ctx: ServerRequestContext[Any, Any]) -> bool:
    """tools/list varies per session only on legacy connections that carry a session."""
    return ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS and not identity.uses_handles(ctx)


async def notify_tools_changed(ctx: ServerRequestContext[Any, Any]) -> None:
    try:
        await ctx.session.send_notification(ToolListChangedNotification(), related_request_id=ctx.request_id)
    except Exception:  # advisory: a lost notification must not fail the committed call
        logger.warning("could not send notifications/tools/list_changed", exc_info=True)


async def list_tools(rt: Runtime, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    result = await call_next(ctx)
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return result
    via_handle = identity.uses_handles(ctx)
    graph = rt.graph
    stage: str | None = None
    filtering = bool(graph) and filters_list(ctx)
    if filtering:
        session_id = identity.wire_session(ctx)
        assert session_id is not None
        with as_protocol_error():
            copy = await rt.store.load(session_id, create=True)
        stage = graph.current(copy.stage if copy else None)
    tools = []
    for tool in result["tools"]:
        name = tool.get("name")
        if not visible(rt, name, via_handle) or (filtering and not graph.allows(stage, name)):
            continue
        tool = dict(tool)
        homes = graph.stages_of(name)
        if homes:
            tool["description"] = f"[{', '.join(homes)}] {tool.get('description') or ''}".rstrip()
        if name == PROCEED and graph:
            targets = graph.targets(stage) if filtering else list(graph.stages)
            _add_property(tool, "target_stage", {"enum": targets}, merge=True)
        if via_handle and rt.stateful(name):
            _add_property(tool, SESSION_ARG, dict(_SESSION_ARG[rt.handles]), required=rt.handles == "required")
        tools.append(tool)
    result["tools"] = tools
    return result


def _add_property(
    tool: dict[str, Any], name: str, schema: dict[str, Any], *, merge: bool = False, required: bool = False
) -> None:
    """Set (or, with `merge`, extend) one property of the tool's input schema, copying what it changes."""
    input_schema = dict(tool.get("inputSchema") or {"type": "object"})
    props = dict(input_schema.get("properties") or {})
    props[name] = {**props.get(name, {}), **schema} if merge else schema
    input_schema["properties"] = props
    if required and name not in input_schema.get("required", []):
        input_schema["required"] = [*input_schema.get("required", []), name]
    tool["inputSchema"] = input_schema
