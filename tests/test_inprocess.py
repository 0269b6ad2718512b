"""Acceptance tests through the SDK's in-process `Client(app)`, in both wire eras, on every backend.

`Client(app, mode="legacy")` runs the initialize handshake: the connection is the
session. The default `Client(app)` speaks 2026-07-28, where the wire has no
session: concierge hands out session handles.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import UTC, datetime

import anyio
import anyio.lowlevel
import pytest
from helpers import (
    HANDLE_KEY,
    NEW,
    handle_of,
    has_handle,
    new_session,
    notice,
    payload,
    status_of,
    stored_sessions,
    text,
    texts,
)
from mcp import Client
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from concierge import Concierge

pytestmark = pytest.mark.anyio

ABSENT = "<absent>"
LIMIT = 30  # seconds any one test may take


class Widget:
    """Not JSON-serialisable."""


class Item(BaseModel):
    name: str
    added: datetime
    qty: int = 1


def make_app(state_url: str, **options: object) -> Concierge:
    app = Concierge("inprocess", state_url=state_url, session_ttl=None, **options)

    @app.tool()
    def echo(words: str) -> dict:
        """Uses no session state."""
        return {"echo": words}

    @app.tool()
    def sneaky(key: str) -> dict:
        """Reaches the state through a path no scan of its code can see."""
        return {"value": getattr(app, "get_" + "state")(key, ABSENT)}

    @app.tool(scopes={"session"})
    def declared(key: str) -> dict:
        """The same hidden path, declared as using session state."""
        return {"value": getattr(app, "get_" + "state")(key, ABSENT)}

    @app.tool()
    def add(item: str) -> dict:
        cart = app.get_state("cart", [])
        cart.append(item)
        app.set_state("cart", cart)
        return {"cart": cart}

    @app.tool()
    async def add_async(item: str, delay: float = 0.0) -> dict:
        cart = app.get_state("cart", [])
        await anyio.sleep(delay)
        cart.append(item)
        app.set_state("cart", cart)
        return {"n": len(cart)}

    @app.tool()
    def add_sync(item: str, delay: float = 0.0) -> dict:
        cart = app.get_state("cart", [])
        time.sleep(delay)
        cart.append(item)
        app.set_state("cart", cart)
        return {"n": len(cart)}

    @app.tool()
    def view() -> dict:
        return {"cart": app.get_state("cart", [])}

    @app.tool()
    def get(key: str) -> dict:
        value = app.get_state(key, ABSENT)
        return {"value": value, "type": type(value).__name__}

    @app.tool()
    def add_then_fail(item: str) -> dict:
        cart = app.get_state("cart", [])
        cart.append(item)
        app.set_state("cart", cart)
        app.set_state("marker", "written before the failure")
        raise ValueError("boom after set_state")

    @app.tool()
    def mutate_without_set() -> dict:
        cart = app.get_state("cart", [])
        cart.append("ghost")
        return {"again": app.get_state("cart", [])}

    @app.tool()
    def store_bad(kind: str) -> dict:
        app.set_state("basket", {1, 2, 3} if kind == "set" else Widget())
        return {"stored": True}

    @app.tool()
    def catch_bad() -> dict:
        app.set_state("kept", "yes")
        try:
            app.set_state("rejected", {"nested": {4, 5}})
        except TypeError as exc:
            return {"caught": True, "is_type_error": isinstance(exc, TypeError), "message": str(exc)}
        return {"caught": False}

    @app.tool()
    def store_model() -> dict:
        app.set_state("item", Item(name="tea", added=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), qty=2))
        return {"stored": True}

    @app.resource("cart://items")
    def cart_resource() -> str:
        return json.dumps(app.get_state("cart", []))

    @app.prompt()
    def cart_prompt() -> str:
        return f"The cart holds {json.dumps(app.get_state('cart', []))}"

    return app


@pytest.fixture
def app(state_url: str) -> Concierge:
    return make_app(state_url)


def resource_cart(result) -> list:
    return json.loads(result.contents[0].text)


def prompt_text(result) -> str:
    return result.messages[0].content.text


# -- legacy (handshake) connections: the connection is the session -----------------------------
async def test_legacy_two_connections_are_isolated_and_each_persists(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode="legacy") as one, Client(app, mode="legacy") as two:
            assert one.protocol_version != "2026-07-28"

            async def fill(client: Client, prefix: str) -> None:
                for i in range(5):
                    result = await client.call_tool("add", {"item": f"{prefix}{i}"})
                    assert not has_handle(result), "a legacy connection has its own session; no handle expected"
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                tg.start_soon(fill, one, "a")
                tg.start_soon(fill, two, "b")
            assert payload(await one.call_tool("view", {}))["cart"] == [f"a{i}" for i in range(5)]
            assert payload(await two.call_tool("view", {}))["cart"] == [f"b{i}" for i in range(5)]
        # a new connection is a new session
        async with Client(app, mode="legacy") as three:
            assert payload(await three.call_tool("view", {}))["cart"] == []


async def test_legacy_lists_no_start_session_and_no_session_argument(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode="legacy") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert "start_session" not in tools
            assert "session_id" not in tools["add"].input_schema.get("properties", {})
            result = await client.call_tool("start_session", {})
            assert result.is_error


# -- 2026-07-28: handles ---------------------------------------------------------------------------
async def test_modern_lists_start_session_and_a_required_session_argument(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            assert client.protocol_version == "2026-07-28"
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert "start_session" in tools
            assert "session_id" in tools["add"].input_schema["properties"]
            assert "session_id" in tools["add"].input_schema["required"]


async def test_handles_optional_lists_the_session_argument_as_optional(state_url: str) -> None:
    app = make_app(state_url, handles="optional")
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert "session_id" in tools["add"].input_schema["properties"]
            assert "session_id" not in tools["add"].input_schema.get("required", [])


@pytest.mark.parametrize("arguments", [{}, {"session_id": ""}], ids=["absent", "empty"])
async def test_modern_call_without_session_id_is_an_error_and_creates_no_session(
    app: Concierge, arguments: dict
) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            for tool, args in (("add", {"item": "apple"}), ("view", {})):
                result = await client.call_tool(tool, {**args, **arguments})
                assert result.is_error, text(result)
                assert text(result) == (
                    f"validation error: tool {tool!r} needs the argument session_id: pass the session_id from an "
                    'earlier result, or "new" to start a new session.'
                )
                assert status_of(result) == "missing"
                assert not has_handle(result)
                assert notice(result) is None
            assert await stored_sessions(app) == [], "a call refused for a missing session_id stored a session"


async def test_modern_session_id_new_starts_a_session_and_puts_its_handle_first(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            first = await client.call_tool("add", {"item": "apple", **NEW})
            assert payload(first)["cart"] == ["apple"]
            handle = handle_of(first)
            assert status_of(first) == "issued"
            assert texts(first)[0] == f"session_id: {handle} — pass it as session_id in later calls"
            assert notice(first) == texts(first)[0]
            assert json.loads(texts(first)[1]) == {"cart": ["apple"]}, "the tool's own output follows the notice"
            assert await stored_sessions(app) == ["h:" + handle]
            second = await client.call_tool("add", {"item": "pear", "session_id": handle})
            assert payload(second)["cart"] == ["apple", "pear"]
            assert handle_of(second) == handle
            assert status_of(second) == "active"
            assert notice(second) == texts(first)[0]
            # "new" again is a different, new session
            other = await client.call_tool("view", NEW)
            assert payload(other)["cart"] == []
            assert handle_of(other) != handle
            assert status_of(other) == "issued"
        # the handle outlives the client connection
        async with Client(app) as again:
            later = await again.call_tool("view", {"session_id": handle})
            assert payload(later)["cart"] == ["apple", "pear"]
            assert status_of(later) == "active"


async def test_handles_optional_call_without_session_id_starts_a_session_and_returns_its_handle(
    state_url: str,
) -> None:
    app = make_app(state_url, handles="optional")
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            first = await client.call_tool("add", {"item": "apple"})
            assert payload(first)["cart"] == ["apple"]
            handle = handle_of(first)
            assert status_of(first) == "issued"
            assert handle in texts(first)[0] and "session_id" in texts(first)[0]
            second = await client.call_tool("add", {"item": "pear", "session_id": handle})
            assert payload(second)["cart"] == ["apple", "pear"]
            assert handle_of(second) == handle
            assert status_of(second) == "active"
            # a call without the handle is a different, new session
            other = await client.call_tool("view", {})
            assert payload(other)["cart"] == []
            assert handle_of(other) != handle
            assert "h:" + handle in await stored_sessions(app)
        async with Client(app) as again:
            assert payload(await again.call_tool("view", {"session_id": handle}))["cart"] == ["apple", "pear"]


async def test_start_session_returns_an_opaque_url_safe_handle_of_at_least_128_bits(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            ids = set()
            for _ in range(3):
                result = await client.call_tool("start_session", {})
                session_id = payload(result)["session_id"]
                assert re.fullmatch(r"[A-Za-z0-9_-]+", session_id), session_id
                assert len(session_id) * 6 >= 128, f"{session_id!r} carries fewer than 128 bits"
                assert handle_of(result) == session_id
                ids.add(session_id)
            assert len(ids) == 3
            handle = ids.pop()
            await client.call_tool("add", {"item": "x", "session_id": handle})
            assert payload(await client.call_tool("view", {"session_id": handle}))["cart"] == ["x"]
            # start_session ignores a session_id and always starts a fresh one
            fresh = payload(await client.call_tool("start_session", {"session_id": handle}))["session_id"]
            assert fresh != handle
            assert payload(await client.call_tool("view", {"session_id": fresh}))["cart"] == []


@pytest.mark.parametrize("kind", ["forged", "truncated", "tampered", "malformed"])
async def test_unknown_session_id_is_an_error_and_never_adopted(app: Concierge, kind: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            real = handle_of(await client.call_tool("add", {"item": "mine", **NEW}))
            bad = {
                "forged": secrets.token_urlsafe(32),
                "truncated": real[:-5],
                "tampered": real[:-1] + ("A" if real[-1] != "A" else "B"),
                "malformed": "../../not a handle!",
            }[kind]
            for _ in range(2):  # the first refusal must not create the session for the second call
                result = await client.call_tool("add", {"item": "intruder", "session_id": bad})
                assert result.is_error, f"{kind} session_id was accepted: {text(result)}"
                if kind == "malformed":
                    assert text(result).startswith(f"session_id {bad!r} is not a session handle: ")
                    assert '"new" to start a new session' in text(result)
                    assert status_of(result) == "malformed"
                else:
                    assert text(result) == (
                        f"unknown session_id {bad!r}: no such session exists for you. "
                        'Pass session_id="new" (or call start_session) to start a new session.'
                    )
                    assert status_of(result) == "unknown"
                assert (result.meta or {}).get(HANDLE_KEY) != bad
                assert notice(result) is None
            result = await client.call_tool("view", {"session_id": bad})
            assert result.is_error
            assert status_of(result) in ("unknown", "malformed")
            assert await stored_sessions(app) == ["h:" + real]
            assert payload(await client.call_tool("view", {"session_id": real}))["cart"] == ["mine"]


async def test_two_handles_in_one_client_are_isolated(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            one = payload(await client.call_tool("start_session", {}))["session_id"]
            two = payload(await client.call_tool("start_session", {}))["session_id"]
            await client.call_tool("add", {"item": "one-a", "session_id": one})
            await client.call_tool("add", {"item": "two-a", "session_id": two})
            await client.call_tool("add", {"item": "one-b", "session_id": one})
            assert payload(await client.call_tool("view", {"session_id": one}))["cart"] == ["one-a", "one-b"]
            assert payload(await client.call_tool("view", {"session_id": two}))["cart"] == ["two-a"]


# -- which tools take a session ----------------------------------------------------------------------
MODES = ["legacy", "2026-07-28"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_stateful_tool_requires_session_id_and_a_stateless_one_takes_none_and_runs_without(
    app: Concierge, mode: str
) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode=mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            if mode == "legacy":  # the connection is the session: no tool takes a handle
                for name in ("add", "view", "declared", "echo"):
                    assert "session_id" not in tools[name].input_schema.get("properties", {}), name
            else:
                for name in ("add", "view", "get", "add_async", "declared"):
                    schema = tools[name].input_schema
                    assert "session_id" in schema["properties"], name
                    assert "session_id" in schema["required"], name
                for name in ("echo", "sneaky"):
                    schema = tools[name].input_schema
                    assert "session_id" not in schema.get("properties", {}), name
                    assert "session_id" not in schema.get("required", []), name
            result = await client.call_tool("echo", {"words": "hello"})
            assert payload(result) == {"echo": "hello"}
            assert not has_handle(result) and status_of(result) is None and notice(result) is None
            if mode != "legacy":
                assert await stored_sessions(app) == [], "a stateless tool on a handle wire started a session"


@pytest.mark.parametrize("mode", MODES)
async def test_a_tool_reaching_state_by_a_path_the_scan_cannot_see_gets_an_error_naming_scopes(
    app: Concierge, mode: str
) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode=mode) as client:
            extra = new_session(mode)
            first = await client.call_tool("add", {"item": "tea", **extra})
            if mode != "legacy":
                extra = {"session_id": handle_of(first)}
            result = await client.call_tool("sneaky", {"key": "cart"})
            if mode == "legacy":  # the connection's session is there for every tool
                assert payload(result) == {"value": ["tea"]}
            else:
                assert result.is_error, f"the hidden state access ran on a silent fresh session: {text(result)}"
                message = text(result)
                assert "sneaky" in message and "no session state" in message
                assert "scopes=" in message and '@app.tool(scopes={"session"})' in message
                assert not has_handle(result)
                assert await stored_sessions(app) == ["h:" + extra["session_id"]], "no session was started"
            # declaring the tool's scope is the fix the message names: it then takes the session's handle
            assert payload(await client.call_tool("declared", {"key": "cart", **extra})) == {"value": ["tea"]}


@pytest.mark.parametrize("mode", MODES)
async def test_end_session_ends_a_session_and_its_handle_is_unknown_afterwards(app: Concierge, mode: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode=mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            first = await client.call_tool("add", {"item": "tea", **new_session(mode)})
            if mode == "legacy":  # the connection is the session: end_session is not offered
                assert "end_session" not in tools
                refused = await client.call_tool("end_session", {})
                assert refused.is_error and "only for transports without one" in text(refused)
                assert payload(await client.call_tool("view", {}))["cart"] == ["tea"]
                return
            assert "session_id" in tools["end_session"].input_schema["required"]
            handle = handle_of(first)
            other = handle_of(await client.call_tool("add", {"item": "kept", **NEW}))
            ended = await client.call_tool("end_session", {"session_id": handle})
            assert payload(ended) == {"ended": True}
            assert status_of(ended) == "ended"

            async def state_left() -> dict | None:
                record = await app.state_backend.load("h:" + handle, now=float("-inf"))
                return None if record is None else record.values

            assert await state_left() in (None, {}), "the ended session's state is still stored"
            for tool, args in (("view", {}), ("add", {"item": "again"}), ("end_session", {})):
                later = await client.call_tool(tool, {**args, "session_id": handle})
                assert later.is_error, text(later)
                assert status_of(later) == "unknown"
                assert repr(handle) in text(later) and 'Pass session_id="new"' in text(later), text(later)
                assert not has_handle(later)
            assert payload(await client.call_tool("view", {"session_id": other}))["cart"] == ["kept"]
            assert await state_left() in (None, {}), "a refused call revived the ended session"


async def test_modern_tools_list_is_the_same_for_every_client_and_in_the_same_order(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as one, Client(app) as two:

            async def listing(client: Client) -> list[dict]:
                return [t.model_dump(mode="json") for t in (await client.list_tools()).tools]

            reference = await listing(one)
            names = [t["name"] for t in reference]
            assert len(names) == len(set(names)) and {"add", "echo", "start_session", "end_session"} <= set(names)
            handle = handle_of(await one.call_tool("add", {"item": "a", **NEW}))
            await two.call_tool("add", {"item": "b", **NEW})
            for _ in range(3):
                assert await listing(one) == reference
                assert await listing(two) == reference
            await one.call_tool("end_session", {"session_id": handle})
            assert await listing(one) == reference
        async with Client(app) as three:
            assert await listing(three) == reference


async def test_modern_start_session_description_names_the_store_and_the_ttl_in_seconds() -> None:
    app = Concierge("ttl", state_url="memory://", session_ttl=5400)

    @app.tool()
    def remember(value: str) -> dict:
        app.set_state("value", value)
        return {"value": value}

    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            description = tools["start_session"].description or ""
            assert "expires after 5400 seconds" in description, description
            assert "(1h 30m)" in description, description
            assert "memory" in description and "lost when the server restarts" in description, description
            assert 'session_id="new"' in description, description
    forever = make_app("memory://")  # session_ttl=None
    with anyio.fail_after(LIMIT):
        async with Client(forever) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert "sessions do not expire" in (tools["start_session"].description or "")


# -- the unit of work: no lost updates, all-or-nothing ---------------------------------------------
@pytest.mark.parametrize("tool", ["add_async", "add_sync"])
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_100_concurrent_calls_in_one_session_lose_no_update(app: Concierge, mode: str, tool: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode=mode) as client:
            extra: dict[str, str] = {}
            if mode != "legacy":
                extra = {"session_id": payload(await client.call_tool("start_session", {}))["session_id"]}
            failures: list[str] = []

            async def one(i: int) -> None:
                result = await client.call_tool(tool, {"item": str(i), "delay": 0.001, **extra})
                if result.is_error:
                    failures.append(text(result))

            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(one, i)
            assert failures == []
            cart = payload(await client.call_tool("view", extra))["cart"]
            assert len(cart) == 100
            assert sorted(cart, key=int) == [str(i) for i in range(100)]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_tool_that_raises_after_set_state_writes_nothing(app: Concierge, mode: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode=mode) as client:
            first = await client.call_tool("add", {"item": "kept", **new_session(mode)})
            extra = {} if mode == "legacy" else {"session_id": handle_of(first)}
            failed = await client.call_tool("add_then_fail", {"item": "lost", **extra})
            assert failed.is_error
            assert payload(await client.call_tool("view", extra))["cart"] == ["kept"]
            assert payload(await client.call_tool("get", {"key": "marker", **extra}))["value"] == ABSENT
            # the session still works afterwards
            assert payload(await client.call_tool("add", {"item": "next", **extra}))["cart"] == ["kept", "next"]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_mutating_a_value_from_get_state_without_set_state_changes_nothing(app: Concierge, mode: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode=mode) as client:
            first = await client.call_tool("add", {"item": "real", **new_session(mode)})
            extra = {} if mode == "legacy" else {"session_id": handle_of(first)}
            result = payload(await client.call_tool("mutate_without_set", extra))
            assert result["again"] == ["real"], "get_state must return a fresh copy each time"
            assert payload(await client.call_tool("view", extra))["cart"] == ["real"]


@pytest.mark.parametrize(("kind", "type_name"), [("set", "set"), ("object", "Widget")])
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_set_state_with_a_non_json_value_is_a_tool_error_naming_key_and_type(
    app: Concierge, mode: str, kind: str, type_name: str
) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode=mode) as client:
            first = await client.call_tool("add", {"item": "a", **new_session(mode)})
            extra = {} if mode == "legacy" else {"session_id": handle_of(first)}
            result = await client.call_tool("store_bad", {"kind": kind, **extra})
            assert result.is_error
            message = text(result)
            assert "basket" in message
            assert type_name in message
            assert payload(await client.call_tool("get", {"key": "basket", **extra}))["value"] == ABSENT


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_set_state_type_error_is_catchable_inside_the_tool(app: Concierge, mode: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode=mode) as client:
            first = await client.call_tool("add", {"item": "a", **new_session(mode)})
            extra = {} if mode == "legacy" else {"session_id": handle_of(first)}
            result = payload(await client.call_tool("catch_bad", extra))
            assert result["caught"] and result["is_type_error"]
            assert "rejected" in result["message"] and "set" in result["message"]
            assert payload(await client.call_tool("get", {"key": "kept", **extra}))["value"] == "yes"
            assert payload(await client.call_tool("get", {"key": "rejected", **extra}))["value"] == ABSENT


async def test_a_pydantic_model_is_stored_as_its_json_dump(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            handle = handle_of(await client.call_tool("store_model", NEW))
            got = payload(await client.call_tool("get", {"key": "item", "session_id": handle}))
            assert got["type"] == "dict"
            assert got["value"] == {"name": "tea", "added": "2024-01-02T03:04:05Z", "qty": 2}


# -- resources and prompts -----------------------------------------------------------------------
async def test_legacy_resources_and_prompts_see_the_connection_session(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app, mode="legacy") as one, Client(app, mode="legacy") as two:
            await one.call_tool("add", {"item": "tea"})
            assert resource_cart(await one.read_resource("cart://items", cache_mode="bypass")) == ["tea"]
            assert resource_cart(await two.read_resource("cart://items", cache_mode="bypass")) == []
            assert '["tea"]' in prompt_text(await one.get_prompt("cart_prompt"))
            assert "[]" in prompt_text(await two.get_prompt("cart_prompt"))


async def test_modern_resources_and_prompts_take_the_handle_from_meta(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            handle = handle_of(await client.call_tool("add", {"item": "tea", **NEW}))
            meta = {HANDLE_KEY: handle}
            assert resource_cart(await client.read_resource("cart://items", meta=meta)) == ["tea"]
            assert '["tea"]' in prompt_text(await client.get_prompt("cart_prompt", meta=meta))
            other = handle_of(await client.call_tool("start_session", {}))
            assert resource_cart(await client.read_resource("cart://items", meta={HANDLE_KEY: other})) == []


async def test_modern_resource_without_a_handle_says_the_request_has_no_session(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            with pytest.raises(MCPError) as caught:
                await client.read_resource("cart://items", cache_mode="bypass")
            assert "no session" in str(caught.value)
            assert HANDLE_KEY in str(caught.value)


async def test_modern_resource_with_an_unknown_handle_says_so(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            forged = secrets.token_urlsafe(32)
            with pytest.raises(MCPError) as caught:
                await client.read_resource("cart://items", meta={HANDLE_KEY: forged})
            assert f"unknown session_id {forged!r}: no such session exists for you" in str(caught.value)
            assert 'session_id="new"' in str(caught.value)


async def test_modern_prompt_without_a_handle_says_the_request_has_no_session(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            with pytest.raises(MCPError) as caught:
                await client.get_prompt("cart_prompt")
            assert "no session" in str(caught.value)
            assert HANDLE_KEY in str(caught.value)


async def test_modern_prompt_with_an_unknown_handle_says_so(app: Concierge) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            forged = secrets.token_urlsafe(32)
            with pytest.raises(MCPError) as caught:
                await client.get_prompt("cart_prompt", meta={HANDLE_KEY: forged})
            assert f"unknown session_id {forged!r}: no such session exists for you" in str(caught.value)
            assert 'session_id="new"' in str(caught.value)
