"""PostgreSQL-only behaviour: the driver extra, unreachable server, server lost and back, write economy, migrations."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from concierge.errors import ConfigurationError, ConflictError, StateUnavailableError
from concierge.state import Commit, backend_from_url
from concierge.state.postgres import PostgresBackend
from tests.conftest import _ThrowawayPostgres, fresh_postgres_database, not_here
from tests.test_sqlite_backend import SQLMigrationTests

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

NOW = 1_000_000.0
SECRET = "s3cret"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pg_url(postgres_server: str) -> str:
    return fresh_postgres_database(postgres_server)


def _full_text(exc: BaseException) -> str:
    """The message and everything a traceback of `exc` would print."""
    return "".join(traceback.format_exception(exc)) + repr(exc.__context__) + repr(exc.__cause__)


# -- the driver, URLs and unreachable servers ---------------------------------------------------------


def test_postgres_without_the_extra_says_which_install_command_adds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # `import asyncpg` now fails as it does where the package is not installed
    for name in [n for n in sys.modules if n == "asyncpg" or n.startswith("asyncpg.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "concierge.state.postgres")
    for url in (f"postgresql://u:{SECRET}@db.example:5432/app", "postgres://localhost/app"):
        with pytest.raises(ConfigurationError) as caught:
            backend_from_url(url)
        assert 'pip install "concierge[postgres]"' in str(caught.value)
        assert "CONCIERGE_STATE_URL" in str(caught.value) and SECRET not in str(caught.value)


def test_postgres_driver_is_imported_only_for_a_postgres_url() -> None:
    probe = (
        "import sys, concierge, concierge.state\n"
        "assert 'asyncpg' not in sys.modules, 'import concierge imported asyncpg'\n"
        "concierge.state.backend_from_url('sqlite:///x.db')\n"
        "assert 'asyncpg' not in sys.modules, 'a sqlite:// URL imported asyncpg'\n"
        "concierge.state.backend_from_url('postgresql://localhost/db')\n"
        "assert 'asyncpg' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_postgres_both_schemes_build_the_postgres_backend() -> None:
    for scheme in ("postgresql", "postgres"):
        b = backend_from_url(f"{scheme}://u:{SECRET}@db.example:6543/app")
        assert isinstance(b, PostgresBackend)
        assert b.location == "db.example:6543"
        assert SECRET not in repr(b)


def test_postgres_url_with_an_at_sign_in_its_query_is_accepted() -> None:
    """Only an '@' after the host part with no user info before it means a password that ended the host part."""
    b = backend_from_url(f"postgresql://u:{SECRET}@db.example:6543/app?application_name=me@host")
    assert isinstance(b, PostgresBackend) and b.location == "db.example:6543"


def test_postgres_malformed_url_is_a_configuration_error_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        backend_from_url(f"postgresql://u:{SECRET}@db.example:notaport/app")
    assert "malformed" in str(caught.value) and SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "template",
    ["postgresql://u:{secret}@127.0.0.1:{port}/db", "postgres://u@127.0.0.1:{port}/db?password={secret}"],
)
async def test_postgres_unreachable_server_names_host_and_port_never_the_password(
    template: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = _unused_port()
    b = backend_from_url(template.format(secret=SECRET, port=port))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StateUnavailableError) as caught:
        await b.open()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert SECRET not in _full_text(caught.value)
    assert SECRET not in caplog.text
    with pytest.raises(StateUnavailableError):  # a method on the never-opened backend says the same
        await b.load("s1", now=NOW)
    await b.close()


# -- concurrent start-up ----------------------------------------------------------------------


# -- what a commit costs -------------------------------------------------------------------------


async def test_postgres_commit_of_one_key_writes_one_value_row_in_a_large_session(pg_url: str) -> None:
    async with PostgresBackend(pg_url) as b:
        await b.commit(Commit("big", 0, {f"k{i}": str(i) for i in range(1000)}), now=NOW)
        await b.commit(Commit("big", 1, {"k5": "55", "k6": None}), now=NOW)
        async with b._transaction(write=False) as tx:
            # rows written by the last commit carry its transaction id in xmin
            rows = await tx.fetch(
                "SELECT count(*) FROM concierge_values WHERE xmin = "
                "(SELECT xmin FROM concierge_sessions WHERE id = 'big')"
            )
            (total,) = (await tx.fetch("SELECT count(*) FROM concierge_values"))[0]
        assert rows[0][0] == 1 and total == 999


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"a": '"A"'},
        {"a": '"A"', "n": "7"},
        {"b": None},
        {"b": None, "a": '"A"'},
        {"b": None, "c": None, "a": '"A"', "n": "7"},
    ],
    ids=["nothing", "one-write", "writes", "one-removal", "removal-and-write", "removals-and-writes"],
)
async def test_postgres_update_of_every_shape_writes_exactly_its_changes(
    pg_url: str, changes: dict[str, str | None]
) -> None:
    # An update runs one of several statements, by what it removes and writes.
    async with PostgresBackend(pg_url) as b:
        await b.commit(Commit("s", 0, {"a": '"a"', "b": '"b"', "c": '"c"'}, expires_at=NOW + 60), now=NOW)
        assert await b.commit(Commit("s", 1, changes, stage="two", expires_at=NOW + 90), now=NOW + 1) == 2
        record = await b.load("s", now=NOW + 1)
        expected = {"a": '"a"', "b": '"b"', "c": '"c"'}
        for key, value in changes.items():
            if value is None:
                expected.pop(key)
            else:
                expected[key] = value
        assert record is not None
        assert (record.version, record.values, record.stage, record.expires_at) == (2, expected, "two", NOW + 90)
        with pytest.raises(ConflictError):  # the same shape at a stale version changes nothing
            await b.commit(Commit("s", 1, changes), now=NOW + 2)
        again = await b.load("s", now=NOW + 2)
        assert again is not None and (again.version, again.values) == (2, expected)


async def test_postgres_connections_the_server_dropped_while_idle_cost_no_call_an_error(pg_url: str) -> None:
    # Between statements the backend keeps its connections; one the server has closed meanwhile is
    # replaced, not used.
    async with PostgresBackend(pg_url, min_size=1, max_size=3) as b:
        await b.commit(Commit("s", 0, {"n": "0"}), now=NOW)
        async with anyio.create_task_group() as tg:  # three at once: three connections kept
            for key in ("x", "y", "z"):
                tg.start_soon(lambda k=key: b.commit(Commit(k, 0, {"n": "0"}), now=NOW))
        admin = await asyncpg.connect(pg_url)
        try:
            database = await admin.fetchval("SELECT current_database()")
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                database,
            )
            assert ended >= 1
            await anyio.sleep(0.2)  # the closed connections' end has reached this process
            for version in range(1, 4):
                assert await b.commit(Commit("s", version, {"n": str(version)}), now=NOW) == version + 1
            record = await b.load("s", now=NOW)
            assert record is not None and record.values == {"n": "3"}
        finally:
            await admin.close()


async def test_postgres_more_statements_than_connections_wait_their_turn_even_when_some_give_up(pg_url: str) -> None:
    async with PostgresBackend(pg_url, min_size=1, max_size=2) as b:
        for i in range(12):
            await b.commit(Commit(f"s{i}", 0, {"n": "0"}), now=NOW)
        admin = await asyncpg.connect(pg_url)
        try:
            # Both connections block on a lock; the other ten statements wait for one of them.
            await admin.execute("BEGIN")
            await admin.execute("SELECT 1 FROM concierge_sessions WHERE id IN ('s0', 's1') FOR UPDATE")
            landed: list[int] = []

            async def bump(i: int) -> None:
                assert await b.commit(Commit(f"s{i}", 1, {"n": "1"}), now=NOW) == 2
                landed.append(i)

            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(bump, i)
                with anyio.CancelScope() as quitters:  # two waiting statements give up
                    async with anyio.create_task_group() as quit_tg:
                        quit_tg.start_soon(bump, 100)
                        quit_tg.start_soon(bump, 101)
                        await anyio.sleep(0.2)
                        quitters.cancel()
                await anyio.sleep(0.1)
                assert landed == []  # every one is still waiting behind the lock
                await admin.execute("ROLLBACK")
            assert sorted(landed) == list(range(12))
        finally:
            await admin.close()
        assert await b.commit(Commit("s0", 2, {"n": "2"}), now=NOW) == 3  # and the backend is whole


async def test_postgres_close_with_statements_in_flight_ends_them_promptly_and_reopens(pg_url: str) -> None:
    b = PostgresBackend(pg_url, min_size=1, max_size=1)
    await b.open()
    await b.commit(Commit("s", 0, {"n": "0"}), now=NOW)
    admin = await asyncpg.connect(pg_url)
    outcomes: dict[str, object] = {}

    async def commit(name: str) -> None:
        try:
            outcomes[name] = await b.commit(Commit("s", 1, {"n": name}), now=NOW)
        except Exception as exc:  # noqa: BLE001 - what each statement met is the point
            outcomes[name] = exc

    try:
        await admin.execute("BEGIN")
        await admin.execute("SELECT 1 FROM concierge_sessions WHERE id = 's' FOR UPDATE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit, "running")  # takes the only connection, then waits on the lock
            await anyio.sleep(0.2)
            tg.start_soon(commit, "waiting")  # waits for the connection
            await anyio.sleep(0.1)
            closing = anyio.Event()

            async def close() -> None:
                await b.close()
                closing.set()

            tg.start_soon(close)
            await anyio.sleep(0.2)
            assert isinstance(outcomes.get("waiting"), StateUnavailableError)
            assert "closed" in str(outcomes["waiting"])
            started = time.monotonic()
            await admin.execute("ROLLBACK")  # the running statement ends ...
            await closing.wait()  # ... goes back to the closing pool, which closes without waiting its 5 s
            assert time.monotonic() - started < 2
        assert outcomes["running"] == 2
    finally:
        await admin.close()
    async with b:  # the same object opens again and serves
        assert await b.commit(Commit("s", 2, {"n": "again"}), now=NOW) == 3


async def test_postgres_a_cancelled_commit_leaves_a_usable_backend_and_writes_all_or_nothing(pg_url: str) -> None:
    async with PostgresBackend(pg_url, min_size=1, max_size=2) as b:
        await b.commit(Commit("s", 0, {"n": "0"}), now=NOW)
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute("BEGIN")
            await admin.execute("SELECT 1 FROM concierge_sessions WHERE id = 's' FOR UPDATE")  # the commit waits
            with anyio.move_on_after(0.3) as scope:
                await b.commit(Commit("s", 1, {"n": "1"}), now=NOW)
            assert scope.cancelled_caught
            await admin.execute("ROLLBACK")
        finally:
            await admin.close()
        for _ in range(4):  # more commits than the pool has connections: none is left stuck
            record = await b.load("s", now=NOW)
            assert record is not None
            assert await b.commit(Commit("s", record.version, {"n": str(record.version + 1)}), now=NOW) == (
                record.version + 1
            )
        record = await b.load("s", now=NOW)
        # The cancelled commit landed whole or not at all (its cancel may reach the server after the lock
        # is gone), and every later one landed on top of it.
        assert record is not None and record.version in (5, 6) and record.values == {"n": str(record.version)}


# -- the server goes away and comes back ---------------------------------------------------------


class _RestartablePostgres(_ThrowawayPostgres):
    def halt(self) -> None:
        """Stop the server as a crash would (no clean shutdown)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def resume(self) -> None:
        """Start it again on the same port (pg_ctl restart reuses the last options)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-w", "restart")


@pytest.fixture
def own_server() -> Iterator[_RestartablePostgres]:
    """A cluster of this test's own, so stopping it disturbs no other test."""
    try:
        server = _RestartablePostgres()
    except FileNotFoundError as exc:
        not_here(
            f"needs PostgreSQL server binaries to stop and restart a server: {exc}",
            in_ci=f"CI must run the Postgres tests, but {exc}",
        )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _wait_until_blocked(admin: asyncpg.Connection) -> None:
    with anyio.fail_after(10):
        while not await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%concierge_values%'"
        ):
            await anyio.sleep(0.01)


def _cluster_pids(server: _RestartablePostgres) -> list[int]:
    """The postmaster and every process it started (backends, checkpointer, ...)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:  # the parent pid
            pids.append(int(stat.parent.name))
    return pids


async def test_postgres_server_that_stops_answering_fails_calls_after_query_timeout_and_recovers(
    own_server: _RestartablePostgres,
) -> None:
    """A hung host or a partition: connections stay open, nothing answers (the cluster is SIGSTOPped)."""
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:{own_server.port}/postgres"
    backend = PostgresBackend(url, query_timeout=1.0, connect_timeout=1.0)
    await backend.open()
    pids: list[int] = []
    try:
        await backend.commit(Commit("s1", 0, {"a": '"old"'}), now=NOW)
        pids = _cluster_pids(own_server)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for call in (
            lambda: backend.commit(Commit("s1", 1, {"a": '"new"'}), now=NOW),
            lambda: backend.load("s1", now=NOW),
        ):
            started = time.monotonic()
            with pytest.raises(StateUnavailableError, match=r"no answer in time.*query_timeout=1s") as caught:
                await call()
            assert time.monotonic() - started < 5
            assert f"127.0.0.1:{own_server.port}" in str(caught.value) and SECRET not in _full_text(caught.value)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    try:
        with anyio.fail_after(30):  # the same object, no reopen; nothing of the timed-out commit was kept
            while True:
                try:
                    record = await backend.load("s1", now=NOW)
                    break
                except StateUnavailableError:
                    await anyio.sleep(0.1)
        assert record is not None and (record.version, record.values) == (1, {"a": '"old"'})
        assert await backend.commit(Commit("s1", 1, {"a": '"new"'}), now=NOW) == 2
    finally:
        await backend.close()


def test_postgres_query_timeout_must_be_positive_or_none() -> None:
    assert PostgresBackend("postgresql://h/db").query_timeout == 30.0
    assert PostgresBackend("postgresql://h/db", query_timeout=None).query_timeout is None
    for bad in (0, -1.0):
        with pytest.raises(ConfigurationError, match="query_timeout"):
            PostgresBackend("postgresql://h/db", query_timeout=bad)


async def test_postgres_server_lost_mid_run_raises_unavailable_writes_nothing_and_recovers(
    own_server: _RestartablePostgres,
) -> None:
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:{own_server.port}/postgres"  # trust auth ignores it
    backend = PostgresBackend(url, min_size=2)
    await backend.open()
    side: list[asyncpg.Connection] = []
    try:
        await backend.commit(Commit("s1", 0, {"a": '"old"', "b": '"old"'}), now=NOW)
        # Hold key "b" so a commit blocks after it has bumped the version and written "a" ...
        admin = await asyncpg.connect(url)
        side.append(admin)
        await admin.execute("BEGIN")
        await admin.execute("SELECT 1 FROM concierge_values WHERE session_id = 's1' AND key = 'b' FOR UPDATE")
        failures: list[BaseException] = []

        async def blocked_commit() -> None:
            try:
                await backend.commit(Commit("s1", 1, {"a": '"new"', "b": '"new"'}), now=NOW)
            except StateUnavailableError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_commit)
            watcher = await asyncpg.connect(url)
            side.append(watcher)
            await _wait_until_blocked(watcher)
            # The throwaway cluster commits asynchronously (synchronous_commit=off): make what is
            # committed so far crash-proof, or the crash below would lose the schema too.
            await watcher.execute("CHECKPOINT")
            await anyio.to_thread.run_sync(own_server.halt)  # ... and lose the server mid-transaction
        assert len(failures) == 1
        for exc in failures:
            assert f"127.0.0.1:{own_server.port}" in str(exc) and SECRET not in _full_text(exc)

        calls = [
            lambda: backend.load("s1", now=NOW),
            lambda: backend.load("s1", now=NOW, known_version=1),
            lambda: backend.commit(Commit("s1", 1, {"a": '"x"'}), now=NOW),
            lambda: backend.commit(Commit("s2", 0), now=NOW),
            lambda: backend.delete("s1"),
            lambda: backend.clear_expired(now=NOW),
        ]
        for call in calls:
            with pytest.raises(StateUnavailableError, match=f"127.0.0.1:{own_server.port}") as caught:
                await call()
            assert SECRET not in _full_text(caught.value)

        await anyio.to_thread.run_sync(own_server.resume)
        record = await backend.load("s1", now=NOW)  # the same object, no reopen
        assert record is not None and (record.version, record.values) == (1, {"a": '"old"', "b": '"old"'})
        assert await backend.commit(Commit("s1", 1, {"a": '"new"'}), now=NOW) == 2
        assert await backend.load("s2", now=NOW) is None
    finally:
        for conn in side:
            conn.terminate()
        await backend.close()


# -- the SQL schema's migrations, as on SQLite ------------------------------------------------------


class TestPostgresMigrations(SQLMigrationTests):
    @pytest.fixture
    def sql_url(self, pg_url: str) -> str:
        return pg_url
