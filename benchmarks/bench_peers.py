"""Concierge against its peers on one cart workload, over streamable HTTP, all state on one PostgreSQL.

    python benchmarks/bench_peers.py [--duration S | --calls N] [--sessions 64] [--inflight 4] [--think-ms 0]
                                     [--rounds 3] [--warmup-calls 8] [--postgres-url URL]
                                     [--systems concierge,concierge-async,concierge-untuned,fastmcp,
                                                fastmcp-session-id,concierge-sdk,mcp-memory]
                                     [--latency-ms 0,0.5,2] [--ping-interval-ms 50]
                                     [--json out.json] [--reinstall]

The systems (each server a subprocess listening on 127.0.0.1, each on its own
scratch database of the same PostgreSQL server):

- concierge: this repository, in the current interpreter's environment
  (`benchmarks/peers/concierge_cart.py`, `Concierge(state_url="postgresql://...")`,
  `app.get_state` / `app.set_state`).
- concierge-async: the same server with its tools written as `async def`
  (`--tools async`): they run on the event loop instead of a worker thread
  (`get_state`/`set_state` never block, so both forms are correct; the sync
  form is the README's).
- concierge-untuned: the concierge server with `Concierge(tune_gc=False)`:
  CPython's garbage collector left as every other system runs it (see
  "Garbage-collection pauses" in docs/deployment.md).
- fastmcp: fastmcp 4.x, `await ctx.get_state` / `await ctx.set_state` (keyed by
  the MCP session), `FastMCP(session_state_store=PostgreSQLStore(url=...))` from
  py-key-value-aio (`benchmarks/peers/fastmcp_cart.py`).
- fastmcp-session-id: the same fastmcp and store, with fastmcp 4's `SessionId`
  argument: each client session first calls `create_session`, then passes the id
  on every call (`--api session-id`).
- concierge-sdk: concierge-sdk 0.8.0 from PyPI (it needs `mcp<2`), its synchronous
  `app.get_state` / `app.set_state`, `CONCIERGE_STATE_URL=postgresql://...`
  (`benchmarks/peers/concierge_sdk_cart.py`).
- mcp-memory: not a peer but the floor under all of them: the bare `mcp` SDK
  of the current environment, carts in a dict in the server's memory
  (`benchmarks/peers/mcp_memory_cart.py`); what the SDK's HTTP path costs
  with no store at all.

Each peer is installed only in its own virtualenv, `benchmarks/.venvs/<name>`,
created on the first run with `python -m venv` and pinned versions, and reused
afterwards (`--reinstall` recreates it). A peer that cannot be installed or
started is reported with the reason, and the others still run.

Workload: `--sessions` client sessions (the `mcp` SDK's `Client(url,
mode="legacy")`: the initialize handshake, one `mcp-session-id` each), each with
`--inflight` calls in flight at once, call `add_to_cart(item)` (read the cart,
append, write it back) with a unique item per call; then each session calls
`view_cart`. An acknowledged item missing from its session's cart is a lost
update. Per round, every system gets fresh sessions, a warm-up
(`--warmup-calls` per session, not timed but counted for lost updates), then the
timed phase (`--duration` seconds, or `--calls` per session). Systems run one
after another, the order reversed every round. After the last round the rows
each system stored are counted in its PostgreSQL tables and compared with what
`view_cart` returned.

Pacing: by default the load is a closed loop (each call in flight starts the
next as soon as it is answered), which keeps every server saturated: its
figures are throughput. `--think-ms T` pauses each call in flight 0.5-1.5 x T
(at random) after every timed call, as a model thinks between tool calls; with
`--inflight 1` and a T that leaves the servers idle part of the time, latency
and the ping show how a server behaves under a load it can carry.

Unrelated calls: during each timed phase a client session of its own, in a
process of its own (`benchmarks/ping_probe.py`), calls the server's `ping` tool
(async, no state) every `--ping-interval-ms`; its p50/p99 show how long any
other request on that server waits while the cart calls run (a server whose
state calls block its event loop holds every request up behind them).

Database latency: `--latency-ms` is a list of round-trip times added between
the servers and PostgreSQL, each one a separate run of the whole comparison
(fresh databases and servers), the results tabled side by side. 0 connects
the servers to PostgreSQL directly, as a loopback database; any other value
puts a TCP delay proxy (`benchmarks/delay_proxy.py`, its own process) in
between, which holds every chunk for the same time in each direction, so one
request and its reply gain twice that. The time is calibrated before each run
(the extra hop and the kernel's wake-ups cost time of their own): the median
of `SELECT 1` round trips through asyncpg, through the proxy minus direct, is
brought to the value, and printed with the hop's own cost (the proxy with no
delay). While the load runs, the proxy reports how late it released chunks:
its own scheduling delay on a busy machine, on top. The load driver's own
connections (set-up, counting) go direct.

PostgreSQL: `--postgres-url` (an admin URL; scratch databases are created and
dropped on it), else a throwaway server started as `benchmarks/bench_state.py`
does (fsync off: an upper bound for a durable server).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench_state import Stores, _free_port, listening
from mcp.client import Client

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / "peers"
VENVS_DIR = HERE / ".venvs"
MARKER = "bench-peers.json"
DELAY_PROXY = HERE / "delay_proxy.py"
PING_PROBE = HERE / "ping_probe.py"


# -- the systems ------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    """One system under test: how to install it, run its server, and find its state in PostgreSQL."""

    name: str
    script: str
    api: str
    store: str
    count_sql: str | None
    """Returns (carts, items) for every cart the server stored; `None`: the server keeps its carts in memory."""
    venv: str | None = None
    """Directory under `benchmarks/.venvs`; `None` runs in the current interpreter's environment."""
    candidates: tuple[tuple[str, ...], ...] = ()
    """Pinned requirement sets, tried in order: the first one that installs is used."""
    distributions: tuple[str, ...] = ()
    """Distributions whose installed versions are reported."""
    args: tuple[str, ...] = ()
    url_env: str = "BENCH_STATE_URL"
    extra_env: tuple[tuple[str, str], ...] = ()
    session_tool: str | None = None
    """A tool each client session calls first; its result is passed back as `session_id`."""


FASTMCP_CANDIDATES = (
    # The latest 4.x. Its `server` extra requires certifi>=2026.10.19, which the
    # package index may not have (4.1.3 and 4.1.4 require it too) ...
    ("fastmcp==4.1.6", "py-key-value-aio[postgresql]==0.4.6"),
    # ... then the newest 4.x without that requirement.
    ("fastmcp==4.1.2", "py-key-value-aio[postgresql]==0.4.6"),
)
CONCIERGE_SDK_CANDIDATES = (
    # concierge-sdk declares mcp>=1.0.0 but imports mcp.server.fastmcp, which mcp 2 removed.
    ("concierge-sdk[postgres]==0.8.0", "mcp==1.30.0", "fastmcp==3.4.10", "psycopg2-binary==2.9.13"),
)

CONCIERGE = Peer(
    name="concierge",
    script="concierge_cart.py",
    api="app.get_state / app.set_state (sync), session = mcp-session-id",
    store="PostgreSQL: concierge_sessions + concierge_values (asyncpg), state_url=",
    count_sql="SELECT count(*), coalesce(sum(jsonb_array_length(value::jsonb)), 0)"
    " FROM concierge_values WHERE key = 'cart'",
    distributions=("concierge", "mcp"),
)

PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        CONCIERGE,
        dataclasses.replace(
            CONCIERGE,
            name="concierge-async",
            api="the same tools as async functions (on the event loop, no worker thread), session = mcp-session-id",
            args=("--tools", "async"),
        ),
        dataclasses.replace(
            CONCIERGE,
            name="concierge-untuned",
            api="the concierge server with Concierge(tune_gc=False): the interpreter's garbage collector as"
            " the peers run it, session = mcp-session-id",
            args=("--no-tune-gc",),
        ),
        Peer(
            name="fastmcp",
            script="fastmcp_cart.py",
            api="await ctx.get_state / ctx.set_state, keyed by ctx.session_id (= mcp-session-id)",
            store="PostgreSQL: kv_store via py-key-value-aio PostgreSQLStore (asyncpg), session_state_store=",
            count_sql="SELECT count(*), coalesce(sum(jsonb_array_length(value -> 'value')), 0)"
            " FROM kv_store WHERE collection = 'fastmcp_state' AND key LIKE '%:cart'",
            venv="fastmcp",
            candidates=FASTMCP_CANDIDATES,
            distributions=("fastmcp", "mcp", "py-key-value-aio", "asyncpg"),
            args=("--api", "context"),
        ),
        Peer(
            name="fastmcp-session-id",
            script="fastmcp_cart.py",
            api="session_id: SessionId + create_session, await get_session(id).get / .set",
            store="PostgreSQL: kv_store via py-key-value-aio PostgreSQLStore (asyncpg), session_state_store=",
            count_sql="SELECT count(*), coalesce(sum(jsonb_array_length(value -> 'value' -> 'state' -> 'cart')), 0)"
            " FROM kv_store WHERE collection = 'fastmcp_state' AND key LIKE 'session:%'"
            " AND value -> 'value' -> 'state' ? 'cart'",
            venv="fastmcp",
            candidates=FASTMCP_CANDIDATES,
            distributions=("fastmcp", "mcp", "py-key-value-aio", "asyncpg"),
            args=("--api", "session-id"),
            session_tool="create_session",
        ),
        Peer(
            name="concierge-sdk",
            script="concierge_sdk_cart.py",
            api="app.get_state / app.set_state (sync, blocking), keyed by the mcp-session-id header",
            store="PostgreSQL: concierge_session_state via its PostgresBackend (psycopg2), CONCIERGE_STATE_URL",
            count_sql="SELECT count(*), coalesce(sum(jsonb_array_length(value)), 0)"
            " FROM concierge_session_state WHERE key = 'cart'",
            venv="concierge-sdk",
            candidates=CONCIERGE_SDK_CANDIDATES,
            distributions=("concierge-sdk", "mcp", "fastmcp", "psycopg2-binary"),
            url_env="CONCIERGE_STATE_URL",
            extra_env=(("CONCIERGE_LOG_LEVEL", "WARNING"), ("CONCIERGE_HEARTBEAT_INTERVAL", "0")),
        ),
        Peer(
            name="mcp-memory",
            script="mcp_memory_cart.py",
            api="the bare mcp SDK (MCPServer, async tools), carts in a dict keyed by mcp-session-id: no store,"
            " not durable, one process; the floor under every system",
            store="none (process memory)",
            count_sql=None,
            distributions=("mcp",),
        ),
    )
}
#: Systems that are compared with concierge (mcp-memory is a floor, not a peer).
COMPARED = ("fastmcp", "fastmcp-session-id", "concierge-sdk", "mcp-memory")
OURS = ("concierge", "concierge-async", "concierge-untuned")
"""The systems of this repository, each compared with every one of `COMPARED`."""


# -- virtualenvs ------------------------------------------------------------------------
@dataclass
class Installed:
    """A ready environment for one peer: its python and what was installed."""

    python: str
    pins: list[str]
    versions: dict[str, str]
    notes: list[str] = field(default_factory=list)


def _pip_errors(stderr: str) -> str:
    """The `ERROR:` lines of pip's output (its reason), else its last lines."""
    lines = [
        line.partition(" (from versions:")[0]
        for line in stderr.splitlines()
        if line.startswith("ERROR:") and "require a different python version" not in line
    ]
    if not lines:
        lines = [line for line in stderr.splitlines() if line.strip() and "is ignored" not in line][-3:]
    return " ".join(lines)[:600]


def _venv_versions(python: str, distributions: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `distributions` in the environment of `python`."""
    probe = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = 'missing'\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([python, "-c", probe, *distributions], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def ensure_environment(peer: Peer, reinstall: bool) -> Installed:
    """The peer's environment: the current one, or its own virtualenv (created and installed on first use).

    Raises `RuntimeError` with pip's reason when no candidate set of pins installs.
    """
    if peer.venv is None:
        return Installed(sys.executable, [], {d: dist_version(d) for d in peer.distributions})
    root = VENVS_DIR / peer.venv
    python = str(root / "bin" / "python")
    marker = root / MARKER
    wanted = [list(c) for c in peer.candidates]
    if not reinstall and marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("candidates") == wanted and Path(python).exists():
            if recorded.get("pins") is None:
                raise RuntimeError(recorded.get("error", "installation failed earlier; run with --reinstall"))
            return Installed(python, recorded["pins"], recorded["versions"], recorded.get("notes", []))
    print(f"[{peer.name}] creating {root.relative_to(HERE.parent)} ...", file=sys.stderr)
    if root.exists():
        shutil.rmtree(root)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    notes: list[str] = []
    for pins in peer.candidates:
        print(f"[{peer.name}] pip install {' '.join(pins)}", file=sys.stderr)
        done = subprocess.run(
            [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", *pins],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            versions = _venv_versions(python, peer.distributions)
            record = {"candidates": wanted, "pins": list(pins), "versions": versions, "notes": notes}
            marker.write_text(json.dumps(record, indent=2))
            return Installed(python, list(pins), versions, notes)
        notes.append(f"`pip install {' '.join(pins)}` failed: {_pip_errors(done.stderr)}")
        print(f"[{peer.name}] {notes[-1]}", file=sys.stderr)
    error = "no pinned version installs: " + " | ".join(notes)
    marker.write_text(json.dumps({"candidates": wanted, "pins": None, "error": error}, indent=2))
    raise RuntimeError(error)


# -- servers ------------------------------------------------------------------------------
def _clean_env() -> dict[str, str]:
    """The environment minus anything that could reconfigure a peer behind the benchmark's back."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONCIERGE_", "FASTMCP_", "BENCH_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Server:
    """A running peer server."""

    peer: Peer
    url: str
    proc: asyncio.subprocess.Process
    log: Path


@asynccontextmanager
async def serve(peer: Peer, python: str, state_url: str, tmp: Path, timeout: float = 180.0) -> AsyncIterator[Server]:
    """Start the peer's server on a free port; yields it once it answers `tools/list`; stops it on exit."""
    port = _free_port()
    env = _clean_env()
    env[peer.url_env] = state_url
    env.update(peer.extra_env)
    log = tmp / f"{peer.name}-{port}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            python,
            str(PEERS_DIR / peer.script),
            "--port",
            str(port),
            *peer.args,
            env=env,
            cwd=str(tmp),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    async with listening(proc, port, timeout=timeout, name=f"{peer.name} server", log=lambda: _tail(log)) as url:
        async with Client(url, mode="legacy", read_timeout_seconds=30) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
        missing = {"add_to_cart", "view_cart", "ping", *([peer.session_tool] if peer.session_tool else [])} - tools
        if missing:
            raise RuntimeError(f"server lists no {sorted(missing)} (it lists {sorted(tools)})")
        yield Server(peer, url, proc, log)


def _tail(log: Path, lines: int = 6) -> str:
    """The last lines of a server log, on one line."""
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


# -- added database latency ---------------------------------------------------------------
MECHANISM = (
    "a TCP delay proxy on 127.0.0.1 (benchmarks/delay_proxy.py, its own process) between every server and "
    "PostgreSQL, holding each chunk the same time in each direction, that time calibrated before the run so "
    "that the median `SELECT 1` round trip through it takes the added time more than direct"
)


@dataclass
class Proxy:
    """A running delay proxy in front of one PostgreSQL server."""

    round_trip_ms: float
    port: int
    proc: asyncio.subprocess.Process

    async def command(self, line: str) -> dict[str, Any]:
        """Send one command (`stats`, `one-way-ms X`); its JSON answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 30))
        if "error" in answer:
            raise RuntimeError(f"delay proxy: {answer['error']}")
        return answer

    async def calibrate(self, admin_url: str) -> RoundTrip:
        """Set the one-way delay so that a `SELECT 1` round trip through the proxy gains `round_trip_ms`.

        The extra hop and the wake-ups cost time of their own; they are measured
        (median `SELECT 1`, direct and through) and taken off the delay, a few
        times over, until the gain is within 5% (or 0.02 ms) of the target.
        """
        target = self.round_trip_ms
        await self.command("one-way-ms 0")
        bare = await select_1_ms(self.via(admin_url))
        one_way = target / 2
        for _ in range(6):
            await self.command(f"one-way-ms {one_way}")
            direct = await select_1_ms(admin_url)
            through = await select_1_ms(self.via(admin_url))
            gain = through - direct
            if abs(gain - target) <= max(0.02, 0.05 * target) or (one_way == 0 and gain > target):
                break
            one_way = max(0.0, one_way + (target - gain) / 2)
        return RoundTrip(target, direct, through, bare, one_way)

    def via(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))


@asynccontextmanager
async def delay_proxy(admin_url: str, round_trip_ms: float, tmp: Path) -> AsyncIterator[Proxy]:
    """A delay proxy to the PostgreSQL of `admin_url`, adding `round_trip_ms` to each round trip; stopped on exit."""
    parts = urlsplit(admin_url)
    if not parts.hostname:
        raise RuntimeError(f"--latency-ms needs PostgreSQL over TCP; {admin_url!r} names no host")
    target = f"{parts.hostname}:{parts.port or 5432}"
    log = tmp / f"delay-proxy-{round_trip_ms:g}ms.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(DELAY_PROXY),
            "--target",
            target,
            "--round-trip-ms",
            str(round_trip_ms),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line.startswith(b"listening "):
            raise RuntimeError(f"the delay proxy did not start: {_tail(log)}")
        yield Proxy(round_trip_ms, int(line.split()[1]), proc)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def select_1_ms(url: str, samples: int = 300) -> float:
    """The median time of one `SELECT 1` round trip on one asyncpg connection to `url`, in ms."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for _ in range(10):
            await conn.fetchval("SELECT 1")
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            await conn.fetchval("SELECT 1")
            times.append(time.perf_counter() - start)
    finally:
        await conn.close()
    return quantile(times, 0.5) * 1e3


@dataclass
class RoundTrip:
    """The check of the added latency made before one run: `SELECT 1` medians, idle."""

    added_ms: float
    direct_ms: float
    through_ms: float | None = None
    """Through the proxy with the delay (`None`: nothing added, no proxy)."""
    bare_proxy_ms: float | None = None
    """Through the proxy adding no delay: the cost of the extra hop itself."""
    one_way_ms: float | None = None
    """The delay the proxy holds each chunk for, as calibrated."""


# -- unrelated calls ------------------------------------------------------------------------
class PingProbe:
    """`benchmarks/ping_probe.py` against one server: started before a round, measuring its timed phase."""

    def __init__(self, url: str, interval_ms: float, log: Path) -> None:
        self.url = url
        self.interval_ms = interval_ms
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.failure: str | None = None

    async def start(self) -> None:
        """Start the probe process (it connects while the load's sessions warm up)."""
        with self.log.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PING_PROBE),
                self.url,
                "--interval-ms",
                str(self.interval_ms),
                env=_clean_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )

    async def _line(self, timeout: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        return await asyncio.wait_for(self.proc.stdout.readline(), timeout)

    async def ready(self) -> None:
        """Wait until the probe's session answered one ping; on failure the round goes on without it."""
        try:
            line = await self._line(60)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            self.failure = f"the ping client did not connect: {_tail(self.log, 3)}"

    def go(self) -> None:
        """Start pinging (the timed phase begins)."""
        if self.failure is None and self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.write(b"go\n")

    async def stop(self) -> dict[str, Any] | None:
        """Stop pinging; the probe's latencies and errors (`None` if it failed); the process is gone after."""
        assert self.proc is not None and self.proc.stdin is not None
        found: dict[str, Any] | None = None
        try:
            if self.failure is None:
                self.proc.stdin.write(b"stop\n")
                line = await self._line(90)
                try:
                    found = json.loads(line)
                except ValueError:
                    self.failure = f"the ping client failed: {_tail(self.log, 3)}"
        except TimeoutError:
            self.failure = "the ping client did not answer `stop` within 90 s"
        finally:
            if self.proc.returncode is None:
                self.proc.stdin.close()
                try:
                    await asyncio.wait_for(self.proc.wait(), 10)
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()
        return found


# -- the workload ---------------------------------------------------------------------------
@dataclass
class RoundResult:
    """One system's numbers for one round."""

    system: str
    round: int
    elapsed: float = 0.0
    ok: int = 0
    errors: int = 0
    acked: int = 0
    """Acknowledged adds, warm-up included (the base of the lost-update count)."""
    in_carts: int = 0
    lost: int = 0
    unacked_in_carts: int = 0
    duplicates: int = 0
    sessions_failed: int = 0
    server_cpu: float | None = None
    """CPU seconds the server process used during the timed phase."""
    driver_cpu: float = 0.0
    """CPU seconds the load driver used during the timed phase."""
    proxy_cpu: float | None = None
    """CPU seconds the delay proxy used during the timed phase (`None`: no proxy)."""
    proxy_late: dict[str, float] | None = None
    """How late the delay proxy released chunks during the timed phase (its `stats`)."""
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    ping_latencies: list[float] = field(default_factory=list)
    """Latencies of the ping client's calls during the timed phase."""
    ping_errors: int = 0
    ping_error_samples: list[str] = field(default_factory=list)
    ping_failure: str | None = None
    """Why this round has no ping figures (`None`: it has)."""

    def error(self, message: str) -> None:
        """Count one failed call, keeping a few distinct messages."""
        self.errors += 1
        message = message[:300]
        if len(self.error_samples) < 5 and message not in self.error_samples:
            self.error_samples.append(message)


def _describe(exc: BaseException) -> str:
    """A one-line description of an exception (the first leaf of an exception group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _payload(result: Any) -> dict[str, Any]:
    """A tool result's structured content, else the JSON of its first text block."""
    if result.structured_content:
        return dict(result.structured_content)
    for block in result.content:
        text = getattr(block, "text", None)
        if text is not None:
            loaded = json.loads(text)
            return loaded if isinstance(loaded, dict) else {"result": loaded}
    return {}


def _process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far, from /proc; `None` where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def run_round(
    server: Server, system: str, number: int, args: argparse.Namespace, proxy: Proxy | None = None
) -> RoundResult:
    """Connect `args.sessions` fresh sessions, warm up, run the timed phase, then read every cart.

    Two barriers bracket the timed phase: every session has connected and warmed
    up before it starts, and every session has finished its timed calls before it
    ends (only then do the sessions read their carts). The ping client pings in
    between; the CPU time the server process, the delay proxy and this process
    used in between is recorded.
    """
    result = RoundResult(system, number)
    probe = PingProbe(server.url, args.ping_interval_ms, server.log.with_suffix(f".ping{number}.log"))
    await probe.start()
    peer = server.peer
    ready = asyncio.Barrier(args.sessions + 1)
    done = asyncio.Barrier(args.sessions + 1)
    go = asyncio.Event()
    clock = time.perf_counter
    deadline = 0.0

    def shares(total: int) -> list[int]:
        return [total // args.inflight + (i < total % args.inflight) for i in range(args.inflight)]

    async def session(index: int) -> None:
        acked: set[str] = set()
        passed: set[str] = set()
        cart: list[str] = []

        async def cross(barrier: asyncio.Barrier, name: str) -> None:
            passed.add(name)
            await barrier.wait()

        try:
            async with Client(server.url, mode="legacy", read_timeout_seconds=60) as client:
                extra: dict[str, Any] = {}
                if peer.session_tool:
                    created = await client.call_tool(peer.session_tool, {})
                    if created.is_error:
                        raise RuntimeError(f"{peer.session_tool} failed: {created.content}")
                    extra = {"session_id": _payload(created)["result"]}
                counter = iter(range(10**9))

                async def add(timed: bool) -> None:
                    item = f"s{index}-{next(counter)}"
                    start = clock()
                    try:
                        reply = await client.call_tool("add_to_cart", {"item": item, **extra})
                    except Exception as exc:  # noqa: BLE001 - every failure is counted, the run goes on
                        result.error(_describe(exc))
                        return
                    if reply.is_error:
                        result.error(" ".join(getattr(b, "text", "") for b in reply.content))
                        return
                    acked.add(item)
                    if timed:
                        result.latencies.append(clock() - start)
                        result.ok += 1

                async def worker(calls: int | None, timed: bool) -> None:
                    pause = args.think_ms / 1000 if timed else 0.0
                    if calls is None:
                        while clock() < deadline:
                            await add(timed)
                            if pause:  # a model thinks between calls; spread, so sessions do not march in step
                                await asyncio.sleep(pause * random.uniform(0.5, 1.5))
                    else:
                        for _ in range(calls):
                            await add(timed)
                            if pause:
                                await asyncio.sleep(pause * random.uniform(0.5, 1.5))

                await asyncio.gather(*(worker(n, False) for n in shares(args.warmup_calls)))
                await cross(ready, "ready")
                await go.wait()
                timed_shares: list[int | None] = (
                    [None] * args.inflight if args.calls is None else list(shares(args.calls))
                )
                await asyncio.gather(*(worker(n, True) for n in timed_shares))
                await cross(done, "done")
                view = await client.call_tool("view_cart", extra)
                if view.is_error:
                    raise RuntimeError(f"view_cart failed: {view.content}")
                cart = list(_payload(view)["cart"])
        except Exception as exc:  # noqa: BLE001 - a failed session is reported, not fatal
            result.sessions_failed += 1
            result.error(f"session {index}: {_describe(exc)}")
            return
        finally:
            if "ready" not in passed:
                await ready.wait()
            if "done" not in passed:
                await done.wait()
        items = set(cart)
        result.acked += len(acked)
        result.in_carts += len(cart)
        result.lost += len(acked - items)
        result.unacked_in_carts += len(items - acked)
        result.duplicates += len(cart) - len(items)

    tasks = [asyncio.create_task(session(i)) for i in range(args.sessions)]
    try:
        await ready.wait()
        await probe.ready()
        if proxy:
            await proxy.command("stats")  # counts from here on
        server_cpu, driver_cpu = _process_cpu(server.proc.pid), time.process_time()
        proxy_cpu = _process_cpu(proxy.proc.pid) if proxy else None
        start = clock()
        deadline = start + (args.duration or 0.0)
        probe.go()
        go.set()
        await done.wait()
        result.elapsed = clock() - start
        server_after = _process_cpu(server.proc.pid)
        proxy_after = _process_cpu(proxy.proc.pid) if proxy else None
        result.driver_cpu = time.process_time() - driver_cpu
        if server_cpu is not None and server_after is not None:
            result.server_cpu = server_after - server_cpu
        if proxy_cpu is not None and proxy_after is not None:
            result.proxy_cpu = proxy_after - proxy_cpu
        if proxy:
            result.proxy_late = await proxy.command("stats")
    finally:
        pings = await probe.stop()
    if pings is None:
        result.ping_failure = probe.failure
    else:
        result.ping_latencies = pings["latencies"]
        result.ping_errors = pings["errors"]
        result.ping_error_samples = pings["error_samples"]
    await asyncio.gather(*tasks)
    return result


# -- aggregation and output ------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile of `values` (NaN when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Summary:
    """One system's numbers over all rounds."""

    system: str
    status: str = "ok"
    calls_per_s: float = float("nan")
    per_round: list[float] = field(default_factory=list)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    ok: int = 0
    errors: int = 0
    acked: int = 0
    lost: int = 0
    unacked_in_carts: int = 0
    duplicates: int = 0
    sessions_failed: int = 0
    in_carts: int = 0
    server_cpu_ms: float = float("nan")
    """Server process CPU per acknowledged timed call."""
    driver_cpu_ms: float = float("nan")
    """Load-driver CPU per acknowledged timed call."""
    proxy_cpu_ms: float = float("nan")
    """Delay-proxy CPU per acknowledged timed call (NaN: no proxy)."""
    proxy_chunks_per_call: float = float("nan")
    """Chunks the delay proxy relayed (both directions) per acknowledged timed call: ~2 per database round trip."""
    proxy_late_p50_ms: float = float("nan")
    proxy_late_p99_ms: float = float("nan")
    """How late the delay proxy released chunks during the timed phases (the worst round's quantiles)."""
    ping_p50_ms: float = float("nan")
    ping_p99_ms: float = float("nan")
    pings: int = 0
    ping_errors: int = 0
    ping_notes: list[str] = field(default_factory=list)
    stored: str = "-"
    stored_matches: bool | None = None
    error_samples: list[str] = field(default_factory=list)


def summarise(system: str, rounds: list[RoundResult]) -> Summary:
    """Pool the rounds: calls/s over all timed time, quantiles over all timed calls."""
    latencies = [x for r in rounds for x in r.latencies]
    elapsed = sum(r.elapsed for r in rounds)
    ok = sum(r.ok for r in rounds)
    server_cpu = [r.server_cpu for r in rounds]
    proxy_cpu = [r.proxy_cpu for r in rounds]
    late = [r for r in rounds if r.proxy_late and "p50_ms" in r.proxy_late]
    pings = [x for r in rounds for x in r.ping_latencies]
    samples: list[str] = []
    ping_notes: list[str] = []
    for r in rounds:
        samples += [s for s in r.error_samples if s not in samples]
        ping_notes += [s for s in r.ping_error_samples if s not in ping_notes]
        if r.ping_failure:
            ping_notes.append(f"round {r.round + 1}: {r.ping_failure}")
    return Summary(
        system=system,
        calls_per_s=ok / elapsed if elapsed > 0 else float("nan"),
        per_round=[r.ok / r.elapsed if r.elapsed > 0 else float("nan") for r in rounds],
        p50_ms=quantile(latencies, 0.50) * 1e3,
        p99_ms=quantile(latencies, 0.99) * 1e3,
        ok=ok,
        errors=sum(r.errors for r in rounds),
        acked=sum(r.acked for r in rounds),
        lost=sum(r.lost for r in rounds),
        unacked_in_carts=sum(r.unacked_in_carts for r in rounds),
        duplicates=sum(r.duplicates for r in rounds),
        sessions_failed=sum(r.sessions_failed for r in rounds),
        in_carts=sum(r.in_carts for r in rounds),
        server_cpu_ms=sum(c for c in server_cpu if c is not None) * 1e3 / ok
        if ok and None not in server_cpu
        else float("nan"),
        driver_cpu_ms=sum(r.driver_cpu for r in rounds) * 1e3 / ok if ok else float("nan"),
        proxy_cpu_ms=sum(c for c in proxy_cpu if c is not None) * 1e3 / ok
        if ok and proxy_cpu and None not in proxy_cpu
        else float("nan"),
        proxy_chunks_per_call=sum(r.proxy_late["chunks"] for r in rounds if r.proxy_late) / ok
        if ok and proxy_cpu and None not in proxy_cpu
        else float("nan"),
        proxy_late_p50_ms=max((r.proxy_late["p50_ms"] for r in late), default=math.nan),
        proxy_late_p99_ms=max((r.proxy_late["p99_ms"] for r in late), default=math.nan),
        ping_p50_ms=quantile(pings, 0.50) * 1e3,
        ping_p99_ms=quantile(pings, 0.99) * 1e3,
        pings=len(pings),
        ping_errors=sum(r.ping_errors for r in rounds),
        ping_notes=ping_notes[:5],
        error_samples=samples[:5],
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, first column left-aligned, the others right-aligned."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
        for r in rows
    ]
    return "\n".join([line, rule, *body])


def _num(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else format(value, fmt)


@dataclass
class LatencyRun:
    """One run of the whole comparison at one added database latency."""

    round_trip: RoundTrip
    summaries: dict[str, Summary]
    rounds: dict[str, list[RoundResult]]
    load: tuple[float, float]
    """1-minute load average before and after the run."""


def _added(ms: float) -> str:
    return f"+{ms:g} ms"


def _lost(s: Summary) -> str:
    return f"{s.lost:,} / {s.acked:,} ({100 * s.lost / s.acked:.1f}%)" if s.acked else "-"


def report(run: LatencyRun, args: argparse.Namespace) -> str:
    """The results table of one run, its ratios and notes."""
    summaries = run.summaries
    proxied = run.round_trip.through_ms is not None
    header = [
        "system",
        "calls/s",
        "per round",
        "p50 ms",
        "p99 ms",
        "ping p50 ms",
        "ping p99 ms",
        "pings",
        "ok calls",
        "errors",
        "lost updates",
        "in PostgreSQL",
        "server CPU ms/call",
        "driver CPU ms/call",
        *(["proxy CPU ms/call", "DB chunks/call", "proxy late p50/p99 ms"] if proxied else []),
    ]
    rows = []
    notes = []
    for name, s in summaries.items():
        if s.status != "ok":
            rows.append([name, *(["-"] * (len(header) - 1))])
            rows[-1][header.index("in PostgreSQL")] = "not run"
            notes.append(f"- **{name}** not run: {s.status}")
            continue
        rows.append(
            [
                name,
                _num(s.calls_per_s, ",.0f"),
                " / ".join(_num(x, ",.0f") for x in s.per_round),
                _num(s.p50_ms, ",.1f"),
                _num(s.p99_ms, ",.1f"),
                _num(s.ping_p50_ms, ",.1f"),
                _num(s.ping_p99_ms, ",.1f"),
                f"{s.pings:,}",
                f"{s.ok:,}",
                f"{s.errors:,}",
                _lost(s),
                s.stored,
                _num(s.server_cpu_ms, ".2f"),
                _num(s.driver_cpu_ms, ".2f"),
                *(
                    [
                        _num(s.proxy_cpu_ms, ".2f"),
                        _num(s.proxy_chunks_per_call, ".1f"),
                        f"{_num(s.proxy_late_p50_ms, '.2f')} / {_num(s.proxy_late_p99_ms, '.2f')}",
                    ]
                    if proxied
                    else []
                ),
            ]
        )
        if s.error_samples:
            notes.append(f"- **{name}** errors, e.g.: " + "; ".join(f"`{e}`" for e in s.error_samples[:3]))
        if s.unacked_in_carts or s.duplicates:
            notes.append(
                f"- **{name}**: {s.unacked_in_carts} items in carts whose call reported a failure, "
                f"{s.duplicates} duplicate items"
            )
        if s.ping_errors or s.ping_notes:
            notes.append(
                f"- **{name}** ping client: {s.pings:,} answered, {s.ping_errors:,} failed"
                + ("; " + "; ".join(f"`{e}`" for e in s.ping_notes[:3]) if s.ping_notes else "")
            )
    mode = f"{args.duration:g} s timed" if args.calls is None else f"{args.calls} timed calls per session"
    check = run.round_trip
    if proxied:
        database = (
            f"PostgreSQL round trip {_added(check.added_ms)} through the delay proxy (`SELECT 1` median, idle: "
            f"{check.direct_ms:.2f} ms direct, {check.through_ms:.2f} ms through it)"
        )
    else:
        database = f"PostgreSQL direct on loopback (`SELECT 1` median, idle: {check.direct_ms:.2f} ms)"
    out = [
        (
            f"\nCart workload over streamable HTTP on 127.0.0.1, {database}: {args.sessions} sessions x "
            f"{args.inflight} calls in flight{_thinking(args)}, {args.rounds} rounds ({mode} per system per round, order reversed "
            f"each round), {args.warmup_calls} warm-up calls per session per round, a ping every "
            f"{args.ping_interval_ms:g} ms; 1-minute load average {run.load[0]:.1f} before, {run.load[1]:.1f} after\n"
        ),
        markdown_table(header, rows),
    ]
    ratios = [
        f"- {ours} / {other}: {line}"
        for ours in OURS
        for other in COMPARED
        if (line := _ratio_line(summaries.get(ours), summaries.get(other)))
    ]
    if ratios:
        out += ["\nRatios\n", *ratios]
    if notes:
        out += ["\nNotes\n", *notes]
    return "\n".join(out)


def _thinking(args: argparse.Namespace) -> str:
    return f" with {args.think_ms:g} ms (0.5-1.5x) of thought after each" if args.think_ms else ""


def _ratio_line(base: Summary | None, other: Summary | None) -> str | None:
    if not (base and other and base.status == "ok" and other.status == "ok" and other.calls_per_s > 0):
        return None
    return (
        f"{base.calls_per_s / other.calls_per_s:.2f}x calls/s, p50 latency {base.p50_ms / other.p50_ms:.2f}x, "
        f"p99 latency {base.p99_ms / other.p99_ms:.2f}x, ping p99 {base.ping_p99_ms / other.ping_p99_ms:.2f}x"
    )


def round_trip_table(runs: list[LatencyRun]) -> str:
    """How much each run's PostgreSQL round trip actually gained."""
    rows = []
    for run in runs:
        c = run.round_trip
        if c.through_ms is None:
            rows.append([_added(c.added_ms), "direct", f"{c.direct_ms:.3f}", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                _added(c.added_ms),
                "delay proxy",
                f"{c.direct_ms:.3f}",
                _num(c.bare_proxy_ms if c.bare_proxy_ms is not None else math.nan, ".3f"),
                _num(c.one_way_ms if c.one_way_ms is not None else math.nan, ".3f"),
                f"{c.through_ms:.3f}",
                f"+{c.through_ms - c.direct_ms:.3f}",
            ]
        )
    header = [
        "added round trip",
        "servers reach PostgreSQL",
        "direct ms",
        "proxy, no delay, ms",
        "held each way ms",
        "through the proxy ms",
        "measured gain ms",
    ]
    return (
        "\nAdded latency, checked before each run: median of 300 `SELECT 1` round trips on one asyncpg connection, "
        "idle (held each way: the proxy's delay per chunk, calibrated to that gain)\n\n" + markdown_table(header, rows)
    )


def side_by_side(runs: list[LatencyRun], args: argparse.Namespace) -> str:
    """Every run's main figures in one table, and the ratios per run."""
    added = " / ".join(_added(r.round_trip.added_ms) for r in runs)

    def cells(name: str, value: Any) -> str:
        got = []
        for run in runs:
            s = run.summaries[name]
            got.append("-" if s.status != "ok" else value(s))
        return " / ".join(got)

    rows = [
        [
            name,
            cells(name, lambda s: _num(s.calls_per_s, ",.0f")),
            cells(name, lambda s: _num(s.p50_ms, ",.0f")),
            cells(name, lambda s: _num(s.p99_ms, ",.0f")),
            cells(name, lambda s: _num(s.ping_p50_ms, ",.1f")),
            cells(name, lambda s: _num(s.ping_p99_ms, ",.1f")),
            cells(name, lambda s: f"{100 * s.lost / s.acked:.1f}%" if s.acked else "-"),
        ]
        for name in args.systems
    ]
    header = ["system", "calls/s", "p50 ms", "p99 ms", "ping p50 ms", "ping p99 ms", "lost updates"]
    ratio_rows = []
    for ours, other in ((o, c) for o in OURS for c in COMPARED):
        if other not in args.systems or ours not in args.systems:
            continue
        for label, attr in (
            ("calls/s", "calls_per_s"),
            ("p50 latency", "p50_ms"),
            ("p99 latency", "p99_ms"),
            ("ping p50", "ping_p50_ms"),
            ("ping p99", "ping_p99_ms"),
        ):
            row = [f"{ours} / {other}, {label}"]
            for run in runs:
                base, theirs = run.summaries[ours], run.summaries[other]
                ok = base.status == "ok" and theirs.status == "ok" and getattr(theirs, attr) > 0
                row.append(f"{getattr(base, attr) / getattr(theirs, attr):.2f}x" if ok else "-")
            ratio_rows.append(row)
    out = [
        f"\nSide by side, PostgreSQL round trip {added} (each cell: the runs in that order)\n",
        markdown_table(header, rows),
    ]
    if ratio_rows:
        out += [
            "\nRatios side by side\n",
            markdown_table(["ratio", *(_added(r.round_trip.added_ms) for r in runs)], ratio_rows),
        ]
    return "\n".join(out)


LEGEND = (
    "\ncalls/s: acknowledged timed `add_to_cart` calls per second of timed phase, all rounds pooled "
    "(per round: the same, each round). p50/p99: latency of one call as the client sees it (queueing "
    "behind the same session's other calls included). ping p50/p99: latency of the `ping` calls (no state) "
    "that one more client session, in a process of its own, makes during the timed phase, one at a time "
    "on a fixed pace (pings: how many it made; a stalled server gets fewer): how long an unrelated request "
    "waits on that server. lost updates: acknowledged items "
    "(warm-up included) missing from their session's cart at the end (= successful adds - items in carts when "
    "no failed call wrote). in PostgreSQL: carts / items found in the system's tables after the last round "
    "(✓ = as many items as the final `view_cart` calls returned in all). CPU ms/call: CPU time of the server "
    "process (PostgreSQL's own not included), of this load driver and of the delay proxy during the timed "
    "phase, per acknowledged timed call. DB chunks/call: chunks the delay proxy relayed between the server and "
    "PostgreSQL (both directions) per acknowledged timed call, about two per database round trip. proxy late: "
    "how long after its due time the delay proxy released a chunk during the timed phase (the worst round's "
    "p50 and p99), added on top of the calibrated delay. "
    "Added round trip: " + MECHANISM + "; +0 ms = no proxy."
)


# -- the run ------------------------------------------------------------------------------
async def count_stored(peer: Peer, url: str) -> tuple[int, int]:
    """(carts, items) the peer stored in its database."""
    import asyncpg

    assert peer.count_sql is not None
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(peer.count_sql)
    finally:
        await conn.close()
    assert row is not None
    return int(row[0]), int(row[1])


async def run(args: argparse.Namespace) -> int:
    """Install, then per added latency: start, measure, verify; report."""
    # SIGTERM unwinds like Ctrl-C: the servers, the proxy and the throwaway PostgreSQL are stopped.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    load_before = os.getloadavg()[0]
    environments: dict[str, Installed] = {}
    install_failures: dict[str, str] = {}
    for name in args.systems:
        try:
            environments[name] = await asyncio.to_thread(ensure_environment, PEERS[name], args.reinstall)
        except Exception as exc:  # noqa: BLE001 - reported in its row
            install_failures[name] = f"install failed: {_describe(exc)}"
    stores = Stores(args.postgres_url)
    reason = await stores.available("postgres")
    if reason:
        print(f"no PostgreSQL: {reason}", file=sys.stderr)
        return 1
    runs: list[LatencyRun] = []
    try:
        for added_ms in args.latency_ms:
            runs.append(await compare(added_ms, args, environments, install_failures, stores))
    finally:
        await stores.close()

    if any(one.round_trip.through_ms is not None for one in runs):
        print(round_trip_table(runs))
    for one in runs:
        print(report(one, args))
    if len(runs) > 1:
        print(side_by_side(runs, args))
    print(LEGEND)
    print("\nSystems\n")
    noted: set[str] = set()
    for name in args.systems:
        peer = PEERS[name]
        env = environments.get(name)
        where = "current environment" if peer.venv is None else f"benchmarks/.venvs/{peer.venv}"
        versions = ", ".join(f"{d} {v}" for d, v in env.versions.items()) if env else "not installed"
        print(f"- **{name}** ({where}: {versions}): {peer.api}; {peer.store}")
        if env and where not in noted:
            noted.add(where)
            for note in env.notes:
                print(f"  - {note}")
    cores = os.cpu_count()
    load_after = os.getloadavg()[0]
    print(
        f"\nPython {platform.python_version()}, {cores} CPUs shared by the load driver, the servers, the ping "
        f"client, the delay proxy and PostgreSQL; 1-minute load average {load_before:.1f} before the run, "
        f"{load_after:.1f} after; {time.strftime('%Y-%m-%d %H:%M')}"
    )
    if args.json:

        def systems(one: LatencyRun) -> dict[str, Any]:
            return {
                name: {
                    "api": PEERS[name].api,
                    "store": PEERS[name].store,
                    "environment": asdict(environments[name]) if name in environments else None,
                    "summary": asdict(one.summaries[name]),
                    "rounds": [
                        {k: v for k, v in asdict(r).items() if k not in ("latencies", "ping_latencies")}
                        for r in one.rounds[name]
                    ],
                }
                for name in args.systems
            }

        document = {
            "config": {k: v for k, v in vars(args).items() if k != "postgres_url"},
            "python": platform.python_version(),
            "cpus": cores,
            "load_average": [load_before, load_after],
            "latency_mechanism": MECHANISM,
            # The first run's systems at the top level, where single-run readers look for them.
            "systems": systems(runs[0]),
            "runs": [
                {"round_trip": asdict(one.round_trip), "load_average": list(one.load), "systems": systems(one)}
                for one in runs
            ],
        }
        Path(args.json).write_text(json.dumps(document, indent=2, default=str))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


async def compare(
    added_ms: float,
    args: argparse.Namespace,
    environments: dict[str, Installed],
    install_failures: dict[str, str],
    stores: Stores,
) -> LatencyRun:
    """One run of the whole comparison with `added_ms` added to every server's PostgreSQL round trip."""
    from contextlib import AsyncExitStack

    load_before = os.getloadavg()[0]
    summaries = {name: Summary(name, status=install_failures.get(name, "ok")) for name in args.systems}
    rounds: dict[str, list[RoundResult]] = {name: [] for name in args.systems}
    urls: dict[str, str] = {}
    admin = stores.postgres_admin_url
    async with AsyncExitStack() as stack:
        proxy: Proxy | None = None
        if added_ms > 0:
            proxy = await stack.enter_async_context(delay_proxy(admin, added_ms, stores.tmp))
            check = await proxy.calibrate(admin)
            print(
                f"== PostgreSQL round trip {_added(added_ms)}: SELECT 1 median {check.direct_ms:.3f} ms direct, "
                f"{check.through_ms:.3f} ms through the delay proxy holding chunks {check.one_way_ms:.3f} ms "
                f"each way (with no delay: {check.bare_proxy_ms:.3f} ms)",
                file=sys.stderr,
            )
        else:
            check = RoundTrip(0.0, await select_1_ms(admin))
            print(f"== PostgreSQL direct: SELECT 1 median {check.direct_ms:.3f} ms", file=sys.stderr)
        servers = await stack.enter_async_context(_servers(args.systems, environments, stores, summaries, urls, proxy))
        order = [name for name in args.systems if name in servers]
        for number in range(args.rounds):
            for name in order if number % 2 == 0 else list(reversed(order)):
                print(f"round {number + 1}/{args.rounds}: {name} ...", file=sys.stderr)
                try:
                    rounds[name].append(await run_round(servers[name], name, number, args, proxy))
                except Exception as exc:  # noqa: BLE001 - reported in its row
                    summaries[name].status = f"round {number + 1} failed: {_describe(exc)}"
                    servers.pop(name)
                    order.remove(name)
                    break
                last = rounds[name][-1]
                pings = quantile(last.ping_latencies, 0.99) * 1e3
                print(
                    f"  {last.ok / last.elapsed if last.elapsed else 0:,.0f} calls/s, {last.errors} errors, "
                    f"{last.lost} lost, ping p99 {_num(pings, '.1f')} ms",
                    file=sys.stderr,
                )
    for name in args.systems:
        if summaries[name].status != "ok":
            continue
        summaries[name] = summarise(name, rounds[name])
        summary = summaries[name]
        if PEERS[name].count_sql is None:
            summary.stored = "- (memory)"
            continue
        try:
            carts, items = await count_stored(PEERS[name], urls[name])
        except Exception as exc:  # noqa: BLE001 - e.g. no such table: the state went elsewhere
            summary.stored_matches = False
            summary.stored = f"✗ ({_describe(exc)})"
            continue
        summary.stored_matches = items == summary.in_carts and summary.sessions_failed == 0
        mark = "✓" if summary.stored_matches else f"✗ (view_cart: {summary.in_carts:,})"
        summary.stored = f"{carts:,} / {items:,} {mark}"
    return LatencyRun(check, summaries, rounds, (load_before, os.getloadavg()[0]))


@asynccontextmanager
async def _servers(
    systems: list[str],
    environments: dict[str, Installed],
    stores: Stores,
    summaries: dict[str, Summary],
    urls: dict[str, str],
    proxy: Proxy | None = None,
) -> AsyncIterator[dict[str, Server]]:
    """Every installable system's server, each on a fresh database (through `proxy` if given); failures reported."""
    from contextlib import AsyncExitStack

    servers: dict[str, Server] = {}
    async with AsyncExitStack() as stack:
        for name in systems:
            if name not in environments:
                continue
            _, url = await stores.fresh("postgres")
            assert url is not None
            urls[name] = url
            print(f"starting {name} ...", file=sys.stderr)
            try:
                servers[name] = await stack.enter_async_context(
                    serve(PEERS[name], environments[name].python, proxy.via(url) if proxy else url, stores.tmp)
                )
            except Exception as exc:  # noqa: BLE001 - reported in its row
                summaries[name].status = f"server failed: {_describe(exc)}"
        yield servers


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--duration", type=float, help="timed seconds per system per round (default 10)")
    timing.add_argument("--calls", type=int, help="timed add_to_cart calls per session per round instead")
    parser.add_argument("--sessions", type=int, default=64, help="concurrent client sessions (default 64)")
    parser.add_argument("--inflight", type=int, default=4, help="calls in flight per session (default 4)")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="pause after each timed call, per call in flight (0.5-1.5 times this, at random; default 0: "
        "closed loop, the server saturated)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order reversed each round (default 3)")
    parser.add_argument("--warmup-calls", type=int, default=8, help="untimed calls per session per round (default 8)")
    parser.add_argument("--postgres-url", help="admin URL of an existing PostgreSQL (default: a throwaway server)")
    parser.add_argument(
        "--systems",
        default=",".join(PEERS),
        help=f"comma-separated subset of {','.join(PEERS)} (default: all)",
    )
    parser.add_argument(
        "--latency-ms",
        default="0",
        help="comma-separated round-trip times added between the servers and PostgreSQL, one run each (default 0)",
    )
    parser.add_argument(
        "--ping-interval-ms", type=float, default=50.0, help="pace of the ping client's calls (default 50)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--reinstall", action="store_true", help="recreate the peers' virtualenvs")
    args = parser.parse_args(argv)
    if args.duration is None and args.calls is None:
        args.duration = 10.0
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(PEERS)
    if unknown or not args.systems:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if args.sessions < 1 or args.inflight < 1 or args.rounds < 1:
        parser.error("--sessions, --inflight and --rounds must be at least 1")
    if args.think_ms < 0:
        parser.error("--think-ms must not be negative")
    try:
        args.latency_ms = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--latency-ms: {args.latency_ms!r} is not a comma-separated list of numbers")
    if not args.latency_ms or min(args.latency_ms) < 0 or args.ping_interval_ms <= 0:
        parser.error("--latency-ms needs at least one value, none negative; --ping-interval-ms must be positive")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        return asyncio.run(run(args))
    except asyncio.CancelledError:
        print("stopped by SIGTERM; everything it started is stopped", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
