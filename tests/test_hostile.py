"""Hostile input through the real thing: a real `Client` against a `Concierge` app, on every backend.

Keys (empty, too long, not a str, SQL and glob metacharacters, unicode tricks, NUL and
lone surrogates), values (over and at `max_value_bytes`, not JSON, NaN and infinity),
session handles (forged, truncated, altered, expired, another principal's), and
malformed state URLs. Every refusal must reach the client as a tool error (or a
`ConfigurationError` at start-up) that says what is wrong, and the call that was
refused must have written nothing. A property-based test drives random, concurrent
interleavings of many sessions against a per-session dict model.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import secrets
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import helpers
import httpx2
import pytest
from helpers import HANDLE_KEY, NEW, ServerProcess, handle_of, has_handle, payload, status_of, stored_sessions, text
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

from concierge import Concierge
from concierge.cli.sessions import main as sessions_cli
from concierge.errors import ConfigurationError, StateKeyError, StateTypeError, StateValueError
from concierge.state import MemoryBackend, backend_from_url
from concierge.work import MAX_KEY_LENGTH, working_copy

pytestmark = pytest.mark.anyio

LIMIT = 30  # seconds any one test may take
MODES = ["legacy", "2026-07-28"]
SMALL_LIMIT = 64  # max_value_bytes of the size tests: small enough to hit exactly
DEFAULT_MAX_VALUE_BYTES = 1_000_000  # README: "max_value_bytes (default 1 MB)"
HANDLE_SHAPE = re.compile(r"[A-Za-z0-9_-]{22,128}")


# -- the server under test ---------------------------------------------------------------------------
# Tool arguments the SDK does not annotate as plain `str` are pre-parsed as JSON ("null" arrives as None),
# so keys travel as `key: str`, a key that is not a str (or that no wire can carry) as `raw=[key]`, and
# values boxed in a one-element list.
def _key(key: str, raw: list[Any] | None = None) -> Any:
    """The key the client meant: `key`, or `raw[0]`, where `{"cp": [code points]}` spells a str."""
    if raw is None:
        return key
    spec = raw[0]
    if isinstance(spec, dict) and set(spec) == {"cp"}:
        return "".join(chr(c) for c in spec["cp"])
    return spec


def K(key: Any, name: str = "key") -> dict[str, Any]:
    """The arguments that carry `key` to the tools above."""
    return {name: key} if isinstance(key, str) else {name: "", "raw": [key]}


class Opaque:
    """Not JSON-serialisable."""


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _deep(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


# Values no store can keep, built inside the server (most cannot even be sent to it).
NOT_JSON: dict[str, Any] = {
    "nan": lambda: math.nan,
    "inf": lambda: math.inf,
    "-inf": lambda: -math.inf,
    "nan-inside": lambda: {"price": [1.0, math.nan]},
    "set": lambda: {1, 2},
    "frozenset": lambda: frozenset({1}),
    "bytes": lambda: b"\x00\x01",
    "object": Opaque,
    "datetime": lambda: datetime(2026, 1, 1),
    "decimal": lambda: Decimal("1.10"),
    "complex": lambda: 1j,
    "set-inside": lambda: {"tags": [{"a"}]},
    "tuple-dict-key": lambda: {(1, 2): "pair"},
    "circular": _circular,
    "too-deep": lambda: _deep(10_000),
    "lone-surrogate": lambda: "a\ud800b",
    "lone-surrogate-dict-key": lambda: {"\udfff": 1},
    "int-over-4300-digits": lambda: 10**5000,
}

# Odd values that are JSON: (built in the server, what reading them back must give).
ODD_JSON: dict[str, tuple[Any, Any]] = {
    "negative-zero": (-0.0, -0.0),
    "largest-float": (1.7976931348623157e308, 1.7976931348623157e308),
    "smallest-subnormal": (5e-324, 5e-324),
    "big-int": (10**300, 10**300),
    "nul-and-controls": ("a\x00b\x01\x1f\x7f\u2028\u2029", "a\x00b\x01\x1f\x7f\u2028\u2029"),
    "surrogate-pair-escaped-emoji": ("\U0001f600", "\U0001f600"),
    "unicode-dict-keys": ({"é": 1, "e\u0301": 2, "\x00": 3, "": 4}, {"é": 1, "e\u0301": 2, "\x00": 3, "": 4}),
    "tuple": ((1, "two"), [1, "two"]),  # JSON has arrays only
    "sql-in-value": ("'; DROP TABLE concierge_values;--", "'; DROP TABLE concierge_values;--"),
    "json-looking-str": ('{"a": 1}', '{"a": 1}'),
    # json's rule, undocumented by concierge: int dict keys come back as str, and colliding ones collapse.
    "int-dict-keys": ({1: "a", 2: "b"}, {"1": "a", "2": "b"}),
    "colliding-dict-keys": ({1: "int", "1": "str"}, {"1": "str"}),
}


def hostile_app(state_url: str, **kwargs: Any) -> Concierge:
    kwargs.setdefault("session_ttl", None)
    app = Concierge("hostile", state_url=state_url, sweep_interval=None, **kwargs)

    @app.tool()
    def whoami() -> dict:
        """The storage id of this session."""
        return {"sid": working_copy("whoami").session_id}

    @app.tool()
    def put(key: str, value: list[Any], raw: list[Any] | None = None) -> dict:
        app.set_state(_key(key, raw), value[0])
        return {"ok": True}

    @app.tool()
    def put_many(items: list[list[Any]]) -> dict:
        for key, value in items:
            app.set_state(key, value)
        return {"n": len(items)}

    @app.tool()
    def get(key: str, raw: list[Any] | None = None) -> dict:
        missing = object()
        value = app.get_state(_key(key, raw), missing)
        return {"found": value is not missing, "value": None if value is missing else value}

    @app.tool()
    def drop(key: str, raw: list[Any] | None = None) -> dict:
        app.delete_state(_key(key, raw))
        return {"ok": True}

    @app.tool()
    def dump() -> dict:
        unit = working_copy("dump")
        names = list(unit.keys())  # a WorkingCopy is not a dict: keys() is its listing
        return {"items": [[key, unit.get(key)] for key in names]}

    @app.tool()
    def put_then(first: str, then: str, raw: list[Any] | None = None) -> dict:
        """Write a valid key, then try `then`: a refused key must take the first write with it."""
        app.set_state(first, "written first")
        app.set_state(_key(then, raw), "written second")
        return {"ok": True}

    @app.tool()
    def put_odd(key: str, kind: str) -> dict:
        app.set_state("before", "written first")
        app.set_state(key, NOT_JSON[kind]() if kind in NOT_JSON else ODD_JSON[kind][0])
        return {"ok": True}

    @app.tool()
    def check_odd(key: str, kind: str) -> dict:
        got = app.get_state(key)
        expected = ODD_JSON[kind][1]
        same = got == expected and repr(got) == repr(expected) and type(got) is type(expected)
        return {"same": same, "got": repr(got)}

    @app.tool()
    def put_sized(key: str, size: int, char: str = "x") -> dict:
        """Store a str whose JSON encoding is `size` bytes (its quotes included)."""
        width = len(char.encode())
        assert (size - 2) % width == 0, "size must be reachable with this char"
        app.set_state(key, char * ((size - 2) // width))
        return {"ok": True}

    @app.tool()
    def length_of(key: str) -> dict:
        value = app.get_state(key)
        return {"len": None if value is None else len(json.dumps(value, ensure_ascii=False).encode())}

    @app.tool()
    def catch(key: str, raw: list[Any] | None = None, kind: str = "", size: int = 0) -> dict:
        """Try one write and report the exception it raised (a caught refusal keeps the other writes)."""
        app.set_state("kept", "yes")
        try:
            if size:
                app.set_state(_key(key, raw), "x" * (size - 2))
            elif kind:
                app.set_state(_key(key, raw), NOT_JSON[kind]())
            else:
                app.set_state(_key(key, raw), "v")
        except Exception as exc:  # noqa: BLE001 - reporting it is the point
            return {"raised": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
        return {"raised": None}

    @app.tool()
    def put_scoped(key: str, scope: str) -> dict:
        app.set_state("before", "written first")
        app.set_state(key, "v", scope=scope)  # type: ignore[arg-type]
        return {"ok": True}

    @app.tool()
    def incr(key: str) -> dict:
        n = app.get_state(key, 0) + 1
        app.set_state(key, n)
        return {"n": n}

    @app.tool()
    def fail_after(key: str, value: list[Any]) -> dict:
        app.set_state(key, value[0])
        raise RuntimeError("the tool failed after set_state")

    return app


# -- client side helpers -----------------------------------------------------------------------------
class Session:
    """One session seen from a client: on a legacy connection the connection, else a handle."""

    def __init__(self, client: Client, handle: str | None) -> None:
        self.client = client
        self.handle = handle

    @property
    def token(self) -> str:
        """The handle of a 2026-07-28 session."""
        assert self.handle is not None, "a legacy connection has no handle"
        return self.handle

    async def call(self, tool: str, **args: Any) -> CallToolResult:
        for name in ("key", "then"):
            if name in args and not isinstance(args[name], str):
                args.update(K(args.pop(name), name))
        if "value" in args:
            args["value"] = [args["value"]]
        if self.handle is not None:
            args["session_id"] = self.handle
        return await self.client.call_tool(tool, args)

    async def ok(self, tool: str, **args: Any) -> Any:
        return payload(await self.call(tool, **args))

    async def refused(self, tool: str, *, status: str | None = None, **args: Any) -> str:
        """The message of a refused call; with `status`, the `_meta["concierge/session"]` it must carry."""
        result = await self.call(tool, **args)
        assert result.is_error, f"{tool}({args!r}) was accepted: {text(result)}"
        if status is not None:
            assert status_of(result) == status, (status_of(result), text(result))
        return text(result)

    async def items(self) -> dict[str, Any]:
        return dict(map(tuple, (await self.ok("dump"))["items"]))

    async def storage_id(self) -> str:
        return (await self.ok("whoami"))["sid"]


async def open_session(client: Client, mode: str) -> Session:
    if mode == "legacy":
        return Session(client, None)
    return Session(client, payload(await client.call_tool("start_session", {}))["session_id"])


@asynccontextmanager
async def sessions(app: Concierge, mode: str, n: int) -> AsyncIterator[list[Session]]:
    """`n` sessions: `n` legacy connections, or `n` handles on one 2026-07-28 client."""
    async with AsyncExitStack() as stack:
        if mode == "legacy":
            clients = [await stack.enter_async_context(Client(app, mode="legacy")) for _ in range(n)]
            yield [Session(client, None) for client in clients]
        else:
            client = await stack.enter_async_context(Client(app))
            yield [await open_session(client, mode) for _ in range(n)]


async def stored(app: Concierge, session_id: str) -> tuple[int, dict[str, Any]] | None:
    """What the store itself holds for a session: (version, decoded values), read past any cache."""
    record = await app.state_backend.load(session_id, now=time.time())
    if record is None:
        return None
    assert record.values is not None
    return record.version, {key: json.loads(value) for key, value in record.values.items()}


# -- keys --------------------------------------------------------------------------------------------
# Keys that must round-trip exactly and stay distinct from each other (and from every other session's).
ROUND_TRIP_KEYS = [
    "a",
    "A",
    "a ",
    " a",
    "'; DROP TABLE concierge_values;--",
    "'; DELETE FROM concierge_sessions; SELECT '",
    '" OR "1"="1',
    "%",
    "a%",
    "_",
    "a_",
    "\\",
    "\\%",
    "\\\\",
    "'",
    "''",
    '"',
    "`",
    "$1",
    "?",
    "*",
    "[a]",
    "[!a]",
    "a*b?c[de]",
    ":",
    "s:h:abc",
    "concierge:v:h:abc",
    "{hash-tag}",
    "é",  # U+00E9, precomposed
    "e\u0301",  # e + COMBINING ACUTE ACCENT: canonically equivalent, a different key
    "Å",  # U+00C5
    "\u212b",  # ANGSTROM SIGN, which NFC folds into U+00C5
    "K",
    "\u212a",  # KELVIN SIGN
    "ﬁ",  # U+FB01 LATIN SMALL LIGATURE FI, NFKC-equal to "fi"
    "fi",
    "ß",
    "ss",
    "İ",
    "i̇",
    "ı",
    "\uff21",  # FULLWIDTH A
    "\u202eevil\u202c",  # RIGHT-TO-LEFT OVERRIDE ... POP DIRECTIONAL FORMATTING
    "\u200b",  # ZERO WIDTH SPACE, alone
    "a\u200db",  # ZERO WIDTH JOINER
    "ab",
    "\ufeffa",  # BOM
    "e" + "\u0301" * 100,  # a pile of combining marks
    "\U0001f600",  # emoji (astral)
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # ZWJ family
    "\U0001f1fa\U0001f1f8",  # flag: two regional indicators
    "\ufffd",
    "\uffff",  # a noncharacter, still valid UTF-8
    "\U0010ffff",
    "\t\n\r\x0b\x0c",
    "null",
    "None",
    "__proto__",
    "k" * MAX_KEY_LENGTH,  # exactly at the limit
    "\U0001f600" * MAX_KEY_LENGTH,  # at the limit in characters, 4 bytes each in UTF-8
    "é" * MAX_KEY_LENGTH,
]

# Keys that are refused: (what the client sends, a phrase the error must contain).
BAD_KEYS: list[tuple[Any, str]] = [
    ("", "must not be empty"),
    ("k" * (MAX_KEY_LENGTH + 1), f"the limit is {MAX_KEY_LENGTH}"),
    ("\U0001f600" * (MAX_KEY_LENGTH + 1), f"the limit is {MAX_KEY_LENGTH}"),
    ("e" + "\u0301" * MAX_KEY_LENGTH, f"the limit is {MAX_KEY_LENGTH}"),  # 257 code points
    ("x" * 100_000, f"the limit is {MAX_KEY_LENGTH}"),
    (3, "must be a str, not int"),
    (0, "must be a str, not int"),
    (1.5, "must be a str, not float"),
    (True, "must be a str, not bool"),
    (None, "must be a str, not NoneType"),
    (["a"], "must be a str, not list"),
    ({"a": 1}, "must be a str, not dict"),
    ("a\x00b", "NUL"),  # PostgreSQL text cannot hold it, so no store takes it
    ("\x00", "NUL"),
    ({"cp": [0xD800]}, "lone surrogate"),  # high surrogate alone
    ({"cp": [0x61, 0xDFFF]}, "lone surrogate"),  # low surrogate alone
    ({"cp": [0xDE00, 0xD83D]}, "lone surrogate"),  # a surrogate pair in the wrong order
]


@pytest.mark.parametrize("mode", MODES)
async def test_hostile_keys_round_trip_exactly_and_stay_distinct(state_url: str, mode: str) -> None:
    assert len(set(ROUND_TRIP_KEYS)) == len(ROUND_TRIP_KEYS)
    app = hostile_app(state_url)
    mine = {key: {"i": i, "owner": "one", "key": key} for i, key in enumerate(ROUND_TRIP_KEYS)}
    theirs = {key: {"i": -i, "owner": "two"} for i, key in enumerate(ROUND_TRIP_KEYS)}
    with anyio.fail_after(LIMIT):
        async with sessions(app, mode, 2) as (one, two):
            await one.ok("put_many", items=[[k, v] for k, v in mine.items()])
            assert await two.items() == {}, "another session sees the first one's keys"
            await two.ok("put_many", items=[[k, v] for k, v in theirs.items()])
            # every key reads back exactly, one call each (a key that collided with another would not)
            for key, value in mine.items():
                assert await one.ok("get", key=key) == {"found": True, "value": value}, repr(key)
            assert await one.items() == mine
            assert await two.items() == theirs
            # and the store holds exactly these keys, past any cache of this process
            for session, expected in ((one, mine), (two, theirs)):
                record = await stored(app, await session.storage_id())
                assert record is not None and record[1] == expected
            # deleting one of a look-alike pair deletes that one only
            for gone in ("e\u0301", "%", "*", "\u212a"):
                await one.ok("drop", key=gone)
                del mine[gone]
            assert await one.items() == mine
            assert await two.items() == theirs
            record = await stored(app, await one.storage_id())
            assert record is not None and record[1] == mine
        if mode != "legacy" and not state_url.startswith("memory"):
            # a fresh server (nothing cached) on the same store reads them back from storage
            async with Client(hostile_app(state_url)) as client:
                again = Session(client, one.handle)
                assert await again.items() == mine


@pytest.mark.parametrize("mode", MODES)
async def test_invalid_keys_are_a_tool_error_and_the_call_writes_nothing(state_url: str, mode: str) -> None:
    app = hostile_app(state_url)
    with anyio.fail_after(LIMIT):
        async with sessions(app, mode, 1) as (session,):
            await session.ok("put", key="existing", value=1)
            sid = await session.storage_id()
            before = await stored(app, sid)
            assert before is not None and before[1] == {"existing": 1}
            for bad, phrase in BAD_KEYS:
                for tool, args in (
                    ("put_then", {"first": "first", "then": bad}),
                    ("put", {"key": bad, "value": 1}),
                    ("get", {"key": bad}),
                    ("drop", {"key": bad}),
                ):
                    message = await session.refused(tool, **args)
                    assert "state key" in message and phrase in message, (bad, tool, message)
                    assert len(message) < 2000, "the error echoes the whole key"
            assert await stored(app, sid) == before, "a refused call wrote something"
            assert await session.items() == {"existing": 1}


@pytest.mark.parametrize("bad", [bad for bad, _ in BAD_KEYS if not (isinstance(bad, str) and len(bad) > 300)])
async def test_an_invalid_key_raises_state_key_error_inside_the_tool_and_a_caught_one_keeps_the_rest(
    bad: Any,
) -> None:
    app = hostile_app("memory://")
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            result = await client.call_tool("catch", {**K(bad), **NEW})
            caught = payload(result)
            assert caught["raised"] == "StateKeyError"
            assert {"StateKeyError", "ValueError", "ToolError"} <= set(caught["mro"])
            session = Session(client, handle_of(result))
            assert await session.items() == {"kept": "yes"}, "a refusal the tool caught must not drop the other writes"


async def test_a_refused_first_call_creates_no_session_and_hands_out_no_handle(state_url: str) -> None:
    app = hostile_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            result = await client.call_tool("put_then", {"first": "first", "then": "", **NEW})
            assert result.is_error and "must not be empty" in text(result)
            assert not has_handle(result), "a first call that failed created nothing, so no handle"
            assert await stored_sessions(app) == []


@pytest.mark.parametrize("mode", MODES)
async def test_an_unknown_scope_is_a_tool_error_and_writes_nothing(mode: str) -> None:
    app = hostile_app("memory://")
    with anyio.fail_after(LIMIT):
        async with sessions(app, mode, 1) as (session,):
            for scope in ("Session", "session ", "", "users", "user; DROP TABLE x", "global\x00", "*", "h:x"):
                message = await session.refused("put_scoped", key="k", scope=scope)
                assert "scope must be one of" in message and repr(scope) in message, message
            assert await session.items() == {}


# -- values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_values_up_to_max_value_bytes_are_kept_and_one_byte_more_is_refused(state_url: str, mode: str) -> None:
    app = hostile_app(state_url, max_value_bytes=SMALL_LIMIT)
    with anyio.fail_after(LIMIT):
        async with sessions(app, mode, 1) as (session,):
            await session.ok("put", key="seed", value=0)
            sid = await session.storage_id()
            # exactly at the limit, counted in UTF-8 bytes of the compact JSON
            for key, char in (("ascii", "x"), ("two-byte", "é"), ("four-byte", "\U0001f600")):
                size = SMALL_LIMIT - (SMALL_LIMIT - 2) % len(char.encode())
                await session.ok("put_sized", key=key, size=size, char=char)
                assert (await session.ok("length_of", key=key))["len"] == size
            await session.ok("put", key="structure", value={"a": [1, 2, "x" * 50]})  # 64 bytes as compact JSON
            assert len(json.dumps({"a": [1, 2, "x" * 50]}, separators=(",", ":"))) == SMALL_LIMIT
            before = await stored(app, sid)
            # one byte more
            for args in (
                {"key": "ascii", "size": SMALL_LIMIT + 1},
                {"key": "new", "size": SMALL_LIMIT + 1},
                {"key": "two-byte", "size": SMALL_LIMIT + 2, "char": "é"},
                {"key": "huge", "size": 10 * SMALL_LIMIT},
            ):
                message = await session.refused("put_sized", **args)
                assert "max_value_bytes" in message and str(SMALL_LIMIT) in message, message
                assert f"state key {args['key']!r}" in message
            message = await session.refused("put", key="structure", value={"a": [1, 2, "x" * 51]})
            assert "65 bytes" in message and "max_value_bytes" in message
            assert await stored(app, sid) == before, "a refused value was written"
            caught = await session.ok("catch", key="big", size=SMALL_LIMIT + 1)
            assert caught["raised"] == "StateValueError" and "ValueError" in caught["mro"]
            assert "big" not in await session.items() and (await session.items())["kept"] == "yes"


async def test_the_default_max_value_bytes_is_one_megabyte_on_every_backend(state_url: str) -> None:
    assert inspect.signature(Concierge).parameters["max_value_bytes"].default == DEFAULT_MAX_VALUE_BYTES
    app = hostile_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            session = await open_session(client, "2026-07-28")
            await session.ok("put_sized", key="big", size=DEFAULT_MAX_VALUE_BYTES)
            message = await session.refused("put_sized", key="bigger", size=DEFAULT_MAX_VALUE_BYTES + 1)
            assert "max_value_bytes" in message and str(DEFAULT_MAX_VALUE_BYTES) in message
            record = await stored(app, await session.storage_id())
            assert record is not None and set(record[1]) == {"big"}
            assert len(json.dumps(record[1]["big"]).encode()) == DEFAULT_MAX_VALUE_BYTES
            assert (await session.ok("length_of", key="big"))["len"] == DEFAULT_MAX_VALUE_BYTES


async def test_max_value_bytes_none_means_no_limit() -> None:
    app = hostile_app("memory://", max_value_bytes=None)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            session = await open_session(client, "2026-07-28")
            await session.ok("put_sized", key="big", size=3 * DEFAULT_MAX_VALUE_BYTES)
            assert (await session.ok("length_of", key="big"))["len"] == 3 * DEFAULT_MAX_VALUE_BYTES


@pytest.mark.parametrize("bad", [0, -1, "1MB", 1.5, True, [1]])
def test_a_max_value_bytes_that_is_not_a_positive_int_is_a_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_value_bytes"):
        Concierge("x", state_url="memory://", max_value_bytes=bad)


@pytest.mark.parametrize("mode", MODES)
async def test_values_that_are_not_json_are_a_state_type_error_and_write_nothing(state_url: str, mode: str) -> None:
    app = hostile_app(state_url)
    with anyio.fail_after(LIMIT):
        async with sessions(app, mode, 1) as (session,):
            await session.ok("put", key="existing", value=[1])
            sid = await session.storage_id()
            before = await stored(app, sid)
            for kind in NOT_JSON:
                message = await session.refused("put_odd", key="odd", kind=kind)
                assert "state key 'odd'" in message, (kind, message)
            assert await stored(app, sid) == before
            for kind in NOT_JSON:
                caught = await session.ok("catch", key="odd", kind=kind)
                assert caught["raised"] == "StateTypeError", (kind, caught)
                assert {"TypeError", "ToolError"} <= set(caught["mro"]), kind
            assert await session.items() == {"existing": [1], "kept": "yes"}


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "nan-inside"])
async def test_nan_and_infinity_are_refused_because_they_are_not_json(kind: str) -> None:
    # README: values are "any JSON-serialisable value"; NaN and Infinity are not JSON (RFC 8259), and are refused.
    app = hostile_app("memory://")
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            result = await client.call_tool("put_odd", {"key": "price", "kind": kind, **NEW})
            assert result.is_error
            assert "state key 'price'" in text(result) and "not valid JSON" in text(result)


@pytest.mark.parametrize("mode", MODES)
async def test_odd_but_valid_json_values_round_trip_through_the_store(state_url: str, mode: str) -> None:
    app = hostile_app(state_url)
    with anyio.fail_after(LIMIT):
        async with sessions(app, mode, 1) as (session,):
            for kind in ODD_JSON:
                await session.ok("put_odd", key=kind, kind=kind)
            sid = await session.storage_id()
            record = await stored(app, sid)
            assert record is not None
            for kind, (_, expected) in ODD_JSON.items():
                assert record[1][kind] == expected and repr(record[1][kind]) == repr(expected), kind
                assert (await session.ok("check_odd", key=kind, kind=kind))["same"], kind
        if mode != "legacy" and not state_url.startswith("memory"):
            async with Client(hostile_app(state_url)) as client:
                again = Session(client, session.handle)
                for kind in ODD_JSON:
                    assert (await again.ok("check_odd", key=kind, kind=kind))["same"], kind


# -- handles -----------------------------------------------------------------------------------------
def _altered(handle: str, at: int) -> str:
    return handle[:at] + ("A" if handle[at] != "A" else "B") + handle[at + 1 :]


def _bad_handles(real: str) -> list[Any]:
    return [
        secrets.token_urlsafe(32),  # forged, the right shape
        secrets.token_urlsafe(16),  # forged, shorter but still a valid shape
        "A" * len(real),
        "_" * len(real),  # LIKE wildcards only, the right shape
        "-" * 22,
        real[:-1],  # truncated
        real[:22],  # truncated to the shortest valid shape
        real[:21],  # truncated below it
        real + "A",  # extended
        real + real,
        _altered(real, 0),
        _altered(real, len(real) // 2),
        _altered(real, len(real) - 1),
        real.swapcase(),
        real + "=",  # base64 padding
        " " + real,
        real + "\n",
        real + "\x00",
        "h:" + real,  # the storage prefix
        "conn:" + real,
        "http:" + real,
        "user:alice",
        "global",
        real + "%",
        real[:-1] + "*",
        "'; DROP TABLE concierge_sessions;--",
        "\u202e" + real,
        "é" * 43,
        "x" * 10_000,
        123,
        12.5,
        True,
        ["x"],
        {"session_id": real},
    ]


async def test_forged_truncated_altered_and_hostile_handles_are_refused_and_reveal_nothing(state_url: str) -> None:
    app = hostile_app(state_url)
    secret = "s3cr3t-value-of-the-real-session"
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            real = await open_session(client, "2026-07-28")
            await real.ok("put", key="secret", value=secret)
            sid = await real.storage_id()
            before = await stored(app, sid)
            for bad in _bad_handles(real.token):
                shaped = isinstance(bad, str) and HANDLE_SHAPE.fullmatch(bad) is not None
                for tool, args in (("get", {"key": "secret"}), ("put", {"key": "secret", "value": ["pwned"]})):
                    result = await client.call_tool(tool, {**args, "session_id": bad})
                    message = text(result)
                    assert result.is_error, f"handle {bad!r} was accepted: {message}"
                    if shaped:  # a handle's shape, naming no session of this caller
                        assert message.startswith("unknown session_id ") and "start_session" in message, message
                        assert status_of(result) == "unknown", (bad, result.meta)
                    else:
                        assert "is not a session handle" in message, (bad, message)
                        assert status_of(result) == "malformed", (bad, result.meta)
                    assert 'session_id="new"' in message or '"new" to start a new session' in message, message
                    assert secret not in message
                    assert not has_handle(result), f"handle {bad!r} was answered with a handle"
                    assert "\u202e" not in message and "\x00" not in message, "the error echoes control characters"
                    assert len(message) < 1000
                if isinstance(bad, str) and HANDLE_SHAPE.fullmatch(bad):
                    assert await stored(app, "h:" + bad) is None, "a refused handle created a session"
            assert await stored(app, sid) == before
            assert await real.ok("get", key="secret") == {"found": True, "value": secret}


async def test_resources_and_prompts_refuse_hostile_handles_in_meta(state_url: str) -> None:
    app = hostile_app(state_url)

    @app.resource("secret://value")
    def secret_resource() -> str:
        return json.dumps(app.get_state("secret"))

    @app.prompt()
    def secret_prompt() -> str:
        return f"the secret is {app.get_state('secret')}"

    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            real = await open_session(client, "2026-07-28")
            await real.ok("put", key="secret", value="hidden")
            for bad in _bad_handles(real.token)[:12] + ["x" * 10_000, "\x00", 42]:
                shaped = isinstance(bad, str) and HANDLE_SHAPE.fullmatch(bad) is not None
                refusal = "unknown session_id " if shaped else "is not a session handle"
                with pytest.raises(MCPError) as caught:
                    await client.read_resource("secret://value", meta={HANDLE_KEY: bad}, cache_mode="bypass")
                assert refusal in str(caught.value) and "hidden" not in str(caught.value), str(caught.value)
                with pytest.raises(MCPError) as caught:
                    await client.get_prompt("secret_prompt", meta={HANDLE_KEY: bad})
                assert refusal in str(caught.value) and "hidden" not in str(caught.value), str(caught.value)
            read = await client.read_resource("secret://value", meta={HANDLE_KEY: real.handle}, cache_mode="bypass")
            assert json.loads(read.contents[0].text) == "hidden"


async def test_an_empty_or_null_session_id_is_refused_as_missing_and_never_reaches_another() -> None:
    # "" and null count as omitted: the argument is required, so the call is refused and starts nothing.
    app = hostile_app("memory://")
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            real = await open_session(client, "2026-07-28")
            await real.ok("put", key="secret", value="hidden")
            for empty in ("", None):
                for tool, args in (("get", {"key": "secret"}), ("put", {"key": "secret", "value": ["pwned"]})):
                    result = await client.call_tool(tool, {**args, "session_id": empty})
                    assert result.is_error, text(result)
                    assert status_of(result) == "missing"
                    assert "needs the argument session_id" in text(result) and "hidden" not in text(result)
                    assert not has_handle(result)
            assert await stored_sessions(app) == [await real.storage_id()]
            assert await real.ok("get", key="secret") == {"found": True, "value": "hidden"}


async def test_with_optional_handles_an_empty_or_null_session_id_starts_a_new_session_and_never_reaches_another() -> (
    None
):
    # With handles="optional" the schema says "Omit it to start a new session"; "" and null count as omitted.
    app = hostile_app("memory://", handles="optional")
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            real = await open_session(client, "2026-07-28")
            await real.ok("put", key="secret", value="hidden")
            for empty in ("", None):
                result = await client.call_tool("get", {"key": "secret", "session_id": empty})
                assert payload(result) == {"found": False, "value": None}
                assert handle_of(result) != real.handle
                assert status_of(result) == "issued"


async def test_an_expired_handle_is_refused_as_expired_and_never_revived(state_url: str) -> None:
    now = [1_000_000.0]
    app = hostile_app(state_url, session_ttl=600, clock=lambda: now[0])
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            old = await open_session(client, "2026-07-28")
            await old.ok("put", key="secret", value="old data")
            now[0] += 601
            for _ in range(2):  # the first refusal must not bring it back for the second
                for tool, args in (("get", {"key": "secret"}), ("put", {"key": "secret", "value": "new"})):
                    message = await old.refused(tool, status="expired", **args)
                    assert message.startswith(f"session_id {old.token!r} has expired: ")
                    assert "10m" in message and "start_session" in message and "old data" not in message
            # nor does an altered copy of it reach anything, and it is not told apart from any unknown handle
            message = await Session(client, _altered(old.token, 5)).refused("get", status="unknown", key="secret")
            assert message.startswith("unknown session_id ") and "old data" not in message
            fresh = await open_session(client, "2026-07-28")
            assert await fresh.ok("get", key="secret") == {"found": False, "value": None}
            assert await app.sweep_expired() == 1
            # swept, it is still refused as expired (the handle's signed issue time says so), never revived
            message = await old.refused("get", status="expired", key="secret")
            assert message.startswith(f"session_id {old.token!r} has expired: ") and "old data" not in message


# -- another principal's handle ----------------------------------------------------------------------
def _user(name: str) -> AuthenticatedUser:
    token = AccessToken(
        token=f"token-{name}",
        client_id="test-client",
        scopes=["user"],
        subject=name,
        claims={"iss": "https://auth.test"},
    )
    return AuthenticatedUser(token)


@contextmanager
def as_principal(name: str | None) -> Iterator[None]:
    """Make the calls made inside carry `name`'s access token, as the SDK's auth middleware does over HTTP.

    In process, the server handles a request in the context the client sent it from.
    """
    token = auth_context_var.set(_user(name) if name is not None else None)
    try:
        yield
    finally:
        auth_context_var.reset(token)


async def test_another_principals_handle_is_unknown_in_process_even_once_expired(state_url: str) -> None:
    now = [1_000_000.0]
    app = hostile_app(state_url, session_ttl=600, clock=lambda: now[0])
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            with as_principal("alice"):
                alice = await open_session(client, "2026-07-28")
                await alice.ok("put", key="secret", value="alice's")
                assert (await alice.storage_id()).startswith("h:")
            for intruder in ("mallory", None):  # another principal, and an unauthenticated caller
                with as_principal(intruder):
                    for tool, args in (("get", {"key": "secret"}), ("put", {"key": "secret", "value": "x"})):
                        message = await alice.refused(tool, status="unknown", **args)
                        assert message.startswith(f"unknown session_id {alice.token!r}: no such session exists for you")
                        assert "alice's" not in message
                    mine = await open_session(client, "2026-07-28")
                    assert await mine.ok("get", key="secret") == {"found": False, "value": None}
            with as_principal("alice"):
                assert await alice.ok("get", key="secret") == {"found": True, "value": "alice's"}
            now[0] += 601
            with as_principal("mallory"):  # an expired session of someone else is not even said to have expired
                message = await alice.refused("get", status="unknown", key="secret")
                assert message.startswith("unknown session_id ") and "has expired" not in message
            with as_principal("alice"):
                assert "has expired" in await alice.refused("get", status="expired", key="secret")


@pytest.fixture(scope="module")
def auth_server() -> Iterator[ServerProcess]:
    proc = helpers.auth_server()
    with helpers.running(proc):
        yield proc


async def test_another_principals_handle_is_unknown_over_http(auth_server: ServerProcess) -> None:
    def as_user(name: str) -> Client:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer token-{name}"})
        return Client(streamable_http_client(auth_server.url, http_client=http))

    with anyio.fail_after(LIMIT):
        async with as_user("erin") as erin, as_user("mallory") as mallory:
            handle = handle_of(await erin.call_tool("note", {"text": "erin's secret", **NEW}))
            for bad in (handle, _altered(handle, 0), handle[:-1], "h:" + handle, secrets.token_urlsafe(32)):
                stolen = await mallory.call_tool("note", {"text": "mallory was here", "session_id": bad})
                if bad.startswith("h:"):  # the storage prefix is no part of a handle
                    assert stolen.is_error and "is not a session handle" in text(stolen), text(stolen)
                    assert status_of(stolen) == "malformed"
                else:
                    assert stolen.is_error and text(stolen).startswith(f"unknown session_id {bad!r}"), text(stolen)
                    assert status_of(stolen) == "unknown"
                assert "erin's secret" not in text(stolen)
            kept = payload(await erin.call_tool("note", {"text": "still mine", "session_id": handle}))
            assert kept["notes"] == ["erin's secret", "still mine"]


# -- state URLs --------------------------------------------------------------------------------------
PASSWORD = "hunter2-S3cret"

# (URL, the password in it or None)
BAD_URLS: list[tuple[str, str | None]] = [
    ("ftp://example.com/state", None),
    ("mysql://app:hunter2-S3cret@db:3306/shop", PASSWORD),
    ("http://[::1", None),
    ("not a url", None),
    ("memory", None),  # a scheme without "://" is no scheme
    ("://", None),
    ("\x00", None),
    ("sqlite:", None),
    ("sqlite://", None),  # no path
    ("sqlite:///", None),  # a path that names no file
    ("sqlite://relative.db", None),  # a host, not a path
    ("sqlite://app:hunter2-S3cret@host/state.db", PASSWORD),
    ("sqlite:///state.db?password=hunter2-S3cret", PASSWORD),
    ("sqlite:///state.db?synchronous=full&password=hunter2-S3cret", PASSWORD),
    ("sqlite:///state.db?synchronous=sometimes", None),
    ("postgresql://app:hunter2-S3cret@db:notaport/shop", PASSWORD),
    ("postgresql://app:hunter2-S3cret@db:99999/shop", PASSWORD),
    ("postgresql://app:hunter2-S3cret@db:-1/shop", PASSWORD),
    ("postgres://app:hunter2-S3cret@[::1/shop", PASSWORD),
    ("postgresql://db:bad/shop?password=hunter2-S3cret", PASSWORD),
    ("postgresql://app:hunter2%2DS3cret@db:bad/shop", PASSWORD),  # percent-encoded in the URL
    # special characters written without percent-encoding: the URL cannot be parsed as meant
    ("postgresql://app:hunter2#S3cret@db:5432/shop", "hunter2#S3cret"),
    ("postgresql://app:hunter2/S3cret@db:5432/shop", "hunter2/S3cret"),
    ("postgresql://app:hunter2?S3cret@db:5432/shop", "hunter2?S3cret"),
    # ... even where the part before the '/' happens to parse as a port (the host would be "app")
    ("postgresql://app:1234/hunter2-S3cret@db:5432/shop", "1234/hunter2-S3cret"),
    ("postgres://app:5432/hunter2-S3cret@db/shop", "5432/hunter2-S3cret"),
    ("redis://host:notaport", None),
    ("redis://:hunter2-S3cret@host:notaport/0", PASSWORD),
    ("redis://user:hunter2-S3cret@host:6379/db-zero", PASSWORD),
    ("rediss://:hunter2#S3cret@host:6379/0", "hunter2#S3cret"),
]

SUPPORTED_FORMS = ("memory://", "sqlite:///", "postgresql://", "redis://")


def _assert_clear_and_secret_free(exc: BaseException, password: str | None) -> None:
    message = str(exc)
    assert any(form in message for form in SUPPORTED_FORMS), f"the message names no supported form: {message}"
    if password is not None:
        shown = "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.args)
        for piece in _pieces(password):
            assert piece not in shown, f"(a piece of) the password leaked: {message}"


def _pieces(password: str) -> list[str]:
    """The password, and each run of 4+ letters and digits in it: none may be shown."""
    return [password, *(p for p in re.split(r"[^A-Za-z0-9]", password) if len(p) >= 4)]


@pytest.mark.parametrize(("url", "password"), BAD_URLS)
def test_a_malformed_state_url_is_a_clear_configuration_error_that_never_shows_the_password(
    url: str, password: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError) as caught:
        backend_from_url(url)
    _assert_clear_and_secret_free(caught.value, password)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ConfigurationError) as caught:
        Concierge("x", state_url=url)
    _assert_clear_and_secret_free(caught.value, password)
    if "\x00" not in url:  # an environment variable cannot hold NUL
        monkeypatch.setenv("CONCIERGE_STATE_URL", url)
        with pytest.raises(ConfigurationError) as caught:
            Concierge("x")
        _assert_clear_and_secret_free(caught.value, password)
    assert list(tmp_path.iterdir()) == [], "a refused URL created a file"


@pytest.mark.parametrize(("url", "password"), [u for u in BAD_URLS if u[1] is not None])
def test_the_sessions_cli_refuses_a_malformed_url_with_exit_2_and_no_password(
    url: str, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sessions_cli(["--url", url, "list"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("concierge sessions: error:") and err.count("\n") == 1
    for piece in _pieces(password):
        assert piece not in out + err, f"(a piece of) the password leaked: {err}"


@pytest.mark.parametrize("url", [None, "", "   ", "\t\n", "memory://", "MEMORY://"])
def test_unset_empty_or_memory_state_url_is_the_memory_store(url: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    # README: "unset, empty or memory://" -> in this process
    assert isinstance(backend_from_url(url), MemoryBackend)
    monkeypatch.delenv("CONCIERGE_STATE_URL", raising=False)
    if url is not None:
        monkeypatch.setenv("CONCIERGE_STATE_URL", url)
    assert isinstance(Concierge("x").state_backend, MemoryBackend)


# -- property: many sessions, random concurrent interleavings, one dict model each --------------------
# Few keys, so that operations on one key meet often; look-alikes among them.
MODEL_KEYS = st.sampled_from(["é", "e\u0301", "%", "_", "'; DROP TABLE concierge_values;--"])
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
SESSIONS = 3
OPERATIONS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=SESSIONS - 1),
        st.sampled_from(["get", "set", "set", "delete", "fail", "dump", "stored"]),
        MODEL_KEYS,
        JSON_VALUES,
    ),
    min_size=20,
    max_size=60,
)


@pytest.fixture(params=["memory", "sqlite"])
def model_state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'model.db'}"


@pytest.mark.parametrize("mode", MODES)
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: every try makes dozens of real calls
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(operations=OPERATIONS)
async def test_random_concurrent_interleavings_match_a_dict_model_per_session(
    model_state_url: str, mode: str, operations: list[tuple[int, str, str, Any]]
) -> None:
    app = hostile_app(model_state_url)
    programs: list[list[tuple[str, str, Any]]] = [[] for _ in range(SESSIONS)]
    for who, op, key, value in operations:
        programs[who].append((op, key, value))
    models: list[dict[str, Any]] = [{} for _ in range(SESSIONS)]

    async def run(session: Session, sid: str, program: list[tuple[str, str, Any]], model: dict[str, Any]) -> None:
        for op, key, value in program:
            if op == "get":
                expected = {"found": key in model, "value": model.get(key)}
                assert await session.ok("get", key=key) == expected, (op, key)
            elif op == "set":
                await session.ok("put", key=key, value=value)
                model[key] = value
            elif op == "delete":
                await session.ok("drop", key=key)
                model.pop(key, None)
            elif op == "fail":  # writes, then raises: nothing of it may land
                await session.refused("fail_after", key=key, value=value)
            elif op == "dump":
                assert await session.items() == model
            else:  # what the store holds, past this process's cache of the session
                record = await stored(app, sid)
                assert (record[1] if record is not None else {}) == model
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(LIMIT):
        async with sessions(app, mode, SESSIONS) as opened:
            sids = [await session.storage_id() for session in opened]
            async with anyio.create_task_group() as tg:
                for session, sid, program, model in zip(opened, sids, programs, models):
                    tg.start_soon(run, session, sid, program, model)
            for session, sid, model in zip(opened, sids, models):
                assert await session.items() == model
                record = await stored(app, sid)
                assert (record[1] if record is not None else {}) == model


@pytest.mark.parametrize("mode", MODES)
async def test_concurrent_read_modify_write_on_hostile_keys_loses_no_update(state_url: str, mode: str) -> None:
    keys = ["%", "_", "e\u0301", "é", "*", "\u212a"]
    app = hostile_app(state_url)
    with anyio.fail_after(LIMIT):
        async with sessions(app, mode, 2) as opened:

            async def bump(session: Session, key: str) -> None:
                await session.ok("incr", key=key)

            async with anyio.create_task_group() as tg:
                for session in opened:
                    for key in keys:
                        for _ in range(5):
                            tg.start_soon(bump, session, key)
            for session in opened:
                assert await session.items() == {key: 5 for key in keys}


def test_errors_are_the_documented_types() -> None:
    assert issubclass(StateKeyError, ValueError)
    assert issubclass(StateValueError, ValueError)
    assert issubclass(StateTypeError, TypeError)
    assert issubclass(ConfigurationError, ValueError)
