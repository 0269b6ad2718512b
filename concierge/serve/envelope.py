"""What a result looks like on the wire: errors refused before a tool runs, the handle note, messages.

`tools/call` errors are results (`isError`), not protocol errors; outside
`tools/call` (resources, prompts) a store failure becomes a JSON-RPC error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, SERVER_INFO_META_KEY, CallToolResult, Implementation, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from concierge import ids
from concierge.errors import ConflictError, SessionExpiredError, StateUnavailableError, UnknownSessionError
from concierge.identity import HANDLE_META_KEY, STATUS_META_KEY, Identity
from concierge.work import SessionStore

__all__ = [
    "Status",
    "as_protocol_error",
    "duration",
    "error_result",
    "missing_session",
    "unknown_session",
    "with_handle",
]


@contextmanager
def as_protocol_error() -> Iterator[None]:
    """Report a store failure outside `tools/call` (which has no error result) as a JSON-RPC error."""
    try:
        yield
    except (ConflictError, StateUnavailableError) as exc:
        raise MCPError(code=INTERNAL_ERROR, message=str(exc)) from exc


Status = Literal["issued", "active", "ended", "missing", "unknown", "expired", "malformed"]
"""`_meta["concierge/session"]`: what became of the handle a call carried (handle wires only)."""


def error_result(
    ctx: ServerRequestContext[Any, Any], message: str, info: Implementation, status: Status | None = None
) -> dict[str, Any]:
    """A `tools/call` error result in its wire form, for calls refused before (or after) the tool runs."""
    result = CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)
    dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    meta: dict[str, Any] = {}
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        dumped["resultType"] = "complete"
        meta[SERVER_INFO_META_KEY] = info.model_dump(by_alias=True, mode="json", exclude_none=True)
    if status is not None:
        meta[STATUS_META_KEY] = status
    if meta:
        dumped["_meta"] = meta
    return dumped


def with_handle(result: dict[str, Any], identity: Identity) -> dict[str, Any]:
    """`result` carrying the session's handle, on handle wires.

    The handle comes first, as one short factual line (a client that cuts long
    results keeps it), and in `_meta`, with the session's status.
    """
    if not identity.via_handle or identity.handle is None:
        return result
    handle = identity.handle
    meta = dict(result.get("_meta") or {})
    meta[HANDLE_META_KEY] = handle
    meta[STATUS_META_KEY] = "issued" if identity.is_new else "active"
    result["_meta"] = meta
    notice = {"type": "text", "text": f"session_id: {handle} — pass it as session_id in later calls"}
    result["content"] = [notice, *result.get("content", [])]
    return result


def unknown_session(identity: Identity) -> str:
    if identity.malformed:
        return (
            f"session_id {identity.supplied or ''!r} is not a session handle: pass the session_id from an "
            f'earlier result, or "new" to start a new session.'
        )
    return (
        f"unknown session_id {identity.supplied or ''!r}: no such session exists for you. "
        'Pass session_id="new" (or call start_session) to start a new session.'
    )


async def missing_session(store: SessionStore, identity: Identity) -> UnknownSessionError:
    """Why a handle found no session: it expired (swept or not), was ended, or is unknown."""
    assert identity.session_id is not None
    advice = 'Pass session_id="new" (or call start_session) to start a new session.'
    try:
        record = await store.backend.load(identity.session_id, now=float("-inf"))
    except StateUnavailableError:
        record = None
    now = store.clock()
    if record is not None and record.owner == identity.owner and record.stage == ids.ENDED:
        return UnknownSessionError(f"session_id {identity.supplied!r} was ended (end_session). {advice}")
    stored_expired = record is not None and record.expires_at is not None and record.expires_at <= now
    signed_expired = record is None and identity.issued_at is not None and store.ttl is not None and (
        identity.issued_at + store.ttl <= now
    )
    if (stored_expired and record is not None and record.owner == identity.owner) or signed_expired:
        return SessionExpiredError(
            f"session_id {identity.supplied!r} has expired: it was idle for more than {duration(store.ttl or 0)} "
            f"and its state is gone. {advice}"
        )
    return UnknownSessionError(unknown_session(identity))


def duration(seconds: float) -> str:
    """`90061` -> "1d 1h 1m 1s", for messages."""
    parts, rest = [], int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size or (unit == "s" and not parts):
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return " ".join(parts)
