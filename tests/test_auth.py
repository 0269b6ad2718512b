"""User scope and handle ownership over real streamable HTTP with the SDK's bearer-token auth.

The server (tests/servers/auth_server.py) accepts `token-<name>` as subject
`<name>`. User state follows the principal across sessions and connections;
a handle minted for one principal is unknown to another.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import helpers
import httpx2
import pytest
from helpers import NEW, ServerProcess, handle_of, payload, status_of, text
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

pytestmark = pytest.mark.anyio

LIMIT = 30


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = helpers.auth_server()
    with helpers.running(proc):
        yield proc


def as_user(server: ServerProcess, name: str, *, mode: str | None = None) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer token-{name}"})
    transport = streamable_http_client(server.url, http_client=http)
    return Client(transport, mode=mode) if mode else Client(transport)


async def test_user_state_follows_one_principal_across_sessions_and_wire_eras(server: ServerProcess) -> None:
    with anyio.fail_after(LIMIT):
        async with as_user(server, "alice") as modern:
            one = await modern.call_tool("add_to_saved_cart", {"item": "book", **NEW})
            two = await modern.call_tool("add_to_saved_cart", {"item": "pen", **NEW})  # a second session
            assert handle_of(one) != handle_of(two)
        async with as_user(server, "alice", mode="legacy") as legacy:  # another connection, stateful HTTP
            assert payload(await legacy.call_tool("saved_cart", {}))["cart"] == ["book", "pen"]
            payload(await legacy.call_tool("add_to_saved_cart", {"item": "mug"}))
        async with as_user(server, "alice") as again:
            assert payload(await again.call_tool("saved_cart", NEW))["cart"] == ["book", "pen", "mug"]


async def test_user_state_is_isolated_between_principals(server: ServerProcess) -> None:
    with anyio.fail_after(LIMIT):
        async with as_user(server, "carol") as carol, as_user(server, "dave") as dave:
            await carol.call_tool("add_to_saved_cart", {"item": "c1", **NEW})
            await dave.call_tool("add_to_saved_cart", {"item": "d1", **NEW})
            assert payload(await carol.call_tool("saved_cart", NEW))["cart"] == ["c1"]
            assert payload(await dave.call_tool("saved_cart", NEW))["cart"] == ["d1"]


async def test_a_handle_of_principal_a_is_unknown_to_principal_b(server: ServerProcess) -> None:
    with anyio.fail_after(LIMIT):
        async with as_user(server, "erin") as erin, as_user(server, "frank") as frank:
            handle = handle_of(await erin.call_tool("note", {"text": "secret", **NEW}))
            stolen = await frank.call_tool("note", {"text": "mine now", "session_id": handle})
            assert stolen.is_error and "unknown" in text(stolen) and "secret" not in text(stolen)
            assert text(stolen).startswith(f"unknown session_id {handle!r}: no such session exists for you")
            assert status_of(stolen) == "unknown"
            assert payload(await erin.call_tool("note", {"text": "still mine", "session_id": handle}))["notes"] == [
                "secret",
                "still mine",
            ]


async def test_list_sessions_lists_the_callers_own_sessions_only(server: ServerProcess) -> None:
    with anyio.fail_after(LIMIT):
        async with as_user(server, "ivan") as ivan, as_user(server, "judy") as judy:
            tools = {t.name: t for t in (await ivan.list_tools()).tools}
            assert "list_sessions" in tools
            assert "session_id" not in tools["list_sessions"].input_schema.get("properties", {})
            mine = {handle_of(await ivan.call_tool("note", {"text": f"ivan {i}", **NEW})) for i in range(2)}
            theirs = handle_of(await judy.call_tool("note", {"text": "judy", **NEW}))
            listed = await ivan.call_tool("list_sessions", {})
            assert not listed.is_error, text(listed)
            assert {entry["session_id"] for entry in payload(listed)["sessions"]} == mine
            assert theirs not in text(listed)
            assert theirs in {
                entry["session_id"] for entry in payload(await judy.call_tool("list_sessions", {}))["sessions"]
            }


async def test_concurrent_user_scope_writes_from_many_sessions_of_one_principal_lose_nothing(
    server: ServerProcess,
) -> None:
    with anyio.fail_after(LIMIT * 2):
        async with as_user(server, "gina") as gina:

            async def add(i: int) -> None:
                result = await gina.call_tool("add_to_saved_cart", {"item": f"i{i}", **NEW})  # a new session each
                assert not result.is_error, text(result)

            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(add, i)
            assert sorted(payload(await gina.call_tool("saved_cart", NEW))["cart"]) == sorted(
                f"i{i}" for i in range(30)
            )


async def test_user_scope_over_unauthenticated_http_is_a_clear_error() -> None:
    server = ServerProcess.cart("streamable-http", state_url="memory://")
    server.start().wait_ready()
    try:
        with anyio.fail_after(LIMIT):
            async with Client(server.url) as client:
                result = await client.call_tool("save_for_later", {"item": "x", **NEW})
        assert result.is_error
        assert "access token" in text(result) and "scope='session'" in text(result)
    finally:
        server.close()


async def test_deleting_a_legacy_http_session_ends_it_with_reason_closed(server: ServerProcess) -> None:
    with anyio.fail_after(LIMIT):
        async with as_user(server, "hana", mode="legacy") as legacy:  # closing sends DELETE
            await legacy.call_tool("note", {"text": "bye"})
        with anyio.fail_after(10):
            while True:
                async with as_user(server, "hana") as other:
                    ended = payload(await other.call_tool("ended_sessions", NEW))["ended"]
                if any(reason == "closed" and notes == ["bye"] for _, reason, notes in ended):
                    break
                await anyio.sleep(0.05)
        assert all(sid.startswith("http:") for sid, reason, _ in ended if reason == "closed")
