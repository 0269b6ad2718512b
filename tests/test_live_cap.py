"""One caller holds at most `max_live_sessions_per_caller` live sessions, counted in the store.

Through real streamable-HTTP servers (2026-07-28, the SDK client's default) on
every persistent store: the cap, its refusal, `end_session` making room, the
count surviving a restart and shared by two processes. In process, through the
app's HTTP transport with a client address per caller: each caller its own
cap, local connections unlimited, no tool code run for a refused call, the
ids of sessions gone dropped at the cap, and the count outliving an idle TTL
while the sessions it counts are used.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from helpers import CART_SERVER, NEW, ServerProcess, free_port, handle_of, has_handle, payload, start_all, text
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

from concierge import Concierge, ConfigurationError, MemoryBackend
from concierge.state import backend_from_url

pytestmark = pytest.mark.anyio

LIMIT = 120
SETTING = "(max_live_sessions_per_caller)"
BASE = "http://127.0.0.1:8000"


def refused(result: CallToolResult, cap: int) -> bool:
    """Whether the call was refused by the live-session cap, with nothing handed out."""
    return result.is_error and f"{SETTING} is {cap}" in text(result) and not has_handle(result)


def cart_server(state_url: str, cap: int, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    args = [str(CART_SERVER), "streamable-http", str(port), "--max-live-sessions", str(cap)]
    return ServerProcess(args, port=port, state_url=state_url)


async def stored_handles(state_url: str) -> set[str]:
    async with backend_from_url(state_url) as backend:
        listed = await backend.list_sessions(now=time.time(), prefix="h:", limit=10_000)
    return {s.session_id.removeprefix("h:") for s in listed}


async def new_cart(client: Client, item: str) -> CallToolResult:
    return await client.call_tool("add_to_cart", {"item": item, **NEW})


# -- real servers, every persistent store ------------------------------------------------------------
async def test_a_caller_holds_up_to_the_cap_then_is_refused_naming_the_setting_until_it_ends_one(
    persistent_state_url: str,
) -> None:
    server = cart_server(persistent_state_url, 3)
    start_all(server)
    restarted: ServerProcess | None = None
    try:
        with anyio.fail_after(LIMIT):
            async with Client(server.url) as client:
                handles = [handle_of(await new_cart(client, f"item{n}")) for n in range(3)]
                over = await new_cart(client, "one too many")
                assert refused(over, 3), text(over)
                assert "this caller holds 3 live sessions" in text(over) and "end_session" in text(over)
                assert refused(await client.call_tool("start_session", {}), 3)
                assert await stored_handles(persistent_state_url) == set(handles)  # nothing of the refused calls
                again = await client.call_tool("add_to_cart", {"item": "more", "session_id": handles[0]})
                assert payload(again)["cart"] == ["item0", "more"]  # the sessions held work on
                ended = await client.call_tool("end_session", {"session_id": handles[1]})
                assert not ended.is_error, text(ended)
                room = await new_cart(client, "in its place")
                assert not room.is_error, text(room)
                handles[1] = handle_of(room)
                assert refused(await new_cart(client, "over again"), 3)
            server.kill()
            restarted = cart_server(persistent_state_url, 3, port=server.port)
            start_all(restarted)
            async with Client(restarted.url) as client:
                assert refused(await new_cart(client, "after a restart"), 3)  # the count is in the store
                kept = await client.call_tool("view_cart", {"session_id": handles[1]})
                assert payload(kept)["cart"] == ["in its place"]
            assert await stored_handles(persistent_state_url) >= set(handles)
    finally:
        server.close()
        if restarted is not None:
            restarted.close()


async def test_two_servers_on_one_store_hold_a_caller_to_one_cap_under_concurrent_starts(
    persistent_state_url: str,
) -> None:
    servers = [cart_server(persistent_state_url, 4), cart_server(persistent_state_url, 4)]
    start_all(*servers)
    results: list[CallToolResult] = []
    try:
        with anyio.fail_after(LIMIT):
            async with Client(servers[0].url) as first, Client(servers[1].url) as second:

                async def start(client: Client, n: int) -> None:
                    results.append(await new_cart(client, f"item{n}"))

                async with anyio.create_task_group() as tg:
                    for n in range(12):
                        tg.start_soon(start, (first, second)[n % 2], n)
    finally:
        for server in servers:
            server.close()
    kept = [r for r in results if not r.is_error]
    assert len(kept) == 4, [text(r) for r in results]
    assert all(refused(r, 4) for r in results if r.is_error), [text(r) for r in results if r.is_error]
    assert await stored_handles(persistent_state_url) == {handle_of(r) for r in kept}


# -- in process, a client address per caller -----------------------------------------------------------
@asynccontextmanager
async def callers(app: Concierge, *hosts: str) -> AsyncIterator[list[Client]]:
    """2026-07-28 clients of `app`'s streamable-HTTP transport, one per client address."""
    asgi = app.streamable_http_app()
    async with app.session_manager.run(), AsyncExitStack() as stack:
        clients = []
        for host in hosts:
            transport = httpx2.ASGITransport(app=asgi, client=(host, 40_000))
            http = await stack.enter_async_context(httpx2.AsyncClient(transport=transport, base_url=BASE))
            transport_streams = streamable_http_client(f"{BASE}/mcp", http_client=http)
            clients.append(await stack.enter_async_context(Client(transport_streams)))
        yield clients


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def counting_app(runs: list[str], **options: Any) -> Concierge:
    app = Concierge("capped", **options)

    @app.tool()
    def put(item: str) -> dict[str, Any]:
        runs.append(item)
        app.set_state("item", item)
        return {"item": item}

    return app


async def test_each_caller_has_a_cap_of_its_own() -> None:
    app = counting_app([], max_live_sessions_per_caller=2)
    with anyio.fail_after(LIMIT):
        async with callers(app, "10.0.0.1", "10.0.0.2") as (alice, bob):
            held = [handle_of(await alice.call_tool("put", {"item": f"a{n}", **NEW})) for n in range(2)]
            assert refused(await alice.call_tool("put", {"item": "a2", **NEW}), 2)
            for n in range(2):  # another address: its own two
                assert not (await bob.call_tool("put", {"item": f"b{n}", **NEW})).is_error
            assert refused(await bob.call_tool("put", {"item": "b2", **NEW}), 2)
            assert not (await alice.call_tool("end_session", {"session_id": held[0]})).is_error
            assert not (await alice.call_tool("put", {"item": "a3", **NEW})).is_error
            assert refused(await bob.call_tool("put", {"item": "b3", **NEW}), 2)  # Alice's room is not Bob's


async def test_a_local_connection_is_not_limited() -> None:
    app = counting_app([], max_live_sessions_per_caller=1)
    async with Client(app) as client:
        for n in range(3):
            assert not (await client.call_tool("put", {"item": str(n), **NEW})).is_error


async def test_a_call_refused_at_the_cap_runs_no_tool_code_and_concurrent_starts_stop_at_it() -> None:
    runs: list[str] = []
    app = counting_app(runs, max_live_sessions_per_caller=3)
    results: list[CallToolResult] = []
    with anyio.fail_after(LIMIT):
        async with callers(app, "10.0.0.1") as (client,):

            async def start(n: int) -> None:
                results.append(await client.call_tool("put", {"item": str(n), **NEW}))

            async with anyio.create_task_group() as tg:
                for n in range(10):
                    tg.start_soon(start, n)
            assert sum(not r.is_error for r in results) == 3
            assert all(refused(r, 3) for r in results if r.is_error)
            runs.clear()
            assert refused(await client.call_tool("put", {"item": "late", **NEW}), 3)
            assert runs == []  # refused before the tool ran


async def test_a_resource_read_that_would_store_a_session_at_the_cap_is_refused_naming_the_setting() -> None:
    app = counting_app([], max_live_sessions_per_caller=1)

    @app.resource("cart://seen")
    def seen() -> str:
        app.set_state("seen", True)
        return "seen"

    with anyio.fail_after(LIMIT):
        async with callers(app, "10.0.0.1") as (client,):
            handle = (await client.call_tool("start_session", {})).structured_content["session_id"]
            assert not (await client.call_tool("put", {"item": "a", **NEW})).is_error
            with pytest.raises(MCPError, match=r"\(max_live_sessions_per_caller\) is 1"):
                await client.read_resource("cart://seen", meta={"concierge/session_id": handle})


async def test_two_apps_on_one_store_count_every_new_session_once_and_run_each_tool_once(
    persistent_state_url: str,
) -> None:
    """Two apps on one store are two processes: commits to the caller's record race, and none is lost."""
    runs: list[str] = []
    apps = [counting_app(runs, state_url=persistent_state_url, max_live_sessions_per_caller=16) for _ in range(2)]
    results: list[CallToolResult] = []
    with anyio.fail_after(LIMIT):
        async with callers(apps[0], "10.0.0.1") as (first,), callers(apps[1], "10.0.0.1") as (second,):

            async def start(client: Client, n: int) -> None:
                results.append(await client.call_tool("put", {"item": str(n), **NEW}))

            async with anyio.create_task_group() as tg:
                for n in range(16):
                    tg.start_soon(start, (first, second)[n % 2], n)
            assert [text(r) for r in results if r.is_error] == []
            assert sorted(runs, key=int) == [str(n) for n in range(16)]  # no tool ran twice
            assert refused(await first.call_tool("put", {"item": "17th", **NEW}), 16)
            assert refused(await second.call_tool("put", {"item": "17th", **NEW}), 16)


async def test_at_the_cap_the_ids_of_sessions_gone_are_dropped_at_most_once_a_minute() -> None:
    clock = Clock()
    backend = MemoryBackend()
    app = counting_app([], state=backend, clock=clock, max_live_sessions_per_caller=2)
    with anyio.fail_after(LIMIT):
        async with callers(app, "10.0.0.1") as (client,):
            held = [handle_of(await client.call_tool("put", {"item": str(n), **NEW})) for n in range(2)]
            assert refused(await client.call_tool("put", {"item": "x", **NEW}), 2)
            assert await backend.delete("h:" + held[0])  # gone behind the server's back (the inspector)
            clock.now += 30
            assert refused(await client.call_tool("put", {"item": "x", **NEW}), 2)  # looked 30 s ago
            clock.now += 31
            assert not (await client.call_tool("put", {"item": "x", **NEW})).is_error
            assert refused(await client.call_tool("put", {"item": "y", **NEW}), 2)


async def test_the_count_lasts_while_its_sessions_are_used_and_expires_with_them() -> None:
    clock = Clock()
    app = counting_app([], clock=clock, session_ttl=100, sweep_interval=None, max_live_sessions_per_caller=2)
    with anyio.fail_after(LIMIT):
        async with callers(app, "10.0.0.1") as (client,):
            held = [handle_of(await client.call_tool("put", {"item": str(n), **NEW})) for n in range(2)]
            clock.now += 90
            for handle in held:  # used: both live on past the first 100 s
                assert not (await client.call_tool("put", {"item": "again", "session_id": handle})).is_error
            clock.now += 60
            assert refused(await client.call_tool("put", {"item": "x", **NEW}), 2)
            clock.now += 200  # both expired, unused
            assert not (await client.call_tool("put", {"item": "x", **NEW})).is_error


def test_the_cap_is_checked_at_start_up() -> None:
    with pytest.raises(ConfigurationError, match="max_live_sessions_per_caller"):
        Concierge("bad", max_live_sessions_per_caller=0)
    assert Concierge("off", max_live_sessions_per_caller=None)._settings.max_live_sessions_per_caller is None
    assert Concierge("default")._settings.max_live_sessions_per_caller == 1000
