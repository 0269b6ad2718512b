"""Store round trips per call, counted (not timed), on every backend.

A process that committed a session last holds its values; with the store's
change feed live (memory: every client is in the process; SQLite: the file's
`data_version`; PostgreSQL: LISTEN/NOTIFY; Redis: pub/sub), the next call on
it starts from them:

- a writing call makes one round trip (its commit, whose version check proves
  the held values current);
- a read-only call on a held session makes none;
- after another process wrote the session, a call makes two (load, commit).

And when a commit does lose a version race, to a write that changed nothing
the call read, the call still lands without running again; when the other
write changed what it read, the call reports the conflict and ran once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from helpers import handle_of, payload, texts
from mcp import Client

from concierge import Concierge
from concierge.state import Commit, StateBackend, backend_from_url
from concierge.work.store import SHARED_FOR, SessionStore

pytestmark = pytest.mark.anyio

KEYS = "round-trip-test-handle-key-0123456789"
"""One handle key for every app of a test, so a handle minted by one resolves on the other."""
COUNTED = ("load", "commit", "commit_all", "touch", "delete", "take_expired", "list_sessions", "checkpoints")


def counting(backend: StateBackend) -> Any:
    """`backend`, counting the calls made to it in `backend.calls` (a call made inside another is not counted)."""
    calls: list[str] = []
    depth = [0]

    def counted(name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                calls.append(name)
            depth[0] += 1
            try:
                return await method(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    for name in COUNTED:
        setattr(backend, name, counted(name, getattr(backend, name)))
    backend.calls = calls  # type: ignore[attr-defined]
    return backend


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def shop(
    backend: StateBackend, *, on_conflict: str = "error", clock: Clock | None = None
) -> tuple[Concierge, dict[str, int]]:
    """A cart app on `backend`, and how often each of its tools' bodies ran."""
    app = Concierge(
        "round-trips",
        state=backend,
        handle_keys=KEYS,
        sweep_interval=None,
        session_ttl=3600,
        on_conflict=on_conflict,
        clock=clock,
    )
    ran = {"add": 0, "view": 0, "slow_add": 0}
    gate: dict[str, anyio.Event] = {}

    @app.tool()
    def add(item: str) -> dict:
        """Add an item to the cart."""
        ran["add"] += 1
        cart = app.get_state("cart", []) + [item]
        app.set_state("cart", cart)
        return {"cart": cart}

    @app.tool()
    def view() -> dict:
        """The cart, read only."""
        ran["view"] += 1
        return {"cart": app.get_state("cart", [])}

    @app.tool(scopes={"session"})
    async def slow_add(item: str, key: str = "cart") -> dict:
        """Read `key`, wait until the test lets go, then write `item` under `key` + "_copy"."""
        ran["slow_add"] += 1
        seen = app.get_state(key, [])
        gate["reading"].set()
        await gate["go"].wait()
        app.set_state(key + "_copy", seen + [item])
        return {"seen": seen}

    @app.tool()
    def put(key: str, value: Any) -> dict:
        """Write one key."""
        app.set_state(key, value)
        return {"key": key}

    @app.tool()
    def dump() -> dict:
        """The keys the race tests write, those present."""
        values = {key: app.get_state(key) for key in ("cart", "cart_copy", "note")}
        return {key: value for key, value in values.items() if value is not None}

    app.gate = gate  # type: ignore[attr-defined]
    return app, ran


async def _call(client: Client, tool: str, arguments: dict[str, Any]) -> Any:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result


async def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for a pushed change feed (PostgreSQL, Redis) to reach this process."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await anyio.sleep(0.005)


def _other_backend(state_url: str, backend: StateBackend) -> StateBackend:
    """The store as another process sees it: a second client of it (memory: the same dict, no other way)."""
    return backend if state_url.startswith("memory") else backend_from_url(state_url)


async def test_a_write_is_one_round_trip_a_held_read_none_and_two_after_another_process_wrote(state_url: str) -> None:
    backend = counting(backend_from_url(state_url))
    clock = Clock()
    app, _ = shop(backend, clock=clock)
    other, _ = shop(_other_backend(state_url, backend))
    async with Client(app) as client, Client(other) as elsewhere:
        backend.calls.clear()  # what starting up read and wrote (the stored handle key)
        first = await _call(client, "add", {"item": "tea", "session_id": "new"})
        assert backend.calls == ["commit"], "a new session: its first commit, nothing loaded"
        handle = handle_of(first)
        sid = "h:" + handle

        backend.calls.clear()
        await _call(client, "add", {"item": "jam", "session_id": handle})
        assert backend.calls == ["commit"]

        backend.calls.clear()
        for _ in range(3):
            assert payload(await _call(client, "view", {"session_id": handle}))["cart"] == ["tea", "jam"]
        assert backend.calls == []

        await _call(elsewhere, "add", {"item": "bread", "session_id": handle})
        await _until(lambda: not app._store.holds(sid), "the other process's write reached this one")

        backend.calls.clear()
        assert payload(await _call(client, "add", {"item": "milk", "session_id": handle}))["cart"] == [
            "tea",
            "jam",
            "bread",
            "milk",
        ]
        assert backend.calls == ["load", "commit"]

        # A session another process wrote may roam between processes: with a pushed feed (memory, PostgreSQL,
        # Redis) each call reads it first for a while, so no call starts from values whose change notice is
        # still on its way. SQLite's feed is polled right before each call, so it knows at once.
        backend.calls.clear()
        assert payload(await _call(client, "view", {"session_id": handle}))["cart"] == ["tea", "jam", "bread", "milk"]
        assert backend.calls == ([] if state_url.startswith("sqlite") else ["load"])

        clock.now += SHARED_FOR  # nobody else wrote it since: held again
        backend.calls.clear()
        assert payload(await _call(client, "view", {"session_id": handle}))["cart"] == ["tea", "jam", "bread", "milk"]
        assert backend.calls == ["touch"]  # no load; the expiry, renewed at most once a minute, moves on


async def test_a_legacy_connection_reads_its_held_session_with_no_round_trip(state_url: str) -> None:
    backend = counting(backend_from_url(state_url))
    app, _ = shop(backend)
    async with Client(app, mode="legacy") as client:
        backend.calls.clear()
        for _ in range(3):  # a session never written: read once, then known to be absent
            assert payload(await _call(client, "view", {}))["cart"] == []
        assert backend.calls == ["load"]
        await _call(client, "add", {"item": "tea"})
        backend.calls.clear()
        await _call(client, "add", {"item": "jam"})
        assert backend.calls == ["commit"]
        backend.calls.clear()
        assert payload(await _call(client, "view", {}))["cart"] == ["tea", "jam"]
        assert backend.calls == []


async def _race(state_url: str, other_writes: str) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """`slow_add` reads "cart" and waits; another process then writes `other_writes`; then `slow_add` writes.

    Returns `slow_add`'s result, how often each body ran, and the session's keys afterwards.
    """
    app, ran = shop(backend_from_url(state_url))
    other, _ = shop(_other_backend(state_url, app.state_backend))
    async with Client(app) as client, Client(other) as elsewhere:
        handle = handle_of(await _call(client, "add", {"item": "tea", "session_id": "new"}))
        app.gate["reading"], app.gate["go"] = anyio.Event(), anyio.Event()
        outcome: list[Any] = []

        async def slow() -> None:
            outcome.append(await client.call_tool("slow_add", {"item": "jam", "session_id": handle}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await app.gate["reading"].wait()
            await _call(elsewhere, "put", {"key": other_writes, "value": ["elsewhere"], "session_id": handle})
            app.gate["go"].set()
        stored = await app.state_backend.load("h:" + handle, now=time.time())  # what the store holds
        assert stored is not None and stored.values is not None
        state = {key: json.loads(text) for key, text in stored.values.items()}
        return outcome[0], ran, state


async def test_a_commit_that_lost_the_race_to_a_write_of_other_keys_still_lands_and_ran_once(state_url: str) -> None:
    result, ran, state = await _race(state_url, "note")
    assert not result.is_error, result.content
    assert ran["slow_add"] == 1
    assert state == {"cart": ["tea"], "cart_copy": ["tea", "jam"], "note": ["elsewhere"]}


async def test_a_commit_that_lost_the_race_to_a_write_of_what_it_read_reports_it_and_ran_once(state_url: str) -> None:
    result, ran, state = await _race(state_url, "cart")
    assert result.is_error and "conflict" in " ".join(texts(result))
    assert ran["slow_add"] == 1
    assert state == {"cart": ["elsewhere"]}  # the other write stands; nothing of the conflicted call was saved


async def test_a_load_overtaken_by_this_process_s_own_commit_is_not_taken_for_another_writer(state_url: str) -> None:
    """A caller's session count is loaded outside its lock while a commit of it may land: the newer version
    the feed then tells of is this process's own, so the record is held again at once, not read before every
    call for `SHARED_FOR` as a record another process writes."""
    backend = counting(backend_from_url(state_url))
    store = SessionStore(backend, ttl=3600)
    rid = "caller:addr:192.0.2.7"
    async with store.opened():
        first = store.blank(rid)
        first.set("a", 1)
        await store.commit(first)
        copy = await store.load(rid, create=True)
        assert copy is not None and copy.version == 1
        copy.set("b", 2)

        loaded, go = anyio.Event(), anyio.Event()
        real_load = backend.load

        async def slow_load(*args: Any, **kwargs: Any) -> Any:
            record = await real_load(*args, **kwargs)
            loaded.set()  # version 1 is read; it lands only after the commit below
            await go.wait()
            return record

        backend.load = slow_load
        store.forget(rid)
        seen: list[int] = []

        async def load() -> None:
            stale = await store.load(rid, create=True)
            assert stale is not None
            seen.append(stale.version)

        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            await loaded.wait()
            await store.commit(copy)  # version 2, by this process, while the load of version 1 is in flight
            go.set()
        backend.load = real_load
        assert seen == [1]

        # The notice of version 2 came during the load (memory) or comes now (PostgreSQL, Redis: given time to
        # arrive); SQLite's feed tells of other connections' commits only. One load reads version 2 and holds it.
        await anyio.sleep(0.2)
        fresh = await store.load(rid, create=True)
        assert fresh is not None and fresh.version == 2
        backend.calls.clear()
        for _ in range(3):
            again = await store.load(rid, create=True)
            assert again is not None and again.version == 2 and again.get("b") == 2
        assert backend.calls == [], "held again: this process's own commit does not make the record roam"


async def test_catching_up_reads_a_change_notice_already_waiting_in_the_feed(state_url: str) -> None:
    """What `catch_up` promises before a call starts from held values: a notice of another process's commit
    that has reached this process (it waits unread in the feed's socket) is told first.

    The other process is a thread with an event loop of its own, joined while this loop stands still, so
    the notice is surely waiting when `catch_up` is called. SQLite's feed tells that something changed
    (no id); memory tells at once.
    """
    mine = backend_from_url(state_url)
    told: list[tuple[str | None, int | None]] = []

    def commit_elsewhere(record_id: str) -> None:
        async def commit() -> None:
            other = backend_from_url(state_url)
            await other.open()
            try:
                await other.commit(Commit(record_id, 0, {"k": "1"}, owner=None, expires_at=None), now=time.time())
            finally:
                await other.close()

        asyncio.run(commit())

    await mine.open()
    try:
        assert await mine.watch(lambda record_id, version: told.append((record_id, version)))
        await _until(mine.caught_up, "the feed is live")
        for n in range(1, 6):
            record_id = f"h:notice-{n}"
            await anyio.sleep(0.01)
            told.clear()
            if state_url.startswith("memory"):
                await mine.commit(Commit(record_id, 0, {"k": "1"}, owner=None, expires_at=None), now=time.time())
            else:
                writer = threading.Thread(target=commit_elsewhere, args=(record_id,))
                writer.start()
                writer.join()  # blocks this loop: nothing it receives meanwhile is read
                time.sleep(0.05)  # the notice arrives in the socket and waits there
            assert await mine.catch_up()
            expected = (None, None) if state_url.startswith("sqlite") else (record_id, 1)
            assert expected in told, f"commit {n}: the waiting notice was not read ({told})"
    finally:
        await mine.close()


async def test_a_tool_that_uses_no_state_neither_reads_the_store_nor_waits_for_its_feed(state_url: str) -> None:
    """On a legacy connection every tool runs in its session's unit of work; one that uses no state starts
    from what this process holds without letting the feed's notices in first (turns of the event loop,
    each long on a busy server): nothing it reads could be stale."""
    backend = counting(backend_from_url(state_url))
    app, _ = shop(backend)

    @app.tool()
    async def ping() -> dict:
        """Answer at once, no state."""
        return {"pong": True}

    waits: list[str] = []
    real_catch_up = backend.catch_up

    async def catch_up() -> bool:
        waits.append("catch_up")
        return await real_catch_up()

    backend.catch_up = catch_up  # type: ignore[method-assign]
    async with Client(app, mode="legacy") as client:
        await _call(client, "add", {"item": "tea"})
        backend.calls.clear()
        waits.clear()
        await _call(client, "view", {})
        assert waits == ["catch_up"], "a tool that reads state lets the notices in first"
        assert backend.calls == []
        waits.clear()
        for _ in range(3):
            await _call(client, "ping", {})
        assert waits == [] and backend.calls == []
