"""The tools concierge adds.

| tool                     | offered                               |
|--------------------------|---------------------------------------|
| `start_session`          | on wires without a session of their own (handles) |
| `end_session`            | on handle wires                       |
| `list_sessions`          | on handle wires of a server that verifies access tokens |
| `proceed_to_next_stage`  | when the app defines stages           |
| `terminate_session`      | always                                |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from concierge import identity, ids
from concierge.errors import NoSessionError, StageError
from concierge.serve.envelope import duration
from concierge.serve.runtime import END_SESSION, LIST_SESSIONS, PROCEED, START_SESSION, TERMINATE, Runtime
from concierge.work import UnitOfWork, current_unit

__all__ = ["builtin_tools", "visible"]

LISTED_AT_MOST = 100
"""Sessions `list_sessions` returns at most (the most recently used first)."""
_SCANNED_AT_MOST = 10_000


def builtin_tools(rt: Runtime) -> list[Callable[..., Any]]:
    """The built-in tool functions, bound to `rt`, to register with the server."""

    def start_session() -> dict[str, str]:
        session_id = current_unit(START_SESSION).session_id
        handle = ids.handle_of(session_id or "")
        assert handle is not None
        return {"session_id": handle}

    start_session.__doc__ = _start_description(rt)

    async def end_session() -> dict[str, Any]:
        """End this session: its state is deleted and its session_id stops working.

        In a server with workflow stages this is terminate_session: the state is
        cleared and the session goes back to the first stage.
        """
        unit = current_unit(END_SESSION)
        if rt.graph:
            return await _terminate(rt, unit)
        session = unit.session
        assert session is not None
        await rt.lifecycle.run_end_hooks(unit, "terminated")
        await rt.live.end_session(session.session_id)
        session.clear()
        # Kept, empty, until it expires: a handle this server signed whose session is absent would
        # otherwise name a fresh one; this way the ended handle stays refused.
        session.set_stage(ids.ENDED)
        return {"ended": True}

    async def list_sessions() -> dict[str, Any]:
        """List your live sessions (their session_id, stage and last activity), most recent first."""
        caller = identity.principal()
        if caller is None:
            raise NoSessionError("list_sessions needs an authenticated caller (an access token on the request)")
        found: list[dict[str, Any]] = []
        backend, now = rt.store.backend, rt.store.clock()
        for offset in range(0, _SCANNED_AT_MOST, 500):
            page = await backend.list_sessions(now=now, prefix=ids.HANDLE, limit=500, offset=offset)
            for summary in page:
                if summary.owner == caller and len(found) < LISTED_AT_MOST:
                    found.append(
                        {
                            "session_id": ids.handle_of(summary.session_id),
                            "stage": summary.stage,
                            "updated_at": summary.updated_at,
                            "expires_at": summary.expires_at,
                        }
                    )
            if len(page) < 500 or len(found) >= LISTED_AT_MOST:
                break
        return {"sessions": found}

    def proceed_to_next_stage(target_stage: str) -> dict[str, Any]:
        """Move this session to another workflow stage; the tools available change with it."""
        session = current_unit(PROCEED).session
        assert session is not None
        graph = rt.graph
        here = graph.current(session.stage)
        allowed = graph.targets(here)
        if target_stage not in allowed:
            raise StageError(
                f"cannot move from stage {here!r} to {target_stage!r}; "
                + (f"allowed targets: {allowed}" if allowed else f"{here!r} is a terminal stage")
            )
        session.set_stage(target_stage)
        return {"stage": target_stage, "tools": graph.tools_in(target_stage), "next": graph.targets(target_stage)}

    async def terminate_session() -> dict[str, Any]:
        """End this session's workflow: clear its state and return it to the first stage."""
        return await _terminate(rt, current_unit(TERMINATE))

    return [start_session, end_session, list_sessions, proceed_to_next_stage, terminate_session]


async def _terminate(rt: Runtime, unit: UnitOfWork) -> dict[str, Any]:
    assert unit.session is not None
    await rt.lifecycle.run_end_hooks(unit, "terminated")
    await rt.live.end_session(unit.session.session_id)
    unit.session.clear()
    return {"terminated": True, "stage": rt.graph.start}


def _start_description(rt: Runtime) -> str:
    """`start_session`'s description: how to use the handle, and this server's durability policy."""
    backend = rt.store.backend
    kind = type(backend).__name__.removesuffix("Backend")
    kept = (
        f"This server keeps sessions in {kind}, so they survive a restart of the server"
        if backend.persistent
        else f"This server keeps sessions in {kind.lower()}: they are lost when the server restarts"
    )
    ttl = rt.store.ttl
    expiry = (
        "sessions do not expire"
        if ttl is None
        else f"a session expires after {int(ttl)} seconds ({duration(ttl)}) without a call, and its state is then gone"
    )
    return (
        "Start a new session and return its handle, session_id. Pass it as session_id in every later tool call "
        'to keep this session\'s state (any tool also takes session_id="new" to start a session). '
        f"{kept}; {expiry}."
    )


def visible(rt: Runtime, name: object, via_handle: bool) -> bool:
    """Whether a built-in tool is offered on this wire (see the module docstring)."""
    if name in (START_SESSION, END_SESSION):
        return via_handle
    if name == LIST_SESSIONS:
        return via_handle and rt.authenticated
    if name == PROCEED:
        return bool(rt.graph)
    return True
