"""Session lifecycle and scopes through a real in-process client, on every backend.

Expiry with an injected clock (no sleeping), the sweep, `initial_state`, the
start and end hooks with their reasons, hooks that raise, and the `user` and
`global` scopes under concurrency. Authenticated user scope over HTTP is in
test_auth.py.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import NEW, handle_of, payload, status_of, text
from mcp.client import Client

from concierge import Concierge, ConfigurationError
from concierge.state import backend_from_url

pytestmark = pytest.mark.anyio

T0 = 1_000_000.0
TTL = 600


def _clock() -> tuple[list[float], Any]:
    now = [T0]
    return now, lambda: now[0]


def _cart_app(state_url: str, now: list[float] | None = None, **kw: Any) -> Concierge:
    clock = (lambda: now[0]) if now is not None else None
    app = Concierge(
        "life",
        state_url=state_url,
        session_ttl=TTL,
        clock=clock,
        sweep_interval=None,
        **kw,
    )

    @app.tool()
    def add(item: str) -> dict:
        cart = app.get_state("cart", [])
        cart.append(item)
        app.set_state("cart", cart)
        return {"cart": cart}

    @app.tool()
    def show() -> dict:
        return {"cart": app.get_state("cart", []), "visits": app.get_state("visits")}

    return app


# -- expiry ------------------------------------------------------------------------------


async def test_expired_handle_is_an_error_that_says_expired_and_how_to_start_again(
    state_url: str,
) -> None:
    now, _ = _clock()
    app = _cart_app(state_url, now)
    async with Client(app) as client:
        handle = handle_of(await client.call_tool("add", {"item": "a", **NEW}))
        now[0] += TTL  # expiry is at exactly TTL seconds of inactivity
        late = await client.call_tool("show", {"session_id": handle})
    assert late.is_error
    assert "expired" in text(late) and "start_session" in text(late)
    assert "unknown" not in text(late)
    assert status_of(late) == "expired"


async def test_unknown_handle_is_not_called_expired(state_url: str) -> None:
    app = _cart_app(state_url)
    async with Client(app) as client:
        result = await client.call_tool("show", {"session_id": "x" * 43})
    assert result.is_error and "unknown" in text(result) and "start_session" in text(result)
    assert "expired" not in text(result) and status_of(result) == "unknown"


async def test_each_call_renews_expiry_so_an_active_session_never_expires(
    state_url: str,
) -> None:
    now, _ = _clock()
    app = _cart_app(state_url, now)
    async with Client(app) as client:
        handle = handle_of(await client.call_tool("add", {"item": "a", **NEW}))
        for i in range(5):  # 5 x 500 s, far past one TTL, never 600 s idle
            now[0] += 500
            assert not (await client.call_tool("add", {"item": f"b{i}", "session_id": handle})).is_error
        assert len(payload(await client.call_tool("show", {"session_id": handle}))["cart"]) == 6


async def test_sweep_deletes_expired_sessions_counts_them_and_then_they_are_refused_as_expired(
    state_url: str,
) -> None:
    now, _ = _clock()
    app = _cart_app(state_url, now)
    async with Client(app) as client:
        old = [handle_of(await client.call_tool("add", {"item": str(i), **NEW})) for i in range(3)]
        now[0] += 300
        fresh = handle_of(await client.call_tool("add", {"item": "new", **NEW}))
        now[0] += 301
        assert await app.sweep_expired() == 3
        assert await app.sweep_expired() == 0
        for handle in old:
            assert await app.state_backend.load("h:" + handle, now=float("-inf")) is None
        gone = await client.call_tool("show", {"session_id": old[0]})
        assert gone.is_error and "start_session" in text(gone)
        # the handle's signed issue time still tells a swept session from one that never existed
        assert status_of(gone) == "expired" and "has expired" in text(gone)
        assert payload(await client.call_tool("show", {"session_id": fresh}))["cart"] == ["new"]


async def test_session_ttl_none_never_expires(state_url: str) -> None:
    now, clock = _clock()
    app = Concierge("forever", state_url=state_url, session_ttl=None, clock=clock)

    @app.tool()
    def put(v: int) -> int:
        app.set_state("v", v)
        return v

    @app.tool()
    def get() -> int:
        return app.get_state("v", -1)

    async with Client(app) as client:
        handle = handle_of(await client.call_tool("put", {"v": 7, **NEW}))
        now[0] += 10 * 365 * 86400
        assert await app.sweep_expired() == 0
        result = await client.call_tool("get", {"session_id": handle})
        assert not result.is_error and result.structured_content == {"result": 7}


# -- initial state -----------------------------------------------------------------------


async def test_initial_state_dict_seeds_each_new_session_once(state_url: str) -> None:
    app = _cart_app(state_url, initial_state={"cart": ["welcome"], "visits": 0})

    @app.tool()
    def visit() -> int:
        visits = app.get_state("visits") + 1
        app.set_state("visits", visits)
        return visits

    async with Client(app) as client:
        handle = handle_of(await client.call_tool("visit", NEW))
        for _ in range(2):
            await client.call_tool("visit", {"session_id": handle})
        seen = payload(await client.call_tool("show", {"session_id": handle}))
        assert seen == {"cart": ["welcome"], "visits": 3}
        other = payload(await client.call_tool("show", NEW))
        assert other == {"cart": ["welcome"], "visits": 0}


async def test_initial_state_async_callable_runs_once_per_session_even_on_a_read_only_wire_session(
    state_url: str,
) -> None:
    calls: list[int] = []

    async def seed() -> dict:
        calls.append(1)
        await anyio.lowlevel.checkpoint()
        return {"cart": [f"seed{len(calls)}"]}

    app = _cart_app(state_url, initial_state=seed)
    async with Client(app, mode="legacy") as client:  # one session per connection
        for _ in range(3):
            assert payload(await client.call_tool("show", {}))["cart"] == ["seed1"]
    async with Client(app, mode="legacy") as client:
        assert payload(await client.call_tool("show", {}))["cart"] == ["seed2"]
    assert len(calls) == 2


# -- hooks ------------------------------------------------------------------------------------


async def test_start_hook_runs_once_inside_the_first_unit_and_may_set_state(
    state_url: str,
) -> None:
    app = _cart_app(state_url, initial_state={"visits": 0})
    started: list[str] = []

    @app.on_session_start
    async def hello(session_id: str) -> None:
        started.append(session_id)
        app.set_state("visits", app.get_state("visits") + 100)  # after initial_state

    async with Client(app) as client:
        handle = handle_of(await client.call_tool("add", {"item": "a", **NEW}))
        await client.call_tool("add", {"item": "b", "session_id": handle})
        assert payload(await client.call_tool("show", {"session_id": handle})) == {
            "cart": ["a", "b"],
            "visits": 100,
        }
    assert started == ["h:" + handle]


async def test_end_hook_gets_terminated_and_reads_the_last_state(
    state_url: str,
) -> None:
    app = _cart_app(state_url)
    ended: list[tuple[str, str, Any]] = []

    @app.on_session_end
    def bye(session_id: str, reason: str) -> None:
        ended.append((session_id, reason, app.get_state("cart")))

    async with Client(app) as client:
        handle = handle_of(await client.call_tool("add", {"item": "a", **NEW}))
        done = await client.call_tool("terminate_session", {"session_id": handle})
        assert not done.is_error, text(done)
        assert payload(await client.call_tool("show", {"session_id": handle}))["cart"] == []
    assert ended == [("h:" + handle, "terminated", ["a"])]


async def test_end_hook_gets_expired_from_the_sweep_and_may_archive_to_global(
    state_url: str,
) -> None:
    now, _ = _clock()
    app = _cart_app(state_url, now)
    reasons: list[str] = []

    @app.on_session_end
    def archive(reason: str) -> None:  # one parameter: the reason
        reasons.append(reason)
        archived = app.get_state("archived", [], scope="global")
        app.set_state("archived", archived + app.get_state("cart", []), scope="global")

    @app.tool()
    def archived() -> dict:
        return {"archived": app.get_state("archived", [], scope="global")}

    async with Client(app) as client:
        for item in ("a", "b"):
            await client.call_tool("add", {"item": item, **NEW})
        now[0] += TTL + 1
        assert await app.sweep_expired() == 2
        assert reasons == ["expired", "expired"]
        assert sorted(payload(await client.call_tool("archived", NEW))["archived"]) == [
            "a",
            "b",
        ]


async def test_end_hook_gets_closed_when_a_legacy_connection_closes_and_state_is_kept(
    state_url: str,
) -> None:
    app = _cart_app(state_url)
    ended: list[tuple[str, str]] = []

    @app.on_session_end
    async def bye(session_id: str, reason: str) -> None:
        ended.append((session_id, reason))

    async with Client(app, mode="legacy") as client:
        await client.call_tool("add", {"item": "a"})
    assert len(ended) == 1 and ended[0][1] == "closed" and ended[0][0].startswith("conn:")
    async with app.state_backend as backend:  # the server has stopped: open the store to look
        record = await backend.load(ended[0][0], now=T0 * 10)
    assert record is not None and record.values == {"cart": '["a"]'}


async def test_keep_closed_sessions_false_deletes_a_closed_session(
    state_url: str,
) -> None:
    app = _cart_app(state_url, keep_closed_sessions=False)
    ended: list[str] = []
    app.on_session_end(lambda session_id, reason: ended.append(session_id))
    async with Client(app, mode="legacy") as client:
        await client.call_tool("add", {"item": "a"})
    assert len(ended) == 1
    async with app.state_backend as backend:
        assert await backend.load(ended[0], now=float("-inf")) is None


async def test_raising_hooks_are_logged_their_writes_dropped_and_the_session_unharmed(
    state_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = _cart_app(state_url)

    @app.on_session_start
    def broken_start() -> None:
        app.set_state("cart", ["poison"])
        raise RuntimeError("start hook bug")

    @app.on_session_end
    def broken_end(reason: str) -> None:
        app.set_state("leak", 1, scope="global")
        raise RuntimeError("end hook bug")

    @app.tool()
    def leak() -> Any:
        return {"leak": app.get_state("leak", None, scope="global")}

    with caplog.at_level(logging.ERROR, logger="concierge"):
        async with Client(app) as client:
            first = await client.call_tool("add", {"item": "a", **NEW})
            assert payload(first)["cart"] == ["a"]
            handle = handle_of(first)
            assert payload(await client.call_tool("add", {"item": "b", "session_id": handle}))["cart"] == ["a", "b"]
            done = await client.call_tool("terminate_session", {"session_id": handle})
            assert not done.is_error, text(done)
            assert payload(await client.call_tool("leak", NEW)) == {"leak": None}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "on_session_start" in messages and "on_session_end" in messages
    assert "start hook bug" in caplog.text and "end hook bug" in caplog.text


# -- scopes ------------------------------------------------------------------------------------


def _counter_app(state_url: str) -> Concierge:
    app = Concierge("counter", state_url=state_url)

    @app.tool(on_conflict="retry")  # harmless to run again: its only effect is on the state
    async def incr() -> int:
        n = app.get_state("n", 0, scope="global")
        await anyio.lowlevel.checkpoint()  # let other calls interleave between read and write
        app.set_state("n", n + 1, scope="global")
        mine = app.get_state("mine", 0)
        app.set_state("mine", mine + 1)
        return n + 1

    @app.tool()
    def total() -> int:
        return app.get_state("n", 0, scope="global")

    return app


async def test_global_counter_200_concurrent_increments_from_20_sessions_reach_200(
    state_url: str,
) -> None:
    app = _counter_app(state_url)
    async with Client(app) as client:
        handles = [handle_of(await client.call_tool("incr", NEW)) for _ in range(20)]

        async def hammer(handle: str) -> None:
            for _ in range(9):
                result = await client.call_tool("incr", {"session_id": handle})
                assert not result.is_error, text(result)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for handle in handles:
                    tg.start_soon(hammer, handle)
        assert "200" in text(await client.call_tool("total", NEW))


async def test_global_increments_from_two_processes_on_one_store_lose_nothing(
    durable_state_url: str,
) -> None:
    """Two apps with their own backend objects: no shared lock, so commits race and (on_conflict="retry") re-run."""
    one, two = _counter_app(durable_state_url), _counter_app(durable_state_url)
    async with Client(one) as a, Client(two) as b:

        async def hammer(client: Client) -> None:
            handle = handle_of(await client.call_tool("incr", NEW))
            for _ in range(24):
                result = await client.call_tool("incr", {"session_id": handle})
                assert not result.is_error, text(result)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for client in (a, b, a, b):
                    tg.start_soon(hammer, client)
        assert "100" in text(await a.call_tool("total", NEW))


async def test_user_scope_is_shared_by_sessions_of_one_local_user_and_survives_terminate(
    state_url: str,
) -> None:
    app = Concierge("user", state_url=state_url)

    @app.tool()
    def keep(item: str) -> dict:
        saved = app.get_state("saved", [], scope="user")
        app.set_state("saved", saved + [item], scope="user")
        app.set_state("mine", item)
        return {"saved": saved + [item], "mine": item}

    @app.tool()
    def look() -> dict:
        return {
            "saved": app.get_state("saved", [], scope="user"),
            "mine": app.get_state("mine"),
        }

    async with Client(app) as client:  # in-process: the caller is this machine's OS user
        first = handle_of(await client.call_tool("keep", {"item": "a", **NEW}))
        await client.call_tool("keep", {"item": "b", **NEW})  # another session
        assert (await client.call_tool("terminate_session", {"session_id": first})).is_error is False
        assert payload(await client.call_tool("look", {"session_id": first})) == {
            "saved": ["a", "b"],
            "mine": None,
        }


async def test_unknown_scope_is_a_clear_error(state_url: str) -> None:
    app = Concierge("bad-scope", state_url=state_url)

    @app.tool()
    def wrong() -> Any:
        return app.get_state("k", scope="team")  # type: ignore[arg-type]

    async with Client(app) as client:
        result = await client.call_tool("wrong", NEW)
    assert result.is_error and "scope" in text(result) and "'team'" in text(result)


async def test_scope_reached_through_a_helper_in_a_sync_tool_is_loaded_on_first_use_and_runs_once(
    state_url: str,
) -> None:
    app = Concierge("helper", state_url=state_url)
    runs: list[int] = []

    def bump(where: str) -> int:  # the scope arrives as a variable: not visible ahead of the call
        n = app.get_state("n", 0, scope=where)  # type: ignore[arg-type]
        app.set_state("n", n + 1, scope=where)  # type: ignore[arg-type]
        return n + 1

    @app.tool()
    def hit() -> int:
        runs.append(1)
        return bump("global")

    async with Client(app) as client:
        assert "1" in text(await client.call_tool("hit", NEW))
        assert len(runs) == 1  # loaded while the tool waited in its worker thread; never re-run
        assert "2" in text(await client.call_tool("hit", NEW))
        assert len(runs) == 2


async def test_an_async_tool_using_an_undeclared_scope_through_a_helper_is_told_to_declare_it(
    state_url: str,
) -> None:
    app = Concierge("helper-async", state_url=state_url)
    runs: list[int] = []

    def bump(where: str) -> int:
        n = app.get_state("n", 0, scope=where)  # type: ignore[arg-type]
        app.set_state("n", n + 1, scope=where)  # type: ignore[arg-type]
        return n + 1

    @app.tool()
    async def hit() -> int:
        runs.append(1)
        return bump("global")

    @app.tool(scopes={"global"})
    async def declared() -> int:
        runs.append(1)
        return bump("global")

    async with Client(app) as client:
        result = await client.call_tool("hit", NEW)
        assert result.is_error and "scopes={'global'}" in text(result) and "'hit'" in text(result)
        assert len(runs) == 1  # ran once, reported, not re-run
        again = await client.call_tool("hit", NEW)
        assert again.is_error and len(runs) == 2  # the same clear error every time, never a silent re-run
        assert "1" in text(await client.call_tool("declared", NEW))
        assert len(runs) == 3


async def test_a_declared_scope_must_be_a_known_one() -> None:
    app = Concierge("declare")
    with pytest.raises(ConfigurationError, match=r"scopes must name 'session', 'user', 'global', not 'team'"):

        @app.tool(scopes={"team"})  # type: ignore[arg-type]
        def t() -> None:
            return None

    with pytest.raises(ConfigurationError, match=r"on_conflict must be 'error' or 'retry'"):

        @app.tool(on_conflict="again")  # type: ignore[arg-type]
        def u() -> None:
            return None


async def test_a_failing_call_writes_no_scope(state_url: str) -> None:
    app = Concierge("atomic", state_url=state_url)

    @app.tool()
    def fail() -> None:
        app.set_state("g", 1, scope="global")
        app.set_state("u", 1, scope="user")
        app.set_state("s", 1)
        raise ValueError("boom")

    @app.tool()
    def peek() -> dict:
        return {k: app.get_state(k, scope=s) for k, s in (("g", "global"), ("u", "user"), ("s", "session"))}

    async with Client(app) as client:
        assert (await client.call_tool("fail", NEW)).is_error
        assert payload(await client.call_tool("peek", NEW)) == {
            "g": None,
            "u": None,
            "s": None,
        }


async def test_shared_buckets_never_expire(state_url: str) -> None:
    now, clock = _clock()
    app = Concierge("buckets", state_url=state_url, session_ttl=TTL, clock=clock)

    @app.tool()
    def put() -> None:
        app.set_state("g", 1, scope="global")
        app.set_state("s", 1)  # the session has state of its own, so there is a session to expire

    async with Client(app) as client:
        await client.call_tool("put", NEW)
    now[0] += 100 * TTL
    assert await app.sweep_expired() == 1  # the session, not the global bucket
    backend = backend_from_url(state_url) if not state_url.startswith("memory") else app.state_backend
    async with backend:
        record = await backend.load("global", now=now[0])
    assert record is not None and record.values == {"g": "1"}
