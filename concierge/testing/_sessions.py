"""The conformance tests of one session's life: create, read, commit, delete, and the fields a commit sets."""

from __future__ import annotations

import pytest

from concierge.errors import ConflictError
from concierge.state.base import UNCHANGED, Commit, StateBackend
from concierge.testing._support import NOW, make


class SessionTests:
    """Round trip, delete and resurrection, version conflicts, `known_version`, clear/stage/owner/expiry."""

    pytestmark = pytest.mark.anyio

    # -- round trip -------------------------------------------------------------------

    async def test_commit_at_version_zero_creates_session_that_load_returns(self, backend: StateBackend) -> None:
        version = await make(backend, "s1", {"a": "1", "b": '"x"'}, stage="browse", owner="alice", expires_at=NOW + 60)
        assert version == 1
        record = await backend.load("s1", now=NOW)
        assert record is not None
        assert (record.session_id, record.version, record.values) == ("s1", 1, {"a": "1", "b": '"x"'})
        assert (record.stage, record.owner, record.expires_at) == ("browse", "alice", NOW + 60)

    async def test_load_of_unknown_session_returns_none(self, backend: StateBackend) -> None:
        assert await backend.load("nope", now=NOW) is None
        assert await backend.load("nope", now=NOW, known_version=1) is None

    async def test_commit_at_version_zero_without_changes_makes_empty_session_at_version_one(
        self, backend: StateBackend
    ) -> None:
        assert await backend.commit(Commit("s1", 0, owner="bob"), now=NOW) == 1
        record = await backend.load("s1", now=NOW)
        assert record is not None
        assert (record.version, record.values, record.stage, record.owner, record.expires_at) == (
            1,
            {},
            None,
            "bob",
            None,
        )

    async def test_each_commit_bumps_version_and_applies_only_its_changes(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1", "b": "2", "c": "3"})
        assert await backend.commit(Commit("s1", 1, {"a": "10", "b": None, "d": "4"}), now=NOW) == 2
        record = await backend.load("s1", now=NOW)
        assert record is not None and record.version == 2
        assert record.values == {"a": "10", "c": "3", "d": "4"}

    async def test_deleting_an_absent_key_is_a_no_op(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"})
        assert await backend.commit(Commit("s1", 1, {"zzz": None}), now=NOW) == 2
        record = await backend.load("s1", now=NOW)
        assert record is not None and record.values == {"a": "1"}

    async def test_sessions_are_isolated(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"k": '"one"'})
        await make(backend, "s2", {"k": '"two"'})
        await backend.commit(Commit("s1", 1, {"k": '"changed"', "extra": "1"}), now=NOW)
        r1, r2 = await backend.load("s1", now=NOW), await backend.load("s2", now=NOW)
        assert r1 is not None and r1.values == {"k": '"changed"', "extra": "1"}
        assert r2 is not None and r2.values == {"k": '"two"'} and r2.version == 1

    async def test_loaded_values_are_a_copy(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"})
        record = await backend.load("s1", now=NOW)
        assert record is not None and record.values is not None
        record.values["a"] = "999"
        record.values["new"] = "1"
        again = await backend.load("s1", now=NOW)
        assert again is not None and again.values == {"a": "1"}

    async def test_committed_changes_dict_is_not_kept_by_reference(self, backend: StateBackend) -> None:
        changes: dict[str, str | None] = {"a": "1"}
        await backend.commit(Commit("s1", 0, changes), now=NOW)
        changes["a"] = "2"
        record = await backend.load("s1", now=NOW)
        assert record is not None and record.values == {"a": "1"}

    # -- delete and resurrection ----------------------------------------------------

    async def test_delete_removes_session_and_reports_whether_it_existed(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"})
        await make(backend, "s2", {"a": "2"})
        assert await backend.delete("s1") is True
        assert await backend.load("s1", now=NOW) is None
        assert await backend.delete("s1") is False
        assert await backend.delete("never") is False
        assert (await backend.load("s2", now=NOW)) is not None

    async def test_commit_after_delete_conflicts_and_does_not_resurrect(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"})
        await backend.delete("s1")
        with pytest.raises(ConflictError, match="no longer exists"):
            await backend.commit(Commit("s1", 1, {"a": "2"}), now=NOW)
        assert await backend.load("s1", now=NOW) is None

    async def test_recreating_a_deleted_session_starts_empty(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1", "b": "2"}, stage="old")
        await backend.delete("s1")
        assert await make(backend, "s1", {"c": "3"}) == 1
        record = await backend.load("s1", now=NOW)
        assert record is not None and record.values == {"c": "3"} and record.stage is None

    # -- conflicts -------------------------------------------------------------------

    async def test_second_commit_from_the_same_version_conflicts_and_writes_nothing(
        self, backend: StateBackend
    ) -> None:
        await make(backend, "s1", {"n": "0"})
        assert await backend.commit(Commit("s1", 1, {"n": "1"}), now=NOW) == 2
        with pytest.raises(ConflictError, match="version 2, expected 1"):
            await backend.commit(Commit("s1", 1, {"n": "99", "other": "1"}, clear=True, stage="x"), now=NOW)
        record = await backend.load("s1", now=NOW)
        assert record is not None
        assert (record.version, record.values, record.stage) == (2, {"n": "1"}, None)

    async def test_creating_an_existing_live_session_conflicts(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"}, owner="alice")
        with pytest.raises(ConflictError):
            await make(backend, "s1", {"a": "2"}, owner="mallory")
        with pytest.raises(ConflictError):  # an empty creation too
            await backend.commit(Commit("s1", 0, owner="mallory"), now=NOW)
        record = await backend.load("s1", now=NOW)
        assert record is not None and (record.version, record.values, record.owner) == (1, {"a": "1"}, "alice")

    # -- known_version ---------------------------------------------------------------

    async def test_load_with_current_known_version_skips_values(self, backend: StateBackend) -> None:
        await make(backend, "s1", {f"k{i}": str(i) for i in range(50)}, stage="st", owner="o", expires_at=NOW + 5)
        record = await backend.load("s1", now=NOW, known_version=1)
        assert record is not None
        assert (record.version, record.values, record.stage, record.owner, record.expires_at) == (
            1,
            None,
            "st",
            "o",
            NOW + 5,
        )

    async def test_load_with_stale_known_version_returns_all_values(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1"})
        await backend.commit(Commit("s1", 1, {"b": "2"}), now=NOW)
        record = await backend.load("s1", now=NOW, known_version=1)
        assert record is not None and record.version == 2 and record.values == {"a": "1", "b": "2"}

    async def test_load_with_stale_known_version_of_empty_session_returns_empty_dict(
        self, backend: StateBackend
    ) -> None:
        await make(backend, "s1", {"a": "1"})
        await backend.commit(Commit("s1", 1, {"a": None}), now=NOW)
        record = await backend.load("s1", now=NOW, known_version=1)
        assert record is not None and record.values == {}

    # -- clear / stage / owner / expires_at -----------------------------------------------

    async def test_clear_drops_every_key_before_applying_changes(self, backend: StateBackend) -> None:
        await make(backend, "s1", {"a": "1", "b": "2", "c": "3"})
        await backend.commit(Commit("s1", 1, {"c": "30", "d": "4"}, clear=True), now=NOW)
        record = await backend.load("s1", now=NOW)
        assert record is not None and record.values == {"c": "30", "d": "4"}

    async def test_stage_is_kept_when_unchanged_and_replaced_or_cleared_when_given(self, backend: StateBackend) -> None:
        await make(backend, "s1", {}, stage="browse")
        await backend.commit(Commit("s1", 1, {"a": "1"}, stage=UNCHANGED), now=NOW)
        assert (r := await backend.load("s1", now=NOW)) is not None and r.stage == "browse"
        await backend.commit(Commit("s1", 2, {}, stage="cart"), now=NOW)
        assert (r := await backend.load("s1", now=NOW)) is not None and r.stage == "cart"
        await backend.commit(Commit("s1", 3, {}, stage=None), now=NOW)
        assert (r := await backend.load("s1", now=NOW)) is not None and r.stage is None and r.version == 4

    async def test_owner_is_set_at_creation_and_not_changed_by_later_commits(self, backend: StateBackend) -> None:
        await make(backend, "s1", {}, owner="alice")
        await backend.commit(Commit("s1", 1, {"a": "1"}, owner="mallory"), now=NOW)
        record = await backend.load("s1", now=NOW)
        assert record is not None and record.owner == "alice"

    async def test_each_commit_sets_expires_at_including_back_to_never(self, backend: StateBackend) -> None:
        await make(backend, "s1", {}, expires_at=NOW + 10)
        await backend.commit(Commit("s1", 1, {}, expires_at=NOW + 100), now=NOW + 5)
        assert await backend.load("s1", now=NOW + 50) is not None  # extended past the first expiry
        await backend.commit(Commit("s1", 2, {}, expires_at=None), now=NOW + 50)
        record = await backend.load("s1", now=NOW + 10_000)
        assert record is not None and record.expires_at is None
