"""A caller without a handle cannot grow the store: nothing is stored before a session's first write.

Through a real streamable-HTTP server (2026-07-28, the SDK client's default) on
every persistent store, with the row count read from the store itself; and in
process, with a backend that counts its reads, for forged handles.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from helpers import ServerProcess, handle_of, payload, start_all, text
from mcp import Client

from concierge import Concierge, MemoryBackend
from concierge.state import backend_from_url

pytestmark = pytest.mark.anyio

CALLS = int(os.environ.get("CONCIERGE_TEST_GROWTH_CALLS", "5000"))
"""How many calls each probe makes (the numbers of the report that found the growth)."""
CONCURRENCY = 16
LIMIT = 600


async def _rows(state_url: str) -> int:
    backend = backend_from_url(state_url)
    async with backend:
        return len(await backend.list_sessions(now=time.time(), include_expired=True, limit=1_000_000))


async def _many(client: Client, n: int, tool: str, arguments: dict[str, Any]) -> list[Any]:
    results: list[Any] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            results.append(await client.call_tool(tool, arguments))

    async with anyio.create_task_group() as tg:
        for i in range(CONCURRENCY):
            tg.start_soon(worker, n // CONCURRENCY + (1 if i < n % CONCURRENCY else 0))
    return results


@asynccontextmanager
async def _served(state_url: str) -> AsyncIterator[tuple[Client, int]]:
    """A cart server on the store, a 2026-07-28 client of it, and the rows stored once it started."""
    server = ServerProcess.cart("streamable-http", state_url=state_url)
    start_all(server)
    try:
        with anyio.fail_after(LIMIT):
            async with Client(server.url) as client:
                await client.list_tools()
                yield client, await _rows(state_url)  # the handle key, written at start-up
    finally:
        server.close()


async def test_handle_less_reads_and_start_session_store_nothing_and_writes_past_the_rate_are_refused(
    persistent_state_url: str,
) -> None:
    async with _served(persistent_state_url) as (client, before):
        read_without_handle = await _many(client, CALLS, "view_cart", {})
        assert all(r.is_error and (r.meta or {}).get("concierge/session") == "missing" for r in read_without_handle)
        assert await _rows(persistent_state_url) == before
        started = await _many(client, CALLS, "start_session", {})
        issued = [r for r in started if not r.is_error]
        assert 0 < len(issued) < len(started)  # start_session starts a session: the rate applies
        assert all("max_new_sessions_per_minute" in text(r) for r in started if r.is_error)
        for result in issued[:50]:  # reads in those fresh sessions: allowed, and they store nothing
            handle = result.structured_content["session_id"]
            assert payload(await client.call_tool("view_cart", {"session_id": handle}))["cart"] == []
        write_without_handle = await _many(client, CALLS, "add_to_cart", {"item": "x"})
        assert all(r.is_error and "session_id" in text(r) for r in write_without_handle)
        assert await _rows(persistent_state_url) == before


async def test_writing_calls_that_start_sessions_are_refused_past_the_documented_rate(
    persistent_state_url: str,
) -> None:
    async with _served(persistent_state_url) as (client, before):
        started = time.monotonic()
        written = await _many(client, CALLS, "add_to_cart", {"item": "x", "session_id": "new"})
        minutes = int((time.monotonic() - started) // 60) + 1  # a sliding one-minute window
        kept = [r for r in written if not r.is_error]
        assert 120 <= len(kept) <= 120 * minutes  # the documented default of max_new_sessions_per_minute
        refused = [r for r in written if r.is_error]
        assert refused and all("(max_new_sessions_per_minute) is 120" in text(r) for r in refused)
        for result in kept[:3]:  # the sessions within the limit work on
            again = await client.call_tool("add_to_cart", {"item": "y", "session_id": handle_of(result)})
            assert payload(again)["cart"] == ["x", "y"]
        # Only those, and the record counting this caller's live sessions (max_live_sessions_per_caller).
        assert await _rows(persistent_state_url) == before + len(kept) + 1


async def test_a_handle_issued_before_a_restart_resolves_after_it_written_or_not(persistent_state_url: str) -> None:
    server = ServerProcess.cart("streamable-http", state_url=persistent_state_url)
    start_all(server)
    restarted: ServerProcess | None = None
    try:
        with anyio.fail_after(LIMIT):
            async with Client(server.url) as client:
                unwritten = (await client.call_tool("start_session", {})).structured_content["session_id"]
                written = handle_of(await client.call_tool("add_to_cart", {"item": "apple", "session_id": "new"}))
            server.kill()
            restarted = ServerProcess.cart("streamable-http", state_url=persistent_state_url, port=server.port)
            start_all(restarted)
            async with Client(restarted.url) as client:
                fresh = await client.call_tool("view_cart", {"session_id": unwritten})
                assert payload(fresh)["cart"] == [] and fresh.meta["concierge/session"] == "active"
                kept = await client.call_tool("view_cart", {"session_id": written})
                assert payload(kept)["cart"] == ["apple"] and kept.meta["concierge/session"] == "active"
    finally:
        server.close()
        if restarted is not None:
            restarted.close()


class CountingBackend(MemoryBackend):
    """A memory store that counts the reads of session records."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []

    async def load(self, session_id: str, **kwargs: Any) -> Any:
        self.loads.append(session_id)
        return await super().load(session_id, **kwargs)


async def test_a_forged_handle_in_the_right_shape_is_refused_with_no_store_read() -> None:
    backend = CountingBackend()
    app = Concierge("forged", state=backend)

    @app.tool()
    def view() -> list[str]:
        return app.get_state("cart", [])

    async with Client(app) as client:
        real = handle_of(await client.call_tool("view", {"session_id": "new"}))
        flipped = real[:10] + ("A" if real[10] != "A" else "B") + real[11:]  # one character altered
        other_key = Concierge("elsewhere", handle_keys=["another key of sixteen bytes or more"])
        async with Client(other_key) as elsewhere:  # a well-formed handle signed with another server's key
            foreign = handle_of(await elsewhere.call_tool("start_session", {}))
        backend.loads.clear()
        truncated = real[:-1] + ("_" if real[-1] != "_" else "-")  # the last character altered
        for forged in (flipped, foreign, truncated):
            result = await client.call_tool("view", {"session_id": forged})
            assert result.is_error and result.meta["concierge/session"] == "unknown", text(result)
        assert backend.loads == []  # refused on the signature alone
        assert not (await client.call_tool("view", {"session_id": real})).is_error


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_call_past_the_session_size_limits_is_refused_naming_the_setting_and_writes_nothing(
    state_url: str, mode: str
) -> None:
    app = Concierge("caps", state_url=state_url, max_keys_per_session=3, max_session_bytes=200)

    @app.tool()
    def put(keys: list[str], size: int = 1) -> int:
        for key in keys:
            app.set_state(key, "x" * size)
        return len(keys)

    @app.tool()
    def count() -> int:
        return sum(app.get_state(k) is not None for k in ("a", "b", "c", "d", "e"))

    new = {} if mode == "legacy" else {"session_id": "new"}
    async with (Client(app, mode="legacy") if mode == "legacy" else Client(app)) as client:
        first = await client.call_tool("put", {"keys": ["a", "b"], **new})
        assert not first.is_error, text(first)
        handle = {} if mode == "legacy" else {"session_id": handle_of(first)}
        too_many = await client.call_tool("put", {"keys": ["c", "d"], **handle})
        assert too_many.is_error and "max_keys_per_session" in text(too_many) and "is 3" in text(too_many)
        too_big = await client.call_tool("put", {"keys": ["a"], "size": 300, **handle})
        assert too_big.is_error and "max_session_bytes" in text(too_big) and "200" in text(too_big)
        assert payload(await client.call_tool("count", handle)) == 2  # nothing of the refused calls was kept
