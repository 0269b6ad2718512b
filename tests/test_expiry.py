"""Session expiry through a real client, with an injected clock (no sleeping)."""

from __future__ import annotations

from typing import Any

import pytest
from mcp.client import Client

from concierge import Concierge

pytestmark = pytest.mark.anyio


def _app(state_url: str, now: list[float]) -> Concierge:
    app = Concierge("expiry", state_url=state_url, session_ttl=600, clock=lambda: now[0])

    @app.tool()
    def add(item: str) -> list[str]:
        items = app.get_state("items", [])
        items.append(item)
        app.set_state("items", items)
        return items

    @app.tool()
    def show() -> list[str]:
        return app.get_state("items", [])

    return app


def _text(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def test_an_idle_handle_expires_and_is_refused(state_url: str) -> None:
    now = [1_000_000.0]
    app = _app(state_url, now)
    async with Client(app) as client:
        first = await client.call_tool("add", {"item": "a", "session_id": "new"})
        handle = first.meta["concierge/session_id"]
        now[0] += 601
        late = await client.call_tool("show", {"session_id": handle})
    assert late.is_error
    assert "expired" in _text(late) and "start_session" in _text(late)
    assert late.meta["concierge/session"] == "expired"


async def test_reading_renews_the_session(state_url: str) -> None:
    now = [1_000_000.0]
    app = _app(state_url, now)
    async with Client(app) as client:
        handle = (await client.call_tool("add", {"item": "a", "session_id": "new"})).meta["concierge/session_id"]
        for _ in range(4):  # 4 x 400 s > the 600 s TTL, but never 600 s idle
            now[0] += 400
            seen = await client.call_tool("show", {"session_id": handle})
            assert not seen.is_error, _text(seen)
            assert seen.meta["concierge/session"] == "active"
        assert "a" in _text(seen)


async def test_legacy_connection_session_starts_empty_after_expiry(state_url: str) -> None:
    now = [1_000_000.0]
    app = _app(state_url, now)
    async with Client(app, mode="legacy") as client:
        await client.call_tool("add", {"item": "a"})
        now[0] += 601
        after = await client.call_tool("show", {})
    assert not after.is_error
    assert '"a"' not in _text(after)
