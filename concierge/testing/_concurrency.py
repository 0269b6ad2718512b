"""The conformance tests of atomicity: `commit_all` is all or nothing, concurrent writers lose nothing."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from concierge.errors import ConflictError
from concierge.state.base import Commit, StateBackend
from concierge.testing._support import NOW, make


class ConcurrencyTests:
    """`commit_all` across sessions, and many tasks committing at once to one or many sessions."""

    pytestmark = pytest.mark.anyio

    async def test_commit_all_applies_every_commit_or_none(self, backend: StateBackend) -> None:
        await make(backend, "a", {"n": "1"})
        await make(backend, "b", {"n": "1"})
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

    async def test_concurrent_cross_session_commits_in_opposite_orders_all_land(self, backend: StateBackend) -> None:
        """Two buckets written together from many tasks in both orders: no deadlock, nothing lost."""
        await make(backend, "x", {"n": "0"})
        await make(backend, "y", {"n": "0"})

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

    async def test_concurrent_commits_from_the_same_version_exactly_one_wins(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"n": "0"})
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

    async def test_concurrent_commits_on_distinct_sessions_all_land(self, backend: StateBackend) -> None:
        async def write(i: int) -> None:
            await backend.commit(Commit(f"s{i}", 0, {"i": str(i), "x": '"y"'}), now=NOW)
            await backend.commit(Commit(f"s{i}", 1, {"i": str(i * 10)}), now=NOW)

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(write, i)
        for i in range(40):
            record = await backend.load(f"s{i}", now=NOW)
            assert record is not None and record.version == 2 and record.values == {"i": str(i * 10), "x": '"y"'}

    async def test_concurrent_increments_on_one_session_with_retry_lose_nothing(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"n": "0"})
        workers, rounds = 8, 5

        async def increment(worker: int) -> None:
            for _ in range(rounds):
                while True:
                    record = await backend.load("s1", now=NOW)
                    assert record is not None and record.values is not None
                    n = int(record.values["n"])
                    try:
                        await backend.commit(
                            Commit("s1", record.version, {"n": str(n + 1), f"w{worker}": "1"}), now=NOW
                        )
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
