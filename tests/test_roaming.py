"""Legacy streamable-HTTP sessions that survive restarts and roam across replicas (`roaming=`).

Every test runs real server subprocesses over streamable HTTP on 127.0.0.1 and
the SDK's legacy (handshake-era) client, which names its session only by the
`mcp-session-id` the server minted:

- `kill -9` and a restart on the same port: the same client, same session id,
  goes on with its cart and its stage (SQLite, PostgreSQL and Redis);
- two server processes on one PostgreSQL (and on one Redis) behind a round-robin that alternates
  the server on every HTTP request: one consistent cart, no sticky sessions;
- ids that must stay `404 Session not found`: unknown, another principal's,
  deleted by the client (HTTP DELETE), expired, and any id with roaming off.
"""

from __future__ import annotations

import itertools
import json
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from helpers import SERVERS, ServerProcess, auth_server, free_port, payload, running, text
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from concierge import Concierge
from concierge.errors import StateUnavailableError
from concierge.state import backend_from_url
from concierge.state.memory import MemoryBackend

pytestmark = pytest.mark.anyio

LIMIT = 60
HANDSHAKE_VERSION = "2025-11-25"


class Wire(httpx2.AsyncBaseTransport):
    """An HTTP transport for the SDK client that records the session id it is given and,
    with several ports, sends each request to the next port in turn (a round-robin balancer)."""

    def __init__(self, ports: list[int]) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self._ports = itertools.cycle(ports)
        self.session_id: str | None = None
        self.served_by: list[int] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        port = next(self._ports)
        request.url = request.url.copy_with(port=port)
        response = await self._inner.handle_async_request(request)
        if request.method == "POST":
            self.served_by.append(port)
        sid = response.headers.get("mcp-session-id")
        if sid:
            self.session_id = sid
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def legacy_client(
    url: str, ports: list[int] | None = None, token: str | None = None
) -> AsyncIterator[tuple[Client, Wire]]:
    """A legacy-mode SDK client over streamable HTTP, with the `Wire` it talks through."""
    wire = Wire(ports or [httpx2.URL(url).port or 80])
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with httpx2.AsyncClient(transport=wire, headers=headers, timeout=httpx2.Timeout(30, read=300)) as http:
        async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            yield client, wire


async def raw_post(
    url: str, session_id: str, *, token: str | None = None, http: httpx2.AsyncClient | None = None
) -> httpx2.Response:
    """One legacy `tools/list` request naming `session_id`, as any client would send it (through `http`, if given)."""
    headers = {
        "mcp-session-id": session_id,
        "mcp-protocol-version": HANDSHAKE_VERSION,
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
    if http is not None:
        return await http.post(url, headers=headers, content=body)
    async with httpx2.AsyncClient(timeout=10) as own:
        return await own.post(url, headers=headers, content=body)


async def assert_not_found(url: str, session_id: str | None, *, token: str | None = None) -> httpx2.Response:
    """The SDK's answer to an id it does not serve: `404 Session not found`."""
    assert session_id is not None
    response = await raw_post(url, session_id, token=token)
    assert response.status_code == 404, response.text
    return response


async def a_session_then_kill(servers: OnePort) -> str:
    """Start a server, add one item in a new legacy session, `kill -9` the server; the session's id."""
    servers.start()
    async with legacy_client(servers.url) as (client, wire):
        await client.call_tool("add_to_cart", {"item": "x"})
        servers.kill()
    assert wire.session_id is not None
    return wire.session_id


def staged(port: int, state_url: str) -> ServerProcess:
    return ServerProcess([str(SERVERS / "staged_server.py"), str(port), state_url], port=port, state_url=state_url)


def cart(state_url: str, port: int | None = None, *extra: str) -> ServerProcess:
    port = port or free_port()
    args = [str(SERVERS / "cart_server.py"), "streamable-http", str(port), *extra]
    return ServerProcess(args, port=port, state_url=state_url)


# -- restart -------------------------------------------------------------------------------------
async def test_legacy_session_survives_kill_9_with_its_cart_and_stage(persistent_state_url: str) -> None:
    port = free_port()
    first = staged(port, persistent_state_url)
    with anyio.fail_after(LIMIT), running(first):
        async with legacy_client(first.url) as (client, wire):
            await client.call_tool("add_to_cart", {"product_id": "p1"})
            await client.call_tool("add_to_cart", {"product_id": "p2"})
            await client.call_tool("proceed_to_next_stage", {"target_stage": "cart"})
            before = wire.session_id
            first.kill()  # SIGKILL: the SDK's in-memory session table is gone

            second = staged(port, persistent_state_url)
            with running(second):
                # the same client object, so the same mcp-session-id, against a process that never saw it
                assert payload(await client.call_tool("view_cart", {}))["cart"] == ["p1", "p2"]
                address = await client.call_tool("set_address", {"address": "1 Main St"})  # only in stage "cart"
                assert not address.is_error, text(address)
                refused = await client.call_tool("search", {"query": "mug"})  # browse-only: still refused
                assert refused.is_error and "stage" in text(refused)
                tools = {t.name for t in (await client.list_tools()).tools}
                assert "set_address" in tools and "search" not in tools
                assert wire.session_id == before
                runs = payload(await client.call_tool("executions", {}))
                assert runs == {"set_address": 1}  # the refused search never ran in the new process


async def test_restarted_session_keeps_writing_and_a_second_restart_keeps_it_all(persistent_state_url: str) -> None:
    with anyio.fail_after(LIMIT):
        async with OnePort(lambda port: cart(persistent_state_url, port)) as servers:
            servers.start()
            async with legacy_client(servers.url) as (client, _):
                for round_ in range(3):
                    for i in range(3):
                        await client.call_tool("add_to_cart", {"item": f"{round_}-{i}"})
                    servers.restart()
                cart_now = payload(await client.call_tool("view_cart", {}))["cart"]
                assert cart_now == [f"{r}-{i}" for r in range(3) for i in range(3)]


class OnePort:
    """Server processes started one after another on one port, each made by `make(port)`; all closed at exit.

    `restart()` is `kill -9` of what runs, then a new process on the same port and store.
    """

    def __init__(self, make: Callable[[int], ServerProcess]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._make = make
        self.all: list[ServerProcess] = []

    async def __aenter__(self) -> OnePort:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self.all:
            server.close()

    def start(self) -> ServerProcess:
        server = self._make(self.port)
        self.all.append(server)
        server.start().wait_ready()
        return server

    def kill(self) -> None:
        for server in self.all:
            server.kill()

    def restart(self) -> ServerProcess:
        self.kill()
        return self.start()


# -- replicas ------------------------------------------------------------------------------------
async def test_two_replicas_round_robin_keep_one_consistent_cart(networked_state_url: str) -> None:
    one, two = cart(networked_state_url), cart(networked_state_url)
    with anyio.fail_after(LIMIT), running(one, two):
        async with legacy_client(one.url, ports=[one.port, two.port]) as (client, wire):
            pids = set()
            for i in range(20):
                result = await client.call_tool("add_to_cart", {"item": f"seq-{i}"})
                assert not result.is_error, text(result)
                pids.add(payload(result)["pid"])
            assert pids == {one.pid, two.pid}, "the round-robin must reach both replicas"
            assert set(wire.served_by) == {one.port, two.port}

            # Concurrent calls in the one session, spread over both replicas: every success is kept,
            # and a call that loses a race across processes says "conflict".
            outcomes: list[tuple[str, bool, str]] = []

            async def add(i: int) -> None:
                result = await client.call_tool("add_to_cart", {"item": f"par-{i}"})
                outcomes.append((f"par-{i}", not result.is_error, text(result)))

            async with anyio.create_task_group() as tg:
                for i in range(24):
                    tg.start_soon(add, i)
            failures = [message for _, ok, message in outcomes if not ok]
            assert all("conflict" in message for message in failures), failures
            final = payload(await client.call_tool("view_cart", {}))["cart"]
            assert final[:20] == [f"seq-{i}" for i in range(20)]
            assert sorted(final[20:]) == sorted(item for item, ok, _ in outcomes if ok)
            assert len(final) == len(set(final))


# -- what must stay 404 --------------------------------------------------------------------------
async def test_unknown_session_id_is_404_and_never_adopted(persistent_state_url: str) -> None:
    server = cart(persistent_state_url)
    with anyio.fail_after(LIMIT), running(server):
        forged = secrets.token_hex(16)
        await assert_not_found(server.url, forged)
        await assert_not_found(server.url, forged)  # still not known: nothing was created


async def test_other_principals_session_id_is_404_after_a_restart(persistent_state_url: str) -> None:
    with anyio.fail_after(LIMIT):
        async with OnePort(lambda port: auth_server(persistent_state_url, port)) as servers:
            servers.start()
            async with legacy_client(servers.url, token="token-alice") as (alice, wire):
                await alice.call_tool("note", {"text": "alice's"})
                servers.restart()
                stolen = await assert_not_found(servers.url, wire.session_id, token="token-mallory")
                assert "alice's" not in stolen.text
                # the owner still gets it back, with its state
                assert payload(await alice.call_tool("note", {"text": "again"}))["notes"] == ["alice's", "again"]
                await assert_not_found(servers.url, wire.session_id, token="token-mallory")  # now held in memory


async def test_deleted_session_is_404_and_not_revived_after_a_restart(persistent_state_url: str) -> None:
    with anyio.fail_after(LIMIT):
        async with OnePort(lambda port: cart(persistent_state_url, port)) as servers:
            servers.start()
            async with legacy_client(servers.url) as (client, wire):
                await client.call_tool("add_to_cart", {"item": "x"})
            # the client sent DELETE on leaving
            await assert_not_found(servers.url, wire.session_id)
            servers.restart()
            await assert_not_found(servers.url, wire.session_id)


async def test_delete_reaching_another_process_ends_the_session_everywhere(persistent_state_url: str) -> None:
    with anyio.fail_after(LIMIT):
        async with OnePort(lambda port: cart(persistent_state_url, port)) as servers:
            servers.start()
            async with legacy_client(servers.url) as (client, wire):
                await client.call_tool("add_to_cart", {"item": "x"})
                servers.restart()
                # leaving the block sends DELETE to a process that never held the session
            await assert_not_found(servers.url, wire.session_id)
            servers.restart()
            await assert_not_found(servers.url, wire.session_id)


async def test_expired_session_is_404_after_a_restart(
    persistent_state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCIERGE_SESSION_TTL", "1")
    with anyio.fail_after(LIMIT):
        async with OnePort(lambda port: cart(persistent_state_url, port)) as servers:
            servers.start()
            async with legacy_client(servers.url) as (client, wire):
                await client.call_tool("add_to_cart", {"item": "x"})
                servers.kill()
                await anyio.sleep(1.5)
                servers.start()
                await assert_not_found(servers.url, wire.session_id)


async def test_a_wire_record_left_without_its_state_is_404_and_dropped(persistent_state_url: str) -> None:
    """A crash between deleting a session's state and its wire record leaves the record: it is never
    served, and it goes the first time its id is asked for."""
    with anyio.fail_after(LIMIT):
        async with OnePort(lambda port: cart(persistent_state_url, port)) as servers:
            session_id = await a_session_then_kill(servers)
            async with backend_from_url(persistent_state_url) as store:
                assert await store.delete(f"http:{session_id}")
                assert await store.load(f"wire:{session_id}", now=time.time()) is not None
            servers.start()
            await assert_not_found(servers.url, session_id)
            servers.kill()
    async with backend_from_url(persistent_state_url) as store:
        assert await store.load(f"wire:{session_id}", now=time.time()) is None


async def test_roaming_off_keeps_the_sdks_404_after_a_restart(persistent_state_url: str) -> None:
    with anyio.fail_after(LIMIT):
        async with OnePort(lambda port: cart(persistent_state_url, port, "--no-roaming")) as servers:
            servers.start()
            async with legacy_client(servers.url) as (client, wire):
                await client.call_tool("add_to_cart", {"item": "x"})
                servers.restart()
                await assert_not_found(servers.url, wire.session_id)


async def test_store_down_answers_503_not_404() -> None:
    """While the store cannot be asked, an id this process does not hold is not declared gone."""

    class Unreachable(MemoryBackend):
        async def load(self, session_id: str, **kwargs: Any) -> Any:
            raise StateUnavailableError("the state store at test:0 is unreachable")

    app = Concierge("down", state=Unreachable(), roaming=True)
    asgi = app.streamable_http_app()
    with anyio.fail_after(LIMIT):
        async with app.session_manager.run():
            transport = httpx2.ASGITransport(app=asgi)
            async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
                response = await raw_post("/mcp", secrets.token_hex(16), http=http)
    assert response.status_code == 503, response.text
    assert "unavailable" in response.json()["error"]["message"]


async def test_inspector_lists_wire_records_and_deleting_a_session_ends_its_roaming(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/state.db"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "concierge", "sessions", *args, "--url", url]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)

    with anyio.fail_after(LIMIT):
        async with OnePort(lambda port: cart(url, port)) as servers:
            session_id = await a_session_then_kill(servers)
            listed = json.loads(cli("list", "--scope", "wire", "--json").stdout)
            assert [row["session_id"] for row in listed] == [f"wire:{session_id}"]
            deleted = cli("delete", f"http:{session_id}")
            assert deleted.returncode == 0, deleted.stderr
            assert json.loads(cli("list", "--scope", "wire", "--json").stdout) == []
            servers.start()
            await assert_not_found(servers.url, session_id)
