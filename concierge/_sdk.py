"""The one place concierge reaches into the MCP SDK's private attributes.

Each use names the SDK version it was checked against. `tests/test_sdk_adapter.py`
exercises every function here through a real client, so an SDK change that
moves these attributes fails that test loudly instead of silently mixing up
sessions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.auth.provider import AccessToken, principal_components
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.runner import serve_connection
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import RequestBodyLimitMiddleware
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp.shared.transport_context import TransportContext
from mcp_types import INTERNAL_ERROR, ErrorData, InitializeRequestParams, JSONRPCError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

__all__ = [
    "SDK_CHECKED",
    "RoamingHooks",
    "WireSession",
    "connection_of",
    "enable_roaming",
    "principal_of_scope",
    "principal_string",
]

logger = logging.getLogger("concierge")
_SESSION_HEADER = b"mcp-session-id"
_VERSION_HEADER = b"mcp-protocol-version"
# mcp 2.3.0: what enable_roaming uses of StreamableHTTPSessionManager beyond its public API.
_MANAGER_INTERNALS = (
    "_handle_request",
    "_server_instances",
    "_session_owners",
    "_session_creation_lock",
    "_task_group",
    "_lifespan_state",
    "_discard_session",
)

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


# -- roaming legacy streamable-HTTP sessions -----------------------------------
#
# The SDK's StreamableHTTPSessionManager keeps its sessions in a dict of
# transports and has no hook to create one for an id it did not mint, so a
# legacy client's `mcp-session-id` answers 404 after a restart or on another
# replica. `enable_roaming` wraps the manager's request handler: before the
# manager sees a request naming a session id it does not hold, it asks
# `RoamingHooks.find` whether the store knows that id for this caller, and if so
# registers a transport under that id whose connection is already initialized
# with the stored protocol version and `initialize` parameters. Every private
# name used below was checked against mcp 2.3.0 and is guarded by
# tests/test_sdk_adapter.py.


@dataclass(frozen=True, slots=True)
class WireSession:
    """What a legacy streamable-HTTP session negotiated, as recorded in the store."""

    protocol_version: str
    client_params: dict[str, Any]


class RoamingHooks(Protocol):
    """What `enable_roaming` asks of the application."""

    async def find(self, session_id: str, principal: str | None) -> WireSession | None:
        """The recorded session `session_id` if it is live and belongs to `principal`, else `None`."""

    async def ended(self, session_id: str) -> None:
        """The client ended session `session_id` (HTTP DELETE answered with success)."""


def principal_of_scope(scope: Scope) -> str | None:
    """The authenticated principal of an ASGI request, in `sessions.principal()`'s form."""
    user = scope.get("user")
    if not isinstance(user, AuthenticatedUser):
        return None
    return principal_string(user.access_token)


def principal_string(token: AccessToken) -> str:
    """One string for a token's principal (client id, issuer, subject)."""
    return json.dumps(list(principal_components(token)), separators=(",", ":"))


def _header(scope: Scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == name), None)


def enable_roaming(manager: StreamableHTTPSessionManager, hooks: RoamingHooks) -> None:
    """Let `manager` serve legacy session ids that another process (or an earlier run) minted.

    Checked against mcp 2.3.0: `StreamableHTTPASGIApp` calls `manager.asgi_app`
    for every request, and `asgi_app` is the body-limit middleware around the
    private `_handle_request`; replacing the attribute puts our step between
    the two.
    """
    missing = [name for name in _MANAGER_INTERNALS if not hasattr(manager, name)]
    if missing:
        raise RuntimeError(
            f"concierge: the installed mcp SDK's StreamableHTTPSessionManager lacks {', '.join(missing)} "
            f"(checked against mcp {SDK_CHECKED}); legacy HTTP sessions cannot roam. Pass roaming=False."
        )
    if manager.stateless:
        return
    inner = manager._handle_request  # mcp 2.3.0: the private per-request dispatcher behind asgi_app
    adopting: dict[str, anyio.Event] = {}
    """Sessions being adopted: a request for one waits until its transport is connected (the transport is
    registered with the manager before it is, and the SDK refuses a request to an unconnected one)."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        session_id = _header(scope, _SESSION_HEADER)
        version = _header(scope, _VERSION_HEADER)
        legacy = version is None or version in HANDSHAKE_PROTOCOL_VERSIONS
        if scope.get("type") != "http" or not session_id or not legacy:
            await inner(scope, receive, send)
            return
        pending = adopting.get(session_id)
        if pending is not None:
            await pending.wait()
        elif session_id not in _transports(manager):
            done = adopting[session_id] = anyio.Event()
            try:
                await _adopt(manager, session_id, scope, hooks)
            except Exception:
                logger.warning("concierge: could not look up session %s in the store", session_id[:64], exc_info=True)
                await _unavailable(scope, receive, send)
                return
            finally:
                del adopting[session_id]
                done.set()
        if scope.get("method") != "DELETE":
            await inner(scope, receive, send)
            return
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await inner(scope, receive, watch)
        if status and status[0] < 400:
            await hooks.ended(session_id)

    manager.asgi_app = RequestBodyLimitMiddleware(handle, manager.max_request_body_size)


async def _unavailable(scope: Scope, receive: Receive, send: Send) -> None:
    """503 with a JSON-RPC error body: the session may exist, but the store cannot say now."""
    body = JSONRPCError(
        jsonrpc="2.0",
        id=None,
        error=ErrorData(code=INTERNAL_ERROR, message="the session store is unavailable; try again shortly"),
    )
    response = Response(
        body.model_dump_json(by_alias=True, exclude_unset=True), status_code=503, media_type="application/json"
    )
    await response(scope, receive, send)


def _transports(manager: StreamableHTTPSessionManager) -> dict[str, StreamableHTTPServerTransport]:
    transports = getattr(manager, "_server_instances", None)  # mcp 2.3.0: session id -> transport
    if not isinstance(transports, dict):
        raise RuntimeError(
            "concierge: the installed mcp SDK no longer keeps StreamableHTTPSessionManager._server_instances "
            f"(checked against mcp {SDK_CHECKED}); legacy HTTP sessions cannot roam"
        )
    return transports


async def _adopt(manager: StreamableHTTPSessionManager, session_id: str, scope: Scope, hooks: RoamingHooks) -> None:
    """Serve `session_id` in this process if the store knows it for this caller; else leave the SDK's 404."""
    found = await hooks.find(session_id, principal_of_scope(scope))
    if found is None:
        return
    try:
        params = InitializeRequestParams.model_validate(found.client_params)
    except ValidationError:
        logger.warning("concierge: the recorded initialize parameters of session %s are unusable", session_id[:64])
        return
    user = scope.get("user")
    requestor = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
    # mcp 2.3.0: the manager registers new sessions under `_session_creation_lock`, in `_server_instances`
    # (and `_session_owners` for authenticated callers), and refuses past `max_sessions`.
    async with manager._session_creation_lock:
        transports = _transports(manager)
        if session_id in transports:
            return  # a concurrent request adopted it first
        if manager.max_sessions is not None and len(transports) >= manager.max_sessions:
            return
        transport = StreamableHTTPServerTransport(
            mcp_session_id=session_id,
            is_json_response_enabled=manager.json_response,
            event_store=manager.event_store,
            security_settings=manager.security_settings,
            retry_interval=manager.retry_interval,
            idle_timeout=manager.session_idle_timeout,
        )
        transports[session_id] = transport
        if requestor is not None:
            manager._session_owners[session_id] = requestor  # mcp 2.3.0: session id -> creating principal

    async def run_server(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # As the manager's own run_server (mcp 2.3.0 `_serve_opening_request`), with a connection that
        # is born initialized: the client did its handshake with the process that minted the id.
        async with transport.connect() as (read_stream, write_stream):
            task_status.started()
            try:
                idle_scope = transport.idle_scope or anyio.CancelScope()
                with idle_scope:
                    dispatcher: JSONRPCDispatcher[TransportContext] = JSONRPCDispatcher(
                        read_stream, write_stream, inline_methods=frozenset({"initialize"})
                    )
                    connection = Connection.for_loop(
                        dispatcher, session_id=session_id, protocol_version_hint=found.protocol_version
                    )
                    connection.client_params = params
                    connection.initialized.set()
                    await serve_connection(
                        manager.app,
                        dispatcher,
                        connection=connection,
                        lifespan_state=manager._lifespan_state,  # mcp 2.3.0: the lifespan entered by run()
                    )
            except Exception:
                logger.exception("concierge: resumed session %s crashed", session_id[:64])
            finally:
                await manager._discard_session(session_id, transport)  # mcp 2.3.0: forget + terminate

    task_group = manager._task_group  # mcp 2.3.0: set while the manager runs
    if task_group is None:
        raise RuntimeError("the streamable HTTP session manager is not running")
    try:
        await task_group.start(run_server)
    except BaseException:
        await manager._discard_session(session_id, transport)
        raise
    logger.info("concierge: resumed legacy HTTP session %s from the store", session_id[:64])
