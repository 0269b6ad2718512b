"""Redis-only behaviour: URLs, the missing extra, the key prefix, native TTLs, WATCH, lost server, processes."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import redis
import redis.asyncio as aioredis

import concierge.state._redis_layout as redis_layout
import concierge.state._redis_scripts as redis_scripts
import concierge.state.redis as redis_module
from concierge.errors import ConfigurationError, ConflictError, StateUnavailableError
from concierge.state import Commit, backend_from_url
from concierge.state.redis import DEFAULT_PREFIX, RedisBackend
from tests.conftest import ThrowawayRedis, fresh_redis_url, not_here, start_throwaway_redis

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

REPO = Path(__file__).resolve().parents[1]
NOW = 1_000_000.0
SECRET = "s3cret"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_text(exc: BaseException) -> str:
    """The message and everything a traceback of `exc` would print."""
    return "".join(traceback.format_exception(exc)) + repr(exc.__context__) + repr(exc.__cause__)


@pytest.fixture
def redis_url(redis_server: str, request: pytest.FixtureRequest) -> str:
    return fresh_redis_url(redis_server, request)


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    b = RedisBackend.from_url(redis_url)
    async with b:
        yield b


@pytest.fixture
async def raw(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test server, to look at the keys as Redis holds them."""
    client = aioredis.Redis.from_url(RedisBackend.from_url(redis_server)._url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _keys(raw: aioredis.Redis, prefix: str) -> set[str]:
    return {key async for key in raw.scan_iter(match=prefix.replace("*", "\\*") + "*")}


# -- URLs -------------------------------------------------------------------------------------


def test_redis_url_forms_build_the_redis_backend() -> None:
    b = backend_from_url(f"redis://:{SECRET}@cache.example:6380/3?prefix=shop:")
    assert isinstance(b, RedisBackend)
    assert (b.location, b.prefix) == ("cache.example:6380", "shop:")
    assert SECRET not in repr(b) and "prefix" not in b._url  # concierge's own option is not redis-py's
    plain = backend_from_url("redis://localhost")
    assert isinstance(plain, RedisBackend)
    assert (plain.location, plain.prefix) == ("localhost:6379", DEFAULT_PREFIX)
    tls = backend_from_url(f"rediss://user:{SECRET}@secure.example/0?prefix=p:&ssl_cert_reqs=none")
    assert isinstance(tls, RedisBackend) and tls.location == "secure.example:6379" and tls.prefix == "p:"
    assert tls._url.startswith("rediss://") and "ssl_cert_reqs=none" in tls._url
    assert SECRET not in repr(tls)


def test_redis_db_from_the_path_is_used() -> None:
    b = RedisBackend.from_url("redis://127.0.0.1:6379/5?prefix=x:")
    pool = aioredis.Redis.from_url(b._url).connection_pool
    assert pool.connection_kwargs["db"] == 5 and "prefix" not in pool.connection_kwargs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis://:{SECRET}@host:notaport/0", "malformed"),
        (f"redis://:{SECRET}@host:6379/zero", "not a number"),
    ],
)
def test_redis_malformed_url_is_a_configuration_error_without_the_password(url: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        backend_from_url(url)
    assert expected in str(caught.value) and SECRET not in str(caught.value)


def test_redis_without_the_extra_says_which_install_command_adds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # `import redis` now fails as it does where the package is not installed
    for name in [n for n in sys.modules if n == "redis" or n.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "concierge.state.redis")
    for url in (f"redis://:{SECRET}@localhost:6379/0", "rediss://localhost"):
        with pytest.raises(ConfigurationError) as caught:
            backend_from_url(url)
        assert 'pip install "concierge[redis]"' in str(caught.value)
        assert SECRET not in str(caught.value)


# -- unreachable server ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    ["redis://:{secret}@127.0.0.1:{port}/0", "redis://user:{secret}@127.0.0.1:{port}/0?password={secret}"],
)
async def test_redis_unreachable_server_names_host_and_port_never_the_password(
    template: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = _unused_port()
    b = backend_from_url(template.format(secret=SECRET, port=port))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StateUnavailableError) as caught:
        await b.open()
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert SECRET not in _full_text(caught.value)
    with pytest.raises(StateUnavailableError) as again:  # a method on the never-opened backend says the same
        await b.load("s1", now=NOW)
    assert SECRET not in _full_text(again.value)
    assert SECRET not in caplog.text
    await b.close()


async def test_redis_wrong_password_is_unavailable_without_the_password(redis_server: str) -> None:
    host = RedisBackend.from_url(redis_server).location
    b = backend_from_url(f"redis://someone:{SECRET}@{host}/0")
    with pytest.raises(StateUnavailableError) as caught:
        await b.open()
    assert host in str(caught.value) and SECRET not in _full_text(caught.value)


# -- the key prefix -------------------------------------------------------------------------------


async def test_redis_every_key_lives_under_the_prefix_and_prefixes_do_not_see_each_other(
    redis_server: str, raw: aioredis.Redis, request: pytest.FixtureRequest
) -> None:
    url_a, url_b = fresh_redis_url(redis_server, request), fresh_redis_url(redis_server, request)
    async with backend_from_url(url_a) as a, backend_from_url(url_b) as b:
        assert isinstance(a, RedisBackend) and isinstance(b, RedisBackend)
        await a.commit(Commit("user:alice", 0, {"k": '"a"'}, stage="st", expires_at=NOW + 60), now=NOW)
        await a.commit(Commit("s:odd:id", 0, {"k": "1"}), now=NOW)
        await b.commit(Commit("user:alice", 0, {"k": '"b"'}), now=NOW)
        keys_a = await _keys(raw, a.prefix)
        assert keys_a == {
            f"{a.prefix}s:user:alice",
            f"{a.prefix}v:user:alice",
            f"{a.prefix}s:s:odd:id",
            f"{a.prefix}v:s:odd:id",
            f"{a.prefix}expiry",
            f"{a.prefix}sessions",
        }
        assert not keys_a & await _keys(raw, b.prefix)
        ra, rb = await a.load("user:alice", now=NOW), await b.load("user:alice", now=NOW)
        assert ra is not None and rb is not None and (ra.values, rb.values) == ({"k": '"a"'}, {"k": '"b"'})
        assert [s.session_id for s in await b.list_sessions(now=NOW)] == ["user:alice"]
        assert await b.clear_expired(now=NOW + 1000) == 0  # a's expired session is not b's to sweep
        assert await a.delete("user:alice") and await b.load("user:alice", now=NOW) is not None


# -- native expiry -------------------------------------------------------------------------------


async def test_redis_sets_a_relative_ttl_with_grace_on_both_keys_and_none_for_never(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    meta, values = f"{backend.prefix}s:s1", f"{backend.prefix}v:s1"
    # The caller's clock says 1970: Redis' TTL is relative to it, never an absolute instant.
    await backend.commit(Commit("s1", 0, {"a": "1"}, expires_at=NOW + 100), now=NOW)
    grace = backend.expiry_grace
    assert (100 + grace - 5) * 1000 < await raw.pttl(meta) <= (100 + grace) * 1000
    meta_ttl, values_ttl = await raw.pipeline(transaction=True).pttl(meta).pttl(values).execute()
    assert 995 <= values_ttl - meta_ttl <= 1005  # the values outlive the metadata by a second
    assert await raw.zscore(f"{backend.prefix}expiry", "s1") == NOW + 100

    await backend.commit(Commit("s1", 1, {"b": "2"}, expires_at=NOW + 86_400), now=NOW)
    assert 86_400 * 1.1 * 1000 - 5000 < await raw.pttl(meta) <= 86_400 * 1.1 * 1000  # 10% when that is longer

    await backend.commit(Commit("s1", 2, {}, expires_at=None), now=NOW)
    assert (await raw.pttl(meta), await raw.pttl(values)) == (-1, -1)
    assert await raw.zscore(f"{backend.prefix}expiry", "s1") is None

    assert await backend.touch("s1", expires_at=NOW + 50, now=NOW + 10)
    assert (40 + grace - 5) * 1000 < await raw.pttl(meta) <= (40 + grace) * 1000
    assert await raw.pttl(values) > 0
    assert await backend.touch("s1", expires_at=None, now=NOW + 20)
    assert (await raw.pttl(meta), await raw.pttl(values)) == (-1, -1)

    await backend.commit(Commit("c1", 0, expires_at=NOW + 30), now=NOW)
    assert 0 < await raw.pttl(f"{backend.prefix}s:c1") <= (30 + grace) * 1000


async def test_redis_checkpoints_key_expires_renews_and_goes_with_its_session(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    meta, values, hist = (f"{backend.prefix}{kind}:s1" for kind in ("s", "v", "h"))
    await backend.commit(Commit("s1", 0, {"a": "1"}, expires_at=NOW + 100, keep_checkpoints=2), now=NOW)
    assert await raw.exists(hist) == 1
    assert await raw.pttl(hist) == pytest.approx(await raw.pttl(values), abs=50)  # expires with the values
    await backend.commit(Commit("s1", 1, {"a": "2"}, expires_at=NOW + 100), now=NOW)  # no checkpoint...
    assert await raw.pttl(hist) == pytest.approx(await raw.pttl(values), abs=50)  # ...but the TTL still moves
    assert await backend.touch("s1", expires_at=None, now=NOW + 1)
    assert await raw.pttl(hist) == -1
    assert [c.version for c in await backend.checkpoints("s1")] == [1]
    for version in (2, 3, 4):
        await backend.commit(Commit("s1", version, {"a": str(version + 1)}, keep_checkpoints=2), now=NOW)
    assert [c.version for c in await backend.checkpoints("s1")] == [4, 5]  # pruned to 2 in the same transaction

    await backend.commit(Commit("gone", 0, {"a": "1"}, expires_at=NOW + 1, keep_checkpoints=5), now=NOW)
    assert [r.session_id for r in await backend.take_expired(now=NOW + 2, limit=10)] == ["gone"]
    assert await raw.exists(f"{backend.prefix}h:gone") == 0  # the sweep takes the checkpoints too
    assert await backend.delete("s1")
    assert await raw.exists(meta, values, hist) == 0


async def test_redis_dropping_a_session_by_itself_hides_it_and_the_sweep_prunes_its_index(
    redis_url: str, raw: aioredis.Redis
) -> None:
    async with RedisBackend.from_url(redis_url) as b:
        b.expiry_grace = 0.0
        clock = time.time()
        await b.commit(Commit("short", 0, {"a": "1"}, expires_at=clock + 0.2), now=clock)
        await b.commit(Commit("keep", 0, {"a": "1"}, expires_at=clock + 3600), now=clock)
        await anyio.sleep(1.5)  # Redis' own expiry drops both keys of "short"
        assert await raw.exists(f"{b.prefix}s:short", f"{b.prefix}v:short") == 0
        assert await b.load("short", now=float("-inf")) is None
        assert await raw.zscore(f"{b.prefix}expiry", "short") is not None  # only the index remembers it
        assert await b.take_expired(now=clock + 10, limit=10) == []  # nothing to hand out, the entry is pruned
        assert await raw.zrange(f"{b.prefix}expiry", 0, -1) == ["keep"]
        assert await raw.zrange(f"{b.prefix}sessions", 0, -1) == ["keep"]
        assert await b.clear_expired(now=clock + 10) == 0


async def test_redis_take_expired_hands_each_session_to_one_of_several_concurrent_sweepers(redis_url: str) -> None:
    async with RedisBackend.from_url(redis_url) as writer:
        for i in range(40):
            await writer.commit(Commit(f"old{i}", 0, {"i": str(i)}, expires_at=NOW + i), now=NOW)
        await writer.commit(Commit("live", 0, {"i": "x"}, expires_at=NOW + 1000), now=NOW)
    taken: list[str] = []

    async def sweeper() -> None:
        async with RedisBackend.from_url(redis_url) as b:
            while batch := await b.take_expired(now=NOW + 100, limit=3):
                taken.extend(r.session_id for r in batch)
                assert all(r.values == {"i": r.session_id[3:]} for r in batch)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(sweeper)
    assert sorted(taken) == sorted(f"old{i}" for i in range(40))  # each exactly once


# -- WATCH -------------------------------------------------------------------------------------


async def test_redis_a_touch_between_watch_and_exec_is_retried_not_a_conflict(
    backend: RedisBackend, redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}, expires_at=NOW + 60), now=NOW)
    side = redis.Redis.from_url(redis_server, decode_responses=True)
    checks = 0
    original = redis_layout.checked_version

    def checked_then_renewed(*args: object) -> int:
        nonlocal checks
        checks += 1
        if checks == 1:  # another process renews the session after this commit read its version
            side.hset(f"{backend.prefix}s:s1", mapping={"expires_at": repr(NOW + 90), "updated_at": repr(NOW + 1)})
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(redis_layout, "checked_version", checked_then_renewed)
    try:  # commit_all takes the WATCH path (a lone update is one script, never interleaved)
        assert await backend.commit_all([Commit("s1", 1, {"a": "2"}, expires_at=NOW + 120)], now=NOW + 2) == [2]
    finally:
        side.close()
    assert checks == 2
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values, record.expires_at) == (2, {"a": "2"}, NOW + 120)


async def test_redis_a_commit_between_watch_and_exec_is_a_conflict_and_writes_nothing(
    backend: RedisBackend, redis_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}), now=NOW)
    await backend.commit(Commit("s2", 0, {"a": "1"}), now=NOW)
    side = redis.Redis.from_url(RedisBackend.from_url(redis_server)._url, decode_responses=True)
    original = redis_layout.checked_version
    interfered = False

    def checked_then_overtaken(commit: Commit, *rest: object) -> int:
        nonlocal interfered
        if commit.session_id == "s2" and not interfered:
            interfered = True  # another process commits to s2 after this unit of work read its version
            with side.pipeline(transaction=True) as pipe:
                pipe.hincrby(f"{backend.prefix}s:s2", "version", 1)
                pipe.hset(f"{backend.prefix}v:s2", "a", "other")
                pipe.execute()
        return original(commit, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(redis_layout, "checked_version", checked_then_overtaken)
    try:
        with pytest.raises(ConflictError, match="'s2' is at version 2, expected 1"):
            await backend.commit_all([Commit("s1", 1, {"a": "mine"}), Commit("s2", 1, {"a": "mine"})], now=NOW)
    finally:
        side.close()
    for sid, value, version in (("s1", "1", 1), ("s2", "other", 2)):
        record = await backend.load(sid, now=NOW)
        assert record is not None and (record.values, record.version) == ({"a": value}, version)


# -- an update in one script -------------------------------------------------------------------------


async def _as_stored(raw: aioredis.Redis, prefix: str, sid: str) -> tuple[object, ...]:
    """Everything Redis holds for one session, TTLs to the second."""
    meta, values = f"{prefix}s:{sid}", f"{prefix}v:{sid}"
    pipe = raw.pipeline(transaction=True)
    pipe.hgetall(meta).hgetall(values).zscore(f"{prefix}expiry", sid).zscore(f"{prefix}sessions", sid)
    pipe.pttl(meta).pttl(values).pttl(f"{prefix}h:{sid}")
    found = await pipe.execute()
    return (*found[:4], *(round(ttl / 1000) if ttl > 0 else ttl for ttl in found[4:]))


UPDATES = [  # (changes, stage, expires_at offset or None), applied in order to a session at version 1
    ({"a": '"2"', "b": "[1,2]"}, "cart", 60.0),
    ({"a": None, "c": '{"x":"y"}'}, redis_module.UNCHANGED, 120.0),
    ({}, None, None),
    ({"b": None, "missing": None}, "pay", 30.0),
    ({f"k{i}": str(i) for i in range(50)}, redis_module.UNCHANGED, None),
]


async def test_redis_an_update_is_one_script_call_that_stores_what_multi_exec_would(
    backend: RedisBackend, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    for sid in ("script", "watch"):
        await backend.commit(Commit(sid, 0, {"a": '"1"', "b": "true"}, stage="browse", expires_at=NOW + 10), now=NOW)
    assert backend._client is not None
    sent: list[object] = []
    original = backend._client.execute_command

    async def counted(*args: object, **options: object) -> object:
        sent.append(args[0])
        return await original(*args, **options)

    monkeypatch.setattr(backend._client, "execute_command", counted)
    for n, (changes, stage, offset) in enumerate(UPDATES):
        now = NOW + n + 1
        expires_at = None if offset is None else now + offset
        sent.clear()
        assert (
            await backend.commit(Commit("script", n + 1, changes, stage=stage, expires_at=expires_at), now=now) == n + 2
        )
        assert sent == ["EVALSHA"], sent  # one round trip
        await backend.commit_all([Commit("watch", n + 1, changes, stage=stage, expires_at=expires_at)], now=now)
        assert await _as_stored(raw, backend.prefix, "script") == await _as_stored(raw, backend.prefix, "watch")
    record = await backend.load("script", now=NOW)
    assert record is not None and record.version == len(UPDATES) + 1 and record.stage == "pay"
    assert record.values == {"c": '{"x":"y"}', **{f"k{i}": str(i) for i in range(50)}}


async def test_redis_an_update_reports_conflicts_and_writes_nothing(backend: RedisBackend, raw: aioredis.Redis) -> None:
    await backend.commit(Commit("s1", 0, {"a": "1"}, expires_at=NOW + 10), now=NOW)
    before = await _as_stored(raw, backend.prefix, "s1")
    with pytest.raises(ConflictError, match="'s1' is at version 1, expected 4"):
        await backend.commit(Commit("s1", 4, {"a": "2"}, stage="x"), now=NOW)
    with pytest.raises(ConflictError, match="'s1' no longer exists"):
        await backend.commit(Commit("s1", 1, {"a": "2"}), now=NOW + 10)  # expired at that instant
    with pytest.raises(ConflictError, match="'never' no longer exists"):
        await backend.commit(Commit("never", 1, {"a": "2"}), now=NOW)
    assert await _as_stored(raw, backend.prefix, "s1") == before
    assert not await raw.exists(f"{backend.prefix}s:never", f"{backend.prefix}v:never")


async def test_redis_an_update_of_more_keys_than_one_script_carries_takes_multi_exec(backend: RedisBackend) -> None:
    await backend.commit(Commit("big", 0, {"a": "1"}), now=NOW)
    many = {f"k{i}": str(i) for i in range(redis_scripts.UPDATE_MAX_KEYS + 500)}
    assert await backend.commit(Commit("big", 1, {**many, "a": None}), now=NOW) == 2
    record = await backend.load("big", now=NOW)
    assert record is not None and record.values == many


# -- the server goes away and comes back ------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[ThrowawayRedis]:
    """A server of this test's own, so stopping it disturbs no other test."""
    try:
        server = start_throwaway_redis()
    except (FileNotFoundError, RuntimeError) as exc:
        not_here(
            f"needs redis-server to stop and restart a server: {exc}", in_ci=f"CI must run the Redis tests, but {exc}"
        )
    try:
        yield server
    finally:
        server.stop()


async def test_redis_server_lost_mid_run_raises_unavailable_and_recovers(own_server: ThrowawayRedis) -> None:
    url = f"redis://127.0.0.1:{own_server.port}/0?prefix=t:"
    backend = RedisBackend.from_url(url)
    await backend.open()
    try:
        await backend.commit(Commit("s1", 0, {"a": '"old"'}), now=NOW)
        await anyio.to_thread.run_sync(own_server.halt)
        calls = [
            lambda: backend.load("s1", now=NOW),
            lambda: backend.load("s1", now=NOW, known_version=1),
            lambda: backend.commit(Commit("s1", 1, {"a": '"x"'}), now=NOW),
            lambda: backend.commit_all([Commit("s1", 1, {}), Commit("s2", 0, {})], now=NOW),
            lambda: backend.commit(Commit("s2", 0), now=NOW),
            lambda: backend.touch("s1", expires_at=None, now=NOW),
            lambda: backend.delete("s1"),
            lambda: backend.clear_expired(now=NOW),
            lambda: backend.take_expired(now=NOW, limit=5),
            lambda: backend.list_sessions(now=NOW),
        ]
        for call in calls:
            with anyio.fail_after(30):
                with pytest.raises(StateUnavailableError, match=f"127.0.0.1:{own_server.port}") as caught:
                    await call()
            assert "reconnects by itself" in str(caught.value)

        await anyio.to_thread.run_sync(own_server.start)  # the same port; it kept nothing
        assert await backend.load("s1", now=NOW) is None  # the same object, no reopen
        assert await backend.commit(Commit("s1", 0, {"a": '"new"'}), now=NOW) == 1
        assert await backend.commit(Commit("s1", 1, {"a": '"newer"'}), now=NOW) == 2
        assert await backend.touch("s1", expires_at=NOW + 10, now=NOW)  # the scripts are loaded again
        assert await backend.take_expired(now=NOW + 10, limit=5) != []
    finally:
        await backend.close()


# -- several processes on one store ---------------------------------------------------------------

_INCREMENTER = """
import asyncio, sys
from concierge.errors import ConflictError
from concierge.state import Commit, backend_from_url
url, rounds = sys.argv[1], int(sys.argv[2])
async def main():
    async with backend_from_url(url) as b:
        for _ in range(rounds):
            while True:
                x, y = await b.load("x", now=1.0), await b.load("y", now=1.0)
                commits = [
                    Commit("x", x.version, {"n": str(int(x.values["n"]) + 1)}),
                    Commit("y", y.version, {"n": str(int(y.values["n"]) + 1)}),
                ]
                try:
                    await b.commit_all(commits, now=1.0)
                    break
                except ConflictError:
                    pass
asyncio.run(main())
"""


async def test_redis_processes_incrementing_two_sessions_together_lose_nothing(redis_url: str) -> None:
    async with backend_from_url(redis_url) as b:
        await b.commit_all([Commit("x", 0, {"n": "0"}), Commit("y", 0, {"n": "0"})], now=1.0)
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def worker() -> None:
        results.append(
            await anyio.run_process([sys.executable, "-c", _INCREMENTER, redis_url, "15"], cwd=REPO, check=False)
        )

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)
    for done in results:
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    async with backend_from_url(redis_url) as b:
        for sid in ("x", "y"):
            record = await b.load(sid, now=1.0)
            assert record is not None and record.values == {"n": "60"} and record.version == 61
