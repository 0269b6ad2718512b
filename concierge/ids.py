"""The format of stored ids: the one place that knows how a record in the store is named.

Every record a store holds has a storage id whose prefix says where it came from:

| storage id            | what it is                                                    |
|-----------------------|---------------------------------------------------------------|
| `h:<handle>`          | a session named by a handle (wires without a session of their own) |
| `http:<id>`           | a legacy streamable-HTTP session (its `mcp-session-id`)       |
| `sse:<id>`            | a legacy SSE connection (its `session_id` query parameter)    |
| `stdio:<token>`       | the one session of a stdio server process                    |
| `conn:<token>`        | one legacy connection of another kind (in-process streams)    |
| `user:<principal>`    | the `user` scope of one caller, shared by all their sessions  |
| `global`              | the `global` scope, shared by everyone                        |
| `wire:<id>`           | what a legacy HTTP session negotiated, so another process can serve it |
| `caller:<who>`        | the sessions one network caller holds (its principal, or `addr:<host>`), for its cap |
| `secrets`             | the key that signs session handles, shared by every process on the store |

Because the origin is part of the id, a handle can never name a session keyed
by a transport id, and a transport id can never be passed as a handle.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CALLER",
    "CONN",
    "ENDED",
    "GLOBAL",
    "HANDLE",
    "HTTP",
    "KINDS",
    "SECRETS",
    "SESSION_PREFIXES",
    "SSE",
    "STDIO",
    "USER",
    "WIRE",
    "Kind",
    "bucket",
    "caller",
    "closes_with_connection",
    "companion",
    "handle_of",
    "is_local",
    "kind_of",
    "lookup_ids",
]

HANDLE = "h:"
HTTP = "http:"
SSE = "sse:"
STDIO = "stdio:"
CONN = "conn:"
USER = "user:"
WIRE = "wire:"
CALLER = "caller:"
GLOBAL = "global"
"""The storage id of the one bucket every caller shares (it has no suffix)."""
SECRETS = "secrets"
"""The storage id of the record holding the handle-signing key."""
ENDED = "concierge/ended"
"""The stage of a session ended by `end_session`: kept (empty) until it expires, so its handle stays refused."""

SESSION_PREFIXES = (HANDLE, HTTP, SSE, STDIO, CONN)
"""The prefixes of sessions, one per origin."""

Kind = Literal["session", "user", "global", "wire", "caller", "secrets"]
KINDS: tuple[Kind, ...] = ("session", "user", "global", "wire", "caller", "secrets")
"""What a stored record is: a session, a user bucket, the global bucket, a wire record, a caller's
sessions, or the secrets."""


def kind_of(storage_id: str) -> Kind:
    """Which of `KINDS` the record `storage_id` is."""
    if storage_id.startswith(USER):
        return "user"
    if storage_id.startswith(WIRE):
        return "wire"
    if storage_id.startswith(CALLER):
        return "caller"
    if storage_id == GLOBAL:
        return "global"
    if storage_id == SECRETS:
        return "secrets"
    return "session"


def bucket(scope: Literal["user", "global"], principal: str | None) -> str:
    """The storage id of a shared scope's bucket: `user:<principal>` or `global`."""
    if scope == "global":
        return GLOBAL
    assert principal is not None, "a user bucket needs a principal"
    return USER + principal


def caller(who: str) -> str:
    """The storage id of the record counting the sessions of caller `who`: `caller:<who>`."""
    return CALLER + who


def handle_of(storage_id: str) -> str | None:
    """The client-facing handle of a handle session (`h:<handle>` -> `<handle>`), else `None`."""
    return storage_id[len(HANDLE) :] if storage_id.startswith(HANDLE) else None


def companion(storage_id: str) -> str | None:
    """The wire record that goes with a legacy HTTP session's state (`None` for other records)."""
    if storage_id.startswith(HTTP):
        return WIRE + storage_id[len(HTTP) :]
    return None


def closes_with_connection(storage_id: str) -> bool:
    """Whether a session ends when its legacy connection closes (its id is the connection's)."""
    return storage_id.startswith((HTTP, SSE, CONN))


def is_local(storage_id: str) -> bool:
    """Whether the session belongs to a connection local to this machine (stdio, in-process)."""
    return storage_id.startswith((STDIO, CONN))


def lookup_ids(given: str) -> list[str]:
    """The storage ids an operator's `given` id may mean: itself, and for a bare handle `h:<handle>` after it."""
    if given in (GLOBAL, SECRETS) or given.startswith((*SESSION_PREFIXES, USER, WIRE, CALLER)):
        return [given]
    return [given, HANDLE + given]
