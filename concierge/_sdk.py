"""The one place concierge reaches into the MCP SDK's private attributes.

Each use names the SDK version it was checked against. `tests/test_sdk_adapter.py`
exercises every function here through a real client, so an SDK change that
moves these attributes fails that test loudly instead of silently mixing up
sessions.
"""

from __future__ import annotations

from typing import Any

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext

__all__ = ["SDK_CHECKED", "connection_of"]

SDK_CHECKED = "2.3.0"


def connection_of(ctx: ServerRequestContext[Any, Any]) -> Connection:
    """The per-connection object behind a request.

    Checked against mcp 2.3.0: `ServerRequestContext.session` is a per-request
    `ServerSession` proxy whose connection is only reachable as the private
    `_connection`. On a legacy (handshake) connection it is the same object for
    every request of the connection; on the 2026-07-28 wire it is new per request.
    """
    connection = getattr(ctx.session, "_connection", None)  # mcp 2.3.0: ServerSession._connection
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "concierge: the installed mcp SDK no longer exposes ServerSession._connection "
            f"(checked against mcp {SDK_CHECKED}); concierge cannot tell legacy connections apart"
        )
    return connection
