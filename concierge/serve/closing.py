"""A legacy connection's session: ending it when the connection closes, and recording it so it can roam."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.context import ServerRequestContext

from concierge import ids
from concierge._sdk import connection_of
from concierge.identity import Identity
from concierge.serve.runtime import Runtime
from concierge.work import WorkingCopy

__all__ = ["roaming_record", "watch_close"]

_CLOSE_REGISTERED = "concierge.close_registered"


def watch_close(rt: Runtime, ctx: ServerRequestContext[Any, Any], session_id: str) -> None:
    """Arrange for the session to end ("closed") when the legacy connection that carries it closes."""
    if not ids.closes_with_connection(session_id):
        return
    connection = connection_of(ctx)
    if connection.state.get(_CLOSE_REGISTERED) == session_id:
        return
    connection.state[_CLOSE_REGISTERED] = session_id
    if rt.roaming is not None and session_id.startswith(ids.HTTP):
        # A roaming session outlives its connection here (a restart, the SDK's idle timeout, another
        # replica): only what this process holds for it ends now; an HTTP DELETE ends the session.
        connection.exit_stack.push_async_callback(rt.live.end_session, session_id)
        return
    connection.exit_stack.push_async_callback(rt.lifecycle.close_session, session_id)


def roaming_record(
    rt: Runtime, ctx: ServerRequestContext[Any, Any], who: Identity
) -> Callable[[], Awaitable[list[WorkingCopy]]] | None:
    """What a legacy streamable-HTTP session writes with its first commit when sessions roam: its wire
    record, made permanent (see `concierge.roaming`)."""
    if rt.roaming is None or who.session_id is None or not who.session_id.startswith(ids.HTTP):
        return None
    roaming, sid = rt.roaming, who.session_id[len(ids.HTTP) :]
    return lambda: roaming.made_permanent(sid)
