"""Acceptance tests over a real stdio subprocess: one session per server process, in both eras."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
from helpers import CART_SERVER, has_handle, payload, server_env
from mcp import Client, StdioServerParameters

pytestmark = pytest.mark.anyio

LIMIT = 30


def stdio_params(state_url: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=[str(CART_SERVER), "stdio"],
        env=server_env(state_url),
        cwd=str(Path(CART_SERVER).parent),
    )


@pytest.fixture(params=["memory", "sqlite"])
def stdio_state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'stdio.db'}"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_stdio_state_persists_across_calls_within_the_process(stdio_state_url: str, mode: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(stdio_params(stdio_state_url), mode=mode) as client:
            if mode == "auto":
                assert client.protocol_version == "2026-07-28"
            else:
                assert client.protocol_version != "2026-07-28"
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert "start_session" not in tools, "stdio carries its own session: no handles"
            first = await client.call_tool("add_to_cart", {"item": "apple"})
            assert not has_handle(first)
            await client.call_tool("add_slowly", {"item": "pear"})
            await client.call_tool("add_blocking", {"item": "plum"})
            result = payload(await client.call_tool("view_cart", {}))
            assert result["cart"] == ["apple", "pear", "plum"]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_two_stdio_processes_are_isolated_even_on_one_shared_store(tmp_path: Path, mode: str) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    with anyio.fail_after(LIMIT):
        async with Client(stdio_params(shared), mode=mode) as one, Client(stdio_params(shared), mode=mode) as two:
            await one.call_tool("add_to_cart", {"item": "one-a"})
            await two.call_tool("add_to_cart", {"item": "two-a"})
            await one.call_tool("add_to_cart", {"item": "one-b"})
            view_one = payload(await one.call_tool("view_cart", {}))
            view_two = payload(await two.call_tool("view_cart", {}))
            assert view_one["pid"] != view_two["pid"]
            assert view_one["cart"] == ["one-a", "one-b"]
            assert view_two["cart"] == ["two-a"]
        # a restarted process is a new session
        async with Client(stdio_params(shared), mode=mode) as three:
            assert payload(await three.call_tool("view_cart", {}))["cart"] == []
