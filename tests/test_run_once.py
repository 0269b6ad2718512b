"""A tool body runs once unless its author asked for a retry.

Shared scopes (`user`, `global`) are loaded before a tool runs when it declares
them or names them in `scope="..."`, and on first use in a sync tool; a
cross-process conflict is reported, and the tool re-run only with
`on_conflict="retry"`. Each test counts a side effect outside the store.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import NEW, new_session, payload, server_env, text
from mcp import Client, StdioServerParameters

from concierge import Concierge
from concierge.state import backend_from_url

pytestmark = pytest.mark.anyio

LIMIT = 30
SHARED_SERVER = Path(__file__).parent / "servers" / "shared_server.py"
MODES = ["legacy", "2026-07-28"]


def _client(app: Concierge, mode: str) -> Client:
    return Client(app, mode="legacy") if mode == "legacy" else Client(app)


async def _stored(app: Concierge, state_url: str, record_id: str) -> dict[str, str] | None:
    backend = app.state_backend if state_url.startswith("memory") else backend_from_url(state_url)
    async with backend:
        record = await backend.load(record_id, now=time.time())
    return None if record is None else record.values


def _side_effect_tools(app: Concierge, effects: list[str]) -> None:
    def helper(scope: str, key: str) -> int:  # the scope arrives as a variable: no scan can see it
        n = app.get_state(key, 0, scope=scope) + 1  # type: ignore[arg-type]
        app.set_state(key, n, scope=scope)  # type: ignore[arg-type]
        return n

    @app.tool()
    def sync_literal() -> list[int]:
        effects.append("sync_literal")
        u = app.get_state("u", 0, scope="user") + 1
        g = app.get_state("g", 0, scope="global") + 1
        app.set_state("u", u, scope="user")
        app.set_state("g", g, scope="global")
        return [u, g]

    @app.tool()
    def sync_helper() -> list[int]:
        effects.append("sync_helper")
        return [helper("global", "g"), helper("user", "u")]  # global first: out of lock order

    @app.tool()
    async def async_literal() -> list[int]:
        effects.append("async_literal")
        u = app.get_state("u", 0, scope="user") + 1
        g = app.get_state("g", 0, scope="global") + 1
        app.set_state("u", u, scope="user")
        app.set_state("g", g, scope="global")
        return [u, g]

    @app.tool(scopes={"user", "global"})
    async def async_declared() -> list[int]:
        effects.append("async_declared")
        return [helper("user", "u"), helper("global", "g")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tool", ["sync_literal", "sync_helper", "async_literal", "async_declared"])
async def test_a_tool_using_user_and_global_scope_on_its_first_call_runs_once(
    state_url: str, mode: str, tool: str
) -> None:
    app = Concierge("once", state_url=state_url)
    effects: list[str] = []
    _side_effect_tools(app, effects)
    with anyio.fail_after(LIMIT):
        async with _client(app, mode) as client:
            first = await client.call_tool(tool, new_session(mode))
            assert not first.is_error, text(first)
            assert first.structured_content == {"result": [1, 1]}
            assert effects == [tool]  # the first call ran once, and its writes were kept
            second = await client.call_tool(tool, new_session(mode))  # handles: another session, same buckets
            assert second.structured_content == {"result": [2, 2]}
            assert effects == [tool, tool]
    assert (await _stored(app, state_url, "global")) == {"g": "2"}


async def test_an_async_tool_reaching_an_undeclared_scope_runs_once_and_names_the_fix(state_url: str) -> None:
    app = Concierge("undeclared", state_url=state_url)
    effects: list[str] = []

    def helper(scope: str) -> None:
        app.set_state("k", 1, scope=scope)  # type: ignore[arg-type]

    @app.tool()
    async def charge() -> str:
        effects.append("charged")
        helper("global")
        return "ok"

    async with Client(app) as client:
        result = await client.call_tool("charge", NEW)
    assert result.is_error
    assert "@app.tool(scopes={'global'})" in text(result) and "'charge'" in text(result)
    assert effects == ["charged"]
    assert await _stored(app, state_url, "global") is None  # nothing of the failed call was written


def _second_process(state_url: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=[str(SHARED_SERVER)], env=server_env(state_url), cwd=str(SHARED_SERVER.parent)
    )


@pytest.mark.parametrize("on_conflict", ["default", "error", "retry"])
@pytest.mark.parametrize("scope", ["global", "user"])
async def test_a_conflicting_shared_write_from_another_process_is_reported_unless_retry_was_asked(
    persistent_state_url: str, scope: str, on_conflict: str
) -> None:
    """Process A reads a shared counter and waits; process B (a real subprocess) bumps it; A then commits."""
    app = Concierge("first-process", state_url=persistent_state_url)
    runs: list[int] = []
    read = anyio.Event()
    go = anyio.Event()
    options: dict[str, Any] = {} if on_conflict == "default" else {"on_conflict": on_conflict}

    @app.tool(scopes={scope}, **options)  # type: ignore[arg-type]
    async def bump_slowly() -> int:
        runs.append(1)
        n = app.get_state("n", 0, scope=scope) + 1  # type: ignore[arg-type]
        read.set()
        await go.wait()
        app.set_state("n", n, scope=scope)  # type: ignore[arg-type]
        return n

    result: list[Any] = []

    async def first() -> None:
        result.append(await client.call_tool("bump_slowly", {}))

    with anyio.fail_after(LIMIT):
        async with Client(app, mode="legacy") as client, Client(_second_process(persistent_state_url)) as other:
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await read.wait()
                assert payload(await other.call_tool("bump", {"scope": scope})) == 1  # B commits first
                go.set()
            after = await other.call_tool("bump", {"scope": scope})
    outcome = result[0]
    if on_conflict == "retry":
        assert not outcome.is_error, text(outcome)
        assert payload(outcome) == 2 and len(runs) == 2  # re-run on B's value, as its author asked
        assert payload(after) == 3
    else:
        assert outcome.is_error and "conflict" in text(outcome) and "nothing this call wrote was saved" in text(outcome)
        assert len(runs) == 1  # ran once, reported, never re-run behind its author's back
        assert payload(after) == 2  # B's write stands; A's was reported, not lost silently
