"""The conformance tests of expiry: judged at the caller's `now`, renewed by `touch`, swept by `take_expired`."""

from __future__ import annotations

import pytest

from concierge.errors import ConflictError
from concierge.state.base import Commit, StateBackend
from concierge.testing._support import NOW, make


class ExpiryTests:
    """Expired sessions are absent; `touch` renews; a new life of an id; `clear_expired` and `take_expired`."""

    pytestmark = pytest.mark.anyio

    async def test_expired_session_is_invisible_at_its_expiry_instant(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
        assert await backend.load("s1", now=NOW + 9.5) is not None
        assert await backend.load("s1", now=NOW + 10) is None
        assert await backend.load("s1", now=NOW + 11, known_version=1) is None

    async def test_commit_to_expired_session_conflicts(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
        with pytest.raises(ConflictError, match="no longer exists"):
            await backend.commit(Commit("s1", 1, {"a": "2"}, expires_at=NOW + 100), now=NOW + 10)
        assert await backend.load("s1", now=NOW + 10) is None

    async def test_creating_over_an_expired_session_replaces_it(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"old": "1"}, stage="late", owner="alice", expires_at=NOW + 10)
        assert await backend.commit(Commit("s1", 0, {"new": "2"}, owner="bob"), now=NOW + 20) == 1
        record = await backend.load("s1", now=NOW + 20)
        assert record is not None
        assert (record.version, record.values, record.stage, record.owner) == (1, {"new": "2"}, None, "bob")
        await backend.commit(Commit("s2", 0, expires_at=NOW + 1), now=NOW)
        await backend.commit(Commit("s2", 0, owner="carol", expires_at=None), now=NOW + 2)
        record = await backend.load("s2", now=NOW + 2)
        assert record is not None and (record.owner, record.values) == ("carol", {})

    async def test_touch_moves_expiry_without_a_new_version(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
        assert await backend.touch("s1", expires_at=NOW + 100, now=NOW + 5) is True
        record = await backend.load("s1", now=NOW + 50)
        assert record is not None
        assert (record.version, record.expires_at, record.values) == (1, NOW + 100, {"a": "1"})
        # a commit from the version loaded before the touch still lands: touching never conflicts
        assert await backend.commit(Commit("s1", 1, {"a": "2"}, expires_at=NOW + 200), now=NOW + 60) == 2

    async def test_touch_leaves_expired_and_missing_sessions_alone(self, backend: StateBackend) -> None:
        await make(backend, "s1", {}, expires_at=NOW + 10)
        assert await backend.touch("s1", expires_at=NOW + 100, now=NOW + 10) is False
        assert await backend.load("s1", now=NOW + 11) is None
        assert await backend.touch("missing", expires_at=NOW + 100, now=NOW) is False

    async def test_a_new_life_of_a_session_id_has_a_new_created_at(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
        first = await backend.load("s1", now=NOW)
        assert first is not None
        await backend.commit(Commit("s1", 0, {"a": "2"}, expires_at=None), now=NOW + 20)
        second = await backend.load("s1", now=NOW + 20, known_version=1, known_created_at=first.created_at)
        assert second is not None
        assert second.version == 1 and second.created_at != first.created_at
        assert second.values == {"a": "2"}

    async def test_clear_expired_deletes_only_expired_sessions_and_counts_them(self, backend: StateBackend) -> None:
        for i in range(3):
            await make(backend, f"old{i}", {"a": "1"}, expires_at=NOW + 10)
        await make(backend, "edge", {"a": "1"}, expires_at=NOW + 20)
        await make(backend, "later", {"a": "1"}, expires_at=NOW + 21)
        await make(backend, "forever", {"a": "1"})
        assert await backend.clear_expired(now=NOW + 5) == 0
        assert await backend.clear_expired(now=NOW + 20) == 4
        assert await backend.clear_expired(now=NOW + 20) == 0
        assert await backend.load("later", now=NOW + 20) is not None
        assert await backend.load("forever", now=NOW + 10**9) is not None
        # swept means gone, not merely hidden: a clock going back does not revive it
        assert await backend.load("old0", now=NOW) is None

    async def test_take_expired_returns_each_expired_session_once_with_its_state_and_deletes_it(
        self, backend: StateBackend
    ) -> None:
        for i in range(5):
            await make(backend, f"old{i}", {"i": str(i), "k": '"v"'}, stage="cart", owner="al", expires_at=NOW + 10 + i)
        await make(backend, "live", {"a": "1"}, expires_at=NOW + 100)
        await make(backend, "forever", {"a": "1"})
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

    async def test_load_at_minus_infinity_sees_an_expired_session_until_it_is_deleted(
        self, backend: StateBackend
    ) -> None:
        await make(backend, "s1", {"a": "1"}, expires_at=NOW + 10)
        assert await backend.load("s1", now=NOW + 10) is None
        record = await backend.load("s1", now=float("-inf"))
        assert record is not None and record.expires_at == NOW + 10 and record.values == {"a": "1"}
        await backend.delete("s1")
        assert await backend.load("s1", now=float("-inf")) is None
