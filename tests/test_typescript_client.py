"""The session scenarios driven by a non-Python client: the official TypeScript MCP SDK.

`tests/ts_client/scenario.mjs` runs the calls with the SDK's `Client` against a real
cart server (tests/servers/cart_server.py) and prints one JSON document with what it
saw; every assertion is here. The SDK (pinned in tests/ts_client/package.json) speaks
the handshake-era protocol only, so this covers:

- stdio: one session per server process, no handles;
- streamable HTTP, stateful: the `mcp-session-id` is the session, clients are isolated;
- streamable HTTP, stateless: no session on the wire, so concierge session handles.

The npm package is installed once per test session (`npm install` in tests/ts_client,
unless it is already there at the pinned version). Without `node`/`npm` the tests skip,
except under CI, where they fail; a failed install always fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CART_SERVER, HANDLE_KEY, ServerProcess, server_env, start_all

from tests.conftest import not_here

TS_CLIENT = Path(__file__).parent / "ts_client"
SCENARIO = TS_CLIENT / "scenario.mjs"
SDK = "@modelcontextprotocol/sdk"
SDK_VERSION = "1.32.2"
SDK_PROTOCOL = "2025-11-25"  # the newest protocol version that SDK release speaks
INSTALL_LIMIT = 300  # seconds for `npm install`
NODE_LIMIT = 60  # seconds for one scenario run (the script stops itself after 45)

STATUS_KEY = "concierge/session"
TTL = 3600
# The cart server's tools that read or write session state.
STATE_TOOLS = ["add_to_cart", "add_slowly", "add_blocking", "view_cart"]
UNKNOWN_HANDLE = "A" * 43
MALFORMED_HANDLE = "!!"


# -- the TypeScript client -----------------------------------------------------------------------
def _installed_sdk_version() -> str | None:
    try:
        manifest = json.loads((TS_CLIENT / "node_modules" / SDK / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = manifest.get("version")
    return version if isinstance(version, str) else None


@pytest.fixture(scope="session")
def node() -> str:
    """The `node` executable, with the pinned SDK installed in tests/ts_client (installed here if needed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    missing = [name for name, path in (("node", node), ("npm", npm)) if path is None]
    if missing:
        reason = f"{' and '.join(missing)} not found on PATH"
        not_here(
            f"TypeScript client tests skipped: {reason}", in_ci=f"CI must run the TypeScript client tests, but {reason}"
        )
    assert node is not None and npm is not None
    pinned = json.loads((TS_CLIENT / "package.json").read_text())["dependencies"][SDK]
    assert pinned == SDK_VERSION, f"tests/ts_client/package.json pins {SDK} {pinned}, these tests expect {SDK_VERSION}"
    if _installed_sdk_version() != SDK_VERSION:
        command = [npm, "install", "--no-package-lock", "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(
                command,
                check=False,
                cwd=TS_CLIENT,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=INSTALL_LIMIT,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`npm {' '.join(command[1:])}` in {TS_CLIENT} did not finish within {INSTALL_LIMIT}s: {exc}")
        if done.returncode != 0:
            pytest.fail(
                f"`npm {' '.join(command[1:])}` in {TS_CLIENT} failed with exit status {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        installed = _installed_sdk_version()
        assert installed == SDK_VERSION, f"npm install left {SDK} {installed} in {TS_CLIENT}, not {SDK_VERSION}"
    return node


def run_scenario(node: str, mode: str, *target: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run scenario.mjs (bounded; its process group is killed on timeout) and return its JSON document."""
    proc = subprocess.Popen(
        [node, str(SCENARIO), mode, *target],
        cwd=TS_CLIENT,
        env=env if env is not None else dict(os.environ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=NODE_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # node and, over stdio, the server it spawned
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"scenario {mode} did not finish within {NODE_LIMIT}s\nstderr:\n{err[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if err.strip():
        print(f"--- stderr of scenario {mode} ---\n{err[-4000:]}", file=sys.stderr)
    assert proc.returncode == 0, f"scenario {mode} exited with {proc.returncode}\nstderr:\n{err[-4000:]}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"scenario {mode} printed {len(lines)} lines, not one JSON document:\n{out[-4000:]}"
    document = json.loads(lines[0])
    assert document["mode"] == mode
    assert document["sdkVersion"] == SDK_VERSION
    assert document["clientProtocolVersion"] == SDK_PROTOCOL
    assert document["connection"]["protocolVersion"] == SDK_PROTOCOL
    return document


# -- reading what the client saw -------------------------------------------------------------------
def result_of(call: dict[str, Any]) -> dict[str, Any]:
    assert "thrown" not in call, f"the TypeScript client threw on {call['tool']}({call['arguments']}): {call['thrown']}"
    return call["result"]


def texts(result: dict[str, Any]) -> list[str]:
    return [block["text"] for block in result["content"] or [] if block.get("type") == "text"]


def meta(result: dict[str, Any]) -> dict[str, Any]:
    return result["_meta"] or {}


def succeeded(call: dict[str, Any]) -> dict[str, Any]:
    result = result_of(call)
    assert result["isError"] is not True, f"{call['tool']}({call['arguments']}) failed: {texts(result)}"
    return result


def refused(call: dict[str, Any]) -> dict[str, Any]:
    result = result_of(call)
    assert result["isError"] is True, f"{call['tool']}({call['arguments']}) should fail, got {result}"
    return result


def cart(call: dict[str, Any]) -> list[str]:
    """The cart a cart tool returned (the text block holding its JSON)."""
    result = succeeded(call)
    for block in texts(result):
        try:
            value = json.loads(block)
        except ValueError:
            continue
        if isinstance(value, dict) and "cart" in value:
            return value["cart"]
    raise AssertionError(f"no cart in the result of {call['tool']}: {result['content']}")


def tools_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {tool["name"]: tool for tool in document["tools"]}


def assert_no_handles(tools: dict[str, dict[str, Any]]) -> None:
    """A listing for a transport with a session of its own: no session_id argument, no start_session."""
    assert set(STATE_TOOLS) <= set(tools), f"cart tools missing from tools/list: {sorted(tools)}"
    assert "start_session" not in tools, "this transport carries its own session: no start_session"
    for name, tool in tools.items():
        schema = tool["inputSchema"] or {}
        assert "session_id" not in (schema.get("properties") or {}), f"{name} takes a session_id: {schema}"
        assert "session_id" not in (schema.get("required") or []), f"{name} requires a session_id: {schema}"


def assert_kept_state_without_handles(calls: dict[str, dict[str, Any]]) -> None:
    assert cart(calls["add_first"]) == ["apple"]
    assert cart(calls["add_second"]) == ["apple", "pear"]
    assert cart(calls["view"]) == ["apple", "pear"], "state must be kept across calls"
    for step, call in calls.items():
        assert HANDLE_KEY not in meta(result_of(call)), f"{step}: no session handle expected here: {call['result']}"


# -- servers ----------------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "sqlite"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'ts-client.db'}"


@pytest.fixture
def ttl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers started by the test get a session TTL of `TTL` seconds."""
    monkeypatch.setenv("CONCIERGE_SESSION_TTL", str(TTL))


def http_server(state_url: str, *, stateless: bool) -> Iterator[ServerProcess]:
    server = ServerProcess.cart("streamable-http", state_url=state_url, stateless=stateless)
    start_all(server)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def stateful_server(state_url: str) -> Iterator[ServerProcess]:
    yield from http_server(state_url, stateless=False)


@pytest.fixture
def stateless_server(state_url: str, ttl_env: None) -> Iterator[ServerProcess]:
    yield from http_server(state_url, stateless=True)


# -- 1. stdio ---------------------------------------------------------------------------------------
def test_ts_client_over_stdio_keeps_state_in_the_process_session(node: str, state_url: str) -> None:
    # node spawns the server; it passes its own environment (CONCIERGE_STATE_URL) on to it.
    document = run_scenario(node, "stdio", sys.executable, str(CART_SERVER), "stdio", env=server_env(state_url))
    assert document["connection"]["wireSessionId"] is None
    assert_no_handles(tools_of(document))
    assert_kept_state_without_handles(document["calls"])


# -- 2. streamable HTTP, stateful -------------------------------------------------------------------
def test_ts_client_over_stateful_http_uses_the_mcp_session_id(node: str, stateful_server: ServerProcess) -> None:
    document = run_scenario(node, "stateful", stateful_server.url)
    one, two = document["connection"], document["second"]["connection"]
    assert one["wireSessionId"], "a stateful server gives each connection an mcp-session-id"
    assert two["wireSessionId"] and two["wireSessionId"] != one["wireSessionId"]
    assert_no_handles(tools_of(document))
    assert_no_handles(tools_of(document["second"]))
    calls = document["calls"]
    assert_kept_state_without_handles({k: calls[k] for k in ("add_first", "add_second", "view")})
    second = document["second"]["calls"]
    assert cart(second["view"]) == [], "another connection is another session: its cart starts empty"
    assert cart(second["add"]) == ["bread"]
    assert cart(calls["view_after_second"]) == ["apple", "pear"], "the second client's write leaked into the first"
    for step, call in second.items():
        assert HANDLE_KEY not in meta(result_of(call)), f"second.{step}: no session handle expected here"


# -- 3. streamable HTTP, stateless: session handles -------------------------------------------------
def assert_carries_handle(call: dict[str, Any], handle: str) -> None:
    result = succeeded(call)
    first = (result["content"] or [None])[0]
    assert first is not None and first.get("type") == "text", f"first content block is not text: {result['content']}"
    assert first["text"].startswith(f"session_id: {handle}"), f"first block does not carry the handle: {first!r}"
    assert meta(result).get(HANDLE_KEY) == handle, f"_meta: {meta(result)}"


def test_ts_client_over_stateless_http_lists_the_session_id_argument(
    node: str, stateless_server: ServerProcess
) -> None:
    document = run_scenario(node, "stateless-missing", stateless_server.url)
    assert document["connection"]["wireSessionId"] is None, "a stateless server sends no mcp-session-id"
    tools = tools_of(document)
    for name in STATE_TOOLS:
        assert name in tools, f"{name} missing from tools/list: {sorted(tools)}"
        schema = tools[name]["inputSchema"] or {}
        prop = (schema.get("properties") or {}).get("session_id")
        assert isinstance(prop, dict) and prop.get("type") == "string", (
            f"{name}: no session_id string property: {schema}"
        )
        assert "session_id" in (schema.get("required") or []), f"{name}: session_id is not required: {schema}"
    assert "start_session" in tools, f"no start_session tool: {sorted(tools)}"
    description = tools["start_session"]["description"] or ""
    assert f"{TTL} seconds" in description, f"start_session does not state the {TTL}s TTL: {description!r}"


def test_ts_client_over_stateless_http_without_session_id_is_told_what_to_pass(
    node: str, state_url: str, stateless_server: ServerProcess
) -> None:
    document = run_scenario(node, "stateless-missing", stateless_server.url)
    call = document["calls"]["missing"]
    assert "session_id" not in call["arguments"]
    result = refused(call)
    message = "\n".join(texts(result))
    assert "session_id" in message and '"new"' in message, f"the error does not say what to pass: {message!r}"
    assert meta(result).get(STATUS_KEY) == "missing", f"_meta: {meta(result)}"
    assert HANDLE_KEY not in meta(result), f"a refused call was given a session: {meta(result)}"
    if state_url.startswith("sqlite:"):
        assert stored_sessions(state_url) == [], "a call without session_id must not create a session"


def stored_sessions(state_url: str) -> list[dict[str, Any]]:
    """Every session record in a shared store, via `python -m concierge sessions list --json`."""
    done = subprocess.run(
        [sys.executable, "-m", "concierge", "sessions", "list", "--url", state_url, "--json", "--include-expired"],
        check=False,
        env=server_env(None),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=NODE_LIMIT,
    )
    assert done.returncode == 0, f"sessions list failed ({done.returncode}): {done.stderr}"
    return [row for row in json.loads(done.stdout) if row["scope"] != "secrets"]  # the handle key is no session


def test_ts_client_over_stateless_http_keeps_state_by_handle(node: str, stateless_server: ServerProcess) -> None:
    document = run_scenario(node, "stateless", stateless_server.url)
    calls = document["calls"]

    # session_id "new": a session is issued, and its handle comes back in text and _meta.
    issued = succeeded(calls["issued"])
    handle = meta(issued).get(HANDLE_KEY)
    assert isinstance(handle, str) and handle, f"no {HANDLE_KEY} in _meta: {meta(issued)}"
    assert meta(issued).get(STATUS_KEY) == "issued", f"_meta: {meta(issued)}"
    assert_carries_handle(calls["issued"], handle)
    assert cart(calls["issued"]) == ["apple"]

    # the handle keeps the state across calls (and HTTP requests)
    for step, expected in (("active_add", ["apple", "pear"]), ("active_view", ["apple", "pear"])):
        assert step in calls, f"{step} was not run (the client found no handle in the issued result)"
        call = calls[step]
        assert call["arguments"]["session_id"] == handle
        assert meta(succeeded(call)).get(STATUS_KEY) == "active", f"{step} _meta: {call['result']['_meta']}"
        assert_carries_handle(call, handle)
        assert cart(call) == expected, f"{step}: state not kept across calls"

    # a well-formed handle that was never issued, and one that is not a handle at all
    unknown = refused(calls["unknown"])
    assert calls["unknown"]["arguments"]["session_id"] == UNKNOWN_HANDLE
    assert meta(unknown).get(STATUS_KEY) == "unknown", f"_meta: {meta(unknown)}"
    assert meta(unknown).get(HANDLE_KEY) != UNKNOWN_HANDLE, "an unknown handle must never be adopted"
    malformed = refused(calls["malformed"])
    assert calls["malformed"]["arguments"]["session_id"] == MALFORMED_HANDLE
    assert meta(malformed).get(STATUS_KEY) == "malformed", f"_meta: {meta(malformed)}"

    # start_session: a structured {"session_id": handle}, usable at once
    start = succeeded(calls["start"])
    structured = start["structuredContent"]
    assert isinstance(structured, dict) and set(structured) == {"session_id"}, f"structuredContent: {structured}"
    started = structured["session_id"]
    assert isinstance(started, str) and started and started != handle
    assert meta(start).get(STATUS_KEY) == "issued", f"_meta: {meta(start)}"
    assert "started_view" in calls, "the client found no handle in the start_session result"
    view = calls["started_view"]
    assert view["arguments"]["session_id"] == started
    assert cart(view) == [], "a new session starts with an empty cart"
    assert meta(succeeded(view)).get(STATUS_KEY) == "active", f"_meta: {view['result']['_meta']}"
    assert_carries_handle(view, started)
