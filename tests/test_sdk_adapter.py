"""Guards for the SDK internals concierge relies on (see concierge/_sdk.py).

If one of these fails after an mcp upgrade, the adapter module must be revisited
before concierge can be trusted to keep sessions apart.
"""

from __future__ import annotations

import inspect
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.server.connection import Connection
from mcp.server.context import CallNext, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.streamable_http import StreamableHTTPServerTransport

from concierge import Concierge
from concierge._sdk import _MANAGER_INTERNALS, SDK_CHECKED, connection_of, enable_roaming

pytestmark = pytest.mark.anyio


def _recording_app() -> tuple[Concierge, list[Connection]]:
    app = Concierge("adapter")
    seen: list[Connection] = []

    async def record(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> Any:
        if ctx.method == "tools/call":
            seen.append(connection_of(ctx))
        return await call_next(ctx)

    app.middleware.insert(0, record)

    @app.tool()
    def ping() -> str:
        return "pong"

    return app, seen


async def test_server_session_still_holds_its_connection_privately() -> None:
    # mcp 2.3.0 keeps the connection as ServerSession._connection; connection_of depends on it.
    conn = Connection.for_loop(outbound=None)  # type: ignore[arg-type]
    session = ServerSession(None, conn)  # type: ignore[arg-type]
    assert getattr(session, "_connection", None) is conn, f"checked against mcp {SDK_CHECKED}"


async def test_legacy_connection_is_one_object_for_every_request() -> None:
    app, seen = _recording_app()
    async with Client(app, mode="legacy") as client:
        await client.call_tool("ping", {})
        await client.call_tool("ping", {})
    assert len(seen) == 2
    assert seen[0] is seen[1]


async def test_two_legacy_connections_are_distinct_objects() -> None:
    app, seen = _recording_app()
    async with Client(app, mode="legacy") as a, Client(app, mode="legacy") as b:
        await a.call_tool("ping", {})
        await b.call_tool("ping", {})
    assert seen[0] is not seen[1]


async def test_modern_connection_is_new_per_request() -> None:
    # Why handles exist: on 2026-07-28 nothing ties two requests together.
    app, seen = _recording_app()
    async with Client(app) as client:
        await client.call_tool("ping", {})
        await client.call_tool("ping", {})
    assert seen[0] is not seen[1]


async def test_connection_of_fails_loudly_without_the_private_attribute() -> None:
    class Bare:
        pass

    ctx = ServerRequestContext(session=Bare(), lifespan_context={}, protocol_version="2025-11-25", method="x")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="_connection"):
        connection_of(ctx)


# -- roaming (enable_roaming) --------------------------------------------------------------------
def test_session_manager_still_has_what_roaming_uses() -> None:
    # mcp 2.3.0: enable_roaming registers transports in these private fields and wraps _handle_request.
    app = Concierge("adapter", state_url="memory://", roaming=True)
    app.streamable_http_app()
    manager = app.session_manager
    missing = [name for name in _MANAGER_INTERNALS if not hasattr(manager, name)]
    assert not missing, f"checked against mcp {SDK_CHECKED}"
    assert isinstance(manager._server_instances, dict)
    assert isinstance(manager._session_owners, dict)
    assert isinstance(manager._session_creation_lock, anyio.Lock)
    assert callable(manager._handle_request) and callable(manager._discard_session)
    assert manager.asgi_app.app.__qualname__.endswith("enable_roaming.<locals>.handle"), "roaming is not installed"
    params = inspect.signature(StreamableHTTPServerTransport).parameters
    assert {"mcp_session_id", "idle_timeout", "retry_interval", "event_store"} <= set(params)


def test_enable_roaming_fails_loudly_when_the_manager_changed() -> None:
    class Changed:
        stateless = False

    with pytest.raises(RuntimeError, match="roaming=False"):
        enable_roaming(Changed(), None)  # type: ignore[arg-type]


def test_roaming_is_on_by_default_only_with_a_persistent_store(tmp_path: Any) -> None:
    assert Concierge("m", state_url="memory://")._rt.roaming is None
    assert Concierge("s", state_url=f"sqlite:///{tmp_path}/s.db")._rt.roaming is not None
    assert Concierge("off", state_url=f"sqlite:///{tmp_path}/s.db", roaming=False)._rt.roaming is None
