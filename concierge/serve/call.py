"""`tools/call`: resolve the session, enforce the stage, run the tool once in its unit of work.

The steps, top to bottom:

1. take the handle out of the arguments (handle wires) and resolve the session;
2. refuse what cannot run (a built-in not offered here, an unknown handle);
3. run the tool in a unit of work (`concierge.work.Runner`), refusing a tool
   outside the session's stage before it runs;
4. commit only a successful result; report a conflict or an unreachable store
   as a tool error, nothing saved. A round that ends in `input_required`
   (2026-07-28: the tool asks the client first) has not finished the call:
   what it wrote is dropped, and the round that finishes commits;
5. tell a legacy client its tool list changed after a stage transition, and
   put the handle on the result.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from copy import copy
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types.methods import is_input_required

from concierge import identity, ids
from concierge.errors import ConciergeError, ConflictError, SessionExpiredError, StateUnavailableError
from concierge.identity import STATUS_META_KEY
from concierge.serve.builtins import visible
from concierge.serve.closing import roaming_record, watch_close
from concierge.serve.envelope import Status, error_result, missing_session, unknown_session, with_handle
from concierge.serve.listing import filters_list, notify_tools_changed
from concierge.serve.runtime import (
    BUILTINS,
    END_SESSION,
    LIST_SESSIONS,
    NEW_SESSION,
    PROCEED,
    SESSION_ARG,
    START_SESSION,
    TERMINATE,
    Runtime,
)
from concierge.work import Job, UnitOfWork, bind

__all__ = ["call_tool"]

logger = logging.getLogger("concierge")


def _ok(result: Any) -> bool:
    """Whether a call finished well, so what it wrote is committed."""
    return isinstance(result, dict) and not result.get("isError") and not is_input_required(result)


async def call_tool(rt: Runtime, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    params = dict(ctx.params or {})
    name = params.get("name")
    arguments = params.get("arguments")
    supplied: object = None
    if isinstance(arguments, Mapping) and SESSION_ARG in arguments:
        arguments = dict(arguments)
        supplied = arguments.pop(SESSION_ARG)
        params["arguments"] = arguments
        ctx = copy(ctx)  # as dataclasses.replace, without re-running the constructor
        ctx.params = params
    if not isinstance(name, str):
        return await call_next(ctx)  # the SDK rejects the malformed call
    if name == START_SESSION:
        supplied = None  # always a fresh session
    who = rt.resolve(ctx, supplied, start=True)

    def error(message: str, status: Status | None = None) -> dict[str, Any]:
        return error_result(ctx, message, rt.info(), status)

    if name in BUILTINS and not visible(rt, name, who.via_handle):
        return error(_not_offered(name))
    if who.via_handle and name != START_SESSION:
        stateful = rt.stateful(name)
        if not stateful and supplied is None:
            return await _without_session(name, ctx, call_next)
        if stateful and supplied in (None, "") and rt.handles == "required":
            return error(
                f"validation error: tool {name!r} needs the argument session_id: pass the session_id from an "
                f'earlier result, or "{NEW_SESSION}" to start a new session.',
                "missing",
            )
    if who.session_id is None:
        return error(unknown_session(who), "malformed" if who.malformed else "unknown")
    if who.is_new:
        refusal = rt.limits.start(ctx)
        if refusal is not None:
            return error(refusal)
    watch_close(rt, ctx, who.session_id)
    stage_before: list[str | None] = []

    def run(unit: UnitOfWork) -> Awaitable[Any]:
        assert unit.session is not None
        stage_before[:] = [unit.session.stage]
        refusal = _stage_refusal(rt, unit.session.stage, name)
        if refusal is not None:
            return _value(error(refusal))
        return call_next(ctx)  # the SDK's coroutine itself: no frame of ours around the tool

    plans = [rt.plans.of("tool:" + name)]
    if name in (TERMINATE, END_SESSION):
        plans.append(rt.lifecycle.end)  # the end hooks run inside this call
    job = Job(
        who.session_id,
        name,
        plans,
        user=lambda copy: identity.user_of(ctx, who.owner),
        create=not who.via_handle or who.issued_at is not None,  # a handle this server signed may be unwritten
        create_until=rt.fresh_until(who),
        fresh=who.is_new,
        # A tool that uses no state (a legacy connection's session still runs it in a unit of work) reads
        # nothing a change notice could make stale: it starts at once, without turns of the event loop.
        catch_up=rt.stateful(name) or name in BUILTINS,
        owner=who.owner,
        check_owner=who.via_handle and not who.is_new,
        keep=_ok,
        companions=roaming_record(rt, ctx, who),
        tally=rt.held.of(ctx, who.via_handle) if rt.held is not None else None,
    )
    # A first call that fails creates nothing, so it hands out no handle.
    unsaved = (lambda result, _: result) if who.is_new else with_handle
    try:
        result, unit = await rt.runner.run(job, run)
    except ConflictError as exc:
        message = (
            f"conflict: {exc}. Another process changed this state while the call ran; nothing this call wrote "
            "was saved. Call the tool again to run it on the current state."
        )
        return unsaved(error(message), who)
    except StateUnavailableError as exc:
        return unsaved(error(str(exc)), who)
    except ConciergeError as exc:  # refused at commit (a session size limit): its own words
        return unsaved(error(str(exc)), who)
    except MCPError:
        raise  # the SDK's own protocol errors stay protocol errors
    except Exception as exc:
        # A store failure of a kind no backend maps (a driver bug, an unexpected server reply): still
        # a tool error the model can read, and the unit of work was not committed.
        logger.exception("concierge: tool %r failed outside the tool itself; nothing was saved", name)
        return unsaved(error(f"the state store failed ({type(exc).__name__}); nothing this call wrote was saved"), who)
    if unit is None:
        missing = await missing_session(rt.store, who)
        return error(str(missing), "expired" if isinstance(missing, SessionExpiredError) else "unknown")
    if is_input_required(result):
        return result  # the call goes on in the client's next round, which carries the same session_id
    if not _ok(result):
        return unsaved(result, who)
    assert unit.session is not None
    if unit.session.stage == ids.ENDED:  # end_session: the handle is no longer valid
        result["_meta"] = {**(result.get("_meta") or {}), STATUS_META_KEY: "ended"}
        return result
    if unit.session.stage != stage_before[0] and not who.via_handle and filters_list(ctx):
        await notify_tools_changed(ctx)
    return with_handle(result, who)


async def _value(value: Any) -> Any:
    return value


async def _without_session(name: str, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """A tool that uses no session state, called without a handle: no session, no store round trip."""
    reason = (
        f"tool {name!r} was registered as using no session state, so on this transport it takes no session_id "
        'and has no session. Declare it: @app.tool(scopes={"session"}) (add "user"/"global" as needed)'
    )
    with bind(UnitOfWork(None, tool=name, no_session_reason=reason)):
        return await call_next(ctx)


def _not_offered(name: str) -> str:
    if name == PROCEED:
        return f"{name} is only available when the server defines stages"
    if name == LIST_SESSIONS:
        return f"{name} is only available on a server that authenticates its callers, on transports using handles"
    return f"this connection already has a session; {name} is only for transports without one"


def _stage_refusal(rt: Runtime, stage: str | None, tool: str) -> str | None:
    graph = rt.graph
    if not graph or tool in BUILTINS:
        return None
    here = graph.current(stage)
    if graph.allows(here, tool):
        return None
    return (
        f"tool {tool!r} is not available in the current stage {here!r} "
        f"(it belongs to stage {', '.join(map(repr, graph.stages_of(tool)))}). "
        f"Tools in {here!r}: {graph.tools_in(here)}; "
        f"call {PROCEED} with one of {graph.targets(here)} to move on."
    )
