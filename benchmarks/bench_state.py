"""What per-session state costs a tool call, per backend.

    python benchmarks/bench_state.py [--calls N] [--rounds R] [--backends memory,sqlite,postgres,redis]
                                     [--postgres-url URL] [--redis-url URL] [--sessions 1000,1000000] [--keys 1000]
                                     [--skip throughput,sessions,keys,roundtrips] [--transports inprocess,http]
                                     [--sqlite-synchronous normal|full] [--json PATH]

Three measurements, each through the SDK's in-process `mcp.client.Client(app)`:

1. throughput: a tool that reads and writes a small counter (`get_state` +
   `set_state`) on `Concierge`, against the same tool without state on a plain
   `MCPServer`, with the default (2026-07-28, session handles) client and with
   `mode="legacy"` (one session per connection). Ratio = stateful / stateless.
   With the default client two more rows: the same app with its store's
   change feed refused (every call loads its session: what the feed saves),
   and the session roaming round-robin between two apps on one store (each
   call finds the session written last by the other app: what sticky
   traffic saves).
   With `--transports ...,http` it is measured a second time over real
   streamable HTTP on 127.0.0.1: each server (the plain `MCPServer` and
   `Concierge` on the same backend) runs in its own subprocess under uvicorn,
   and the SDK's streamable-HTTP client calls it on the default 2026-07-28 wire
   (session handles). In-process, a stateless call is cheap (no network, no
   HTTP), so each store round trip weighs heavily in the ratio; over HTTP the
   ratio is closer to what a deployed server sees.
2. sessions: per-call latency of that tool when the store holds 1k sessions vs
   1M (pre-populated beforehand: memory through the backend's `commit`,
   SQLite and Postgres with bulk SQL, Redis with a Lua script that writes the
   backend's own key layout - metadata and values hashes with their TTLs, the
   expiry and activity indexes - 10,000 sessions per run; one small key per
   session).
3. keys: a call touching one key of a session that holds 1,000 keys vs one of
   a 1-key session.
4. roundtrips: what the two store calls of a stateful call cost on their own,
   the backend called directly (no MCP): `load` of a session whose version the
   caller knows, and `commit` of one key. With the in-process throughput in
   the same run it gives each backend's ceiling: stateless call time /
   (stateless call time + load + commit), the ratio a stateful call would
   reach if concierge itself cost nothing.

"ratio" is stateful/stateless calls per second over all timed calls; "ratio
(medians)" compares median call latencies, which a shared, busy machine
disturbs less.

Series that are compared run in the same process, interleaved in rounds (the
order alternates every round), after a warm-up, so drift hits both sides alike.
Postgres: `--postgres-url` (an admin URL; a scratch database is created and
dropped on it), else a throwaway server is started the way the tests do it
(`tests/conftest.py`, which needs the PostgreSQL server binaries); that server
runs with fsync off, so its numbers are an upper bound for a durable server.
SQLite runs with the backend's default `synchronous=normal` (no fsync per
commit) unless `--sqlite-synchronous full` is given.
Redis: `--redis-url` (an existing server; each store gets a key prefix of its
own, `bench-<random>:`, whose keys are deleted after the run; nothing is
flushed), else a throwaway `redis-server` is started the way the tests do it
(`tests/conftest.py`); that server keeps nothing on disk (no RDB, no AOF), so
its numbers are an upper bound for a server with persistence.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.util
import json
import logging
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from mcp.client import Client
from mcp.server.mcpserver import MCPServer

from concierge import Concierge
from concierge.serve.process import tune_collector
from concierge.state import Commit, StateBackend, backend_from_url

REPO = Path(__file__).resolve().parent.parent
HANDLE_KEY = "concierge/session_id"
NEW = {"session_id": "new"}
"""What a first call passes to start a session (concierge ignores it on connections with their own session)."""
ALL_BACKENDS = ("memory", "sqlite", "postgres", "redis")
ALL_TRANSPORTS = ("inprocess", "http")
DAY = 86_400.0
MODERN = "2026-07-28"

logger = logging.getLogger("bench")


# -- servers ------------------------------------------------------------------------
def stateful_app(state: StateBackend | None = None, state_url: str | None = None, **options: Any) -> Concierge:
    """`Concierge` with the measured tool (`bump`) and a `fill` tool that writes many keys at once."""
    app = Concierge("bench", state=state, state_url=state_url, session_ttl=DAY, **options)

    @app.tool()
    def bump() -> dict:
        """Read and write a small counter."""
        count = app.get_state("count", 0) + 1
        app.set_state("count", count)
        return {"count": count}

    @app.tool()
    def fill(keys: int) -> dict:
        """Write `keys` keys (k0, k1, ...) in one call."""
        for i in range(keys):
            app.set_state(f"k{i}", {"i": i, "note": "x" * 16})
        return {"keys": keys}

    @app.tool()
    def touch() -> dict:
        """Read and write one key (k0)."""
        value = app.get_state("k0", {"i": 0})
        value["i"] += 1
        app.set_state("k0", value)
        return {"count": value["i"]}

    return app


def stateless_app(**options: Any) -> MCPServer:
    """A plain `MCPServer` with the same tool, minus the state."""
    app = MCPServer("bench-stateless", **options)

    @app.tool()
    def bump() -> dict:
        """Return a constant counter."""
        count = 1
        return {"count": count}

    return app


# -- a measured series ----------------------------------------------------------------
@dataclass
class Series:
    """One thing timed: a tool on a client, with the session handle passed back when one comes."""

    label: str
    client: Client
    tool: str
    arguments: dict[str, Any] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    async def call(self) -> None:
        result = await self.client.call_tool(self.tool, self.arguments)
        if result.is_error:
            raise RuntimeError(f"{self.label}: {self.tool} failed: {result.content}")
        handle = (result.meta or {}).get(HANDLE_KEY)
        if handle:
            self.arguments = {**self.arguments, "session_id": handle}

    async def timed(self, calls: int) -> None:
        clock = time.perf_counter
        for _ in range(calls):
            start = clock()
            await self.call()
            self.latencies.append(clock() - start)

    @property
    def per_second(self) -> float:
        return len(self.latencies) / sum(self.latencies)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def median_us(self) -> float:
        return statistics.median(self.latencies) * 1e6


async def interleave(series: list[Series], calls: int, rounds: int, warmup: int = 50) -> None:
    """Run every series `calls` times in `rounds` rounds, alternating the order each round."""
    for s in series:
        for _ in range(warmup):
            await s.call()
    per_round = max(1, calls // rounds)
    for r in range(rounds):
        for s in series if r % 2 == 0 else reversed(series):
            await s.timed(per_round)


@asynccontextmanager
async def connected(app: MCPServer | str, mode: str) -> AsyncIterator[Client]:
    """A client of `app`: in-process for a server object, streamable HTTP for a URL."""
    async with Client(app, mode=mode) as client:
        await client.list_tools()  # the 2026-07-28 client checks calls against its listing
        yield client


# -- servers over streamable HTTP -------------------------------------------------------
def serve(role: str, port: int) -> int:
    """Run one benchmark server on 127.0.0.1:`port` until SIGTERM (the `--serve` mode of this script).

    `stateful` takes its store from `CONCIERGE_STATE_URL`, as a deployed server
    does; it is set by the parent, so no URL (nor password) is on a command line.
    """
    quiet = {"log_level": "WARNING"}  # no log line per request
    app = stateless_app(**quiet) if role == "stateless" else stateful_app(**quiet)
    if role == "stateless":
        # `Concierge.run` tunes the garbage collector (tune_gc); the plain server gets the same,
        # so that the ratio compares the state alone.
        tune_collector()
    app.run("streamable-http", host="127.0.0.1", port=port)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def listening(
    proc: asyncio.subprocess.Process, port: int, *, timeout: float, name: str, log: Callable[[], str]
) -> AsyncIterator[str]:
    """Wait until the server `proc` accepts connections on `port`; yield its streamable-HTTP URL; stop it on exit.

    Fails with `log()` in the message if the server exits first or does not listen
    within `timeout` seconds. Stopping is SIGTERM, then SIGKILL after 10 s.
    """
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{name} did not listen on port {port} within {timeout:.0f}s:\n{log()}"
                    ) from None
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                break
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def http_server(role: str, state_url: str | None, tmp: Path) -> AsyncIterator[str]:
    """A `--serve role` subprocess on a free port; yields its streamable-HTTP URL, stops it on exit."""
    port = _free_port()
    env = dict(os.environ)
    env.pop("CONCIERGE_STATE_URL", None)
    if state_url is not None:
        env["CONCIERGE_STATE_URL"] = state_url
    log = tmp / f"server-{role}-{port}.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            role,
            "--port",
            str(port),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    async with listening(
        proc, port, timeout=30, name=f"{role} server", log=lambda: log.read_text(errors="replace")
    ) as url:
        yield url


# -- stores ---------------------------------------------------------------------------
def _tests_conftest() -> Any:
    """`tests/conftest.py` as a module: the throwaway servers the tests start."""
    spec = importlib.util.spec_from_file_location("concierge_tests_conftest", REPO / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest


def _with_prefix(url: str, prefix: str | None) -> str:
    """A Redis URL with its `prefix=` query parameter replaced by `prefix` (removed when `None`)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "prefix"]
    if prefix is not None:
        query.append(("prefix", prefix))
    return parts._replace(query=urlencode(query)).geturl()


# KEYS: expiry, sessions. ARGV: prefix, first, last, now, -now, expires_at, TTL ms of the metadata,
# of the values. Sessions `bench:<first>` .. `bench:<last>` exactly as `RedisBackend` commits them at
# version 1 (see concierge/state/redis.py), so the backend sees real sessions.
_REDIS_POPULATE = """
local prefix = ARGV[1]
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local id = 'bench:' .. i
  local meta, vals = prefix .. 's:' .. id, prefix .. 'v:' .. id
  redis.call('HSET', meta, 'version', '1', 'created_at', ARGV[4], 'updated_at', ARGV[4], 'expires_at', ARGV[6])
  redis.call('PEXPIRE', meta, ARGV[7])
  redis.call('HSET', vals, 'count', tostring(i))
  redis.call('PEXPIRE', vals, ARGV[8])
  redis.call('ZADD', KEYS[1], ARGV[6], id)
  redis.call('ZADD', KEYS[2], ARGV[5], id)
end
return 0
"""
_REDIS_BATCH = 10_000  # sessions per script run: none blocks the server for long


class Stores:
    """Fresh, empty stores per backend, and the bulk pre-population of sessions."""

    def __init__(
        self, postgres_url: str | None, sqlite_synchronous: str = "normal", redis_url: str | None = None
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="concierge-bench-"))
        self.sqlite_synchronous = sqlite_synchronous
        self._postgres_admin = postgres_url
        self._postgres_server: Any = None
        self._databases: list[str] = []
        self._redis_url = None if redis_url is None else _with_prefix(redis_url, None)
        self._redis_server: Any = None
        self._redis_client: Any = None
        self._redis_prefixes: list[str] = []

    @property
    def postgres_admin_url(self) -> str:
        """The admin URL of the PostgreSQL in use (after `available("postgres")` returned `None`)."""
        assert self._postgres_admin is not None
        return self._postgres_admin

    async def available(self, kind: str) -> str | None:
        """`None` when `kind` can run, else why not (starting a throwaway server when one is needed)."""
        module = {
            "sqlite": "concierge.state.sqlite",
            "postgres": "concierge.state.postgres",
            "redis": "concierge.state.redis",
        }.get(kind)
        if module and importlib.util.find_spec(module) is None:
            return f"{module} is not there yet"
        if kind == "postgres" and self._postgres_admin is None:
            try:
                self._postgres_admin = await asyncio.to_thread(self._start_postgres)
            except Exception as exc:  # noqa: BLE001 - no binaries, or the server would not start
                return f"no --postgres-url and no throwaway server ({exc})"
        if kind == "redis":
            if importlib.util.find_spec("redis") is None:
                return 'redis-py is not installed (pip install "concierge[redis]")'
            if self._redis_url is None:
                try:
                    self._redis_url = await asyncio.to_thread(self._start_redis)
                except Exception as exc:  # noqa: BLE001 - no binary, or the server would not start
                    return f"no --redis-url and no throwaway server ({exc})"
            try:
                await self._redis().ping()
            except Exception as exc:  # noqa: BLE001 - any failure means the server cannot be used
                return f"Redis at {urlsplit(self._redis_url).hostname} does not answer ({exc})"
        return None

    def _start_postgres(self) -> str:
        server = _tests_conftest()._ThrowawayPostgres()
        url = server.start()
        self._postgres_server = server
        print(f"(started a throwaway PostgreSQL on port {server.port}, fsync off)", file=sys.stderr)
        return url

    def _start_redis(self) -> str:
        server = _tests_conftest().start_throwaway_redis()
        self._redis_server = server
        print(f"(started a throwaway redis-server on port {server.port}, no persistence)", file=sys.stderr)
        return server.url

    def _redis(self) -> Any:
        """A plain client of the Redis server (for set-up and clean-up, never measured)."""
        if self._redis_client is None:
            import redis.asyncio as aioredis

            assert self._redis_url is not None
            self._redis_client = aioredis.Redis.from_url(self._redis_url, decode_responses=True)
        return self._redis_client

    async def fresh(self, kind: str) -> tuple[StateBackend | None, str | None]:
        """A new empty store: `(backend, None)` for memory, `(None, url)` otherwise."""
        if kind == "memory":
            from concierge.state import MemoryBackend

            return MemoryBackend(), None
        if kind == "sqlite":
            query = "" if self.sqlite_synchronous == "normal" else f"?synchronous={self.sqlite_synchronous}"
            return None, f"sqlite:///{self.tmp / (uuid.uuid4().hex + '.db')}{query}"
        if kind == "redis":
            assert self._redis_url is not None
            prefix = f"bench-{uuid.uuid4().hex[:12]}:"  # an empty store of its own on a shared server
            self._redis_prefixes.append(prefix)
            return None, _with_prefix(self._redis_url, prefix)
        import asyncpg

        assert self._postgres_admin is not None
        name = "bench_" + uuid.uuid4().hex[:12]
        conn = await asyncpg.connect(self._postgres_admin)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self._databases.append(name)
        return None, self._postgres_admin.rpartition("/")[0] + "/" + name

    async def populate(self, app: Concierge, kind: str, url: str | None, sessions: int) -> None:
        """Store `sessions` live sessions of one small key each, the fastest way the backend allows."""
        backend = app.state_backend
        now = time.time()
        if kind == "memory":
            for i in range(sessions):
                commit = Commit(f"bench:{i}", 0, {"count": str(i)}, owner=None, expires_at=now + DAY)
                await backend.commit(commit, now=now)
            return
        if kind == "redis":
            await self._populate_redis(backend, sessions, now)
            return
        await backend.open()  # applies the schema
        await backend.close()
        if kind == "sqlite":
            path = url.removeprefix("sqlite:///").partition("?")[0] if url else ""
            await asyncio.to_thread(_sqlite_bulk, path, sessions, now)
            return
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO concierge_sessions (id, version, stage, owner, created_at, updated_at, expires_at)"
                    " SELECT 'bench:' || g, 1, NULL, NULL, $1::float8, $1::float8, $2::float8"
                    " FROM generate_series(1, $3::int) g",
                    now,
                    now + DAY,
                    sessions,
                )
                await conn.execute(
                    "INSERT INTO concierge_values (session_id, key, value)"
                    " SELECT 'bench:' || g, 'count', g::text FROM generate_series(1, $1::int) g",
                    sessions,
                )
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

    async def _populate_redis(self, backend: Any, sessions: int, now: float) -> None:
        """Write `sessions` sessions into `backend`'s keys with `_REDIS_POPULATE`, a batch per script run."""
        client = self._redis()
        script = client.register_script(_REDIS_POPULATE)
        expires_at = now + DAY
        ttl = backend._ttl_ms(expires_at, now)  # the backend's own TTL rule, so the keys match its commits
        keys = [f"{backend.prefix}expiry", f"{backend.prefix}sessions"]
        for first in range(1, sessions + 1, _REDIS_BATCH):
            last = min(first + _REDIS_BATCH - 1, sessions)
            args = [backend.prefix, first, last, repr(now), repr(-now), repr(expires_at), ttl, ttl + 1000]
            await script(keys=keys, args=args)

    async def close(self) -> None:
        await self._close_redis()
        if self._databases and self._postgres_admin:
            import asyncpg

            conn = await asyncpg.connect(self._postgres_admin)
            try:
                for name in self._databases:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            finally:
                await conn.close()
        if self._postgres_server is not None:
            self._postgres_server.stop()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    async def _close_redis(self) -> None:
        """Delete the benchmark's keys from a server it was given; stop a server it started."""
        client, self._redis_client = self._redis_client, None
        if client is not None:
            try:
                if self._redis_server is None:  # someone else's server: only the prefixes used here go
                    for prefix in self._redis_prefixes:
                        batch = []
                        async for key in client.scan_iter(match=f"{prefix}*", count=10_000):
                            batch.append(key)
                            if len(batch) >= 10_000:
                                await client.unlink(*batch)
                                batch = []
                        if batch:
                            await client.unlink(*batch)
            finally:
                await client.aclose()
        if self._redis_server is not None:
            await asyncio.to_thread(self._redis_server.stop)
            self._redis_server = None


def _sqlite_bulk(path: str, sessions: int, now: float) -> None:
    """Bulk insert with a recursive CTE (benchmark set-up only: a sync driver, off the event loop)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO concierge_sessions (id, version, stage, owner, created_at, updated_at, expires_at)"
            " SELECT 'bench:' || i, 1, NULL, NULL, ?, ?, ? FROM n",
            (sessions, now, now, now + DAY),
        )
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            " INSERT INTO concierge_values (session_id, key, value) SELECT 'bench:' || i, 'count', i FROM n",
            (sessions,),
        )
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()


# -- the three measurements ----------------------------------------------------------------
@dataclass
class RoundRobin(Series):
    """A series whose calls alternate between two clients, each of another app on the same store.

    What a session sees behind a round-robin balancer in front of two processes:
    each call finds the session written last by the other one.
    """

    other: Client | None = None
    conflicts: int = 0
    calls: int = 0

    async def call(self) -> None:
        client, self.client = self.client, self.other
        self.other = client
        self.calls += 1
        assert self.client is not None
        result = await self.client.call_tool(self.tool, self.arguments)
        if result.is_error:
            if not any("conflict:" in getattr(c, "text", "") for c in result.content):
                raise RuntimeError(f"{self.label}: {self.tool} failed: {result.content}")
            self.conflicts += 1  # reported, as the app's on_conflict="error" reports it to the caller
            return
        handle = (result.meta or {}).get(HANDLE_KEY)
        if handle:
            self.arguments = {**self.arguments, "session_id": handle}


def _without_feed(app: Concierge) -> Concierge:
    """`app` with its store's change feed refused (every call loads its session, as before there was one)."""

    async def no_feed(on_change: Any) -> bool:
        return False

    app.state_backend.watch = no_feed  # type: ignore[method-assign]
    return app


class _Floor:
    """Reference, not concierge: the least a state layer that hands out session handles does per call.

    It replaces concierge's middleware on one app (benchmark-only use of internals): it takes
    `session_id` out of the arguments, checks the signed handle (`Runtime.resolve`), binds a
    working copy of a dict entry so `app.get_state`/`set_state` work, writes the changes back
    into the dict, and puts the handle on the result (`with_handle`). No store, no lock, no
    version check, no expiry, no stages, no limits. Its ratio is the ceiling the handle wire and
    the state API leave on this machine.
    """

    def __init__(self, app: Concierge) -> None:
        from concierge.serve.envelope import with_handle
        from concierge.work import UnitOfWork, WorkingCopy, bind

        self.rt = app.middleware[-1].rt  # type: ignore[attr-defined]
        self.values: dict[str, dict[str, str]] = {}
        self._with_handle, self._unit, self._copy, self._bind = with_handle, UnitOfWork, WorkingCopy, bind

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        if ctx.method != "tools/call":
            return await call_next(ctx)
        params = dict(ctx.params)
        arguments = dict(params.get("arguments") or {})
        supplied = arguments.pop("session_id", None)
        params["arguments"] = arguments
        ctx = copy.copy(ctx)
        ctx.params = params
        who = self.rt.resolve(ctx, supplied, start=True)
        base = self.values.get(who.session_id, {})
        working = self._copy(who.session_id, version=1, base=base)
        with self._bind(self._unit(working)):
            result = await call_next(ctx)
        if working.changes:
            self.values[who.session_id] = {**base, **working.changes}
        return self._with_handle(result, who)


def _floor_app() -> Concierge:
    app = stateful_app()
    app.middleware[-1] = _Floor(app)
    return app


async def throughput(stores: Stores, kind: str, calls: int, rounds: int) -> list[list[str]]:
    """Stateful vs stateless calls, per client; on the 2026-07-28 client also: the store's change feed
    refused, and the session roaming round-robin between two apps on one store."""
    rows = []
    keys = {"handle_keys": "bench-handle-key-0123456789abcdef"}  # one signer for the apps sharing a store
    for mode, client_name in (("auto", "2026-07-28 (handles)"), ("legacy", "legacy (per connection)")):
        state, url = await stores.fresh(kind)
        async with AsyncExitStack() as stack:
            plain = await stack.enter_async_context(connected(stateless_app(), mode))
            stateful = await stack.enter_async_context(connected(stateful_app(state, url, **keys), mode))
            base = Series("stateless", plain, "bump")
            measured = Series("stateful", stateful, "bump", dict(NEW))
            series = [base, measured]
            if mode == "auto":
                other_state, other_url = await stores.fresh(kind)
                no_feed = _without_feed(stateful_app(other_state, other_url, **keys))
                unfed = Series("no feed", await stack.enter_async_context(connected(no_feed, mode)), "bump", dict(NEW))
                shared_state, shared_url = await stores.fresh(kind)
                first = stateful_app(shared_state, shared_url, **keys)
                second = stateful_app(shared_state, shared_url, **keys)  # memory: the same dict
                roaming = RoundRobin(
                    "roaming",
                    await stack.enter_async_context(connected(first, mode)),
                    "bump",
                    dict(NEW),
                    other=await stack.enter_async_context(connected(second, mode)),
                )
                series += [unfed, roaming]
                if kind == "memory":
                    floor_client = await stack.enter_async_context(connected(_floor_app(), mode))
                    floor = Series("floor", floor_client, "bump", dict(NEW))
                    series.append(floor)
            await interleave(series, calls, rounds)
        rows.append(ratio_row(kind, client_name, base, measured))
        if mode == "auto":
            rows.append(ratio_row(kind, client_name + ", no change feed", base, unfed))
            rows.append(
                ratio_row(
                    kind,
                    f"{client_name}, roaming over 2 apps ({roaming.conflicts} conflicts in {roaming.calls} calls)",
                    base,
                    roaming,
                )
            )
            if kind == "memory":
                label = f"{client_name}, reference: the least a handle-carrying state layer does (not concierge)"
                rows.append(ratio_row(kind, label, base, floor))
    return rows


THROUGHPUT_HEADER = ["backend", "client", "stateless calls/s", "stateful calls/s", "ratio", "ratio (medians)"]


def ratio_row(kind: str, client_name: str, base: Series, measured: Series) -> list[str]:
    """One row under `THROUGHPUT_HEADER`."""
    return [
        kind,
        client_name,
        f"{base.per_second:,.0f}",
        f"{measured.per_second:,.0f}",
        f"{measured.per_second / base.per_second:.2f}",
        f"{base.median_us / measured.median_us:.2f}",
    ]


async def http_throughput(stores: Stores, kind: str, calls: int, rounds: int) -> list[list[str]]:
    """The throughput rows again, over streamable HTTP: each server in its own process, 2026-07-28 client."""
    _, url = await stores.fresh(kind)
    async with AsyncExitStack() as stack:
        plain_url = await stack.enter_async_context(http_server("stateless", None, stores.tmp))
        stateful_url = await stack.enter_async_context(http_server("stateful", url or "memory://", stores.tmp))
        plain = await stack.enter_async_context(connected(plain_url, "auto"))
        stateful = await stack.enter_async_context(connected(stateful_url, "auto"))
        for client in (plain, stateful):
            if client.protocol_version != MODERN:
                raise RuntimeError(f"the HTTP client negotiated {client.protocol_version}, not {MODERN}")
        base = Series("stateless", plain, "bump")
        measured = Series("stateful", stateful, "bump", dict(NEW))
        await interleave([base, measured], calls, rounds)
    if measured.arguments["session_id"] == NEW["session_id"]:
        raise RuntimeError("the stateful HTTP server handed out no session handle")
    return [ratio_row(kind, f"{MODERN} (handles)", base, measured)]


async def sessions_scale(stores: Stores, kind: str, counts: list[int], calls: int, rounds: int) -> list[list[str]]:
    series = []
    async with AsyncExitStack() as stack:
        for count in counts:
            state, url = await stores.fresh(kind)
            app = stateful_app(state, url)
            started = time.perf_counter()
            await stores.populate(app, kind, url, count)
            print(f"  {kind}: stored {count:,} sessions in {time.perf_counter() - started:.1f}s", file=sys.stderr)
            client = await stack.enter_async_context(connected(app, "auto"))
            series.append((count, Series(f"{count} sessions", client, "bump", dict(NEW))))
        await interleave([s for _, s in series], calls, rounds)
    smallest = series[0][1].median_us
    return [
        [kind, f"{count:,}", f"{s.median_us:,.0f}", f"{s.quantile(0.99) * 1e6:,.0f}", f"{s.median_us / smallest:.2f}"]
        for count, s in series
    ]


async def keys_scale(stores: Stores, kind: str, keys: int, calls: int, rounds: int) -> list[list[str]]:
    state, url = await stores.fresh(kind)
    async with connected(stateful_app(state, url), "auto") as client:
        series = []
        for count in (1, keys):
            s = Series(f"{count} keys", client, "fill", {"keys": count, **NEW})
            await s.call()  # creates the session and writes its keys in one commit
            s.tool, s.arguments = "touch", {"session_id": s.arguments["session_id"]}
            series.append((count, s))
        await interleave([s for _, s in series], calls, rounds)
    smallest = series[0][1].median_us
    return [
        [kind, f"{count:,}", f"{s.median_us:,.0f}", f"{s.quantile(0.99) * 1e6:,.0f}", f"{s.median_us / smallest:.2f}"]
        for count, s in series
    ]


async def round_trip_row(stores: Stores, kind: str, calls: int, throughput_rows: list[list[str]]) -> list[str]:
    """One row under `ROUND_TRIP_HEADER`: median µs of `load` (version known) and of a one-key `commit`, the
    backend called directly, and the ceiling they leave, from the same run's in-process stateless calls/s."""
    state, url = await stores.fresh(kind)
    backend = state if state is not None else backend_from_url(url)
    async with backend:
        now = time.time()
        version = await backend.commit(Commit("round-trip", 0, {"count": "0"}, expires_at=now + DAY), now=now)
        loads, commits = [], []
        clock = time.perf_counter
        for i in range(calls + 50):  # the first 50 warm up
            start = clock()
            await backend.load("round-trip", now=now, known_version=version)
            loaded = clock()
            version = await backend.commit(
                Commit("round-trip", version, {"count": str(i)}, expires_at=now + DAY), now=now
            )
            if i >= 50:
                loads.append(loaded - start)
                commits.append(clock() - loaded)
    load_us, commit_us = statistics.median(loads) * 1e6, statistics.median(commits) * 1e6
    stateless = {(row[0], row[1].strip()): float(row[2].replace(",", "")) for row in throughput_rows}
    row = [kind, f"{load_us:,.0f}", f"{commit_us:,.0f}"]
    for client in ("2026-07-28 (handles)", "legacy (per connection)"):
        rate = stateless.get((kind, client))
        if rate:
            call_us = 1e6 / rate
            row.append(f"{call_us / (call_us + load_us + commit_us):.2f}")
        else:
            row.append("-")
    return row


ROUND_TRIP_HEADER = [
    "backend",
    "load µs",
    "commit µs",
    "ceiling, 2026-07-28",
    "ceiling, legacy",
]


def fsync_median_us(directory: Path, samples: int = 200) -> float:
    """Median latency of a small write + fsync in `directory`: what a durable SQLite commit waits for."""
    probe = directory / "fsync-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        latencies = []
        for _ in range(samples):
            start = time.perf_counter()
            os.write(fd, b"x" * 128)
            os.fsync(fd)
            latencies.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        probe.unlink()
    return statistics.median(latencies) * 1e6


# -- output -------------------------------------------------------------------------------
def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.rjust(w) if i >= 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
        for r in rows
    ]
    return "\n".join([f"\n{title}\n", line, rule, *body])


async def run(args: argparse.Namespace) -> int:
    stores = Stores(args.postgres_url, args.sqlite_synchronous, args.redis_url)
    kinds = []
    for kind in args.backends:
        reason = await stores.available(kind)
        if reason:
            print(f"skipping {kind}: {reason}", file=sys.stderr)
        else:
            kinds.append(kind)
    outputs = []
    results: dict[str, list[list[str]]] = {}  # measurement -> its table's rows, for --json
    tables = {  # measurement -> the title and header of its table
        "throughput_inprocess": (
            (
                f"Throughput: get_state + set_state of a counter vs the same tool on a plain MCPServer "
                f"({args.calls} calls per series, {args.rounds} interleaved rounds, in-process client)"
            ),
            THROUGHPUT_HEADER,
        ),
        "throughput_http": (
            (
                f"Throughput over streamable HTTP on 127.0.0.1: the same tools, each server in its own process "
                f"under uvicorn ({args.calls} calls per series, {args.rounds} interleaved rounds)"
            ),
            THROUGHPUT_HEADER,
        ),
        "sessions": (
            "Per-call latency vs sessions stored (2026-07-28 client, the call's own session among them)",
            ["backend", "sessions stored", "median µs", "p99 µs", f"median / {args.sessions[0]:,}"],
        ),
        "keys": (
            "Per-call latency touching one key vs keys in the session (2026-07-28 client)",
            ["backend", "keys in session", "median µs", "p99 µs", "median / 1 key"],
        ),
        "roundtrips": (
            (
                f"The store calls of one stateful call on their own (the backend called directly, median of "
                f"{args.calls}), and the in-process ratio they leave room for: stateless call / (stateless call "
                "+ load + commit), with this run's stateless calls/s"
            ),
            ROUND_TRIP_HEADER,
        ),
    }

    async def each_backend(key: str, label: str, measure: Callable[[str], Awaitable[list[list[str]]]]) -> None:
        """Run `measure` on every backend; keep its rows under `key` and print them as `tables[key]` says."""
        rows = []
        for kind in kinds:
            print(f"{label}: {kind} ...", file=sys.stderr)
            rows += await measure(kind)
        results[key] = rows
        title, header = tables[key]
        outputs.append(table(title, header, rows))

    async def round_trips(kind: str) -> list[list[str]]:
        return [await round_trip_row(stores, kind, args.calls, results.get("throughput_inprocess", []))]

    disk_before = fsync_median_us(stores.tmp)
    try:
        if "throughput" not in args.skip and "inprocess" in args.transports:
            await each_backend(
                "throughput_inprocess", "throughput", lambda kind: throughput(stores, kind, args.calls, args.rounds)
            )
        if "throughput" not in args.skip and "http" in args.transports:
            await each_backend(
                "throughput_http",
                "throughput over HTTP",
                lambda kind: http_throughput(stores, kind, args.calls, args.rounds),
            )
        if "sessions" not in args.skip:
            await each_backend(
                "sessions",
                "sessions",
                lambda kind: sessions_scale(stores, kind, args.sessions, args.calls, args.rounds),
            )
        if "keys" not in args.skip:
            await each_backend(
                "keys", "keys", lambda kind: keys_scale(stores, kind, args.keys, args.calls, args.rounds)
            )
        if "roundtrips" not in args.skip:
            await each_backend("roundtrips", "round trips", round_trips)
        disk_after = fsync_median_us(stores.tmp)
    finally:
        await stores.close()
    print("\n".join(outputs))
    waits = (
        "every SQLite commit waits for one (synchronous=full), so its rows move with this number"
        if args.sqlite_synchronous == "full"
        else "SQLite commits do not wait for one (synchronous=normal); only its WAL checkpoints do"
    )
    print(
        f"\nDisk: a small write + fsync took {disk_before:,.0f} µs (median) before the run and {disk_after:,.0f} µs "
        f"after; {waits}."
    )
    print(f"\nPython {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"tables": results, "disk_fsync_us": [disk_before, disk_after]}, indent=2)
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per series (default 2000)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument(
        "--backends", default=",".join(ALL_BACKENDS), help=f"comma-separated subset of {','.join(ALL_BACKENDS)}"
    )
    parser.add_argument("--postgres-url", help="admin URL of an existing PostgreSQL (default: a throwaway server)")
    parser.add_argument(
        "--redis-url",
        help="URL of an existing Redis; each store gets a fresh key prefix, deleted after the run "
        "(default: a throwaway server)",
    )
    parser.add_argument(
        "--sessions", default="1000,1000000", help="stored-session counts to compare (default 1000,1000000)"
    )
    parser.add_argument("--keys", type=int, default=1000, help="keys in the big session (default 1000)")
    parser.add_argument("--json", help="also write every table's rows to this JSON file")
    parser.add_argument(
        "--skip", default="", help="comma-separated measurements to skip: throughput,sessions,keys,roundtrips"
    )
    parser.add_argument(
        "--transports",
        default="inprocess",
        help="comma-separated transports for the throughput measurement: inprocess (default), http "
        "(servers in subprocesses on 127.0.0.1, 2026-07-28 client)",
    )
    parser.add_argument(
        "--sqlite-synchronous",
        choices=("normal", "full"),
        default="normal",
        help="the SQLite backend's synchronous setting (default normal: no fsync per commit)",
    )
    parser.add_argument("--serve", choices=("stateless", "stateful"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return serve(args.serve, args.port)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(ALL_BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(ALL_BACKENDS)}")
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = set(args.transports) - set(ALL_TRANSPORTS)
    if unknown or not args.transports:
        parser.error(f"unknown transports {sorted(unknown)}; choose from {', '.join(ALL_TRANSPORTS)}")
    args.sessions = [int(n) for n in args.sessions.split(",")]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)  # MCPServer sets INFO: a log line per call would be measured
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
