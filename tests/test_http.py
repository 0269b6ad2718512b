"""Acceptance tests against real HTTP servers on 127.0.0.1 (subprocesses), through the SDK client.

- streamable HTTP, stateful, legacy client: the `mcp-session-id` is the session;
- streamable HTTP, 2026-07-28 client: handles;
- streamable HTTP, `stateless_http=True`, legacy client: handles;
- SSE, legacy and 2026-07-28 clients: one session per SSE connection;
- on SQLite and Postgres: a handle survives `kill -9` and a restart, 100 concurrent
  calls in one session lose nothing, and two server processes sharing one store
  never silently drop a write to the same session.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest
from helpers import (
    HANDLE_KEY,
    NEW,
    ServerProcess,
    handle_of,
    has_handle,
    notice,
    payload,
    start_all,
    status_of,
    text,
)
from mcp import Client
from mcp.client.sse import sse_client

pytestmark = pytest.mark.anyio

LIMIT = 30
MODERN = "2026-07-28"


@dataclass
class MemoryServers:
    stateful: ServerProcess
    stateless: ServerProcess
    sse: ServerProcess


@pytest.fixture(scope="module")
def servers() -> Iterator[MemoryServers]:
    """One memory-backed server per HTTP flavour, started in parallel and shared by the module."""
    group = MemoryServers(
        stateful=ServerProcess.cart("streamable-http", state_url="memory://"),
        stateless=ServerProcess.cart("streamable-http", state_url="memory://", stateless=True),
        sse=ServerProcess.cart("sse", state_url="memory://"),
    )
    all_ = (group.stateful, group.stateless, group.sse)
    start_all(*all_)
    try:
        yield group
    finally:
        for server in all_:
            server.close()


async def cart_of(client: Client, **extra: str) -> list[str]:
    return payload(await client.call_tool("view_cart", extra))["cart"]


# -- stateful streamable HTTP, legacy client: mcp-session-id --------------------------------------
async def test_stateful_http_legacy_session_is_the_mcp_session_id(servers: MemoryServers) -> None:
    url = servers.stateful.url
    with anyio.fail_after(LIMIT):
        async with Client(url, mode="legacy") as one, Client(url, mode="legacy") as two:
            assert one.protocol_version != MODERN
            assert "start_session" not in {t.name for t in (await one.list_tools()).tools}

            async def fill(client: Client, prefix: str) -> None:
                for i in range(4):
                    result = await client.call_tool("add_to_cart", {"item": f"{prefix}{i}"})
                    assert not has_handle(result), "stateful HTTP has its own session; no handle expected"

            async with anyio.create_task_group() as tg:
                tg.start_soon(fill, one, "a")
                tg.start_soon(fill, two, "b")
            assert await cart_of(one) == [f"a{i}" for i in range(4)]
            assert await cart_of(two) == [f"b{i}" for i in range(4)]
        async with Client(url, mode="legacy") as three:
            assert await cart_of(three) == []


# -- streamable HTTP, 2026-07-28 client: handles -----------------------------------------------
async def test_http_modern_handles_keep_state_across_connections_and_stay_isolated(servers: MemoryServers) -> None:
    url = servers.stateful.url
    with anyio.fail_after(LIMIT):
        async with Client(url) as one, Client(url) as two:
            assert one.protocol_version == MODERN
            assert "start_session" in {t.name for t in (await one.list_tools()).tools}
            first = await one.call_tool("add_to_cart", {"item": "apple", **NEW})
            h1 = handle_of(first)
            assert notice(first) == f"session_id: {h1} — pass it as session_id in later calls"
            assert status_of(first) == "issued"
            h2 = handle_of(await two.call_tool("add_to_cart", {"item": "bread", **NEW}))
            assert h1 != h2
            again = await one.call_tool("add_to_cart", {"item": "milk", "session_id": h1})
            assert status_of(again) == "active" and handle_of(again) == h1
            assert await cart_of(one, session_id=h1) == ["apple", "milk"]
            assert await cart_of(two, session_id=h2) == ["bread"]
            assert await cart_of(two, **NEW) == [], '"new" starts a new, empty session'
            missing = await two.call_tool("view_cart", {})
            assert missing.is_error and status_of(missing) == "missing", "a call without a handle is refused"
            assert "needs the argument session_id" in text(missing) and not has_handle(missing)
        async with Client(url) as later:
            assert await cart_of(later, session_id=h1) == ["apple", "milk"]


async def test_http_modern_forged_handle_is_refused_and_never_adopted(servers: MemoryServers) -> None:
    forged = secrets.token_urlsafe(32)
    with anyio.fail_after(LIMIT):
        async with Client(servers.stateful.url) as client:
            for _ in range(2):
                result = await client.call_tool("add_to_cart", {"item": "x", "session_id": forged})
                assert result.is_error
                assert text(result).startswith(f"unknown session_id {forged!r}: no such session exists for you")
                assert "start_session" in text(result)
                assert status_of(result) == "unknown"
                assert (result.meta or {}).get(HANDLE_KEY) != forged


# -- stateless streamable HTTP, legacy client: handles ------------------------------------------
async def test_stateless_http_legacy_uses_handles_and_clients_never_share_state(servers: MemoryServers) -> None:
    url = servers.stateless.url
    with anyio.fail_after(LIMIT):
        async with Client(url, mode="legacy") as one, Client(url, mode="legacy") as two:
            assert one.protocol_version != MODERN
            tools = {t.name: t for t in (await one.list_tools()).tools}
            assert "start_session" in tools
            assert "session_id" in tools["add_to_cart"].input_schema["properties"]
            assert "session_id" in tools["add_to_cart"].input_schema["required"]
            h1 = handle_of(await one.call_tool("add_to_cart", {"item": "one-a", **NEW}))
            h2 = handle_of(await two.call_tool("add_to_cart", {"item": "two-a", **NEW}))
            assert h1 != h2
            await one.call_tool("add_to_cart", {"item": "one-b", "session_id": h1})
            await two.call_tool("add_to_cart", {"item": "two-b", "session_id": h2})
            assert await cart_of(one, session_id=h1) == ["one-a", "one-b"]
            assert await cart_of(two, session_id=h2) == ["two-a", "two-b"]
            # without the handle there is no session to fall back to: the call is refused, "new" is a new one
            for client in (one, two):
                missing = await client.call_tool("view_cart", {})
                assert missing.is_error and status_of(missing) == "missing", text(missing)
                assert await cart_of(client, **NEW) == []
            refused = await one.call_tool("view_cart", {"session_id": secrets.token_urlsafe(32)})
            assert refused.is_error and text(refused).startswith("unknown session_id ")
            assert status_of(refused) == "unknown"


# -- SSE, legacy client: one session per SSE connection --------------------------------------------
async def test_sse_legacy_session_per_connection(servers: MemoryServers) -> None:
    url = servers.sse.url
    with anyio.fail_after(LIMIT):
        async with (
            Client(sse_client(url), mode="legacy") as one,
            Client(sse_client(url), mode="legacy") as two,
        ):
            assert "start_session" not in {t.name for t in (await one.list_tools()).tools}
            first = await one.call_tool("add_to_cart", {"item": "one-a"})
            assert not has_handle(first)
            await two.call_tool("add_to_cart", {"item": "two-a"})
            await one.call_tool("add_slowly", {"item": "one-b"})
            assert await cart_of(one) == ["one-a", "one-b"]
            assert await cart_of(two) == ["two-a"]
        async with Client(sse_client(url), mode="legacy") as three:
            assert await cart_of(three) == []


# -- SSE, 2026-07-28 client: still one session per SSE connection ------------------------------------
async def test_sse_modern_client_keeps_state_on_its_connection_and_connections_are_isolated(
    servers: MemoryServers,
) -> None:
    url = servers.sse.url
    with anyio.fail_after(LIMIT):
        async with Client(sse_client(url)) as one, Client(sse_client(url)) as two:
            assert one.protocol_version == MODERN
            tools = {t.name: t for t in (await one.list_tools()).tools}
            assert "start_session" not in tools and "end_session" not in tools
            assert "session_id" not in tools["add_to_cart"].input_schema.get("properties", {})
            first = await one.call_tool("add_to_cart", {"item": "one-a"})
            assert not first.is_error, text(first)
            assert not has_handle(first) and notice(first) is None and status_of(first) is None
            await two.call_tool("add_to_cart", {"item": "two-a"})
            await one.call_tool("add_slowly", {"item": "one-b"})
            await one.call_tool("add_blocking", {"item": "one-c"})
            assert await cart_of(one) == ["one-a", "one-b", "one-c"]
            assert await cart_of(two) == ["two-a"]
        async with Client(sse_client(url)) as three:
            assert await cart_of(three) == []


# -- durable backends ------------------------------------------------------------------------
async def test_http_handle_survives_kill_9_and_restart(durable_state_url: str) -> None:
    server = ServerProcess.cart("streamable-http", state_url=durable_state_url)
    start_all(server)
    restarted: ServerProcess | None = None
    try:
        with anyio.fail_after(LIMIT):
            async with Client(server.url) as client:
                handle = handle_of(await client.call_tool("add_to_cart", {"item": "apple", **NEW}))
                result = payload(await client.call_tool("add_slowly", {"item": "pear", "session_id": handle}))
                assert result["cart"] == ["apple", "pear"]
                first_pid = result["pid"]
            server.kill()  # SIGKILL: no clean shutdown, nothing flushed on exit
            restarted = ServerProcess.cart("streamable-http", state_url=durable_state_url, port=server.port)
            start_all(restarted)
            async with Client(restarted.url) as client:
                after = payload(await client.call_tool("view_cart", {"session_id": handle}))
                assert after["pid"] != first_pid
                assert after["cart"] == ["apple", "pear"]
                assert payload(await client.call_tool("add_to_cart", {"item": "plum", "session_id": handle}))[
                    "cart"
                ] == ["apple", "pear", "plum"]
    finally:
        server.close()
        if restarted is not None:
            restarted.close()


async def test_http_100_concurrent_calls_in_one_handle_session_lose_nothing(durable_state_url: str) -> None:
    server = ServerProcess.cart("streamable-http", state_url=durable_state_url)
    start_all(server)
    try:
        with anyio.fail_after(LIMIT):
            async with Client(server.url) as client:
                handle = payload(await client.call_tool("start_session", {}))["session_id"]
                failures: list[str] = []

                async def one(i: int) -> None:
                    tool = "add_slowly" if i % 2 else "add_blocking"
                    result = await client.call_tool(tool, {"item": str(i), "delay": 0.001, "session_id": handle})
                    if result.is_error:
                        failures.append(text(result))

                async with anyio.create_task_group() as tg:
                    for i in range(100):
                        tg.start_soon(one, i)
                assert failures == []
                cart = await cart_of(client, session_id=handle)
                assert sorted(cart, key=int) == [str(i) for i in range(100)]
    finally:
        server.close()


async def test_two_server_processes_sharing_a_store_never_drop_a_write_to_one_session(
    durable_state_url: str,
) -> None:
    a = ServerProcess.cart("streamable-http", state_url=durable_state_url)
    b = ServerProcess.cart("streamable-http", state_url=durable_state_url)
    # One after the other: this test is about sharing a session, not about starting at once
    # (two processes opening a fresh SQLite file at the same instant is a separate concern).
    start_all(a)
    try:
        start_all(b)
        with anyio.fail_after(LIMIT):
            async with Client(a.url) as via_a, Client(b.url) as via_b:
                handle = handle_of(await via_a.call_tool("add_to_cart", {"item": "seed", **NEW}))
                assert await cart_of(via_b, session_id=handle) == ["seed"], "the other process must see the session"
                ok: list[str] = []
                failed: list[str] = []
                pids: set[int] = set()

                async def one(i: int) -> None:
                    client = via_a if i % 2 == 0 else via_b
                    result = await client.call_tool(
                        "add_slowly", {"item": f"c{i}", "delay": 0.01, "session_id": handle}
                    )
                    if result.is_error:
                        failed.append(text(result))
                    else:
                        ok.append(f"c{i}")
                        pids.add(payload(result)["pid"])

                async with anyio.create_task_group() as tg:
                    for i in range(40):
                        tg.start_soon(one, i)
                bad = [message for message in failed if "conflict" not in message.lower()]
                assert bad == [], f"failed calls that do not report a conflict: {bad[:3]}"
                assert ok, "no call succeeded"
                assert pids <= {a.pid, b.pid}
                for client in (via_a, via_b):
                    cart = await cart_of(client, session_id=handle)
                    assert len(cart) == 1 + len(ok), f"{len(ok)} calls succeeded, {len(failed)} failed; cart={cart}"
                    assert sorted(cart) == sorted(["seed", *ok])
    finally:
        a.close()
        b.close()
