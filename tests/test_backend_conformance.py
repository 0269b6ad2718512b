"""The `StateBackend` contract, run unchanged against every backend.

`state_url` gives a fresh, empty store per backend (memory, SQLite, Postgres);
tests that need a store to outlive its backend object use `durable_state_url`
(SQLite, Postgres). Backend-specific behaviour lives in test_sqlite_backend.py
and test_postgres_backend.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from concierge.errors import ConflictError
from concierge.state import UNCHANGED, Commit, StateBackend, backend_from_url
from concierge.state._sql import MIGRATIONS, SQLBackend

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]

NOW = 1_000_000.0


@pytest.fixture
async def backend(state_url: str) -> AsyncIterator[StateBackend]:
    b = backend_from_url(state_url)
    await b.open()
    try:
        yield b
    finally:
        await b.close()


async def _make(b: StateBackend, sid: str, values: dict[str, str], **kw: object) -> int:
    return await b.commit(Commit(sid, 0, dict(values), **kw), now=NOW)  # type: ignore[arg-type]


# -- round trip -------------------------------------------------------------------


async def test_commit_at_version_zero_creates_session_that_load_returns(backend: StateBackend) -> None:
    version = await _make(backend, "s1", {"a": "1", "b": '"x"'}, stage="browse", owner="alice", expires_at=NOW + 60)
    assert version == 1
    record = await backend.load("s1", now=NOW)
    assert record is not None
    assert (record.session_id, record.version, record.values) == ("s1", 1, {"a": "1", "b": '"x"'})
    assert (record.stage, record.owner, record.expires_at) == ("browse", "alice", NOW + 60)


async def test_load_of_unknown_session_returns_none(backend: StateBackend) -> None:
    assert await backend.load("nope", now=NOW) is None
    assert await backend.load("nope", now=NOW, known_version=1) is None


async def test_create_makes_empty_session_at_version_one(backend: StateBackend) -> None:
    await backend.create("s1", owner="bob", expires_at=None, now=NOW)
    record = await backend.load("s1", now=NOW)
    assert record is not None
    assert (record.version, record.values, record.stage, record.owner, record.expires_at) == (1, {}, None, "bob", None)


async def test_each_commit_bumps_version_and_applies_only_its_changes(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1", "b": "2", "c": "3"})
    assert await backend.commit(Commit("s1", 1, {"a": "10", "b": None, "d": "4"}), now=NOW) == 2
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.version == 2
    assert record.values == {"a": "10", "c": "3", "d": "4"}


async def test_deleting_an_absent_key_is_a_no_op(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"})
    assert await backend.commit(Commit("s1", 1, {"zzz": None}), now=NOW) == 2
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.values == {"a": "1"}


async def test_sessions_are_isolated(backend: StateBackend) -> None:
    await _make(backend, "s1", {"k": '"one"'})
    await _make(backend, "s2", {"k": '"two"'})
    await backend.commit(Commit("s1", 1, {"k": '"changed"', "extra": "1"}), now=NOW)
    r1, r2 = await backend.load("s1", now=NOW), await backend.load("s2", now=NOW)
    assert r1 is not None and r1.values == {"k": '"changed"', "extra": "1"}
    assert r2 is not None and r2.values == {"k": '"two"'} and r2.version == 1


async def test_loaded_values_are_a_copy(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"})
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.values is not None
    record.values["a"] = "999"
    record.values["new"] = "1"
    again = await backend.load("s1", now=NOW)
    assert again is not None and again.values == {"a": "1"}


async def test_committed_changes_dict_is_not_kept_by_reference(backend: StateBackend) -> None:
    changes = {"a": "1"}
    await backend.commit(Commit("s1", 0, changes), now=NOW)
    changes["a"] = "2"
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.values == {"a": "1"}


# -- delete and resurrection ----------------------------------------------------


async def test_delete_removes_session_and_reports_whether_it_existed(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"})
    await _make(backend, "s2", {"a": "2"})
    assert await backend.delete("s1") is True
    assert await backend.load("s1", now=NOW) is None
    assert await backend.delete("s1") is False
    assert await backend.delete("never") is False
    assert (await backend.load("s2", now=NOW)) is not None


async def test_commit_after_delete_conflicts_and_does_not_resurrect(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"})
    await backend.delete("s1")
    with pytest.raises(ConflictError, match="no longer exists"):
        await backend.commit(Commit("s1", 1, {"a": "2"}), now=NOW)
    assert await backend.load("s1", now=NOW) is None


async def test_recreating_a_deleted_session_starts_empty(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1", "b": "2"}, stage="old")
    await backend.delete("s1")
    assert await _make(backend, "s1", {"c": "3"}) == 1
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.values == {"c": "3"} and record.stage is None


# -- conflicts -------------------------------------------------------------------


async def test_second_commit_from_the_same_version_conflicts_and_writes_nothing(backend: StateBackend) -> None:
    await _make(backend, "s1", {"n": "0"})
    assert await backend.commit(Commit("s1", 1, {"n": "1"}), now=NOW) == 2
    with pytest.raises(ConflictError, match="version 2, expected 1"):
        await backend.commit(Commit("s1", 1, {"n": "99", "other": "1"}, clear=True, stage="x"), now=NOW)
    record = await backend.load("s1", now=NOW)
    assert record is not None
    assert (record.version, record.values, record.stage) == (2, {"n": "1"}, None)


async def test_concurrent_commits_from_the_same_version_exactly_one_wins(backend: StateBackend) -> None:
    await _make(backend, "s1", {"n": "0"})
    outcomes: list[object] = []

    async def attempt(value: str) -> None:
        try:
            outcomes.append(await backend.commit(Commit("s1", 1, {"n": value}), now=NOW))
        except ConflictError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        for value in ("1", "2", "3", "4"):
            tg.start_soon(attempt, value)
    assert sorted(o for o in outcomes if isinstance(o, int)) == [2]
    assert sum(isinstance(o, ConflictError) for o in outcomes) == 3
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.version == 2 and record.values is not None
    assert record.values["n"] in {"1", "2", "3", "4"}


async def test_creating_an_existing_live_session_conflicts(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"}, owner="alice")
    with pytest.raises(ConflictError):
        await _make(backend, "s1", {"a": "2"}, owner="mallory")
    with pytest.raises(ConflictError, match="already exists"):
        await backend.create("s1", owner="mallory", expires_at=None, now=NOW)
    record = await backend.load("s1", now=NOW)
    assert record is not None and (record.version, record.values, record.owner) == (1, {"a": "1"}, "alice")


# -- known_version ---------------------------------------------------------------


async def test_load_with_current_known_version_skips_values(backend: StateBackend) -> None:
    await _make(backend, "s1", {f"k{i}": str(i) for i in range(50)}, stage="st", owner="o", expires_at=NOW + 5)
    record = await backend.load("s1", now=NOW, known_version=1)
    assert record is not None
    assert (record.version, record.values, record.stage, record.owner, record.expires_at) == (
        1,
        None,
        "st",
        "o",
        NOW + 5,
    )


async def test_load_with_stale_known_version_returns_all_values(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"})
    await backend.commit(Commit("s1", 1, {"b": "2"}), now=NOW)
    record = await backend.load("s1", now=NOW, known_version=1)
    assert record is not None and record.version == 2 and record.values == {"a": "1", "b": "2"}


async def test_load_with_stale_known_version_of_empty_session_returns_empty_dict(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"})
    await backend.commit(Commit("s1", 1, {"a": None}), now=NOW)
    record = await backend.load("s1", now=NOW, known_version=1)
    assert record is not None and record.values == {}


# -- clear / stage / owner / expires_at -----------------------------------------------


async def test_clear_drops_every_key_before_applying_changes(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1", "b": "2", "c": "3"})
    await backend.commit(Commit("s1", 1, {"c": "30", "d": "4"}, clear=True), now=NOW)
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.values == {"c": "30", "d": "4"}


async def test_stage_is_kept_when_unchanged_and_replaced_or_cleared_when_given(backend: StateBackend) -> None:
    await _make(backend, "s1", {}, stage="browse")
    await backend.commit(Commit("s1", 1, {"a": "1"}, stage=UNCHANGED), now=NOW)
    assert (r := await backend.load("s1", now=NOW)) is not None and r.stage == "browse"
    await backend.commit(Commit("s1", 2, {}, stage="cart"), now=NOW)
    assert (r := await backend.load("s1", now=NOW)) is not None and r.stage == "cart"
    await backend.commit(Commit("s1", 3, {}, stage=None), now=NOW)
    assert (r := await backend.load("s1", now=NOW)) is not None and r.stage is None and r.version == 4


async def test_owner_is_set_at_creation_and_not_changed_by_later_commits(backend: StateBackend) -> None:
    await _make(backend, "s1", {}, owner="alice")
    await backend.commit(Commit("s1", 1, {"a": "1"}, owner="mallory"), now=NOW)
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.owner == "alice"


async def test_each_commit_sets_expires_at_including_back_to_never(backend: StateBackend) -> None:
    await _make(backend, "s1", {}, expires_at=NOW + 10)
    await backend.commit(Commit("s1", 1, {}, expires_at=NOW + 100), now=NOW + 5)
    assert await backend.load("s1", now=NOW + 50) is not None  # extended past the first expiry
    await backend.commit(Commit("s1", 2, {}, expires_at=None), now=NOW + 50)
    record = await backend.load("s1", now=NOW + 10_000)
    assert record is not None and record.expires_at is None


# -- expiry ---------------------------------------------------------------------


async def test_expired_session_is_invisible_at_its_expiry_instant(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
    assert await backend.load("s1", now=NOW + 9.5) is not None
    assert await backend.load("s1", now=NOW + 10) is None
    assert await backend.load("s1", now=NOW + 11, known_version=1) is None


async def test_commit_to_expired_session_conflicts(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
    with pytest.raises(ConflictError, match="no longer exists"):
        await backend.commit(Commit("s1", 1, {"a": "2"}, expires_at=NOW + 100), now=NOW + 10)
    assert await backend.load("s1", now=NOW + 10) is None


async def test_creating_over_an_expired_session_replaces_it(backend: StateBackend) -> None:
    await _make(backend, "s1", {"old": "1"}, stage="late", owner="alice", expires_at=NOW + 10)
    assert await backend.commit(Commit("s1", 0, {"new": "2"}, owner="bob"), now=NOW + 20) == 1
    record = await backend.load("s1", now=NOW + 20)
    assert record is not None
    assert (record.version, record.values, record.stage, record.owner) == (1, {"new": "2"}, None, "bob")
    await backend.create("s2", owner=None, expires_at=NOW + 1, now=NOW)
    await backend.create("s2", owner="carol", expires_at=None, now=NOW + 2)
    record = await backend.load("s2", now=NOW + 2)
    assert record is not None and (record.owner, record.values) == ("carol", {})


async def test_touch_moves_expiry_without_a_new_version(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
    assert await backend.touch("s1", expires_at=NOW + 100, now=NOW + 5) is True
    record = await backend.load("s1", now=NOW + 50)
    assert record is not None
    assert (record.version, record.expires_at, record.values) == (1, NOW + 100, {"a": "1"})
    # a commit from the version loaded before the touch still lands: touching never conflicts
    assert await backend.commit(Commit("s1", 1, {"a": "2"}, expires_at=NOW + 200), now=NOW + 60) == 2


async def test_touch_leaves_expired_and_missing_sessions_alone(backend: StateBackend) -> None:
    await _make(backend, "s1", {}, expires_at=NOW + 10)
    assert await backend.touch("s1", expires_at=NOW + 100, now=NOW + 10) is False
    assert await backend.load("s1", now=NOW + 11) is None
    assert await backend.touch("missing", expires_at=NOW + 100, now=NOW) is False


async def test_a_new_life_of_a_session_id_has_a_new_created_at(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
    first = await backend.load("s1", now=NOW)
    await backend.commit(Commit("s1", 0, {"a": "2"}, expires_at=None), now=NOW + 20)
    second = await backend.load("s1", now=NOW + 20, known_version=1, known_created_at=first.created_at)
    assert first is not None and second is not None
    assert second.version == 1 and second.created_at != first.created_at
    assert second.values == {"a": "2"}


async def test_clear_expired_deletes_only_expired_sessions_and_counts_them(backend: StateBackend) -> None:
    for i in range(3):
        await _make(backend, f"old{i}", {"a": "1"}, expires_at=NOW + 10)
    await _make(backend, "edge", {"a": "1"}, expires_at=NOW + 20)
    await _make(backend, "later", {"a": "1"}, expires_at=NOW + 21)
    await _make(backend, "forever", {"a": "1"})
    assert await backend.clear_expired(now=NOW + 5) == 0
    assert await backend.clear_expired(now=NOW + 20) == 4
    assert await backend.clear_expired(now=NOW + 20) == 0
    assert await backend.load("later", now=NOW + 20) is not None
    assert await backend.load("forever", now=NOW + 10**9) is not None
    # swept means gone, not merely hidden: a clock going back does not revive it
    assert await backend.load("old0", now=NOW) is None


async def test_take_expired_returns_each_expired_session_once_with_its_state_and_deletes_it(
    backend: StateBackend,
) -> None:
    for i in range(5):
        await _make(backend, f"old{i}", {"i": str(i), "k": '"v"'}, stage="cart", owner="al", expires_at=NOW + 10 + i)
    await _make(backend, "live", {"a": "1"}, expires_at=NOW + 100)
    await _make(backend, "forever", {"a": "1"})
    first = await backend.take_expired(now=NOW + 50, limit=3)
    second = await backend.take_expired(now=NOW + 50, limit=3)
    assert len(first) == 3 and len(second) == 2
    taken = {r.session_id: r for r in first + second}
    assert set(taken) == {f"old{i}" for i in range(5)}
    assert taken["old3"].values == {"i": "3", "k": '"v"'}
    assert (taken["old3"].stage, taken["old3"].owner, taken["old3"].expires_at) == ("cart", "al", NOW + 13)
    assert await backend.take_expired(now=NOW + 50, limit=3) == []
    assert await backend.load("old0", now=float("-inf")) is None  # deleted, not hidden
    assert await backend.load("live", now=NOW + 50) is not None
    assert await backend.load("forever", now=NOW + 10**9) is not None


async def test_load_at_minus_infinity_sees_an_expired_session_until_it_is_deleted(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
    assert await backend.load("s1", now=NOW + 10) is None
    record = await backend.load("s1", now=float("-inf"))
    assert record is not None and record.expires_at == NOW + 10 and record.values == {"a": "1"}
    await backend.delete("s1")
    assert await backend.load("s1", now=float("-inf")) is None


async def test_commit_all_applies_every_commit_or_none(backend: StateBackend) -> None:
    await _make(backend, "a", {"n": "1"})
    await _make(backend, "b", {"n": "1"})
    versions = await backend.commit_all(
        [Commit("b", 1, {"n": "2"}), Commit("a", 1, {"n": "2"}), Commit("c", 0, {"n": "1"})], now=NOW
    )
    assert versions == [2, 2, 1]
    with pytest.raises(ConflictError):  # "a" is at version 2 now: the whole batch is refused
        await backend.commit_all([Commit("b", 2, {"n": "3"}), Commit("a", 1, {"n": "3"})], now=NOW)
    for sid, n, version in (("a", "2", 2), ("b", "2", 2), ("c", "1", 1)):
        record = await backend.load(sid, now=NOW)
        assert record is not None and (record.values, record.version) == ({"n": n}, version)
    with pytest.raises(ConflictError):  # a creation that finds a live session refuses the batch too
        await backend.commit_all([Commit("d", 0, {"n": "1"}), Commit("c", 0, {"n": "9"})], now=NOW)
    assert await backend.load("d", now=NOW) is None


async def test_concurrent_cross_session_commits_in_opposite_orders_all_land(backend: StateBackend) -> None:
    """Two buckets written together from many tasks in both orders: no deadlock, nothing lost."""
    await _make(backend, "x", {"n": "0"})
    await _make(backend, "y", {"n": "0"})

    async def bump(reverse: bool) -> None:
        for _ in range(5):
            while True:
                rx, ry = await backend.load("x", now=NOW), await backend.load("y", now=NOW)
                assert rx and ry and rx.values is not None and ry.values is not None
                commits = [
                    Commit("x", rx.version, {"n": str(int(rx.values["n"]) + 1)}),
                    Commit("y", ry.version, {"n": str(int(ry.values["n"]) + 1)}),
                ]
                try:
                    await backend.commit_all(commits[::-1] if reverse else commits, now=NOW)
                    break
                except ConflictError:
                    await anyio.lowlevel.checkpoint()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(bump, i % 2 == 1)
    for sid in ("x", "y"):
        record = await backend.load(sid, now=NOW)
        assert record is not None and record.values == {"n": "30"}


# -- concurrency -----------------------------------------------------------------


async def test_concurrent_commits_on_distinct_sessions_all_land(backend: StateBackend) -> None:
    async def write(i: int) -> None:
        await backend.commit(Commit(f"s{i}", 0, {"i": str(i), "x": '"y"'}), now=NOW)
        await backend.commit(Commit(f"s{i}", 1, {"i": str(i * 10)}), now=NOW)

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(write, i)
    for i in range(40):
        record = await backend.load(f"s{i}", now=NOW)
        assert record is not None and record.version == 2 and record.values == {"i": str(i * 10), "x": '"y"'}


async def test_concurrent_increments_on_one_session_with_retry_lose_nothing(backend: StateBackend) -> None:
    await _make(backend, "s1", {"n": "0"})
    workers, rounds = 8, 5

    async def increment(worker: int) -> None:
        for _ in range(rounds):
            while True:
                record = await backend.load("s1", now=NOW)
                assert record is not None and record.values is not None
                n = int(record.values["n"])
                try:
                    await backend.commit(Commit("s1", record.version, {"n": str(n + 1), f"w{worker}": "1"}), now=NOW)
                    break
                except ConflictError:
                    await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for w in range(workers):
            tg.start_soon(increment, w)
    record = await backend.load("s1", now=NOW)
    assert record is not None and record.values is not None
    assert record.values["n"] == str(workers * rounds)
    assert record.version == 1 + workers * rounds
    assert {k for k in record.values if k.startswith("w")} == {f"w{w}" for w in range(workers)}


# -- lifecycle and persistence ------------------------------------------------------


async def test_open_and_close_are_idempotent(state_url: str) -> None:
    b = backend_from_url(state_url)
    await b.close()  # without open
    await b.open()
    await b.open()
    await _make(b, "s1", {"a": "1"})
    await b.close()
    await b.close()


async def test_committed_session_survives_a_restart(durable_state_url: str) -> None:
    first = backend_from_url(durable_state_url)
    async with first:
        await _make(first, "s1", {"a": "1", "b": "2"}, stage="cart", owner="alice", expires_at=NOW + 60)
        await first.commit(Commit("s1", 1, {"b": None}, expires_at=NOW + 60), now=NOW)
    second = backend_from_url(durable_state_url)
    async with second:
        record = await second.load("s1", now=NOW)
    assert record is not None
    assert (record.version, record.values, record.stage, record.owner, record.expires_at) == (
        2,
        {"a": "1"},
        "cart",
        "alice",
        NOW + 60,
    )


async def _applied_migrations(b: StateBackend) -> list[int]:
    assert isinstance(b, SQLBackend)
    async with b._transaction(write=False) as tx:
        rows = await tx.fetch("SELECT version FROM concierge_migrations ORDER BY version")
    return [int(r[0]) for r in rows]


async def test_migrations_apply_once_however_often_the_store_is_opened(durable_state_url: str) -> None:
    expected = list(range(1, len(MIGRATIONS) + 1))
    for attempt in range(2):
        b = backend_from_url(durable_state_url)
        async with b:
            await b.open()  # a second open on the same object is a no-op too
            assert await _applied_migrations(b) == expected
            await b.commit(Commit(f"s{attempt}", 0, {"a": "1"}), now=NOW)
            if attempt == 1:  # the schema was not recreated: the first run's data is still there
                assert await b.load("s0", now=NOW) is not None


_WORKER = """
import asyncio, os, sys, time
from concierge.state import Commit, backend_from_url
url, name, ready, go = sys.argv[1:5]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
async def main():
    async with backend_from_url(url) as b:
        await b.commit(Commit(name, 0, {"who": '"' + name + '"'}), now=1.0)
asyncio.run(main())
"""


def start_together(url: str, names: list[str], tmp: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run one worker per name, released at the same instant once all have imported."""
    go = tmp / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, name, str(tmp / f"ready-{name}"), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    deadline = time.monotonic() + 30
    while not all((tmp / f"ready-{n}").exists() for n in names) and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


async def test_processes_starting_at_once_on_one_empty_store_all_succeed(
    durable_state_url: str, tmp_path: Path
) -> None:
    names = [f"p{i}" for i in range(3)]
    for done in start_together(durable_state_url, names, tmp_path):
        assert done.returncode == 0, done.stderr
    async with backend_from_url(durable_state_url) as b:
        assert await _applied_migrations(b) == list(range(1, len(MIGRATIONS) + 1))
        for name in names:
            record = await b.load(name, now=NOW)
            assert record is not None and record.values == {"who": f'"{name}"'}


async def test_two_backend_objects_on_one_store_detect_each_others_commits(durable_state_url: str) -> None:
    async with backend_from_url(durable_state_url) as a, backend_from_url(durable_state_url) as b:
        await _make(a, "s1", {"n": "0"})
        record = await b.load("s1", now=NOW, known_version=1)
        assert record is not None and record.values is None
        assert await b.commit(Commit("s1", 1, {"n": "1"}), now=NOW) == 2
        with pytest.raises(ConflictError):
            await a.commit(Commit("s1", 1, {"n": "2"}), now=NOW)
        stale = await a.load("s1", now=NOW, known_version=1)
        assert stale is not None and stale.values == {"n": "1"}
        await b.delete("s1")
        with pytest.raises(ConflictError):
            await a.commit(Commit("s1", 2, {"n": "3"}), now=NOW)
        assert await a.load("s1", now=NOW) is None


# -- list_sessions ----------------------------------------------------------------


async def test_list_sessions_orders_by_last_activity_newest_first_then_by_id(backend: StateBackend) -> None:
    for sid, at in [("b", NOW + 1), ("a", NOW + 1), ("c", NOW + 3), ("d", NOW + 2)]:
        await backend.commit(Commit(sid, 0, {"k": "1"}), now=at)
    listed = await backend.list_sessions(now=NOW + 10)
    assert [s.session_id for s in listed] == ["c", "d", "a", "b"]
    assert [s.updated_at for s in listed] == [NOW + 3, NOW + 2, NOW + 1, NOW + 1]
    await backend.commit(Commit("b", 1, {"k": "2"}), now=NOW + 5)  # a commit is activity
    await backend.touch("a", expires_at=None, now=NOW + 6)  # and so is a renewal
    listed = await backend.list_sessions(now=NOW + 10)
    assert [s.session_id for s in listed] == ["a", "b", "c", "d"]
    assert [s.updated_at for s in listed] == [NOW + 6, NOW + 5, NOW + 3, NOW + 2]


async def test_list_sessions_describes_each_session_without_its_values(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1", "name": '"Zoë"', "list": "[1,2]"}, stage="cart", owner="alice")
    await backend.commit(Commit("s1", 1, {"a": None}, expires_at=NOW + 60), now=NOW + 2)
    await backend.create("empty", owner=None, expires_at=None, now=NOW + 1)
    by_id = {s.session_id: s for s in await backend.list_sessions(now=NOW + 3)}
    assert set(by_id) == {"s1", "empty"}
    s1 = by_id["s1"]
    assert (s1.version, s1.stage, s1.owner, s1.keys) == (2, "cart", "alice", 2)
    assert s1.size == len('"Zoë"'.encode()) + len(b"[1,2]") == 11  # UTF-8 bytes: "ë" counts 2
    assert (s1.created_at, s1.updated_at, s1.expires_at) == (NOW, NOW + 2, NOW + 60)
    empty = by_id["empty"]
    assert (empty.version, empty.stage, empty.owner, empty.keys, empty.size) == (1, None, None, 0, 0)
    assert (empty.created_at, empty.updated_at, empty.expires_at) == (NOW + 1, NOW + 1, None)


async def test_list_sessions_pages_with_limit_and_offset(backend: StateBackend) -> None:
    for i in range(7):
        await backend.commit(Commit(f"s{i}", 0, {"i": str(i)}), now=NOW + i)
    newest_first = [f"s{i}" for i in reversed(range(7))]
    pages = [await backend.list_sessions(now=NOW + 10, limit=3, offset=o) for o in (0, 3, 6, 9)]
    assert [[s.session_id for s in page] for page in pages] == [
        newest_first[:3],
        newest_first[3:6],
        newest_first[6:],
        [],
    ]
    assert await backend.list_sessions(now=NOW + 10, limit=0) == []
    assert len(await backend.list_sessions(now=NOW + 10)) == 7  # the default limit is 50
    with pytest.raises(ValueError):
        await backend.list_sessions(now=NOW, limit=-1)
    with pytest.raises(ValueError):
        await backend.list_sessions(now=NOW, offset=-1)


async def test_list_sessions_prefix_matches_the_start_of_the_id_literally(backend: StateBackend) -> None:
    for sid in ["h:abc", "h:xyz", "http:abc", "user:alice", "user_x", "global", "100%", "100x"]:
        await _make(backend, sid, {})

    async def ids(prefix: str | None) -> list[str]:
        return sorted(s.session_id for s in await backend.list_sessions(now=NOW, prefix=prefix))

    assert await ids("h:") == ["h:abc", "h:xyz"]
    assert await ids("h") == ["h:abc", "h:xyz", "http:abc"]
    assert await ids("user:") == ["user:alice"]
    assert await ids("user_") == ["user_x"]  # `_` is no wildcard
    assert await ids("100%") == ["100%"]  # nor is `%`
    assert await ids("global") == ["global"]
    assert await ids("nothing") == []
    assert len(await ids(None)) == 8


async def test_list_sessions_leaves_out_expired_sessions_unless_asked(backend: StateBackend) -> None:
    await _make(backend, "live", {}, expires_at=NOW + 100)
    await _make(backend, "forever", {}, expires_at=None)
    await _make(backend, "gone", {"a": "1"}, expires_at=NOW + 10)
    assert sorted(s.session_id for s in await backend.list_sessions(now=NOW + 10)) == ["forever", "live"]
    everything = await backend.list_sessions(now=NOW + 10, include_expired=True)
    assert sorted(s.session_id for s in everything) == ["forever", "gone", "live"]
    gone = next(s for s in everything if s.session_id == "gone")
    assert (gone.keys, gone.expires_at) == (1, NOW + 10)
    assert await backend.clear_expired(now=NOW + 10) == 1
    assert len(await backend.list_sessions(now=NOW + 10, include_expired=True)) == 2


async def test_list_sessions_sees_a_recreated_session_as_new(backend: StateBackend) -> None:
    await _make(backend, "s1", {"a": "1", "b": "2"}, expires_at=NOW + 10)
    await backend.commit(Commit("s1", 0, {"c": "3"}), now=NOW + 20)
    (only,) = await backend.list_sessions(now=NOW + 20, include_expired=True)
    assert (only.version, only.keys, only.created_at, only.updated_at) == (1, 1, NOW + 20, NOW + 20)


async def test_a_backend_without_list_sessions_says_so() -> None:
    from concierge.state.memory import MemoryBackend

    class Minimal(MemoryBackend):
        list_sessions = StateBackend.list_sessions

    with pytest.raises(NotImplementedError, match="Minimal does not support listing sessions"):
        await Minimal().list_sessions(now=NOW)


# -- history (checkpoints) ----------------------------------------------------------


@pytest.fixture
async def recording(backend: StateBackend) -> StateBackend:
    """`backend`, on the backends that record history."""
    if not backend.supports_history:
        pytest.skip(f"{type(backend).__name__} does not record history")
    return backend


def _step(
    sid: str, expected: int, changes: dict[str, str | None], before: dict[str, str | None], **kw: object
) -> Commit:
    kw.setdefault("history", 10)
    kw.setdefault("tool", "t")
    return Commit(sid, expected, changes, before=before, **kw)  # type: ignore[arg-type]


async def test_each_commit_with_history_records_one_checkpoint_of_what_it_changed(recording: StateBackend) -> None:
    b = recording
    assert await b.history("s1") == []
    await b.commit(_step("s1", 0, {"a": "1", "b": '"x"'}, {}, tool="create", stage="browse"), now=NOW)
    await b.commit(_step("s1", 1, {"a": "2", "b": None, "c": "[3]"}, {"a": "1", "b": '"x"', "c": None}), now=NOW + 1)
    await b.commit(_step("s1", 2, {}, {}, tool=None, stage="cart", stage_before="browse"), now=NOW + 2)
    first, second, third = await b.history("s1")
    assert (first.version, first.at, first.tool) == (1, NOW, "create")
    assert (first.changes, first.previous) == ({"a": "1", "b": '"x"'}, {"a": None, "b": None})
    assert (first.stage_changed, first.stage, first.previous_stage) == (True, "browse", None)
    assert (second.version, second.at, second.tool, second.stage_changed) == (2, NOW + 1, "t", False)
    assert second.changes == {"a": "2", "b": None, "c": "[3]"}
    assert second.previous == {"a": "1", "b": '"x"', "c": None}
    assert (third.version, third.tool, third.changes, third.previous) == (3, None, {}, {})
    assert (third.stage_changed, third.stage, third.previous_stage) == (True, "cart", "browse")


async def test_a_checkpoint_leaves_out_keys_written_with_the_value_they_had(recording: StateBackend) -> None:
    await recording.commit(_step("s1", 0, {"a": "1", "b": "2"}, {}, stage="x"), now=NOW)
    before = {"a": "1", "b": "2"}
    await recording.commit(
        _step("s1", 1, {"a": "1", "b": "3", "gone": None}, before, stage="x", stage_before="x"), now=NOW
    )
    last = (await recording.history("s1"))[-1]
    assert (last.changes, last.previous, last.stage_changed) == ({"b": "3"}, {"b": "2"}, False)


async def test_a_clearing_commit_records_every_key_it_removed_with_its_value(recording: StateBackend) -> None:
    await recording.commit(_step("s1", 0, {"a": "1", "b": "2", "c": "3"}, {}, stage="cart"), now=NOW)
    await recording.commit(
        _step("s1", 1, {"c": "30"}, {"a": "1", "b": "2", "c": "3"}, clear=True, stage=None, stage_before="cart"),
        now=NOW,
    )
    last = (await recording.history("s1"))[-1]
    assert last.changes == {"a": None, "b": None, "c": "30"}
    assert last.previous == {"a": "1", "b": "2", "c": "3"}
    assert (last.stage_changed, last.stage, last.previous_stage) == (True, None, "cart")


async def test_a_commit_without_history_records_nothing(recording: StateBackend) -> None:
    await _make(recording, "s1", {"a": "1"})
    await recording.commit(Commit("s1", 1, {"a": "2"}, tool="t"), now=NOW)
    assert await recording.history("s1") == []
    await recording.commit(_step("s1", 2, {"a": "3"}, {"a": "2"}), now=NOW)
    assert [c.version for c in await recording.history("s1")] == [3]


async def test_history_keeps_the_last_n_checkpoints_per_session(recording: StateBackend) -> None:
    await recording.commit(_step("s1", 0, {"n": "0"}, {}, history=3), now=NOW)
    await recording.commit(_step("other", 0, {"n": "0"}, {}, history=3), now=NOW)
    for v in range(1, 8):
        await recording.commit(_step("s1", v, {"n": str(v)}, {"n": str(v - 1)}, history=3), now=NOW + v)
    kept = await recording.history("s1")
    assert [c.version for c in kept] == [6, 7, 8]
    assert [c.changes for c in kept] == [{"n": "5"}, {"n": "6"}, {"n": "7"}]
    assert [c.version for c in await recording.history("other")] == [1]
    await recording.commit(_step("s1", 8, {"n": "8"}, {"n": "7"}, history=1), now=NOW)  # a smaller window prunes more
    assert [c.version for c in await recording.history("s1")] == [9]


async def test_a_conflicting_commit_records_no_checkpoint(recording: StateBackend) -> None:
    await recording.commit(_step("s1", 0, {"n": "0"}, {}), now=NOW)
    await recording.commit(_step("s1", 1, {"n": "1"}, {"n": "0"}), now=NOW)
    with pytest.raises(ConflictError):
        await recording.commit(_step("s1", 1, {"n": "9"}, {"n": "0"}), now=NOW)
    with pytest.raises(ConflictError):
        await recording.commit_all([_step("s2", 0, {"x": "1"}, {}), _step("s1", 1, {"n": "9"}, {"n": "0"})], now=NOW)
    assert [c.version for c in await recording.history("s1")] == [1, 2]
    assert await recording.history("s2") == []


async def test_commit_all_records_a_checkpoint_for_each_session_it_writes(recording: StateBackend) -> None:
    await recording.commit_all(
        [_step("h:s", 0, {"a": "1"}, {}, tool="visit"), _step("global", 0, {"n": "1"}, {}, tool="visit")], now=NOW
    )
    await recording.commit_all(
        [_step("h:s", 1, {"a": "2"}, {"a": "1"}, tool="visit"), _step("global", 1, {"n": "2"}, {"n": "1"})], now=NOW
    )
    assert [(c.version, c.changes) for c in await recording.history("h:s")] == [(1, {"a": "1"}), (2, {"a": "2"})]
    assert [(c.version, c.tool) for c in await recording.history("global")] == [(1, "visit"), (2, "t")]


async def test_history_goes_with_its_session(recording: StateBackend) -> None:
    await recording.commit(_step("s1", 0, {"a": "1"}, {}, expires_at=NOW + 10), now=NOW)
    await recording.commit(_step("s1", 1, {"a": "2"}, {"a": "1"}, expires_at=NOW + 10), now=NOW)
    await recording.commit(_step("s2", 0, {"a": "1"}, {}), now=NOW)
    # A new life of an expired id starts without its predecessor's checkpoints.
    await recording.commit(_step("s1", 0, {"b": "1"}, {}), now=NOW + 20)
    assert [(c.version, c.changes) for c in await recording.history("s1")] == [(1, {"b": "1"})]
    assert await recording.delete("s1")
    assert await recording.history("s1") == []
    await recording.commit(_step("s3", 0, {"a": "1"}, {}, expires_at=NOW + 10), now=NOW)
    assert await recording.clear_expired(now=NOW + 10) == 1
    assert await recording.history("s3") == []
    assert [c.version for c in await recording.history("s2")] == [1]


async def test_checkpoints_survive_a_restart(durable_state_url: str) -> None:
    async with backend_from_url(durable_state_url) as first:
        await first.commit(_step("s1", 0, {"k": '"Zoë"'}, {}, tool="add", stage="cart"), now=NOW)
    async with backend_from_url(durable_state_url) as second:
        (only,) = await second.history("s1")
    assert (only.version, only.at, only.tool, only.changes, only.stage) == (1, NOW, "add", {"k": '"Zoë"'}, "cart")


async def test_a_store_made_before_history_existed_is_migrated_and_keeps_its_sessions(
    durable_state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concierge.state._sql as sql

    with monkeypatch.context() as patched:
        patched.setattr(sql, "MIGRATIONS", MIGRATIONS[:1])
        async with backend_from_url(durable_state_url) as old:  # the schema and data of a store before history
            assert isinstance(old, SQLBackend)
            async with old._transaction(write=True) as tx:
                await tx.execute(
                    "INSERT INTO concierge_sessions (id, version, created_at, updated_at) VALUES ('s1', 1, $1, $1)", NOW
                )
                await tx.execute("INSERT INTO concierge_values (session_id, key, value) VALUES ('s1', 'a', '1')")
    async with backend_from_url(durable_state_url) as new:
        assert await _applied_migrations(new) == list(range(1, len(MIGRATIONS) + 1))
        assert await new.history("s1") == []
        record = await new.load("s1", now=NOW)
        assert record is not None and (record.version, record.values) == (1, {"a": "1"})
        await new.commit(_step("s1", 1, {"a": "2"}, {"a": "1"}), now=NOW)
        assert [(c.version, c.previous) for c in await new.history("s1")] == [(2, {"a": "1"})]


async def test_a_backend_without_history_says_so() -> None:
    from concierge.state.memory import MemoryBackend

    class Minimal(MemoryBackend):
        supports_history = False
        history = StateBackend.history

    with pytest.raises(NotImplementedError, match="Minimal does not record history"):
        await Minimal().history("s1")
