"""The conformance tests of a backend's lifecycle, and of a store that outlives its backend objects.

The tests that build backend objects of their own ask for the `backend_factory`
fixture; `StateBackendConformance`'s own skips them, saying so, for a subclass
that does not provide one.
"""

from __future__ import annotations

import pytest

from concierge.errors import ConflictError
from concierge.state.base import Commit, StateBackend
from concierge.testing._support import NOW, BackendFactory, make


class DurabilityTests:
    """`open`/`close` are idempotent; committed sessions survive a new backend object; two objects share a store."""

    pytestmark = pytest.mark.anyio

    async def test_open_and_close_are_idempotent(self, backend: StateBackend) -> None:
        await backend.open()  # a second open is a no-op: what was committed is still there
        await make(backend, "s1", {"a": "1"})
        await backend.open()
        record = await backend.load("s1", now=NOW)
        assert record is not None and record.values == {"a": "1"}
        await backend.close()
        await backend.close()

    async def test_close_without_open_is_safe(self, backend_factory: BackendFactory) -> None:
        never_opened = backend_factory()
        await never_opened.close()
        await never_opened.close()

    async def test_committed_session_survives_a_restart(self, backend_factory: BackendFactory) -> None:
        first = backend_factory()
        async with first:
            await make(first, "s1", {"a": "1", "b": "2"}, stage="cart", owner="alice", expires_at=NOW + 60)
            await first.commit(Commit("s1", 1, {"b": None}, expires_at=NOW + 60), now=NOW)
        second = backend_factory()
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

    async def test_two_backend_objects_on_one_store_detect_each_others_commits(
        self, backend_factory: BackendFactory
    ) -> None:
        async with backend_factory() as a, backend_factory() as b:
            await make(a, "s1", {"n": "0"})
            record = await b.load("s1", now=NOW, known_version=1)
            assert record is not None and record.values is None
            assert await b.commit(Commit("s1", 1, {"n": "1"}), now=NOW) == 2
            with pytest.raises(ConflictError):
                await a.commit(Commit("s1", 1, {"n": "2"}), now=NOW)
            stale = await a.load("s1", now=NOW, known_version=1)
            assert stale is not None and stale.values == {"n": "1"}
            await b.delete("s1")
            with pytest.raises(ConflictError, match="no longer exists"):
                await a.commit(Commit("s1", 2, {"n": "3"}), now=NOW)
            assert await a.load("s1", now=NOW) is None
