"""Shared fixtures: a real throwaway PostgreSQL and Redis, and one state URL per backend.

PostgreSQL: `CONCIERGE_TEST_POSTGRES_URL` points the tests at an existing server
(each test gets a fresh database created on it). Otherwise, when the server
binaries (`initdb`, `pg_ctl`) are installed, a throwaway cluster is started in
a temporary directory for the test session and stopped after it. Without
either, the Postgres tests skip with that reason - except under `CI=true`, where
they fail: CI must run them.

Redis: the same, with `CONCIERGE_TEST_REDIS_URL` (an existing server; each test
gets a fresh key prefix on it, nothing is flushed) or a throwaway `redis-server`
started on a free loopback port without persistence.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

PG_ENV = "CONCIERGE_TEST_POSTGRES_URL"
REDIS_ENV = "CONCIERGE_TEST_REDIS_URL"
BACKENDS = ["memory", "sqlite", "postgres", "redis"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / name).exists():
            return str(base / name)
    return None


class _ThrowawayPostgres:
    """A PostgreSQL cluster in a temp dir, run as the unprivileged `postgres` user when we are root."""

    def __init__(self) -> None:
        self.initdb = _pg_bin("initdb")
        self.pg_ctl = _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="concierge-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
                pw = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o755)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, *args],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
        )

    def start(self) -> str:
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.data} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def not_here(reason: str, *, in_ci: str | None = None) -> NoReturn:
    """Skip for `reason`; under CI (`CI` set), which must run every test, fail with `in_ci` (or `reason`) instead."""
    if os.environ.get("CI"):
        pytest.fail(in_ci or reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The admin URL of a running PostgreSQL server (skips when none can be had)."""
    url = os.environ.get(PG_ENV)
    if url:
        yield url
        return
    try:
        server = _ThrowawayPostgres()
    except FileNotFoundError as exc:
        not_here(
            f"Postgres tests skipped: {exc} and {PG_ENV} is not set", in_ci=f"CI must run the Postgres tests, but {exc}"
        )
    try:
        admin_url = server.start()
    except subprocess.CalledProcessError as exc:
        server.stop()
        message = f"could not start a throwaway PostgreSQL: {exc.stderr.decode(errors='replace')}"
        not_here(message)
    try:
        yield admin_url
    finally:
        server.stop()


def _with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


def fresh_postgres_database(admin_url: str) -> str:
    """Create an empty database on the server and return its URL."""
    import asyncpg

    name = "t_" + uuid.uuid4().hex[:16]

    async def create() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return _with_database(admin_url, name)


class ThrowawayRedis:
    """A `redis-server` on a free loopback port, keeping nothing on disk, in a temp dir of its own."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="concierge-redis-"))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start the server (on this object's port) and wait until it answers; return its URL."""
        log = open(self.root / "log", "ab")  # noqa: SIM115 - the server process owns it
        args = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, *args, "--dir", str(self.root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            close_fds=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.root / 'log').read_text(errors='replace')[-2000:]}")
            if _answers_ping(self.port):
                return self.url
            time.sleep(0.02)
        self.halt()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 15 s")

    def halt(self) -> None:
        """Stop the server as a crash would (SIGKILL): everything it held is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_throwaway_redis() -> ThrowawayRedis:
    """A started `ThrowawayRedis` (another port is tried when the chosen one was taken meanwhile)."""
    for attempt in range(3):
        server = ThrowawayRedis()
        try:
            server.start()
            return server
        except RuntimeError:
            server.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """The URL of a running Redis server (skips when none can be had, fails under CI)."""
    url = os.environ.get(REDIS_ENV)
    if url:
        yield url
        return
    try:
        server = start_throwaway_redis()
    except FileNotFoundError as exc:
        not_here(
            f"Redis tests skipped: {exc} and {REDIS_ENV} is not set", in_ci=f"CI must run the Redis tests, but {exc}"
        )
    except RuntimeError as exc:
        message = f"could not start a throwaway Redis: {exc}"
        not_here(message)
    try:
        yield server.url
    finally:
        server.stop()


def fresh_redis_url(server_url: str, request: pytest.FixtureRequest) -> str:
    """`server_url` with a key prefix no other test uses (an empty store), whose keys go when the test ends."""
    parts = urlsplit(server_url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "prefix"]
    prefix = f"concierge-test-{uuid.uuid4().hex[:16]}:"
    request.addfinalizer(lambda: _delete_redis_keys(parts._replace(query=urlencode(query)).geturl(), prefix))
    return parts._replace(query=urlencode([*query, ("prefix", prefix)])).geturl()


def _delete_redis_keys(server_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(server_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    except redis.ConnectionError:
        pass  # a test stopped this server: nothing is left to delete
    finally:
        client.close()


@pytest.fixture(params=BACKENDS)
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A state URL naming a fresh, empty store, once per backend."""
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if kind == "redis":
        return fresh_redis_url(request.getfixturevalue("redis_server"), request)
    admin = request.getfixturevalue("postgres_server")
    return fresh_postgres_database(admin)


def _shared_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if kind == "redis":
        return fresh_redis_url(request.getfixturevalue("redis_server"), request)
    return fresh_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def persistent_state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store on every backend that outlives a server process."""
    return _shared_store(request.param, request, tmp_path)


@pytest.fixture(params=["postgres", "redis"])
def networked_state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store on every backend that server processes on several machines can share."""
    return _shared_store(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def durable_state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A state URL naming a fresh, empty store on each backend that survives a restart."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return fresh_postgres_database(request.getfixturevalue("postgres_server"))
