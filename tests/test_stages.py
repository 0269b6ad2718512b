"""Workflow stages, through real MCP clients on both wire eras.

The shop used here: `browse` (search, add_to_cart) -> `cart` (set_address,
boom) -> `checkout` (pay, terminal); `cart` may go back to `browse`.
`view_cart` and `note` are in no stage. Every staged tool counts its
executions, so a refused call can be shown never to have run.

Legacy connections (`Client(app, mode="legacy")`) carry their own session; the
2026-07-28 wire (the default `Client(app)`) has none, so the tests pass the
session handle back from `_meta["concierge/session_id"]` (the first call passes
`session_id: "new"`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ToolListChangedNotification

from concierge import Concierge, ConfigurationError

pytestmark = pytest.mark.anyio

HANDLE_KEY = "concierge/session_id"
STATUS_KEY = "concierge/session"
MODES = ["legacy", "modern"]
BUILTINS = {"proceed_to_next_stage", "terminate_session"}
UNSTAGED = {"view_cart", "note"}
BROWSE = {"search", "add_to_cart", "jump", "jump_then_fail"}
CART = {"set_address", "boom"}
CHECKOUT = {"pay"}
SERVER_SCRIPT = Path(__file__).parent / "servers" / "staged_server.py"


# -- the app under test ------------------------------------------------------------------


def make_shop(state_url: str = "memory://") -> tuple[Concierge, Counter[str]]:
    """A staged shop that mixes `app.stages` with `@app.stage` above and below `@app.tool()`."""
    app = Concierge("staged", state_url=state_url)
    runs: Counter[str] = Counter()
    app.stages = {"browse": ["search"], "cart": ["set_address"], "checkout": []}
    app.transitions = {"browse": ["cart"], "cart": ["browse", "checkout"], "checkout": []}

    @app.tool()
    def search(query: str) -> dict:
        """Search the catalogue"""
        runs["search"] += 1
        return {"results": [query]}

    @app.stage("browse")  # above @app.tool()
    @app.tool()
    def add_to_cart(product_id: str) -> dict:
        """Put a product in the cart"""
        runs["add_to_cart"] += 1
        cart = app.get_state("cart", [])
        cart.append(product_id)
        app.set_state("cart", cart)
        return {"cart": cart}

    @app.tool()
    def set_address(address: str) -> dict:
        """Set the delivery address"""
        runs["set_address"] += 1
        app.set_state("address", address)
        return {"address": address}

    @app.tool()
    @app.stage("cart")  # below @app.tool()
    def boom(key: str) -> dict:
        """Write state, then fail"""
        runs["boom"] += 1
        app.set_state(key, "should not be saved")
        raise RuntimeError("boom")

    @app.tool()
    @app.stage("checkout")
    def pay() -> dict:
        """Pay for the cart"""
        runs["pay"] += 1
        order = {"items": app.get_state("cart", []), "address": app.get_state("address")}
        app.set_state("order", order)
        return {"paid": True, "order": order}

    @app.stage("browse")
    @app.tool()
    async def jump() -> dict:
        """Move to the cart from inside a tool, then succeed"""
        runs["jump"] += 1
        app.set_state("jumped", True)
        await app.call_tool("proceed_to_next_stage", {"target_stage": "cart"})
        return {"jumped": True}

    @app.stage("browse")
    @app.tool()
    async def jump_then_fail() -> dict:
        """Move to the cart from inside a tool, then fail"""
        runs["jump_then_fail"] += 1
        app.set_state("jumped", True)
        await app.call_tool("proceed_to_next_stage", {"target_stage": "cart"})
        raise ToolError("failed after the transition")

    @app.tool()
    def view_cart() -> dict:
        """Show the cart"""
        return {
            "cart": app.get_state("cart", []),
            "address": app.get_state("address"),
            "order": app.get_state("order"),
            "jumped": app.get_state("jumped"),
        }

    @app.tool()
    def note(text: str) -> dict:
        """Remember a note"""
        app.set_state("note", text)
        return {"note": text}

    return app, runs


# -- a client that carries its session the way each era needs -------------------------------


class Session:
    """One client's session: on the 2026-07-28 wire, the handle is passed back on every call."""

    def __init__(self, client: Client, modern: bool) -> None:
        self.client = client
        self.modern = modern
        self.handle: str | None = None

    async def call(self, name: str, **arguments: Any) -> CallToolResult:
        if self.modern:
            arguments["session_id"] = self.handle if self.handle is not None else "new"
        result = await self.client.call_tool(name, arguments)
        if self.modern:
            handle = (result.meta or {}).get(HANDLE_KEY)
            status = (result.meta or {}).get(STATUS_KEY)
            if self.handle is None:
                self.handle = handle
                if handle is not None:
                    assert status == "issued", status
            elif handle is not None:
                assert handle == self.handle, "the server switched this client to another session"
                assert status == "active", status
        return result

    async def ok(self, name: str, **arguments: Any) -> Any:
        result = await self.call(name, **arguments)
        assert not result.is_error, f"{name} failed: {text(result)}"
        return payload(result)

    async def refused(self, name: str, **arguments: Any) -> str:
        result = await self.call(name, **arguments)
        assert result.is_error, f"{name} was expected to be refused but returned {text(result)}"
        return text(result)

    async def stage(self) -> str:
        """The current stage, read from the refusal of a transition to a stage that does not exist."""
        message = await self.refused("proceed_to_next_stage", target_stage="no-such-stage")
        found = re.search(r"from stage '([^']*)'", message)
        assert found, f"the refusal does not name the current stage: {message}"
        return found.group(1)

    async def tool_names(self) -> set[str]:
        return {tool.name for tool in (await self.client.list_tools()).tools}


@asynccontextmanager
async def connect(app: Concierge, mode: str, **kwargs: Any) -> AsyncIterator[Session]:
    if mode == "legacy":
        kwargs["mode"] = "legacy"
    async with Client(app, **kwargs) as client:
        yield Session(client, modern=mode == "modern")


def text(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def payload(result: CallToolResult) -> Any:
    """The tool's return value; on the 2026-07-28 wire the first block is the session-handle notice."""
    if result.structured_content is not None:
        return result.structured_content
    blocks = [block for block in result.content if getattr(block, "type", None) == "text"]
    if blocks and blocks[0].text.startswith("session_id: "):  # type: ignore[union-attr]
        blocks = blocks[1:]
    return json.loads(blocks[0].text)  # type: ignore[union-attr]


class Notifications:
    """A `message_handler` that records `notifications/tools/list_changed`."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, message: Any) -> None:
        if isinstance(message, ToolListChangedNotification):
            self.count += 1

    async def wait(self, count: int) -> None:
        """Until at least `count` notifications have arrived (fails after 5 s)."""
        with anyio.fail_after(5):
            while self.count < count:
                await anyio.sleep(0.01)


# -- tools/list on legacy connections ---------------------------------------------------------


async def test_legacy_list_shows_current_stage_unstaged_and_builtins() -> None:
    app, _ = make_shop()
    async with connect(app, "legacy") as s:
        assert await s.tool_names() == BROWSE | UNSTAGED | BUILTINS
        await s.ok("proceed_to_next_stage", target_stage="cart")
        assert await s.tool_names() == CART | UNSTAGED | BUILTINS
        await s.ok("proceed_to_next_stage", target_stage="checkout")
        assert await s.tool_names() == CHECKOUT | UNSTAGED | BUILTINS
        await s.ok("terminate_session")
        assert await s.tool_names() == BROWSE | UNSTAGED | BUILTINS


async def test_legacy_proceed_schema_enumerates_allowed_targets() -> None:
    app, _ = make_shop()

    async def targets(s: Session) -> list[str]:
        tools = {tool.name: tool for tool in (await s.client.list_tools()).tools}
        return tools["proceed_to_next_stage"].input_schema["properties"]["target_stage"]["enum"]

    async with connect(app, "legacy") as s:
        assert await targets(s) == ["cart"]
        await s.ok("proceed_to_next_stage", target_stage="cart")
        assert sorted(await targets(s)) == ["browse", "checkout"]
        await s.ok("proceed_to_next_stage", target_stage="checkout")
        assert await targets(s) == []


async def test_legacy_advertises_tools_list_changed() -> None:
    app, _ = make_shop()
    async with connect(app, "legacy") as s:
        assert s.client.server_capabilities.tools is not None
        assert s.client.server_capabilities.tools.list_changed is True


async def test_list_changed_goes_to_the_transitioning_session_only() -> None:
    app, _ = make_shop()
    mine, theirs = Notifications(), Notifications()
    async with (
        connect(app, "legacy", message_handler=mine) as me,
        connect(app, "legacy", message_handler=theirs) as other,
    ):
        await me.ok("add_to_cart", product_id="p1")
        await me.refused("proceed_to_next_stage", target_stage="checkout")
        await anyio.sleep(0.05)
        assert mine.count == 0, "a call that changed no stage announced a tools/list change"

        await me.ok("proceed_to_next_stage", target_stage="cart")
        await mine.wait(1)
        await me.ok("terminate_session")
        await mine.wait(2)

        await anyio.sleep(0.1)
        assert theirs.count == 0, "another session was told its tool list changed"
        assert await other.tool_names() == BROWSE | UNSTAGED | BUILTINS
        await other.ok("proceed_to_next_stage", target_stage="cart")
        await theirs.wait(1)
        assert mine.count == 2


# -- tools/list on the 2026-07-28 wire ----------------------------------------------------------


async def test_modern_lists_every_tool_whatever_the_stage() -> None:
    app, _ = make_shop()
    notes = Notifications()
    async with connect(app, "modern", message_handler=notes) as s, connect(app, "modern") as other:

        async def listing(session: Session) -> list[dict[str, Any]]:
            listed = await session.client.list_tools(cache_mode="refresh")
            return [tool.model_dump() for tool in listed.tools]

        before = await listing(s)
        names = {tool["name"] for tool in before}
        assert names == BROWSE | CART | CHECKOUT | UNSTAGED | BUILTINS | {"start_session", "end_session"}
        for tool in before:  # every tool here is staged, a built-in of a session, or uses state
            if tool["name"] != "start_session":
                assert "session_id" in tool["input_schema"]["required"], tool["name"]

        await s.ok("proceed_to_next_stage", target_stage="cart")
        await s.ok("proceed_to_next_stage", target_stage="checkout")
        after = await listing(s)
        elsewhere = await listing(other)
        assert after == before, "tools/list varied with the caller's stage on the 2026-07-28 wire"
        assert elsewhere == before
        assert notes.count == 0


@pytest.mark.parametrize("mode", MODES)
async def test_descriptions_carry_the_stage(mode: str) -> None:
    app, _ = make_shop()
    async with connect(app, mode) as s:
        tools = {tool.name: tool for tool in (await s.client.list_tools()).tools}
        assert tools["search"].description == "[browse] Search the catalogue"
        assert tools["add_to_cart"].description == "[browse] Put a product in the cart"
        assert tools["view_cart"].description == "Show the cart"
        if mode == "legacy":  # the other stages' tools are listed once the session is there
            await s.ok("proceed_to_next_stage", target_stage="cart")
            tools.update({tool.name: tool for tool in (await s.client.list_tools()).tools})
            await s.ok("proceed_to_next_stage", target_stage="checkout")
            tools.update({tool.name: tool for tool in (await s.client.list_tools()).tools})
    assert tools["set_address"].description == "[cart] Set the delivery address"
    assert tools["boom"].description == "[cart] Write state, then fail"
    assert tools["pay"].description == "[checkout] Pay for the cart"


# -- enforcement on both eras ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_tool_outside_the_stage_is_refused_and_never_runs(mode: str, state_url: str) -> None:
    app, runs = make_shop(state_url)
    async with connect(app, mode) as s:
        await s.ok("note", text="hello")  # opens the session
        message = await s.refused("pay")
        assert "'browse'" in message
        for tool in ("search", "add_to_cart"):
            assert tool in message
        assert "proceed_to_next_stage" in message and "['cart']" in message
        await s.refused("set_address", address="Main St")
        assert runs["pay"] == 0 and runs["set_address"] == 0

        await s.ok("proceed_to_next_stage", target_stage="cart")
        message = await s.refused("search", query="kettle")
        assert "'cart'" in message and "set_address" in message
        assert "'browse'" in message and "'checkout'" in message
        await s.refused("pay")
        assert runs["search"] == 0 and runs["pay"] == 0
        assert await s.stage() == "cart"
        assert (await s.ok("view_cart"))["order"] is None


@pytest.mark.parametrize("mode", MODES)
async def test_disallowed_transition_is_refused(mode: str, state_url: str) -> None:
    app, _ = make_shop(state_url)
    notes = Notifications()
    async with connect(app, mode, message_handler=notes) as s:
        message = await s.refused("proceed_to_next_stage", target_stage="checkout")
        assert "'browse'" in message and "['cart']" in message
        assert await s.stage() == "browse"

        await s.ok("proceed_to_next_stage", target_stage="cart")
        await s.ok("proceed_to_next_stage", target_stage="checkout")
        message = await s.refused("proceed_to_next_stage", target_stage="browse")
        assert "'checkout'" in message and "terminal" in message
        assert await s.stage() == "checkout"
        await s.ok("pay")
        if mode == "legacy":
            await notes.wait(2)
            await anyio.sleep(0.05)
            assert notes.count == 2, "a refused transition announced a tools/list change"


@pytest.mark.parametrize("mode", MODES)
async def test_unstaged_tools_work_in_every_stage(mode: str) -> None:
    app, _ = make_shop()
    async with connect(app, mode) as s:
        for stage in ("browse", "cart", "checkout"):
            if stage != "browse":
                await s.ok("proceed_to_next_stage", target_stage=stage)
            assert (await s.ok("note", text=stage)) == {"note": stage}
            await s.ok("view_cart")
            if mode == "legacy":
                assert UNSTAGED <= await s.tool_names()


# -- state and stage over time ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_state_is_kept_across_transitions(mode: str, state_url: str) -> None:
    app, _ = make_shop(state_url)
    async with connect(app, mode) as s:
        await s.ok("add_to_cart", product_id="p1")
        await s.ok("add_to_cart", product_id="p2")
        await s.ok("proceed_to_next_stage", target_stage="cart")
        assert (await s.ok("view_cart"))["cart"] == ["p1", "p2"]
        await s.ok("set_address", address="1 Main St")
        await s.ok("proceed_to_next_stage", target_stage="browse")
        await s.ok("add_to_cart", product_id="p3")
        await s.ok("proceed_to_next_stage", target_stage="cart")
        await s.ok("proceed_to_next_stage", target_stage="checkout")
        paid = await s.ok("pay")
        assert paid["order"] == {"items": ["p1", "p2", "p3"], "address": "1 Main St"}


@pytest.mark.parametrize("mode", MODES)
async def test_terminate_clears_state_and_returns_to_the_first_stage(mode: str, state_url: str) -> None:
    app, runs = make_shop(state_url)
    async with connect(app, mode) as s:
        await s.ok("add_to_cart", product_id="p1")
        await s.ok("note", text="remember me")
        await s.ok("proceed_to_next_stage", target_stage="cart")
        await s.ok("set_address", address="1 Main St")
        handle = s.handle

        result = await s.ok("terminate_session")
        assert result["stage"] == "browse"
        assert s.handle == handle  # the same session continues, emptied
        assert await s.stage() == "browse"
        assert await s.ok("view_cart") == {"cart": [], "address": None, "order": None, "jumped": None}
        await s.refused("set_address", address="2 Side St")
        assert runs["set_address"] == 1
        assert (await s.ok("add_to_cart", product_id="p9"))["cart"] == ["p9"]
        await s.ok("proceed_to_next_stage", target_stage="cart")
        assert (await s.ok("view_cart"))["cart"] == ["p9"]


@pytest.mark.parametrize("mode", MODES)
async def test_stage_persists_across_calls(mode: str, state_url: str) -> None:
    app, _ = make_shop(state_url)
    async with connect(app, mode) as s:
        await s.ok("proceed_to_next_stage", target_stage="cart")
        for _ in range(3):
            await s.ok("set_address", address="1 Main St")
            await s.ok("view_cart")
            await s.refused("search", query="x")
        assert await s.stage() == "cart"
        handle = s.handle
    if mode == "modern":  # the stage lives with the session, not with the client connection
        async with connect(app, mode) as again:
            again.handle = handle
            assert await again.stage() == "cart"
            assert (await again.ok("view_cart"))["address"] == "1 Main St"


async def test_stage_survives_a_server_restart(durable_state_url: str) -> None:
    first, _ = make_shop(durable_state_url)
    async with connect(first, "modern") as s:
        await s.ok("add_to_cart", product_id="p1")
        await s.ok("proceed_to_next_stage", target_stage="cart")
        handle = s.handle
    second, runs = make_shop(durable_state_url)
    async with connect(second, "modern") as s:
        s.handle = handle
        assert await s.stage() == "cart"
        await s.refused("add_to_cart", product_id="p2")
        assert runs["add_to_cart"] == 0
        assert (await s.ok("view_cart"))["cart"] == ["p1"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_tool_that_raises_after_a_transition_leaves_the_stage_unchanged(mode: str, state_url: str) -> None:
    app, runs = make_shop(state_url)
    notes = Notifications()
    async with connect(app, mode, message_handler=notes) as s:
        await s.ok("note", text="first")  # opens the session
        message = await s.refused("jump_then_fail")
        assert "failed after the transition" in message
        assert runs["jump_then_fail"] == 1
        assert await s.stage() == "browse"
        assert (await s.ok("view_cart"))["jumped"] is None
        await anyio.sleep(0.05)
        assert notes.count == 0, "a rolled-back transition announced a tools/list change"

        # the same transition from a tool that succeeds does move the session
        assert await s.ok("jump") == {"jumped": True}
        assert await s.stage() == "cart"
        assert (await s.ok("view_cart"))["jumped"] is True

        # a failing tool in the new stage keeps both the stage and the state as they were
        await s.refused("boom", key="note")
        assert runs["boom"] == 1
        assert await s.stage() == "cart"
        assert (await s.ok("view_cart"))["jumped"] is True
        assert (await s.ok("note", text="second")) == {"note": "second"}


async def test_a_refused_first_call_on_the_modern_wire_hands_out_no_dead_handle() -> None:
    app, runs = make_shop()
    async with connect(app, "modern") as s:
        await s.refused("pay")
        assert runs["pay"] == 0
        if s.handle is not None:
            # the refusal returned a handle: it must name a session that exists
            await s.ok("view_cart")


# -- @app.stage and the graph validation at start-up ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_stage_decorator_above_and_below_a_named_tool(mode: str) -> None:
    app = Concierge("decorated")
    ran: list[str] = []

    @app.stage("first")
    @app.tool(name="alpha")
    def alpha_impl() -> str:
        ran.append("alpha")
        return "alpha"

    @app.tool(name="beta")
    @app.stage("second")
    def beta_impl() -> str:
        ran.append("beta")
        return "beta"

    app.transitions = {"first": ["second"], "second": []}
    async with connect(app, mode) as s:
        descriptions = {tool.name: tool.description for tool in (await s.client.list_tools()).tools}
        assert (descriptions.get("alpha") or "").startswith("[first]")
        if mode == "modern":
            assert (descriptions.get("beta") or "").startswith("[second]")
        else:
            assert "beta" not in descriptions
        await s.ok("alpha")  # opens the session (see the refused-first-call test below)
        assert await s.stage() == "first"
        await s.refused("beta")
        await s.ok("proceed_to_next_stage", target_stage="second")
        await s.refused("alpha")
        await s.ok("beta")
    assert ran == ["alpha", "beta"]


def _exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _exceptions(sub)]
    return [exc]


def _two_tool_app() -> Concierge:
    app = Concierge("broken")

    @app.tool()
    def a() -> str:
        return "a"

    @app.tool()
    def b() -> str:
        return "b"

    return app


def _unknown_tool(app: Concierge) -> None:
    app.stages = {"s1": ["a", "ghost_tool"], "s2": ["b"]}


def _unknown_target(app: Concierge) -> None:
    app.stages = {"s1": ["a"], "s2": ["b"]}
    app.transitions = {"s1": ["s2", "ghost_stage"], "s2": []}


def _unknown_source(app: Concierge) -> None:
    app.stages = {"s1": ["a"], "s2": ["b"]}
    app.transitions = {"s1": ["s2"], "s2": [], "ghost_stage": ["s1"]}


def _unreachable(app: Concierge) -> None:
    app.stages = {"s1": ["a"], "s2": ["b"], "island": []}
    app.transitions = {"s1": ["s2"], "s2": ["s1"], "island": ["s1"]}


def _decorated_non_tool(app: Concierge) -> None:
    @app.stage("s1")
    def ghost_helper() -> None: ...


def _builtin_in_stage(app: Concierge) -> None:
    app.stages = {"s1": ["a", "terminate_session"]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("configure", "named"),
    [
        (_unknown_tool, "ghost_tool"),
        (_unknown_target, "ghost_stage"),
        (_unknown_source, "ghost_stage"),
        (_unreachable, "island"),
        (_decorated_non_tool, "ghost_helper"),
        (_builtin_in_stage, "terminate_session"),
    ],
    ids=["unknown-tool", "unknown-target", "unknown-source", "unreachable", "decorated-non-tool", "builtin"],
)
async def test_a_bad_graph_fails_at_start_up_naming_the_culprit(
    mode: str, configure: Callable[[Concierge], None], named: str
) -> None:
    app = _two_tool_app()
    configure(app)
    with pytest.raises(BaseException) as caught:  # legacy: inside the transport's task group
        with anyio.fail_after(10):
            async with connect(app, mode) as s:
                await s.tool_names()
    errors = [e for e in _exceptions(caught.value) if isinstance(e, ConfigurationError)]
    assert errors, f"expected a ConfigurationError, got {caught.value!r}"
    assert f"'{named}'" in str(errors[0])


async def test_a_good_graph_starts() -> None:
    app = _two_tool_app()
    app.stages = {"s1": ["a"], "s2": ["b"]}
    app.transitions = {"s1": ["s2"], "s2": ["s1"]}
    async with connect(app, "legacy") as s:
        assert await s.tool_names() == {"a"} | BUILTINS


# -- a full flow over real streamable HTTP ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the staged server exited early with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"the staged server did not listen on port {port} within {timeout}s")


async def test_full_flow_over_streamable_http() -> None:
    port = _free_port()
    repo = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        with anyio.fail_after(20):
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                assert client.protocol_version == "2026-07-28"
                s = Session(client, modern=True)
                tools = {tool.name: tool for tool in (await client.list_tools()).tools}
                assert {"search", "add_to_cart", "set_address", "pay", "view_cart"} <= set(tools)
                assert tools["search"].description == "[browse] Search the catalogue"
                assert tools["pay"].description == "[checkout] Pay for the cart"

                assert (await s.ok("search", query="tea"))["results"] == ["p2"]
                assert s.handle is not None
                await s.ok("add_to_cart", product_id="p2")
                message = await s.refused("pay")
                assert "'browse'" in message and "['cart']" in message
                message = await s.refused("proceed_to_next_stage", target_stage="checkout")
                assert "'browse'" in message and "['cart']" in message

                await s.ok("proceed_to_next_stage", target_stage="cart")
                await s.refused("add_to_cart", product_id="p3")
                await s.ok("set_address", address="1 Main St")
                await s.ok("proceed_to_next_stage", target_stage="checkout")
                paid = await s.ok("pay")
                assert paid["order"] == {"items": ["p2"], "address": "1 Main St"}
                assert await s.stage() == "checkout"
                assert await s.ok("executions") == {"search": 1, "add_to_cart": 1, "set_address": 1, "pay": 1}

                await s.ok("terminate_session")
                assert await s.stage() == "browse"
                assert (await s.ok("view_cart"))["cart"] == []
                await s.refused("pay")
                assert (await s.ok("executions"))["pay"] == 1
    finally:
        proc.kill()
        proc.wait(timeout=10)
