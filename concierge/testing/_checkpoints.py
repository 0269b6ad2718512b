"""The conformance tests of checkpoints (skipped for a backend whose `supports_checkpoints` is false)."""

from __future__ import annotations

import pytest

from concierge.errors import ConflictError
from concierge.state.base import Commit, StateBackend
from concierge.testing._support import NOW, BackendFactory, make, require_checkpoints, step


class CheckpointTests:
    """What a commit with `keep_checkpoints` records, what it prunes, and that checkpoints go with their session."""

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def recording(self, backend: StateBackend) -> StateBackend:
        """`backend`, when it records checkpoints."""
        return require_checkpoints(backend)

    async def test_each_commit_with_checkpoints_records_one_of_what_it_changed(self, recording: StateBackend) -> None:
        b = recording
        assert await b.checkpoints("s1") == []
        await b.commit(step("s1", 0, {"a": "1", "b": '"x"'}, {}, tool="create", stage="browse"), now=NOW)
        await b.commit(step("s1", 1, {"a": "2", "b": None, "c": "[3]"}, {"a": "1", "b": '"x"', "c": None}), now=NOW + 1)
        await b.commit(step("s1", 2, {}, {}, tool=None, stage="cart", stage_before="browse"), now=NOW + 2)
        first, second, third = await b.checkpoints("s1")
        assert (first.version, first.at, first.tool) == (1, NOW, "create")
        assert (first.changes, first.previous) == ({"a": "1", "b": '"x"'}, {"a": None, "b": None})
        assert (first.stage_changed, first.stage, first.previous_stage) == (True, "browse", None)
        assert (second.version, second.at, second.tool, second.stage_changed) == (2, NOW + 1, "t", False)
        assert second.changes == {"a": "2", "b": None, "c": "[3]"}
        assert second.previous == {"a": "1", "b": '"x"', "c": None}
        assert (third.version, third.tool, third.changes, third.previous) == (3, None, {}, {})
        assert (third.stage_changed, third.stage, third.previous_stage) == (True, "cart", "browse")

    async def test_a_checkpoint_leaves_out_keys_written_with_the_value_they_had(self, recording: StateBackend) -> None:
        await recording.commit(step("s1", 0, {"a": "1", "b": "2"}, {}, stage="x"), now=NOW)
        before: dict[str, str | None] = {"a": "1", "b": "2"}
        await recording.commit(
            step("s1", 1, {"a": "1", "b": "3", "gone": None}, before, stage="x", stage_before="x"), now=NOW
        )
        last = (await recording.checkpoints("s1"))[-1]
        assert (last.changes, last.previous, last.stage_changed) == ({"b": "3"}, {"b": "2"}, False)

    async def test_a_clearing_commit_records_every_key_it_removed_with_its_value(self, recording: StateBackend) -> None:
        await recording.commit(step("s1", 0, {"a": "1", "b": "2", "c": "3"}, {}, stage="cart"), now=NOW)
        await recording.commit(
            step("s1", 1, {"c": "30"}, {"a": "1", "b": "2", "c": "3"}, clear=True, stage=None, stage_before="cart"),
            now=NOW,
        )
        last = (await recording.checkpoints("s1"))[-1]
        assert last.changes == {"a": None, "b": None, "c": "30"}
        assert last.previous == {"a": "1", "b": "2", "c": "3"}
        assert (last.stage_changed, last.stage, last.previous_stage) == (True, None, "cart")

    async def test_a_commit_without_keep_checkpoints_records_nothing(self, recording: StateBackend) -> None:
        await make(recording, "s1", {"a": "1"})
        await recording.commit(Commit("s1", 1, {"a": "2"}, tool="t"), now=NOW)
        assert await recording.checkpoints("s1") == []
        await recording.commit(step("s1", 2, {"a": "3"}, {"a": "2"}), now=NOW)
        assert [c.version for c in await recording.checkpoints("s1")] == [3]

    async def test_keep_checkpoints_keeps_the_last_n_per_session(self, recording: StateBackend) -> None:
        await recording.commit(step("s1", 0, {"n": "0"}, {}, keep_checkpoints=3), now=NOW)
        await recording.commit(step("other", 0, {"n": "0"}, {}, keep_checkpoints=3), now=NOW)
        for v in range(1, 8):
            await recording.commit(step("s1", v, {"n": str(v)}, {"n": str(v - 1)}, keep_checkpoints=3), now=NOW + v)
        kept = await recording.checkpoints("s1")
        assert [c.version for c in kept] == [6, 7, 8]
        assert [c.changes for c in kept] == [{"n": "5"}, {"n": "6"}, {"n": "7"}]
        assert [c.version for c in await recording.checkpoints("other")] == [1]
        # a smaller window prunes more
        await recording.commit(step("s1", 8, {"n": "8"}, {"n": "7"}, keep_checkpoints=1), now=NOW)
        assert [c.version for c in await recording.checkpoints("s1")] == [9]

    async def test_a_conflicting_commit_records_no_checkpoint(self, recording: StateBackend) -> None:
        await recording.commit(step("s1", 0, {"n": "0"}, {}), now=NOW)
        await recording.commit(step("s1", 1, {"n": "1"}, {"n": "0"}), now=NOW)
        with pytest.raises(ConflictError):
            await recording.commit(step("s1", 1, {"n": "9"}, {"n": "0"}), now=NOW)
        with pytest.raises(ConflictError):
            await recording.commit_all([step("s2", 0, {"x": "1"}, {}), step("s1", 1, {"n": "9"}, {"n": "0"})], now=NOW)
        assert [c.version for c in await recording.checkpoints("s1")] == [1, 2]
        assert await recording.checkpoints("s2") == []

    async def test_commit_all_records_a_checkpoint_for_each_session_it_writes(self, recording: StateBackend) -> None:
        await recording.commit_all(
            [step("h:s", 0, {"a": "1"}, {}, tool="visit"), step("global", 0, {"n": "1"}, {}, tool="visit")], now=NOW
        )
        await recording.commit_all(
            [step("h:s", 1, {"a": "2"}, {"a": "1"}, tool="visit"), step("global", 1, {"n": "2"}, {"n": "1"})], now=NOW
        )
        assert [(c.version, c.changes) for c in await recording.checkpoints("h:s")] == [
            (1, {"a": "1"}),
            (2, {"a": "2"}),
        ]
        assert [(c.version, c.tool) for c in await recording.checkpoints("global")] == [(1, "visit"), (2, "t")]

    async def test_checkpoints_go_with_their_session(self, recording: StateBackend) -> None:
        await recording.commit(step("s1", 0, {"a": "1"}, {}, expires_at=NOW + 10), now=NOW)
        await recording.commit(step("s1", 1, {"a": "2"}, {"a": "1"}, expires_at=NOW + 10), now=NOW)
        await recording.commit(step("s2", 0, {"a": "1"}, {}), now=NOW)
        # A new life of an expired id starts without its predecessor's checkpoints.
        await recording.commit(step("s1", 0, {"b": "1"}, {}), now=NOW + 20)
        assert [(c.version, c.changes) for c in await recording.checkpoints("s1")] == [(1, {"b": "1"})]
        assert await recording.delete("s1")
        assert await recording.checkpoints("s1") == []
        await recording.commit(step("s3", 0, {"a": "1"}, {}, expires_at=NOW + 10), now=NOW)
        assert await recording.clear_expired(now=NOW + 10) == 1
        assert await recording.checkpoints("s3") == []
        assert [c.version for c in await recording.checkpoints("s2")] == [1]

    async def test_checkpoints_survive_a_restart(self, backend_factory: BackendFactory) -> None:
        async with backend_factory() as first:
            require_checkpoints(first)
            await first.commit(step("s1", 0, {"k": '"Zoë"'}, {}, tool="add", stage="cart"), now=NOW)
        async with backend_factory() as second:
            (only,) = await second.checkpoints("s1")
        assert (only.version, only.at, only.tool, only.changes, only.stage) == (1, NOW, "add", {"k": '"Zoë"'}, "cart")
