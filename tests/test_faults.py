"""Faults under load, through real server subprocesses over streamable HTTP on 127.0.0.1.

The server is the cart server plus a tool that writes two keys in one call
(tests/servers/fault_server.py). Sessions of both wire eras take part: legacy
clients on stateful streamable HTTP (the `mcp-session-id` is the session) and
2026-07-28 clients with handles. Every item a call adds is unique, so the
stored state of a session can be checked call by call:

- every call that returned success is in it, and the cart each such call
  returned is a prefix of the final cart (nothing lost, nothing reordered);
- every item is whole and there once: no duplicates, no item nobody sent;
- the two keys of `add_pair` are both there or neither (the receipts list is
  exactly the cart's `add_pair` items, in order);
- the session's version grows by one per item (no version bump without its
  values, no values without their bump);
- a call that failed or was cut off may or may not be there, except where the
  failure is certain to have written nothing (a full disk, a read-only file).

The faults:

1. `kill -9` of the server while 200 concurrent calls are in flight (after
   about half have returned), then a restart on the same store - SQLite and
   PostgreSQL. The restarted process serves every session as stored: handle
   sessions by their handle, legacy ones by their `mcp-session-id`.
2. PostgreSQL stopped (as a crash would) for ~2 s under load and started
   again: the calls in between fail with a clear tool error, and the same
   server process recovers by itself. It uses a PostgreSQL server of its own,
   with `synchronous_commit` on, never the shared one.
3. SQLite: a read-only store (file or directory) at start-up; the store made
   read-only while the server runs; the disk full, then `kill -9` and a
   restart while it is still full. The last two need root:
   the immutable attribute (`chattr +i`) is the only way to make a file the
   server already holds open read-only, and the full disk is a size-limited
   tmpfs mounted for the test. Without root they skip, saying why; as root
   with `CI` set, a missing facility is a failure, not a skip.

The whole module takes about a minute. `CONCIERGE_SOAK=1` runs longer variants
(a few minutes): 1000 calls per kill and four kill/restart rounds, three
outages of 2, 5 and 0.5 s, and three spells of each SQLite fault.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import anyio
import httpx2
import pytest
from helpers import NEW, SERVERS, ServerProcess, free_port, handle_of, has_handle, payload, start_all, text
from mcp import Client
from mcp_types import CallToolResult

from concierge.state import backend_from_url
from concierge.state.base import SessionRecord
from tests.conftest import _ThrowawayPostgres, fresh_postgres_database, not_here

pytestmark = pytest.mark.anyio

FAULT_SERVER = SERVERS / "fault_server.py"
SOAK = os.environ.get("CONCIERGE_SOAK", "").strip() not in ("", "0")

KILL_ROUNDS = 4 if SOAK else 1
SESSIONS_PER_ERA = 4
CALLS_PER_SESSION = 125 if SOAK else 25  # x 8 sessions: 1000 (soak) or 200 concurrent calls
# Each add_pair of the kill test spends this long in the server, so when half the calls have
# returned the rest are still being served: without it a fast store can finish every call
# before the client has read half the answers, and the kill would find an idle server.
PAIR_DELAY = 0.02
OUTAGES = (2.0, 5.0, 0.5) if SOAK else (2.0,)
FAULT_CYCLES = 3 if SOAK else 1
LIMIT = 240 if SOAK else 60  # seconds any one test may take
SECRET = "s3cret-fault-pw"
HANDSHAKE_VERSION = "2025-11-25"
TRACEBACK_MARKS = ("Traceback", 'File "', "\n    at ", "site-packages")


# -- the server and its sessions ---------------------------------------------------------------


def fault_server(state_url: str, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess([str(FAULT_SERVER), "streamable-http", str(port)], port=port, state_url=state_url)


@dataclass
class Call:
    item: str
    tool: str
    started: float
    ended: float = math.inf  # still in flight
    status: str = "cut"  # "ok", "error" (a tool error result) or "cut" (no answer)
    message: str = ""
    cart: list[str] | None = None  # the cart the call returned
    pid: int | None = None


@dataclass
class Track:
    """One session and every call made in it."""

    tag: str
    era: str  # "legacy" or "modern"
    handle: str | None = None
    calls: list[Call] = field(default_factory=list)
    base: int | None = None  # stored version minus cart length once seeded: commits that add no item
    numbers: Iterator[int] = field(default_factory=itertools.count)

    @property
    def mode(self) -> str:
        return "legacy" if self.era == "legacy" else "auto"

    def of(self, status: str) -> list[Call]:
        return [c for c in self.calls if c.status == status]


def tracks_for(prefix: str, per_era: int) -> list[Track]:
    return [Track(f"{prefix}L{k}", "legacy") for k in range(per_era)] + [
        Track(f"{prefix}M{k}", "modern") for k in range(per_era)
    ]


async def issue(client: Client, track: Track, *, pad: int = 0, delay: float = 0.0) -> Call:
    """One call adding a new item: `add_to_cart` (one key) and `add_pair` (two keys, `pad`, `delay`) in turn."""
    n = next(track.numbers)
    tool = "add_pair" if n % 2 else "add_to_cart"
    arguments: dict[str, Any] = {"item": f"{track.tag}-{n}"}
    if tool == "add_pair" and pad:
        arguments["pad"] = pad
    if tool == "add_pair" and delay:
        arguments["delay"] = delay
    if track.era == "modern":  # the first call starts the session, the later ones pass its handle
        arguments["session_id"] = track.handle if track.handle is not None else "new"
    call = Call(arguments["item"], tool, time.monotonic())
    track.calls.append(call)
    try:
        result = await client.call_tool(tool, arguments)
    except Exception as exc:  # noqa: BLE001 - the connection broke: the call got no answer
        call.message = f"{type(exc).__name__}: {exc}"
    else:
        if result.is_error:
            call.status, call.message = "error", text(result)
        else:
            body = payload(result)
            call.status, call.cart, call.pid = "ok", body["cart"], body["pid"]
            if track.era == "modern" and track.handle is None:
                track.handle = handle_of(result)
    finally:
        call.ended = time.monotonic()
    return call


async def legacy_call(url: str, session_id: str, tool: str, arguments: dict[str, Any]) -> Any:
    """A handshake-era `tools/call` in the session `session_id`, sent as any client would; its payload."""
    headers = {
        "mcp-session-id": session_id,
        "mcp-protocol-version": HANDSHAKE_VERSION,
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    async with httpx2.AsyncClient(timeout=20) as http:
        response = await http.post(url, headers=headers, content=json.dumps(body))
    assert response.status_code == 200, f"{tool} in legacy session {session_id}: {response.status_code} {response.text}"
    if response.headers.get("content-type", "").startswith("application/json"):
        message = response.json()
    else:  # one server-sent event carries the response
        data = [line.removeprefix("data:").strip() for line in response.text.splitlines() if line.startswith("data:")]
        message = next(m for m in map(json.loads, data) if m.get("id") == 1)
    result = CallToolResult.model_validate(message["result"])
    return payload(result)


async def seed(client: Client, track: Track) -> None:
    """The session's first call (a modern one learns its handle from it)."""
    call = await issue(client, track)
    assert call.status == "ok", f"{track.tag}: the first call failed: {call.message}"


@asynccontextmanager
async def connected(server: ServerProcess, state_url: str, tracks: list[Track]) -> AsyncIterator[dict[str, Client]]:
    """One client per track, each seeded (see `note_bases`)."""
    async with AsyncExitStack() as stack:
        clients = {}
        for track in tracks:
            clients[track.tag] = await stack.enter_async_context(
                Client(server.url, mode=track.mode, read_timeout_seconds=20)
            )
            await seed(clients[track.tag], track)
        await note_bases(state_url, tracks)
        yield clients


# -- the stored state -----------------------------------------------------------------------------


async def stored_sessions(state_url: str) -> dict[str, SessionRecord]:
    """Every live session in the store, read directly (not through a server)."""
    backend = backend_from_url(state_url)
    await backend.open()
    try:
        records = {}
        for summary in await backend.list_sessions(now=time.time(), limit=10_000):
            record = await backend.load(summary.session_id, now=time.time())
            assert record is not None and record.values is not None
            records[summary.session_id] = record
        return records
    finally:
        await backend.close()


async def note_bases(state_url: str, tracks: list[Track], known: set[str] | None = None) -> None:
    """Remember, per seeded session, how many of its commits added no item (its creation may be one).

    From here on every commit adds exactly one item, so the stored version must
    stay `base + len(cart)`.
    """
    found = match_sessions(await stored_sessions(state_url), tracks, known or {t.tag for t in tracks})
    for track in tracks:
        track.base = found[track.tag].version - len(cart_of(found[track.tag]))
        assert track.base in (0, 1), f"{track.tag}: version {found[track.tag].version} after its first call"


def cart_of(record: SessionRecord) -> list[str]:
    assert record.values is not None
    return json.loads(record.values.get("cart", "[]"))


def receipts_of(record: SessionRecord) -> list[str]:
    assert record.values is not None
    return [r["item"] for r in json.loads(record.values.get("receipts", "[]"))]


def match_sessions(records: dict[str, SessionRecord], tracks: list[Track], known: set[str]) -> dict[str, SessionRecord]:
    """Each track's stored session, found by the tag its items carry.

    Sessions must never mix items of two tracks; a session of a track in `known`
    but not in `tracks` (an earlier round) is left out, and so are the `wire:`
    records that describe legacy sessions, the `caller:` records counting a
    caller's sessions and the `secrets` record holding the key that signs
    handles (they hold no state of a tool).
    """
    by_tag = {t.tag: t for t in tracks}
    found: dict[str, SessionRecord] = {}
    for sid, record in records.items():
        if sid.startswith(("wire:", "caller:")) or sid == "secrets":
            continue
        tags = {item.rsplit("-", 1)[0] for item in cart_of(record)}
        assert len(tags) == 1, f"session {sid} holds items of {sorted(tags) or 'no track'}: {cart_of(record)}"
        (tag,) = tags
        assert tag in known, f"session {sid} holds items of an unknown track {tag!r}"
        if tag not in by_tag:
            continue
        track = by_tag[tag]
        assert tag not in found, f"two stored sessions hold items of {tag}: {found[tag].session_id} and {sid}"
        if track.era == "modern":
            assert sid == f"h:{track.handle}", f"{tag}: items stored under {sid}, not its handle"
        else:
            assert sid.startswith("http:"), f"{tag}: a legacy session stored as {sid}"
        found[tag] = record
    missing = sorted(set(by_tag) - set(found))
    assert not missing, f"no stored session for {missing}"
    return found


def assert_whole(track: Track, record: SessionRecord, *, failures_wrote_nothing: bool = False) -> list[str]:
    """The checks of the module docstring, for one session; returns its cart."""
    where = f"session {track.tag} ({track.era}, {record.session_id})"
    cart, receipts = cart_of(record), receipts_of(record)
    calls = {c.item: c for c in track.calls}
    assert len(cart) == len(set(cart)), f"{where}: an item is in the cart twice: {cart}"
    strays = [item for item in cart if item not in calls]
    assert not strays, f"{where}: items no call sent: {strays}"
    pairs = [item for item in cart if calls[item].tool == "add_pair"]
    assert receipts == pairs, f"{where}: add_pair applied halfway: cart has {pairs}, receipts {receipts}"
    for call in track.calls:
        if call.status == "ok":
            assert call.item in cart, f"{where}: acknowledged {call.tool}({call.item}) is lost: {cart}"
            assert call.cart is not None and cart[: len(call.cart)] == call.cart, (
                f"{where}: {call.item} returned the cart {call.cart}, which does not start the final {cart}"
            )
        elif failures_wrote_nothing and call.status == "error":
            assert call.item not in cart, f"{where}: failed {call.tool}({call.item}) was written: {call.message}"
    assert track.base is not None and record.version == track.base + len(cart), (
        f"{where}: version {record.version} for {len(cart)} one-item commits (+{track.base} without an item)"
    )
    return cart


def sqlite_integrity(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()


def assert_clear(message: str, *, names: list[str], secret: str | None = None) -> None:
    """A tool error a person can act on: names the store, shows no traceback and no password."""
    for needle in names:
        assert needle in message, f"error does not mention {needle!r}: {message!r}"
    for mark in TRACEBACK_MARKS:
        assert mark not in message, f"error carries traceback text ({mark!r}): {message!r}"
    if secret is not None:
        assert secret not in message, f"error shows the password: {message!r}"


def whole_log(server: ServerProcess) -> str:
    """All the server has logged (`ServerProcess.log` keeps only the end)."""
    return Path(server._log.name).read_text(errors="replace")


def unavailable(reason: str) -> NoReturn:
    """Skip for `reason`; under CI (`CI` set) fail instead: CI must run these tests."""
    not_here(reason, in_ci=f"CI must run this test, but {reason}")


# -- 1. kill -9 under load -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return fresh_postgres_database(request.getfixturevalue("postgres_server"))


async def storm_and_kill(
    server: ServerProcess, state_url: str, tracks: list[Track], per_session: int, known: set[str]
) -> float:
    """Seed every session, fire `per_session` concurrent calls in each, SIGKILL the server once half returned.

    `known`: the tags of every track whose session may be in the store. Returns
    when the kill happened (monotonic clock).
    """
    kill_after = len(tracks) * per_session // 2
    acknowledged = 0
    killed_at: list[float] = []
    seeded = 0
    go = anyio.Event()

    async def one(client: Client, track: Track) -> None:
        nonlocal acknowledged
        call = await issue(client, track, delay=PAIR_DELAY)
        if call.status == "ok":
            acknowledged += 1
            if acknowledged == kill_after:
                server.kill()
                killed_at.append(time.monotonic())

    async def session(track: Track) -> None:
        nonlocal seeded
        try:
            async with Client(server.url, mode=track.mode, read_timeout_seconds=20) as client:
                await seed(client, track)
                seeded += 1
                if seeded == len(tracks):
                    await note_bases(state_url, tracks, known)
                    go.set()
                await go.wait()
                async with anyio.create_task_group() as tg:
                    for _ in range(per_session):
                        tg.start_soon(one, client, track)
        except Exception:  # the client breaking when its server dies; its calls record the rest
            if not killed_at:
                raise

    async with anyio.create_task_group() as tg:
        for track in tracks:
            tg.start_soon(session, track)
    assert killed_at, f"the server was never killed: {acknowledged} calls returned"
    return killed_at[0]


async def test_kill_9_under_load_keeps_every_acknowledged_call_whole(durable_url: str) -> None:
    server = fault_server(durable_url)
    start_all(server)
    servers = [server]
    known: set[str] = set()
    try:
        with anyio.fail_after(LIMIT):
            for round_ in range(KILL_ROUNDS):
                tracks = tracks_for(f"r{round_}", SESSIONS_PER_ERA)
                known |= {t.tag for t in tracks}
                killed_at = await storm_and_kill(server, durable_url, tracks, CALLS_PER_SESSION, known)
                storm = [c for t in tracks for c in t.calls[1:]]
                early = [c for c in storm if c.ended < killed_at and c.status != "ok"]
                assert not early, f"calls failed before the kill: {[(c.item, c.message) for c in early[:3]]}"
                assert {c.pid for t in tracks for c in t.of("ok")} == {server.pid}
                cut = [c for c in storm if c.status != "ok"]
                assert cut, "every call returned before the kill: nothing was in flight"
                assert not [c for c in storm if c.status == "error"], "a call got a tool error"

                restarted = fault_server(durable_url, port=server.port)
                start_all(restarted)
                servers.append(restarted)
                server = restarted
                found = match_sessions(await stored_sessions(durable_url), tracks, known)
                carts = {t.tag: assert_whole(t, found[t.tag]) for t in tracks}
                if durable_url.startswith("sqlite"):
                    sqlite_integrity(Path(durable_url.removeprefix("sqlite:///")))

                # The restarted server serves every session as stored and takes new calls in it: a
                # handle session through any client, a legacy one by its mcp-session-id (roaming).
                async with Client(server.url, read_timeout_seconds=20) as client:
                    for track in tracks:
                        if track.era == "modern":
                            view = payload(await client.call_tool("view_all", {"session_id": track.handle}))
                            call = await issue(client, track)
                            assert call.status == "ok", call.message
                            added = call.cart
                        else:
                            wire_id = found[track.tag].session_id.removeprefix("http:")
                            view = await legacy_call(server.url, wire_id, "view_all", {})
                            added = (
                                await legacy_call(server.url, wire_id, "add_to_cart", {"item": f"{track.tag}-after"})
                            )["cart"]
                        assert view["cart"] == carts[track.tag] and view["pid"] == server.pid
                        assert added == [*carts[track.tag], added[-1]]
                async with Client(server.url, mode="legacy", read_timeout_seconds=20) as client:
                    fresh = Track(f"r{round_}X", "legacy")
                    known.add(fresh.tag)
                    assert (await issue(client, fresh)).cart == [f"r{round_}X-0"]
    finally:
        for s in servers:
            s.close()


# -- 2. PostgreSQL stopped under load and started again ---------------------------------------------


class _StoppablePostgres(_ThrowawayPostgres):
    """A cluster of this test's own that commits synchronously, so a crash keeps every acknowledged commit."""

    def start(self) -> str:
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.resume()
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def resume(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.data} "
            "-c synchronous_commit=on -c fsync=off -c max_connections=100"
        )
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def halt(self) -> None:
        """Stop as a crash would: every backend gone at once, no checkpoint."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")


@pytest.fixture
def own_postgres() -> Iterator[_StoppablePostgres]:
    try:
        server = _StoppablePostgres()
    except FileNotFoundError as exc:
        unavailable(f"needs PostgreSQL server binaries to stop and start a server of its own: {exc}")
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        server.stop()
        unavailable(f"could not start a PostgreSQL server: {exc.stderr.decode(errors='replace')}")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.postgres
async def test_postgres_outage_under_load_fails_calls_clearly_and_the_same_process_recovers(
    own_postgres: _StoppablePostgres,
) -> None:
    port = own_postgres.port
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/postgres"  # trust auth ignores the password
    server = fault_server(url)
    start_all(server)
    tracks = tracks_for("", 2)
    lanes = 3  # concurrent callers per session
    outages: list[tuple[float, float]] = []
    refusals: list[CallToolResult] = []
    try:
        with anyio.fail_after(LIMIT):
            async with connected(server, url, tracks) as clients:
                stop = anyio.Event()

                async def lane(track: Track) -> None:
                    while not stop.is_set():
                        await issue(clients[track.tag], track)
                        await anyio.sleep(0.005)

                def ok_since(moment: float) -> int:
                    return min(sum(1 for c in t.of("ok") if c.started > moment) for t in tracks)

                async with anyio.create_task_group() as tg:
                    for track in tracks:
                        for _ in range(lanes):
                            tg.start_soon(lane, track)
                    for seconds in OUTAGES:
                        mark = time.monotonic()
                        while ok_since(mark) < 5:  # each session is busy and succeeding
                            await anyio.sleep(0.02)
                        down = time.monotonic()
                        await anyio.to_thread.run_sync(own_postgres.halt)
                        # A new session cannot be started now: refused, with no handle.
                        refusals.append(
                            await clients[tracks[-1].tag].call_tool("add_to_cart", {"item": "nobody", **NEW})
                        )
                        await anyio.sleep(seconds)
                        await anyio.to_thread.run_sync(own_postgres.resume)
                        up = time.monotonic()
                        outages.append((down, up))
                        while ok_since(up) < 5:  # ... and so again, without a restart
                            await anyio.sleep(0.02)
                    stop.set()

                assert server.proc is not None and server.proc.poll() is None, "the server process died"
                calls = [c for t in tracks for c in t.calls]
                assert {c.pid for c in calls if c.status == "ok"} == {server.pid}, "served by another process"
                cut = [c for c in calls if c.status == "cut"]
                assert not cut, f"calls got no answer: {[(c.item, c.message) for c in cut[:3]]}"
                for down, up in outages:
                    during = [c for c in calls if c.status == "error" and c.ended >= down and c.started <= up]
                    assert during, f"no call failed during the {up - down:.1f}s outage"
                for call in (c for c in calls if c.status == "error"):
                    assert_clear(call.message, names=["PostgreSQL", f"127.0.0.1:{port}", "unavailable"], secret=SECRET)
                    assert any(call.ended >= down and call.started <= up + 1.0 for down, up in outages), (
                        f"{call.item} failed away from any outage: {call.message}"
                    )
                for result in refusals:
                    assert result.is_error and not has_handle(result), "a session the store never saw got a handle"
                    assert_clear(text(result), names=["PostgreSQL", f"127.0.0.1:{port}", "unavailable"], secret=SECRET)
                # Recovered for good: after the first success past the last outage, every call succeeds.
                last_up = outages[-1][1]
                back = min(c.ended for c in calls if c.status == "ok" and c.started > last_up)
                late = [c for c in calls if c.started > back and c.status != "ok"]
                assert not late, f"calls failed after recovery: {[(c.item, c.message) for c in late[:3]]}"

                found = match_sessions(await stored_sessions(url), tracks, {t.tag for t in tracks})
                for track in tracks:
                    assert_whole(track, found[track.tag])
        assert SECRET not in whole_log(server), "the server logged the password"
    finally:
        server.close()


# -- 3. SQLite: read-only store, disk full ------------------------------------------------------------


def chmod_binds_this_process(directory: Path) -> bool:
    """Whether a mode without write permission stops this user (not so for root with CAP_DAC_OVERRIDE)."""
    probe = directory / ".mode-probe"
    probe.write_bytes(b"")
    probe.chmod(0o444)
    try:
        with open(probe, "ab"):
            return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o644)
        probe.unlink()


def immutable_unsupported(directory: Path) -> str | None:
    """Why the immutable attribute cannot be used on files in `directory`, or None when it can."""
    if os.geteuid() != 0:
        return "setting the immutable attribute needs root"
    if shutil.which("chattr") is None:
        return "chattr is not installed"
    probe = directory / ".immutable-probe"
    probe.write_bytes(b"")
    try:
        done = subprocess.run(["chattr", "+i", str(probe)], check=False, capture_output=True, text=True)
        if done.returncode:
            return f"the filesystem of {directory} refuses chattr +i: {done.stderr.strip()}"
        subprocess.run(["chattr", "-i", str(probe)], check=True, capture_output=True)
        return None
    finally:
        probe.unlink()


def set_immutable(paths: list[Path], on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], check=True, capture_output=True)


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def stop_gracefully(server: ServerProcess) -> None:
    """SIGTERM and wait: the server closes the store (SQLite checkpoints and removes its -wal and -shm)."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=20)


@contextmanager
def read_only(store: Path, what: str) -> Iterator[None]:
    """Make the store's file (with its -wal) or its directory read-only to a server started now."""
    wal = store.with_name(store.name + "-wal")
    targets = [store.parent] if what == "directory" else [store, *([wal] if wal.exists() else [])]
    if chmod_binds_this_process(store.parent):
        modes = {p: p.stat().st_mode & 0o777 for p in targets}
        for p in targets:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    reason = immutable_unsupported(store.parent)
    if reason:
        unavailable(f"file modes do not stop this user (root) and {reason}")
    set_immutable(targets, True)
    try:
        yield
    finally:
        set_immutable(targets, False)


@pytest.mark.parametrize("what", ["file", "directory"])
async def test_sqlite_read_only_store_is_refused_at_start_up_untouched_and_served_once_writable(
    tmp_path: Path, what: str
) -> None:
    home = tmp_path / "store"
    home.mkdir()
    store = home / "state.db"
    url = f"sqlite:///{store}"
    server = fault_server(url)
    start_all(server)
    track = Track("M0", "modern")
    try:
        with anyio.fail_after(LIMIT):
            async with Client(server.url, read_timeout_seconds=20) as client:
                await seed(client, track)
                await note_bases(url, [track])
                for _ in range(3):
                    assert (await issue(client, track)).status == "ok"
    finally:
        if what == "directory":
            stop_gracefully(server)  # no -wal left: opening the store must create one in the directory
        else:
            server.kill()  # the -wal keeps the acknowledged commits, the file alone is not the whole store
        server.close()
    wal = store.with_name(store.name + "-wal")
    assert wal.exists() == (what == "file"), sorted(p.name for p in home.iterdir())
    before = digest(home)

    refused = fault_server(url)
    with read_only(store, what):
        refused.start()
        try:
            code = refused.proc.wait(timeout=30)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server kept running on a read-only store:\n{refused.log()}")
        log = refused.log()
        refused.close()
    assert code != 0, log
    assert f"SQLite state file '{store}'" in log, log
    expected = "read-only" if what == "file" else "writable"
    assert expected in log, f"the start-up error does not say the store is not writable:\n{log}"
    assert digest(home) == before, "a refused start-up changed the store"
    sqlite_integrity(store)

    served = fault_server(url, port=refused.port)
    start_all(served)
    try:
        with anyio.fail_after(LIMIT):
            record = match_sessions(await stored_sessions(url), [track], {track.tag})[track.tag]  # its only session
            cart = assert_whole(track, record)
            async with Client(served.url, read_timeout_seconds=20) as client:
                assert payload(await client.call_tool("view_all", {"session_id": track.handle}))["cart"] == cart
                call = await issue(client, track)
                assert call.status == "ok" and call.cart == [*cart, call.item], call.message
    finally:
        served.close()


async def fault_cycle(
    tracks: list[Track],
    clients: dict[str, Client],
    fault: AbstractContextManager[None],
    *,
    names: list[str],
    pad: int = 0,
) -> None:
    """One spell of `fault`, and after it.

    While it lasts: concurrent writes in every session fail with a clear tool
    error, reads still work and show none of them, and a new session is
    refused without a handle. Once it is over, the same server process takes
    writes in every session again.
    """
    before = {t.tag: [c.item for c in t.of("ok")] for t in tracks}
    with fault:
        failed: list[Call] = []

        async def one(track: Track) -> None:
            failed.append(await issue(clients[track.tag], track, pad=pad))

        async with anyio.create_task_group() as tg:
            for track in tracks:
                for _ in range(4):
                    tg.start_soon(one, track)
        assert len(failed) == 4 * len(tracks)
        for call in failed:
            assert call.status == "error", f"{call.item} did not fail under the fault: {call.status} {call.message}"
            assert_clear(call.message, names=names)
        for track in tracks:  # reads still work, and show no trace of the failed writes
            assert [i for i in (await view(clients[track.tag], track))["cart"] if i not in before[track.tag]] == []
        modern = next(t for t in tracks if t.era == "modern")
        result = await clients[modern.tag].call_tool("add_to_cart", {"item": "nobody", **NEW})
        assert result.is_error and not has_handle(result), "a session the store could not create got a handle"
        assert_clear(text(result), names=names)
    for track in tracks:
        for _ in range(3):
            call = await issue(clients[track.tag], track, pad=pad)
            assert call.status == "ok", f"{track.tag} did not recover: {call.message}"


async def check_store(url: str, tracks: list[Track], *servers: ServerProcess) -> dict[str, list[str]]:
    """The store holds every session whole (a failed write left nothing); returns the carts."""
    calls = [c for t in tracks for c in t.calls]
    assert {c.pid for c in calls if c.status == "ok"} <= {s.pid for s in servers}, "served by another process"
    found = match_sessions(await stored_sessions(url), tracks, {t.tag for t in tracks})
    carts = {t.tag: assert_whole(t, found[t.tag], failures_wrote_nothing=True) for t in tracks}
    sqlite_integrity(Path(url.removeprefix("sqlite:///")))
    return carts


async def view(client: Client, track: Track) -> Any:
    return payload(await client.call_tool("view_all", {"session_id": track.handle} if track.handle else {}))


async def test_sqlite_store_made_read_only_mid_run_fails_writes_clearly_and_recovers(tmp_path: Path) -> None:
    # File modes are checked when a file is opened, and the server holds the store open from start-up:
    # only the immutable attribute (root) makes a file that is already open read-only.
    if os.geteuid() != 0:
        pytest.skip("making a file the server holds open read-only needs the immutable attribute, so root")
    reason = immutable_unsupported(tmp_path)
    if reason:
        unavailable(reason)
    store = tmp_path / "state.db"
    url = f"sqlite:///{store}"
    server = fault_server(url)
    start_all(server)
    tracks = tracks_for("", 2)
    try:
        with anyio.fail_after(LIMIT):
            async with connected(server, url, tracks) as clients:
                for track in tracks:
                    assert (await issue(clients[track.tag], track)).status == "ok"
                # The database and its write-ahead log; not the -shm index, which SQLite maps into
                # memory: a write to an immutable mapping kills the process with SIGBUS.
                targets = [store, store.with_name(store.name + "-wal")]
                for _ in range(FAULT_CYCLES):
                    await fault_cycle(tracks, clients, _immutable(targets), names=[f"'{store}'", "unavailable"])
                assert server.proc is not None and server.proc.poll() is None
                await check_store(url, tracks, server)
    finally:
        server.close()


@contextmanager
def _immutable(paths: list[Path]) -> Iterator[None]:
    set_immutable(paths, True)
    try:
        yield
    finally:
        set_immutable(paths, False)


@contextmanager
def tiny_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs mounted at `path` (root only) and unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a size-limited tmpfs, and mounting one needs root")
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        unavailable(f"could not mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextmanager
def disk_full(directory: Path) -> Iterator[None]:
    """Fill the filesystem of `directory` to the last byte; free it afterwards."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


async def test_sqlite_disk_full_fails_writes_clearly_writes_nothing_and_recovers(tmp_path: Path) -> None:
    with tiny_filesystem(tmp_path / "tiny", "8m") as home:
        store = home / "state.db"
        url = f"sqlite:///{store}"
        names = [f"'{store}'", "unavailable", "disk is full"]
        server = fault_server(url)
        start_all(server)
        servers = [server]
        tracks = tracks_for("", 2)
        try:
            with anyio.fail_after(LIMIT):
                async with connected(server, url, tracks) as clients:
                    for track in tracks:
                        for _ in range(4):
                            assert (await issue(clients[track.tag], track, pad=500)).status == "ok"
                    for _ in range(FAULT_CYCLES):
                        await fault_cycle(tracks, clients, disk_full(home), names=names, pad=500)
                    assert server.proc is not None and server.proc.poll() is None
                    carts = await check_store(url, tracks, server)

                    # kill -9 while the disk is full and start again on it, still full: the server comes up
                    # and serves every session as stored (the same clients, legacy ones by their
                    # mcp-session-id), refuses writes clearly, and takes them once there is room.
                    with disk_full(home):
                        server.kill()
                        server = fault_server(url, port=server.port)
                        servers.append(server)
                        start_all(server)
                        for track in tracks:
                            assert (await view(clients[track.tag], track))["cart"] == carts[track.tag]
                            call = await issue(clients[track.tag], track, pad=500)
                            assert call.status == "error", f"{call.item} was not refused: {call.status}"
                            assert_clear(call.message, names=names)
                    for track in tracks:
                        call = await issue(clients[track.tag], track, pad=500)
                        assert call.status == "ok" and call.pid == server.pid, call.message
                    await check_store(url, tracks, *servers)
        finally:
            for s in servers:
                s.close()
