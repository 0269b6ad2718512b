"""How fast one caller may start sessions: a sliding one-minute window per principal or client address.

Starting a session costs nothing in the store until its first write, but a
caller that keeps starting sessions and writing to each could still grow the
store without bound. The window is kept per process: with N replicas behind a
round-robin balancer a caller gets up to N times the rate.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from mcp.server.context import ServerRequestContext

from concierge import identity

__all__ = ["StartLimit", "caller_of"]

_TRACKED_AT_MOST = 10_000
"""Callers whose recent starts are remembered; the least recently seen is forgotten past it."""


def caller_of(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """Who the per-caller limits count a request against: its authenticated principal, else its client
    address (`addr:<host>`) on unauthenticated HTTP; `None` on a connection local to this machine (stdio,
    in-process), which is not limited."""
    if ctx.request is None:
        return None
    who = identity.principal()
    if who is None:
        client = getattr(ctx.request, "client", None)
        who = "addr:" + (getattr(client, "host", None) or "unknown")
    return who


class StartLimit:
    """At most `per_minute` new sessions per caller per minute (`None`: no limit).

    Callers on a connection local to this machine (stdio, in-process) are not limited.
    """

    def __init__(self, per_minute: int | None, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._starts: OrderedDict[str, deque[float]] = OrderedDict()

    def start(self, ctx: ServerRequestContext[Any, Any]) -> str | None:
        """Count one new session for this request's caller; the refusal message when over the limit."""
        if self.per_minute is None:
            return None
        who = caller_of(ctx)
        if who is None:
            return None
        now = self.clock()
        starts = self._starts.pop(who, None) or deque()
        while starts and starts[0] <= now - 60:
            starts.popleft()
        self._starts[who] = starts
        while len(self._starts) > _TRACKED_AT_MOST:
            self._starts.popitem(last=False)
        if len(starts) >= self.per_minute:
            wait = max(1, int(starts[0] + 60 - now) + 1)
            return (
                f"too many new sessions: this caller started {len(starts)} in the last minute, and the limit "
                f"(max_new_sessions_per_minute) is {self.per_minute}. Pass the session_id of a session you "
                f"already have, or start a new one in {wait} s"
            )
        starts.append(now)
        return None
