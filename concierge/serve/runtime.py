"""`Runtime`: everything the request path needs from the app, handed to it once.

The request path (`concierge.serve`) never imports `concierge.app`: the app
builds one `Runtime` and the middleware works from it alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mcp_types import Implementation

from concierge import identity
from concierge.config import Handles
from concierge.handles import HandleSigner
from concierge.identity import NEW, Identity
from concierge.lifecycle import Lifecycle
from concierge.live import LiveObjects
from concierge.roaming import Roaming
from concierge.serve.held import HeldSessions
from concierge.serve.limits import StartLimit
from concierge.stages import StageGraph
from concierge.work import Plans, Runner, SessionStore

__all__ = ["Runtime"]

START_SESSION = "start_session"
END_SESSION = "end_session"
LIST_SESSIONS = "list_sessions"
PROCEED = "proceed_to_next_stage"
TERMINATE = "terminate_session"
BUILTINS = (START_SESSION, END_SESSION, LIST_SESSIONS, PROCEED, TERMINATE)
SESSION_ARG = "session_id"
NEW_SESSION = NEW
"""The `session_id` value that starts a new session (from any tool)."""


@dataclass
class Runtime:
    """The parts of one app that serve its requests.

    Attributes:
        graph: the validated stage graph, set when the server starts.
        info: the server's `Implementation` (name, version, ...), for error results.
    """

    store: SessionStore
    lifecycle: Lifecycle
    live: LiveObjects
    plans: Plans
    info: Callable[[], Implementation]
    roaming: Roaming | None = None
    handles: Handles = "required"
    authenticated: bool = False
    """Whether the server verifies access tokens (then `list_sessions` is offered)."""
    limits: StartLimit = field(default_factory=lambda: StartLimit(None, time.time))
    """How fast one caller may start sessions."""
    held: HeldSessions | None = None
    """How many live sessions one caller may hold (`None`: no limit)."""
    signer: HandleSigner | None = None
    """Mints and checks handles; set from the options, or from the store when the server starts."""
    graph: StageGraph = field(default_factory=lambda: StageGraph({}, None))

    @property
    def runner(self) -> Runner:
        return self.lifecycle.runner

    def resolve(self, ctx: Any, supplied: object, *, start: bool) -> Identity:
        """The request's session (see `concierge.identity.resolve`), with this app's handle signer."""
        assert self.signer is not None, "the server has not started"
        return identity.resolve(ctx, supplied, start=start, signer=self.signer, now=self.store.clock())

    def fresh_until(self, who: Identity) -> float | None:
        """Until when a handle this server signed, whose session was never written, names a fresh session.

        After `issued_at + ttl` an absent session can only have expired (or been deleted): it is refused.
        `None` when the question does not arise (a new session, an unsigned handle, no TTL).
        """
        if who.issued_at is None or who.is_new or self.store.ttl is None:
            return None
        return who.issued_at + self.store.ttl

    def stateful(self, tool: str) -> bool:
        """Whether `tool` uses session state, so on handle wires it takes the `session_id` argument.

        A tool in a stage always does: its stage is enforced per session.
        """
        if tool in (START_SESSION, LIST_SESSIONS):
            return False
        if tool in BUILTINS or self.graph.stages_of(tool):
            return True
        return self.plans.of("tool:" + tool).stateful
