"""History and revert end to end: `Concierge(keep_checkpoints=N)` through the SDK's in-process client, on every backend.

Each test drives tools with `Client(app)` (the 2026-07-28 wire: sessions are
handles, storage id `h:<handle>`), then reads `app.checkpoints` and calls
`app.revert`. The `sessions history` / `sessions revert` commands are run as
real `python -m concierge` subprocesses on a SQLite store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from helpers import NEW, handle_of, payload
from mcp import Client

from concierge import DELETED, Checkpoint, Concierge, ConfigurationError, HistoryError, MemoryBackend
from concierge.errors import UnknownSessionError
from concierge.state import StateBackend, backend_from_url

pytestmark = pytest.mark.anyio

LIMIT = 30  # seconds any one test may take
REPO = Path(__file__).resolve().parents[1]


def make_app(state_url: str, keep: int = 10) -> Concierge:
    if not backend_from_url(state_url).supports_checkpoints:
        pytest.skip(f"{state_url.partition(':')[0]} stores do not record checkpoints")
    app = Concierge("history", state_url=state_url, session_ttl=None, keep_checkpoints=keep)
    app.stages = {"browse": ["add", "note", "forget", "view", "fail", "slow_add", "visit"], "cart": ["add", "view"]}

    @app.tool()
    def add(item: str) -> dict:
        cart = app.get_state("cart", [])
        cart.append(item)
        app.set_state("cart", cart)
        return {"cart": cart}

    @app.tool()
    def note(text: str | None) -> dict:
        app.set_state("note", text)
        return {"note": text}

    @app.tool()
    def forget() -> dict:
        app.delete_state("note")
        return {"forgot": True}

    @app.tool()
    def view() -> dict:
        return {"cart": app.get_state("cart", []), "note": app.get_state("note", "<absent>")}

    @app.tool()
    def fail(item: str) -> dict:
        app.set_state("cart", [item])
        raise ValueError("boom")

    @app.tool()
    async def slow_add(item: str, delay: float) -> dict:
        cart = app.get_state("cart", [])
        await anyio.sleep(delay)
        cart.append(item)
        app.set_state("cart", cart)
        return {"cart": cart}

    @app.tool()
    def visit() -> dict:
        visits = app.get_state("visits", 0, scope="user") + 1
        app.set_state("visits", visits, scope="user")
        app.set_state("seen", True)
        return {"visits": visits}

    return app


class Session:
    """One handle-carrying session of `app`, driven through `client`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.handle: str | None = None

    async def call(self, tool: str, **arguments: object):
        arguments["session_id"] = self.handle if self.handle is not None else "new"
        result = await self.client.call_tool(tool, arguments)
        if self.handle is None:
            self.handle = handle_of(result)
        return result

    async def ok(self, tool: str, **arguments: object) -> dict:
        return payload(await self.call(tool, **arguments))

    @property
    def id(self) -> str:
        assert self.handle is not None
        return "h:" + self.handle


def _summary(checkpoints: list[Checkpoint]) -> list[tuple[int, str | None]]:
    return [(c.version, c.tool) for c in checkpoints]


# -- what is recorded ---------------------------------------------------------------------------
async def test_each_committing_call_records_one_checkpoint_with_its_tool_and_changes(state_url: str) -> None:
    app = make_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            await s.ok("add", item="apple")
            await s.ok("note", text="gift")
            await s.ok("note", text=None)  # a stored JSON null, not a deletion
            await s.ok("forget")
            await s.ok("add", item="pear")
            kept = await app.checkpoints(s.id)
    assert _summary(kept) == [(1, "add"), (2, "note"), (3, "note"), (4, "forget"), (5, "add")]
    assert [c.changes for c in kept] == [
        {"cart": ["apple"]},
        {"note": "gift"},
        {"note": None},
        {"note": DELETED},
        {"cart": ["apple", "pear"]},
    ]
    assert all(not c.stage_changed for c in kept)
    assert [c.at for c in kept] == sorted(c.at for c in kept)
    assert await app.checkpoints(s.handle) == kept  # a bare handle names its session too


async def test_failed_refused_and_read_only_calls_record_nothing(state_url: str) -> None:
    app = make_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            await s.ok("add", item="apple")
            assert (await s.call("fail", item="x")).is_error  # raised after set_state: nothing is kept
            assert await s.ok("view") == {"cart": ["apple"], "note": "<absent>"}
            await s.ok("proceed_to_next_stage", target_stage="cart")
            assert (await s.call("note", text="refused")).is_error  # not in stage "cart"
            await s.ok("view")
            kept = await app.checkpoints(s.id)
    assert _summary(kept) == [(1, "add"), (2, "proceed_to_next_stage")]
    assert (kept[1].changes, kept[1].stage_changed, kept[1].stage) == ({}, True, "cart")


async def test_a_call_writing_shared_scopes_records_a_checkpoint_in_each_bucket(state_url: str) -> None:
    app = make_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            await s.ok("visit")
            await s.ok("visit")
            (bucket,) = await app.state_backend.list_sessions(now=time.time(), prefix="user:")
            user_id = bucket.session_id
            assert _summary(await app.checkpoints(user_id)) == [(1, "visit"), (2, "visit")]
            assert [c.changes for c in await app.checkpoints(user_id)] == [{"visits": 1}, {"visits": 2}]
            session = await app.checkpoints(s.id)
            assert [(c.version, c.changes) for c in session] == [(1, {"seen": True}), (2, {})]  # same value again
            done = await app.revert(user_id, 1)
            assert (done.state, done.version) == ({"visits": 1}, 3)
            assert await s.ok("visit") == {"visits": 2}


# -- revert ---------------------------------------------------------------------------------------
async def test_revert_restores_state_and_stage_and_is_recorded(state_url: str) -> None:
    app = make_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            await s.ok("add", item="apple")  # 1
            await s.ok("note", text="gift")  # 2
            await s.ok("proceed_to_next_stage", target_stage="cart")  # 3
            await s.ok("add", item="pear")  # 4
            done = await app.revert(s.id, 2)
            assert (done.session_id, done.reverted_to, done.version) == (s.id, 2, 5)
            assert (done.state, done.stage) == ({"cart": ["apple"], "note": "gift"}, None)
            assert await s.ok("view") == {"cart": ["apple"], "note": "gift"}
            assert (await s.ok("note", text="allowed again"))["note"] == "allowed again"  # back in "browse"
            kept = await app.checkpoints(s.id)
            assert _summary(kept)[-2:] == [(5, "revert"), (6, "note")]
            assert (kept[-2].changes, kept[-2].stage_changed, kept[-2].stage) == ({"cart": ["apple"]}, True, None)
            to_start = await app.revert(s.handle, 0)  # before the first call: an empty session
            assert (to_start.state, to_start.stage, to_start.version) == ({}, None, 7)
            assert await s.ok("view") == {"cart": [], "note": "<absent>"}


async def test_terminate_session_is_recorded_key_by_key_and_can_be_undone(state_url: str) -> None:
    app = make_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            await s.ok("add", item="apple")  # 1
            await s.ok("note", text="gift")  # 2
            await s.ok("proceed_to_next_stage", target_stage="cart")  # 3
            await s.ok("terminate_session")  # 4
            cleared = (await app.checkpoints(s.id))[-1]
            assert (cleared.version, cleared.tool) == (4, "terminate_session")
            assert (cleared.changes, cleared.stage_changed, cleared.stage) == (
                {"cart": DELETED, "note": DELETED},
                True,
                None,
            )
            done = await app.revert(s.id, 3)
            assert (done.state, done.stage) == ({"cart": ["apple"], "note": "gift"}, "cart")
            assert await s.ok("view") == {"cart": ["apple"], "note": "gift"}


async def test_a_revert_can_itself_be_reverted(state_url: str) -> None:
    app = make_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            await s.ok("add", item="apple")  # 1
            await s.ok("proceed_to_next_stage", target_stage="cart")  # 2
            await s.ok("add", item="pear")  # 3
            await app.revert(s.id, 1)  # 4
            assert await s.ok("view") == {"cart": ["apple"], "note": "<absent>"}
            undone = await app.revert(s.id, 3)  # 5: undo the revert
            assert (undone.state, undone.stage) == ({"cart": ["apple", "pear"]}, "cart")
            assert await s.ok("view") == {"cart": ["apple", "pear"], "note": "<absent>"}
            assert (await s.call("note", text="x")).is_error  # in "cart" again
            same = await app.revert(s.id, 5)  # to the current version: changes nothing, still recorded
            assert (same.version, same.state) == (6, {"cart": ["apple", "pear"]})
            assert _summary(await app.checkpoints(s.id))[-3:] == [(4, "revert"), (5, "revert"), (6, "revert")]


async def test_history_keeps_the_last_n_and_revert_names_the_oldest_restorable_version(state_url: str) -> None:
    app = make_app(state_url, keep=3)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            for i in range(6):
                await s.ok("add", item=f"i{i}")
            assert [c.version for c in await app.checkpoints(s.id)] == [4, 5, 6]
            with pytest.raises(HistoryError, match="oldest version it can be reverted to is 3"):
                await app.revert(s.id, 2)
            with pytest.raises(HistoryError, match="is at version 6; cannot revert to version 7"):
                await app.revert(s.id, 7)
            done = await app.revert(s.id, 3)
            assert done.state == {"cart": ["i0", "i1", "i2"]}
            assert [c.version for c in await app.checkpoints(s.id)] == [5, 6, 7]


async def test_revert_waits_for_a_call_running_on_the_session(state_url: str) -> None:
    app = make_app(state_url)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            await s.ok("add", item="apple")  # 1
            results = []

            async def slow() -> None:
                results.append(await s.call("slow_add", item="pear", delay=0.3))

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await anyio.sleep(0.1)  # the call holds the session now
                done = await app.revert(s.id, 1)
            assert not results[0].is_error  # it committed first (version 2); the revert came after it
            assert (done.version, done.state) == (3, {"cart": ["apple"]})
            assert _summary(await app.checkpoints(s.id)) == [(1, "add"), (2, "slow_add"), (3, "revert")]


async def test_unknown_sessions_and_history_off_are_clear_errors(state_url: str) -> None:
    app = make_app(state_url)
    with pytest.raises(UnknownSessionError, match="also tried 'h:nope'"):
        await app.checkpoints("nope")
    with pytest.raises(UnknownSessionError):
        await app.revert("h:nope", 0)
    off = Concierge("off", state_url=state_url, session_ttl=None)
    with pytest.raises(HistoryError, match=r"keep_checkpoints=N"):
        await off.checkpoints("h:whatever")
    with pytest.raises(HistoryError, match=r"keep_checkpoints=N"):
        await off.revert("h:whatever", 1)


async def test_history_needs_a_store_that_records_it() -> None:
    class Minimal(MemoryBackend):
        supports_checkpoints = False
        checkpoints = StateBackend.checkpoints

    with pytest.raises(ConfigurationError, match="Minimal does not"):
        Concierge("x", state=Minimal(), keep_checkpoints=3)
    Concierge("x", state=Minimal())  # checkpoints off: any store will do
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigurationError, match="keep_checkpoints must be"):
            Concierge("x", state=MemoryBackend(), keep_checkpoints=bad)  # type: ignore[arg-type]


async def test_the_old_names_history_option_and_method_still_work_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="keep_checkpoints"):
        app = Concierge("old", history=2)

    @app.tool()
    def add(item: str) -> list[str]:
        cart = app.get_state("cart", []) + [item]
        app.set_state("cart", cart)
        return cart

    async with Client(app) as client:
        handle = handle_of(await client.call_tool("add", {"item": "a", **NEW}))
        with pytest.warns(DeprecationWarning, match="checkpoints"):
            kept = await app.history(handle)
    assert [c.changes for c in kept] == [{"cart": ["a"]}]
    with pytest.raises(ConfigurationError, match="not also its old name"):
        Concierge("both", history=2, keep_checkpoints=2)


# -- the command line (a SQLite store, real subprocesses) ----------------------------------------------
def _cli(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCIERGE_")}
    return subprocess.run(
        [sys.executable, "-m", "concierge", "sessions", "--url", url, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )


def _error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith("concierge sessions: error: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


async def test_cli_history_and_revert(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    app = make_app(url, keep=5)
    with anyio.fail_after(LIMIT):
        async with Client(app) as client:
            s = Session(client)
            await s.ok("add", item="apple")  # 1
            await s.ok("note", text="gift")  # 2
            await s.ok("proceed_to_next_stage", target_stage="cart")  # 3
            await s.ok("add", item="pear")  # 4
    assert s.handle is not None

    table = await anyio.to_thread.run_sync(lambda: _cli(url, "history", s.handle, cwd=tmp_path))
    assert table.returncode == 0 and table.stderr == "", table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "AT", "TOOL", "CHANGED", "KEYS", "STAGE"]
    assert [line.split()[0] for line in lines[1:5]] == ["1", "2", "3", "4"]
    assert "proceed_to_next_stage" in lines[3] and lines[3].rstrip().endswith("cart")
    assert lines[-1] == f"{s.id}: oldest version it can be reverted to: 0"

    as_json = await anyio.to_thread.run_sync(lambda: _cli(url, "history", s.id, "--json", cwd=tmp_path))
    documents = json.loads(as_json.stdout)
    assert [(d["version"], d["tool"], d["changes"], d["deleted"]) for d in documents] == [
        (1, "add", {"cart": ["apple"]}, []),
        (2, "note", {"note": "gift"}, []),
        (3, "proceed_to_next_stage", {}, []),
        (4, "add", {"cart": ["apple", "pear"]}, []),
    ]
    assert (documents[2]["stage_changed"], documents[2]["stage"]) == (True, "cart")

    reverted = await anyio.to_thread.run_sync(lambda: _cli(url, "revert", s.handle, "1", cwd=tmp_path))
    assert reverted.returncode == 0, reverted.stderr
    assert reverted.stdout.startswith(f"reverted {s.id} to version 1 (now version 5)\nstage: -\n")
    assert json.loads(reverted.stdout.split("state:\n", 1)[1]) == {"cart": ["apple"]}

    # The server sees the reverted session, and the revert is in its history: every checkpoint kept, plus its own.
    kept = await app.checkpoints(s.id)
    assert _summary(kept) == [(1, "add"), (2, "note"), (3, "proceed_to_next_stage"), (4, "add"), (5, "revert")]
    assert (kept[-1].changes, kept[-1].stage_changed) == ({"cart": ["apple"], "note": DELETED}, True)
    async with Client(app) as client:
        again = Session(client)
        again.handle = s.handle
        assert await again.ok("view") == {"cart": ["apple"], "note": "<absent>"}
        await again.ok("note", text="back in browse")  # 6: the server prunes back to its 5
    assert [c.version for c in await app.checkpoints(s.id)] == [2, 3, 4, 5, 6]

    undo = await anyio.to_thread.run_sync(lambda: _cli(url, "--json", "revert", s.id, "4", "--keep", "2", cwd=tmp_path))
    assert json.loads(undo.stdout) == {
        "session_id": s.id,
        "reverted_to": 4,
        "version": 7,
        "stage": "cart",
        "state": {"cart": ["apple", "pear"], "note": "gift"},
    }
    assert [c.version for c in await app.checkpoints(s.id)] == [6, 7]

    too_old = await anyio.to_thread.run_sync(lambda: _cli(url, "revert", s.id, "1", cwd=tmp_path))
    assert "oldest version it can be reverted to is 5" in _error(too_old)
    unknown = await anyio.to_thread.run_sync(lambda: _cli(url, "history", "nope", cwd=tmp_path))
    assert "no session 'nope' in this store" in _error(unknown)
    unknown = await anyio.to_thread.run_sync(lambda: _cli(url, "revert", "nope", "1", cwd=tmp_path))
    assert "no session 'nope'" in _error(unknown)
