"""Multi-round requests on the 2026-07-28 wire: sealed so any replica serves the next round.

A tool that elicits answers its first round with `input_required` and a
`requestState` the SDK seals; the client's next round (its answers and that
state) may reach another replica. Replicas seal with the same keys: the
app's `request_state_keys`, else `CONCIERGE_REQUEST_STATE_KEYS`, else keys
derived from the store's secret; a memory store keeps the SDK's key of the
process. Real server processes on one PostgreSQL first, then the key sources in
process, then what a round that ends in `input_required` does to the state.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import NEW, SERVERS, ServerProcess, free_port, handle_of, payload, running
from mcp import Client
from mcp.server.mcpserver import Context
from mcp.server.request_state import RequestStateSecurity
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, ElicitRequest, ElicitRequestFormParams, ElicitResult, InputRequiredResult

from concierge import Concierge, ConfigurationError
from concierge.config import Settings
from concierge.handles import stored_keys
from concierge.request_state import ENV_REQUEST_STATE_KEYS, MIN_KEY_BYTES, derived
from concierge.state import backend_from_url
from concierge.work import SessionStore
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.anyio

CONFIRM_SERVER = SERVERS / "confirm_server.py"
LIMIT = 60
REFUSED = "Invalid or expired requestState"
KEY_A = "a" * 64
KEY_B = "b" * 64


def _server_module() -> Any:
    spec = importlib.util.spec_from_file_location("confirm_server", CONFIRM_SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _server_module().build
"""`build(name, keys=None, **options)`: the confirm server's app, for in-process clients."""


@pytest.fixture(autouse=True)
def no_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_REQUEST_STATE_KEYS, raising=False)


@pytest.fixture
def pg_url(postgres_server: str) -> str:
    """A fresh database on the test PostgreSQL server."""
    return fresh_postgres_database(postgres_server)


def confirm_server(state_url: str, *, keys: list[str] | None = None) -> ServerProcess:
    port = free_port()
    args = [str(CONFIRM_SERVER), str(port)] + (["--keys", ",".join(keys)] if keys else [])
    return ServerProcess(args, port=port, state_url=state_url)


# -- the two rounds, on whichever server each is sent to -----------------------------------
async def _accept(context: Any, params: Any) -> ElicitResult:
    """The client's elicitation handler: confirms."""
    return ElicitResult(action="accept", content={"ok": True})


async def start(where: Any) -> str:
    async with Client(where, elicitation_callback=_accept) as client:
        return handle_of(await client.call_tool("start_session", {}))


async def first_round(where: Any, handle: str, item: str = "tea") -> InputRequiredResult:
    async with Client(where, elicitation_callback=_accept) as client:
        assert client.protocol_version == "2026-07-28"
        first = await client.session.call_tool("order", {"item": item, "session_id": handle}, allow_input_required=True)
    assert isinstance(first, InputRequiredResult), first
    (request,) = first.input_requests.values()
    assert isinstance(request, ElicitRequest) and request.params.message == f"Order {item}?"
    assert first.request_state
    return first


async def second_round(where: Any, handle: str, first: InputRequiredResult, item: str = "tea") -> CallToolResult:
    """The client's answer (confirmed) with the state of `first`; raises the server's refusal as `MCPError`."""
    answers = {key: ElicitResult(action="accept", content={"ok": True}) for key in first.input_requests}
    async with Client(where, elicitation_callback=_accept) as client:
        try:
            result = await client.session.call_tool(
                "order",
                {"item": item, "session_id": handle},
                input_responses=answers,
                request_state=first.request_state,
                allow_input_required=True,
            )
        except MCPError as exc:
            refused = exc  # raised outside the client, which would wrap it in an exception group
        else:
            refused = None
    if refused is not None:
        raise refused
    assert isinstance(result, CallToolResult), result
    return result


async def orders(where: Any, handle: str) -> dict[str, Any]:
    async with Client(where, elicitation_callback=_accept) as client:
        return payload(await client.call_tool("view_orders", {"session_id": handle}))


# -- replicas: real server processes on one PostgreSQL ---------------------------------------
@pytest.mark.postgres
async def test_a_round_sent_to_another_replica_completes_there_with_keys_from_the_shared_store(pg_url: str) -> None:
    url = pg_url
    a, b = confirm_server(url), confirm_server(url)
    with running(a, b), anyio.fail_after(LIMIT):
        handle = await start(a.url)
        first = await first_round(a.url, handle)
        assert (await orders(a.url, handle))["orders"] == [], "a round that asks first writes nothing yet"
        done = payload(await second_round(b.url, handle, first))
        assert done == {"orders": ["tea"], "pid": b.pid}
        assert (await orders(a.url, handle))["orders"] == ["tea"]
        assert (await orders(b.url, handle))["orders"] == ["tea"]


@pytest.mark.postgres
async def test_a_replica_sealing_with_other_keys_refuses_the_round_and_one_holding_the_old_key_accepts_it(
    pg_url: str,
) -> None:
    url = pg_url
    a = confirm_server(url, keys=[KEY_A])
    b = confirm_server(url, keys=[KEY_B])
    rotated = confirm_server(url, keys=[KEY_B, KEY_A])  # the new key seals, the old one still unseals
    with running(a, b, rotated), anyio.fail_after(LIMIT):
        handle = await start(a.url)
        first = await first_round(a.url, handle)
        with pytest.raises(MCPError, match=REFUSED):
            await second_round(b.url, handle, first)
        assert (await orders(b.url, handle))["orders"] == [], "the handle is shared: only the sealed state is not"
        assert payload(await second_round(rotated.url, handle, first)) == {"orders": ["tea"], "pid": rotated.pid}
        again = await first_round(rotated.url, handle, "milk")
        with pytest.raises(MCPError, match=REFUSED):  # sealed with the new key, which `a` does not hold
            await second_round(a.url, handle, again, "milk")


# -- in process: where the keys come from ---------------------------------------------------
async def _handed_over(a: Concierge, b: Concierge) -> CallToolResult:
    """The first round on `a`, the second on `b` (which raises the SDK's refusal as `MCPError`)."""
    with anyio.fail_after(LIMIT):
        handle = await start(a)
        first = await first_round(a, handle)
        return await second_round(b, handle, first)


async def test_apps_on_one_sqlite_store_serve_each_others_rounds_with_keys_derived_from_its_secret(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    a, b = build("shop", state_url=url), build("shop", state_url=url)
    assert payload(await _handed_over(a, b))["orders"] == ["tea"]
    store = SessionStore(backend_from_url(url))
    async with store.opened():
        (handle_key,) = await stored_keys(store)
    (sealing,) = derived([handle_key])
    assert sealing == hmac.new(handle_key, b"concierge-request-state-v1", hashlib.sha256).digest()
    assert sealing != handle_key and len(sealing) >= MIN_KEY_BYTES


async def test_apps_given_handle_keys_derive_the_request_state_keys_from_them(tmp_path: Path) -> None:
    handle_keys = ["one handle key of sixteen bytes or more"]
    a = build("shop", state_url=f"sqlite:///{tmp_path / 'a.db'}", handle_keys=handle_keys)
    b = build("shop", state_url=f"sqlite:///{tmp_path / 'b.db'}", handle_keys=handle_keys)
    assert payload(await _handed_over(a, b))["orders"] == ["tea"]  # b's store: a signed handle, unwritten
    other = build("shop", state_url=f"sqlite:///{tmp_path / 'c.db'}", handle_keys=["another key, sixteen bytes+"])
    with pytest.raises(MCPError, match=REFUSED):
        await _handed_over(a, other)


async def test_apps_on_two_memory_stores_keep_the_sdk_key_of_each_process() -> None:
    with pytest.raises(MCPError, match=REFUSED):
        await _handed_over(build("shop"), build("shop"))


async def test_apps_given_the_same_keys_serve_each_others_rounds_on_memory_stores() -> None:
    a, b = build("shop", [KEY_A]), build("shop", [KEY_B, KEY_A])
    # a memory store: the handle is unknown on `b`, so the round is sealed right and the session is not
    result = await _handed_over(a, b)
    assert result.is_error and "unknown session_id" in result.content[0].text


async def test_the_option_wins_over_the_environment_which_wins_over_the_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_REQUEST_STATE_KEYS, f" {KEY_B} ,{KEY_A},")
    assert Settings.of(request_state_keys=KEY_A).request_state_keys == [KEY_A.encode()]
    assert Settings.of(request_state_keys=[KEY_A.encode(), KEY_B]).request_state_keys == [
        KEY_A.encode(),
        KEY_B.encode(),
    ]
    assert Settings.of().request_state_keys == [KEY_B.encode(), KEY_A.encode()]
    url = f"sqlite:///{tmp_path / 'state.db'}"
    from_env = build("shop", state_url=url)  # the environment's keys, not the store's
    monkeypatch.delenv(ENV_REQUEST_STATE_KEYS)
    assert Settings.of().request_state_keys == []
    with pytest.raises(MCPError, match=REFUSED):
        await _handed_over(from_env, build("shop", state_url=url))
    assert payload(await _handed_over(from_env, build("shop", [KEY_B], state_url=url)))["orders"] == ["tea"]


@pytest.mark.parametrize("where", ["option", "environment"])
async def test_a_key_shorter_than_the_sdk_minimum_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    short = "k" * (MIN_KEY_BYTES - 1)
    if where == "environment":
        monkeypatch.setenv(ENV_REQUEST_STATE_KEYS, f"{KEY_A},{short}")
    with pytest.raises(ConfigurationError, match=f"at least {MIN_KEY_BYTES} bytes.*{ENV_REQUEST_STATE_KEYS}"):
        Concierge("shop", request_state_keys=short if where == "option" else None)
    assert Settings.of(request_state_keys="k" * MIN_KEY_BYTES).request_state_keys  # the SDK accepts that length


async def test_a_repeated_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="duplicates"):
        Concierge("shop", request_state_keys=[KEY_A, KEY_A])


async def test_explicit_keys_need_a_named_app_and_an_unnamed_app_on_a_store_uses_the_store_keys(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigurationError, match="named server"):
        Concierge(request_state_keys=KEY_A)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    assert payload(await _handed_over(build(None, state_url=url), build(None, state_url=url)))["orders"] == ["tea"]


async def test_the_app_name_is_the_audience_so_another_service_sharing_the_keys_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    with pytest.raises(MCPError, match=REFUSED):
        await _handed_over(build("shop", state_url=url), build("travel", state_url=url))
    with pytest.raises(MCPError, match=REFUSED):
        await _handed_over(build(None, state_url=url), build("shop", state_url=url))


async def test_the_sdk_request_state_security_is_left_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_REQUEST_STATE_KEYS, "too-short")  # not read: the SDK policy is the user's choice
    url = f"sqlite:///{tmp_path / 'state.db'}"
    own = build("shop", state_url=url, request_state_security=RequestStateSecurity(keys=[KEY_A]))
    monkeypatch.delenv(ENV_REQUEST_STATE_KEYS)
    assert payload(await _handed_over(own, build("shop", [KEY_A], state_url=url)))["orders"] == ["tea"]
    with pytest.raises(MCPError, match=REFUSED):  # not the store's keys
        await _handed_over(own, build("shop", state_url=url))
    with pytest.raises(ConfigurationError, match="not both"):
        Concierge("shop", request_state_keys=KEY_A, request_state_security=RequestStateSecurity(keys=[KEY_A]))


# -- what a round that ends in input_required does to the state ---------------------------------
def asking_app() -> Concierge:
    """A tool that asks in its own code (returns `InputRequiredResult`), writing state in every round."""
    app = Concierge("asking", handles="optional")

    def ask(item: str) -> InputRequiredResult:
        question = ElicitRequestFormParams(
            message=f"Order {item}?", requested_schema={"type": "object", "properties": {"ok": {"type": "boolean"}}}
        )
        return InputRequiredResult(input_requests={"ok": ElicitRequest(params=question)}, request_state=item)

    @app.tool(scopes={"session"})
    def confirm(item: str, ctx: Context) -> dict | InputRequiredResult:
        rounds = app.get_state("rounds", 0) + 1
        app.set_state("rounds", rounds)
        if not ctx.input_responses:
            return ask(item)
        app.set_state("ordered", ctx.request_state)
        return {"rounds": rounds, "ordered": ctx.request_state}

    @app.prompt()
    def reorder(item: str, ctx: Context) -> str | InputRequiredResult:
        app.set_state("rounds", app.get_state("rounds", 0) + 1)
        if not ctx.input_responses:
            return ask(item)
        return f"Order {item} again"

    @app.tool(scopes={"session"})
    def show() -> dict:
        return {"rounds": app.get_state("rounds"), "ordered": app.get_state("ordered")}

    return app


async def test_what_a_round_ending_in_input_required_wrote_is_dropped_and_the_finished_round_commits() -> None:
    app = asking_app()
    with anyio.fail_after(LIMIT):
        async with Client(app, elicitation_callback=_accept) as client:
            handle = handle_of(await client.call_tool("start_session", {}))
            first = await client.session.call_tool(
                "confirm", {"item": "tea", "session_id": handle}, allow_input_required=True
            )
            assert isinstance(first, InputRequiredResult)
            assert "content" not in first.model_dump(by_alias=True), "an input_required round carries no note"
            assert payload(await client.call_tool("show", {"session_id": handle})) == {"rounds": None, "ordered": None}
            done = await client.call_tool("confirm", {"item": "tea", "session_id": handle})
            assert payload(done) == {"rounds": 1, "ordered": "tea"}, "the tool ran twice; one round counts"
            assert payload(await client.call_tool("show", {"session_id": handle})) == {"rounds": 1, "ordered": "tea"}


async def test_a_call_starting_a_session_that_asks_first_stores_one_session() -> None:
    app = asking_app()
    with anyio.fail_after(LIMIT):
        async with Client(app, elicitation_callback=_accept) as client:
            done = await client.call_tool("confirm", {"item": "tea", **NEW})
            assert payload(done) == {"rounds": 1, "ordered": "tea"}
            listed = await app.state_backend.list_sessions(now=0, include_expired=True, limit=100)
            assert [s.session_id for s in listed] == ["h:" + handle_of(done)]


async def test_a_prompt_round_ending_in_input_required_writes_nothing_and_the_finished_round_commits() -> None:
    app = asking_app()
    with anyio.fail_after(LIMIT):
        async with Client(app, elicitation_callback=_accept) as client:
            handle = handle_of(await client.call_tool("start_session", {}))
            meta = {"concierge/session_id": handle}
            first = await client.session.get_prompt("reorder", {"item": "tea"}, meta=meta, allow_input_required=True)
            assert isinstance(first, InputRequiredResult)
            assert payload(await client.call_tool("show", {"session_id": handle}))["rounds"] is None
            done = await client.get_prompt("reorder", {"item": "tea"}, meta=meta)
            assert done.messages[0].content.text == "Order tea again"
            assert payload(await client.call_tool("show", {"session_id": handle}))["rounds"] == 1
