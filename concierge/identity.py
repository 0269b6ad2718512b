"""Where a request's session comes from, on every transport and both wire eras.

| connection                                   | session                                  |
|----------------------------------------------|------------------------------------------|
| stdio (either era)                           | one per server process                   |
| legacy streamable HTTP, stateful             | the `mcp-session-id`                     |
| legacy SSE                                   | the transport's `session_id` parameter    |
| legacy, other streams (in-process client)    | one per connection                       |
| legacy stateless HTTP, every 2026-07-28 wire | none on the wire: a *handle*             |

A handle is an opaque token concierge mints (`secrets`, 256 bits). The client
passes it back in a tool's `session_id` argument (or, for resources and
prompts, in `_meta["concierge/session_id"]`). The storage id of every session
carries its origin as a prefix, so a handle can never name a session that was
keyed by a transport id, and a transport id can never be supplied as a handle.
"""

from __future__ import annotations

import contextvars
import functools
import getpass
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.context import ServerRequestContext
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from concierge import ids
from concierge._sdk import connection_of, principal_string
from concierge.handles import LEGACY_LENGTH, HandleSigner

__all__ = [
    "HANDLE_META_KEY",
    "Identity",
    "new_handle",
    "principal",
    "resolve",
    "user_of",
    "user_of_stored",
    "wire_session",
]

HANDLE_META_KEY = "concierge/session_id"
NEW = "new"
"""The handle value that asks for a new session."""
STATUS_META_KEY = "concierge/session"
_CONNECTION_STATE_KEY = "concierge.session"
_HANDLE_SHAPE = re.compile(r"[A-Za-z0-9_-]{22,128}")
_SSE_SHAPE = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as the SDK's SSE transport mints it

# Set for the life of a stdio server: stdio has one client per process, and on
# the 2026-07-28 wire the SDK builds a fresh Connection for every request, so
# the session cannot live on the connection.
process_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("concierge_process", default=None)


def new_handle() -> str:
    """A fresh opaque handle: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def principal() -> str | None:
    """The authenticated caller of this request (client id, issuer, subject), or `None`."""
    token = get_access_token()
    if token is None:
        return None
    return principal_string(token)


def user_of(ctx: ServerRequestContext[Any, Any], owner: str | None) -> str | None:
    """Whose `user` state a request reaches: the authenticated principal; else, on a
    connection local to this machine (stdio, in-process), the OS user running the
    server; else (unauthenticated HTTP) nobody.
    """
    if owner is not None:
        return owner
    if ctx.request is None:
        return "os:" + _os_user()
    return None


def user_of_stored(session_id: str, owner: str | None) -> str | None:
    """`user_of` for a session outside any request (its end hooks): its owner, or the
    OS user for sessions of a local connection."""
    if owner is not None:
        return owner
    if ids.is_local(session_id):
        return "os:" + _os_user()
    return None


@functools.cache  # asked on every call of a local connection; a process keeps its user
def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (e.g. a bare container)
        return str(os.getuid()) if hasattr(os, "getuid") else "local"


@dataclass(frozen=True, slots=True)
class Identity:
    """The session a request belongs to.

    Attributes:
        session_id: storage id; `None` when the request has no session (a
            resource read or prompt on a handle wire without a handle).
        via_handle: the wire has no session of its own; handles are in use.
        handle: the client-facing handle (handle wires only).
        is_new: no handle was supplied: the call starts a new session.
        owner: the authenticated principal making the request.
        supplied: the handle as the client sent it (for error messages).
        malformed: what was supplied is not a handle at all.
        issued_at: when this server minted the handle (its signature checked),
            `None` for an unsigned handle of an earlier version, looked up in the store.
    """

    session_id: str | None
    via_handle: bool
    handle: str | None = None
    is_new: bool = False
    owner: str | None = None
    supplied: str | None = None
    malformed: bool = False
    issued_at: float | None = None


def wire_session(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The storage id the transport itself provides, or `None` on handle wires."""
    proc = process_session.get()
    if proc is not None:
        return ids.STDIO + proc
    request = ctx.request
    sse = _sse_session(request)
    if sse is not None:  # one session per SSE connection, on both eras
        return ids.SSE + sse
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    connection = connection_of(ctx)
    if connection.session_id:
        return ids.HTTP + connection.session_id
    if request is not None:
        headers = getattr(request, "headers", None)
        sid = headers.get("mcp-session-id") if headers is not None else None
        if sid:
            return ids.HTTP + sid
        return None  # legacy stateless HTTP: a fresh connection per request
    sid = connection.state.get(_CONNECTION_STATE_KEY)
    if sid is None:
        sid = connection.state[_CONNECTION_STATE_KEY] = new_handle()
    return ids.CONN + sid


def _sse_session(request: object) -> str | None:
    """The SSE connection of a request posted to the SSE transport's message endpoint, else `None`.

    The SDK's SSE transport (mcp 2.3) posts every message with the connection's
    `session_id` query parameter, a UUID it minted and checked; a request that
    also carries `mcp-session-id` is streamable HTTP, whose id comes first.
    """
    if request is None:
        return None
    headers = getattr(request, "headers", None)
    if headers is not None and headers.get("mcp-session-id"):
        return None
    query = getattr(request, "query_params", None)
    sid = query.get("session_id") if query is not None else None
    if not isinstance(sid, str) or not _SSE_SHAPE.fullmatch(sid):
        return None
    return sid


def uses_handles(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether this request's wire has no session of its own."""
    return wire_session(ctx) is None


def resolve(
    ctx: ServerRequestContext[Any, Any], supplied: object, *, start: bool, signer: HandleSigner, now: float
) -> Identity:
    """Resolve a request's session.

    Args:
        supplied: the handle the client passed (`None` when it passed none).
            Ignored on wires that carry their own session.
        start: a missing handle (or `"new"`) starts a new session (tool calls)
            rather than leaving the request without one (resource reads, prompts).
        signer: mints and checks handles; a handle it did not sign for this
            caller is refused without a store lookup.
    """
    owner = principal()
    wire = wire_session(ctx)
    if wire is not None:
        return Identity(session_id=wire, via_handle=False, owner=owner)
    if supplied is None or supplied == "" or supplied == NEW:
        if not start:
            return Identity(session_id=None, via_handle=True, owner=owner)
        handle = signer.mint(owner, now)
        return Identity(ids.HANDLE + handle, via_handle=True, handle=handle, is_new=True, owner=owner, issued_at=now)
    if not isinstance(supplied, str) or not _HANDLE_SHAPE.fullmatch(supplied):
        shown = supplied[:64] if isinstance(supplied, str) else type(supplied).__name__
        return Identity(None, via_handle=True, owner=owner, supplied=shown, malformed=True)
    if len(supplied) == LEGACY_LENGTH:  # unsigned, from an earlier version: only the store can tell
        return Identity(ids.HANDLE + supplied, via_handle=True, handle=supplied, owner=owner, supplied=supplied)
    verified = signer.verify(supplied, owner)
    if verified is None:  # forged, altered, or another caller's: refused with no store lookup
        return Identity(None, via_handle=True, owner=owner, supplied=supplied)
    return Identity(
        ids.HANDLE + supplied,
        via_handle=True,
        handle=supplied,
        owner=owner,
        supplied=supplied,
        issued_at=verified.issued_at,
    )
