"""`resources/read` and `prompts/get`: user code with a session but no arguments to carry a handle.

On handle wires the handle comes in the request's `_meta["concierge/session_id"]`;
without one, the state API raises a clear error saying the request has no session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from mcp_types.methods import is_input_required

from concierge import identity
from concierge.identity import HANDLE_META_KEY
from concierge.serve.closing import roaming_record, watch_close
from concierge.serve.envelope import as_protocol_error, missing_session, unknown_session
from concierge.serve.held import SessionLimitError
from concierge.serve.runtime import Runtime
from concierge.work import Job, UnitOfWork, bind

__all__ = ["read"]


async def read(rt: Runtime, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    meta = (ctx.params or {}).get("_meta")
    supplied = meta.get(HANDLE_META_KEY) if isinstance(meta, Mapping) else None
    who = rt.resolve(ctx, supplied, start=False)
    if who.session_id is None:
        reason = (
            unknown_session(who)
            if who.supplied is not None  # malformed, or forged (its signature does not check)
            else "this request has no session: on this transport, pass the session's handle in "
            f"_meta[{HANDLE_META_KEY!r}] of the request"
        )
        return await _surfaced(UnitOfWork(None, no_session_reason=reason), ctx, call_next)
    watch_close(rt, ctx, who.session_id)
    key = f"{ctx.method}:{(ctx.params or {}).get('uri') or (ctx.params or {}).get('name')}"
    job = Job(
        who.session_id,
        key,
        [rt.plans.of(key)],
        user=lambda copy: identity.user_of(ctx, who.owner),
        create=not who.via_handle or who.issued_at is not None,  # a signed handle may be unwritten
        create_until=rt.fresh_until(who),
        owner=who.owner,
        check_owner=who.via_handle,
        companions=roaming_record(rt, ctx, who),
        tally=rt.held.of(ctx, who.via_handle) if rt.held is not None else None,
        keep=lambda result: not is_input_required(result),  # an input_required round runs again: not yet done
    )
    with as_protocol_error():
        try:
            result, unit = await rt.runner.run(job, lambda unit: _surfaced(unit, ctx, call_next))
        except SessionLimitError as exc:  # refused before it ran: the caller holds its cap of sessions
            raise MCPError(code=INVALID_PARAMS, message=str(exc)) from exc
        if unit is None:
            missing = await missing_session(rt.store, who)
            return await _surfaced(UnitOfWork(None, no_session_reason=str(missing)), ctx, call_next)
    return result


async def _surfaced(unit: UnitOfWork, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Run a resource read or prompt in `unit`, keeping the message of a concierge error it raised.

    mcp 2.3 re-wraps an exception raised while rendering a prompt, so the
    client would only see "Internal server error".
    """
    with bind(unit):
        try:
            return await call_next(ctx)
        except MCPError:
            raise
        except Exception as exc:
            if unit.error is None:
                raise
            raise MCPError(code=INVALID_PARAMS, message=str(unit.error)) from exc
