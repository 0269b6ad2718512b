"""Exceptions raised by concierge.

mcp 2.x reports any tool exception that is not its own `ToolError` as a bare
"Error executing tool X" and hides the message. Every error concierge raises
inside a tool therefore also derives from `ToolError`, so the model reads what
went wrong, while callers can still catch the ordinary Python type.
"""

from __future__ import annotations

from mcp.server.mcpserver.exceptions import ResourceError, ToolError

__all__ = [
    "ConciergeError",
    "ConfigurationError",
    "ConflictError",
    "HistoryError",
    "LiveObjectError",
    "NoSessionError",
    "SessionExpiredError",
    "StageError",
    "StateKeyError",
    "StateScopeError",
    "StateTypeError",
    "StateUnavailableError",
    "StateValueError",
    "UndeclaredScopeError",
    "UnknownSessionError",
]


class ConciergeError(ToolError, ResourceError):
    """Base class of every error concierge raises while serving a request.

    It is both the SDK's `ToolError` and `ResourceError`, so its message reaches
    the client from a tool and from a resource alike.
    """


class StateTypeError(ConciergeError, TypeError):
    """A value given to `set_state` cannot be stored as JSON."""


class StateKeyError(ConciergeError, ValueError):
    """A state key is not a non-empty string within the length limit."""


class StateScopeError(ConciergeError, ValueError):
    """A state call named a scope other than "session", "user" or "global"."""


class UndeclaredScopeError(StateScopeError):
    """Code used a shared scope (`user`, `global`) that was not loaded for it and cannot be loaded mid-call.

    Async code cannot wait inside the synchronous `get_state`; the message
    names the fix: declare the scope (`@app.tool(scopes={"user"})`).
    """


class StateValueError(ConciergeError, ValueError):
    """A value's JSON encoding is larger than `max_value_bytes`."""


class UnknownSessionError(ConciergeError, LookupError):
    """A session handle is unknown, expired or belongs to another caller."""


class SessionExpiredError(UnknownSessionError):
    """A session handle named a session that expired from inactivity."""


class NoSessionError(ConciergeError, RuntimeError):
    """State was used where the request carries no session (or outside a request)."""


class ConflictError(ConciergeError, RuntimeError):
    """Another process committed to the same session first; nothing was written."""


class StateUnavailableError(ConciergeError, RuntimeError):
    """The state backend could not be reached; nothing was written."""


class LiveObjectError(ConciergeError, TypeError):
    """A live object was asked for the wrong way (an async factory given to the sync `app.resource`)."""


class HistoryError(ConciergeError, ValueError):
    """History is not recorded, or a version cannot be restored from the checkpoints kept."""


class StageError(ConciergeError, PermissionError):
    """A tool or transition is not allowed in the session's current stage."""


class ConfigurationError(ValueError):
    """Bad configuration found at start-up (state URL, stage graph, options)."""
