"""Live per-session objects and the per-session cache, through a real in-process client.

Nothing here may reach the state backend; every test that stores something
checks the store afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from helpers import NEW, handle_of, payload, text
from mcp.client import Client

from concierge import Concierge
from concierge.live import LiveObjects

pytestmark = pytest.mark.anyio

T0 = 1_000_000.0


class Conn:
    """A stand-in for a live connection: counts how it was made and closed."""

    made: list[Conn] = []

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.closed = 0
        Conn.made.append(self)

    async def aclose(self) -> None:
        self.closed += 1


@pytest.fixture(autouse=True)
def _reset() -> None:
    Conn.made = []


def _app(state_url: str, now: list[float] | None = None, **kw: Any) -> Concierge:
    clock = (lambda: now[0]) if now is not None else None
    app = Concierge("live", state_url=state_url, session_ttl=600, clock=clock, sweep_interval=None, **kw)

    @app.tool()
    async def use(who: str, pause: float = 0.0) -> dict:
        async def make() -> Conn:
            await anyio.sleep(pause)
            return Conn(who)

        conn = await app.alive("db", make)
        app.set_state("who", who)
        return {"owner": conn.owner, "id": id(conn)}

    @app.tool()
    def use_sync(who: str) -> dict:
        conn = app.live("sync-db", lambda: Conn(who))
        return {"owner": conn.owner, "id": id(conn)}

    return app


async def _stored_keys(app: Concierge) -> set[str]:
    """Every key any state record in the store holds (not the `secrets` record with the handle-signing key)."""
    keys: set[str] = set()
    now = app._store.clock()
    async with app._store.opened():
        for summary in await app.state_backend.list_sessions(now=now, include_expired=True, limit=1000):
            if summary.session_id == "secrets":
                continue
            record = await app.state_backend.load(summary.session_id, now=float("-inf"))
            assert record is not None and record.values is not None
            keys.update(record.values)
    return keys


async def test_created_once_per_session_under_concurrent_first_use_and_isolated(state_url: str) -> None:
    app = _app(state_url)
    async with Client(app) as client:
        handle = handle_of(await client.call_tool("use_sync", {"who": "a", **NEW}))
        results: list[dict] = []

        async def call(who: str, session: str | None) -> None:
            args = {"who": who, "pause": 0.01} | ({"session_id": session} if session else {})
            results.append(payload(await client.call_tool("use", args)))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(call, "a", handle)
        assert len({r["id"] for r in results}) == 1 and results[0]["owner"] == "a"
        other = payload(await client.call_tool("use", {"who": "b", **NEW}))  # another session
        assert other["owner"] == "b" and other["id"] != results[0]["id"]
        assert sorted(c.owner for c in Conn.made) == ["a", "a", "b"]  # 'a': one async, one sync object
    assert await _stored_keys(app) == {"who"}  # the objects never reach the backend


async def test_concurrent_first_use_outside_a_session_lock_still_creates_once() -> None:
    live = LiveObjects(10, lambda: T0)
    made: list[int] = []

    async def make() -> int:
        made.append(1)
        await anyio.sleep(0.01)
        return len(made)

    got: list[int] = []

    async def use() -> None:
        got.append(await live.aget("s", "k", make, None))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(use)
    assert made == [1] and got == [1] * 20


async def test_close_runs_on_terminate(state_url: str) -> None:
    app = _app(state_url)
    async with Client(app) as client:
        handle = handle_of(await client.call_tool("use", {"who": "a", **NEW}))
        assert not (await client.call_tool("terminate_session", {"session_id": handle})).is_error
        assert [c.closed for c in Conn.made] == [1]
        again = payload(await client.call_tool("use", {"who": "a2", "session_id": handle}))
        assert again["owner"] == "a2"  # a new one after the session was terminated


async def test_close_runs_on_expiry_via_the_sweep(state_url: str) -> None:
    now = [T0]
    app = _app(state_url, now)
    async with Client(app) as client:
        await client.call_tool("use", {"who": "old", **NEW})
        now[0] += 300
        await client.call_tool("use", {"who": "fresh", **NEW})
        now[0] += 301
        await app.sweep_expired()
        assert {c.owner: c.closed for c in Conn.made} == {"old": 1, "fresh": 0}


async def test_close_runs_when_a_legacy_connection_closes_and_on_shutdown(state_url: str) -> None:
    app = _app(state_url)
    async with Client(app) as keeper:
        await keeper.call_tool("use", {"who": "kept", **NEW})
        async with Client(app, mode="legacy") as legacy:
            await legacy.call_tool("use", {"who": "legacy"})
        assert {c.owner: c.closed for c in Conn.made} == {"kept": 0, "legacy": 1}
    assert {c.owner: c.closed for c in Conn.made} == {"kept": 1, "legacy": 1}  # the server shut down


async def test_eviction_past_max_live_objects_closes_the_least_recently_used(
    state_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(state_url, max_live_objects=2)
    with caplog.at_level(logging.WARNING, logger="concierge"):
        async with Client(app) as client:
            first = handle_of(await client.call_tool("use", {"who": "1", **NEW}))
            await client.call_tool("use", {"who": "2", **NEW})
            await client.call_tool("use", {"who": "1", "session_id": first})  # 1 is now the most recent
            await client.call_tool("use", {"who": "3", **NEW})
            assert {c.owner: c.closed for c in Conn.made} == {"1": 0, "2": 1, "3": 0}
    assert "max_live_objects=2" in caplog.text


async def test_sync_close_callable_gets_the_object(state_url: str) -> None:
    closed: list[str] = []
    app = Concierge("live-sync", state_url=state_url)

    @app.tool()
    def open_it() -> str:
        return app.live("r", lambda: "handle-1", close=closed.append)

    async with Client(app) as client:
        handle = handle_of(await client.call_tool("open_it", NEW))
        await client.call_tool("terminate_session", {"session_id": handle})
    assert closed == ["handle-1"]


async def test_cache_hit_miss_and_expiry_with_an_injected_clock(state_url: str) -> None:
    now = [T0]
    app = _app(state_url, now)
    computed: list[str] = []

    @app.cache(ttl=60)
    def price(sku: str) -> dict:
        computed.append(sku)
        return {"sku": sku, "n": len(computed)}

    @app.tool()
    def quote(sku: str) -> dict:
        return price(sku)

    @app.tool()
    async def rate() -> dict:
        async def fetch() -> float:
            computed.append("rate")
            return 1.5

        return {"rate": await app.acached("rate", 30, fetch)}

    async with Client(app) as client:
        handle = handle_of(await client.call_tool("quote", {"sku": "x", **NEW}))
        same = {"session_id": handle}
        assert payload(await client.call_tool("quote", {"sku": "x"} | same))["n"] == 1  # hit
        assert payload(await client.call_tool("quote", {"sku": "y"} | same))["n"] == 2  # miss: other args
        now[0] += 61
        assert payload(await client.call_tool("quote", {"sku": "x"} | same))["n"] == 3  # expired
        assert payload(await client.call_tool("quote", {"sku": "x", **NEW}))["n"] == 4  # another session: its own cache
        assert payload(await client.call_tool("rate", same)) == {"rate": 1.5}
        assert payload(await client.call_tool("rate", same)) == {"rate": 1.5}
        assert computed.count("rate") == 1
    assert await _stored_keys(app) == set()  # the cache never reaches the backend


async def test_resource_outside_a_request_is_a_clear_error(state_url: str) -> None:
    app = _app(state_url)
    with pytest.raises(RuntimeError, match="outside a tool call"):
        app.live("x", object)
    async with Client(app) as client:

        @app.tool()
        def wrong() -> Any:
            async def make() -> int:
                return 1

            return app.live("x", make)

        result = await client.call_tool("wrong", NEW)
    assert result.is_error and "alive" in text(result)


async def test_the_old_names_resource_and_aresource_still_give_live_objects_with_a_deprecation_warning() -> None:
    app = Concierge("old-live")

    @app.tool()
    async def both() -> list[int]:
        with pytest.warns(DeprecationWarning, match=r"app\.alive"):
            first = await app.aresource("a", lambda: Conn("a"))
        with pytest.warns(DeprecationWarning, match=r"app\.live"):
            second = app.resource("b", lambda: Conn("b"))
        return [id(first) == id(await app.alive("a", lambda: Conn("x"))), id(second) == id(app.live("b", object))]

    @app.resource("data://plain")
    def plain() -> str:  # without a factory, app.resource is MCPServer's resource decorator, unchanged
        return "plain"

    async with Client(app) as client:
        result = await client.call_tool("both", NEW)
        assert not result.is_error, text(result)
        assert result.structured_content == {"result": [True, True]}
        read = await client.read_resource("data://plain")
    assert read.contents[0].text == "plain"  # type: ignore[union-attr]
