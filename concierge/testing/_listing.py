"""The conformance tests of `list_sessions` (skipped for a backend that keeps the default, which refuses)."""

from __future__ import annotations

import pytest

from concierge.state.base import Commit, StateBackend
from concierge.testing._support import NOW, make, require_listing


class ListingTests:
    """Order, summaries, pages, the id prefix and expired sessions of `list_sessions`."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def listing(self, backend: StateBackend) -> StateBackend:
        """`backend`, when it implements `list_sessions`."""
        return require_listing(backend)

    async def test_list_sessions_orders_by_last_activity_newest_first_then_by_id(self, listing: StateBackend) -> None:
        for sid, at in [("b", NOW + 1), ("a", NOW + 1), ("c", NOW + 3), ("d", NOW + 2)]:
            await listing.commit(Commit(sid, 0, {"k": "1"}), now=at)
        listed = await listing.list_sessions(now=NOW + 10)
        assert [s.session_id for s in listed] == ["c", "d", "a", "b"]
        assert [s.updated_at for s in listed] == [NOW + 3, NOW + 2, NOW + 1, NOW + 1]
        await listing.commit(Commit("b", 1, {"k": "2"}), now=NOW + 5)  # a commit is activity
        await listing.touch("a", expires_at=None, now=NOW + 6)  # and so is a renewal
        listed = await listing.list_sessions(now=NOW + 10)
        assert [s.session_id for s in listed] == ["a", "b", "c", "d"]
        assert [s.updated_at for s in listed] == [NOW + 6, NOW + 5, NOW + 3, NOW + 2]

    async def test_list_sessions_describes_each_session_without_its_values(self, listing: StateBackend) -> None:
        await make(listing, "s1", {"a": "1", "name": '"Zoë"', "list": "[1,2]"}, stage="cart", owner="alice")
        await listing.commit(Commit("s1", 1, {"a": None}, expires_at=NOW + 60), now=NOW + 2)
        await listing.commit(Commit("empty", 0), now=NOW + 1)
        by_id = {s.session_id: s for s in await listing.list_sessions(now=NOW + 3)}
        assert set(by_id) == {"s1", "empty"}
        s1 = by_id["s1"]
        assert (s1.version, s1.stage, s1.owner, s1.keys) == (2, "cart", "alice", 2)
        assert s1.size == len('"Zoë"'.encode()) + len(b"[1,2]") == 11  # UTF-8 bytes: "ë" counts 2
        assert (s1.created_at, s1.updated_at, s1.expires_at) == (NOW, NOW + 2, NOW + 60)
        empty = by_id["empty"]
        assert (empty.version, empty.stage, empty.owner, empty.keys, empty.size) == (1, None, None, 0, 0)
        assert (empty.created_at, empty.updated_at, empty.expires_at) == (NOW + 1, NOW + 1, None)

    async def test_list_sessions_pages_with_limit_and_offset(self, listing: StateBackend) -> None:
        for i in range(7):
            await listing.commit(Commit(f"s{i}", 0, {"i": str(i)}), now=NOW + i)
        newest_first = [f"s{i}" for i in reversed(range(7))]
        pages = [await listing.list_sessions(now=NOW + 10, limit=3, offset=o) for o in (0, 3, 6, 9)]
        assert [[s.session_id for s in page] for page in pages] == [
            newest_first[:3],
            newest_first[3:6],
            newest_first[6:],
            [],
        ]
        assert await listing.list_sessions(now=NOW + 10, limit=0) == []
        assert len(await listing.list_sessions(now=NOW + 10)) == 7  # the default limit is 50
        with pytest.raises(ValueError):
            await listing.list_sessions(now=NOW, limit=-1)
        with pytest.raises(ValueError):
            await listing.list_sessions(now=NOW, offset=-1)

    async def test_list_sessions_prefix_matches_the_start_of_the_id_literally(self, listing: StateBackend) -> None:
        for sid in ["h:abc", "h:xyz", "http:abc", "user:alice", "user_x", "global", "100%", "100x"]:
            await make(listing, sid, {})

        async def ids(prefix: str | None) -> list[str]:
            return sorted(s.session_id for s in await listing.list_sessions(now=NOW, prefix=prefix))

        assert await ids("h:") == ["h:abc", "h:xyz"]
        assert await ids("h") == ["h:abc", "h:xyz", "http:abc"]
        assert await ids("user:") == ["user:alice"]
        assert await ids("user_") == ["user_x"]  # `_` is no wildcard
        assert await ids("100%") == ["100%"]  # nor is `%`
        assert await ids("global") == ["global"]
        assert await ids("nothing") == []
        assert len(await ids(None)) == 8

    async def test_list_sessions_leaves_out_expired_sessions_unless_asked(self, listing: StateBackend) -> None:
        await make(listing, "live", {}, expires_at=NOW + 100)
        await make(listing, "forever", {}, expires_at=None)
        await make(listing, "gone", {"a": "1"}, expires_at=NOW + 10)
        assert sorted(s.session_id for s in await listing.list_sessions(now=NOW + 10)) == ["forever", "live"]
        everything = await listing.list_sessions(now=NOW + 10, include_expired=True)
        assert sorted(s.session_id for s in everything) == ["forever", "gone", "live"]
        gone = next(s for s in everything if s.session_id == "gone")
        assert (gone.keys, gone.expires_at) == (1, NOW + 10)
        assert await listing.clear_expired(now=NOW + 10) == 1
        assert len(await listing.list_sessions(now=NOW + 10, include_expired=True)) == 2

    async def test_list_sessions_sees_a_recreated_session_as_new(self, listing: StateBackend) -> None:
        await make(listing, "s1", {"a": "1", "b": "2"}, expires_at=NOW + 10)
        await listing.commit(Commit("s1", 0, {"c": "3"}), now=NOW + 20)
        (only,) = await listing.list_sessions(now=NOW + 20, include_expired=True)
        assert (only.version, only.keys, only.created_at, only.updated_at) == (1, 1, NOW + 20, NOW + 20)
