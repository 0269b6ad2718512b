"""The `StateBackend` contract (`concierge.testing.StateBackendConformance`), run unchanged against every backend.

`state_url` gives a fresh, empty store per backend (memory, SQLite, PostgreSQL,
Redis); on the backends whose store outlives a backend object (all but memory)
the same store backs `backend_factory`, for the restart tests. Below the suite:
what the ABC's defaults do, and the documented way to run the suite against a
backend of one's own. Backend-specific behaviour, the SQL backends' migrations
included, lives in test_sqlite_backend.py, test_postgres_backend.py and
test_redis_backend.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from xml.etree import ElementTree

import pytest

import concierge.testing
from concierge.state import Commit, SessionRecord, StateBackend, backend_from_url
from concierge.state.memory import MemoryBackend
from concierge.testing import StateBackendConformance

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
NOW = 1_000_000.0


class TestEveryBackend(StateBackendConformance):
    @pytest.fixture
    async def backend(self, state_url: str) -> AsyncIterator[StateBackend]:
        async with backend_from_url(state_url) as b:
            yield b

    @pytest.fixture
    def backend_factory(self, state_url: str) -> Callable[[], StateBackend]:
        if not backend_from_url(state_url).persistent:
            pytest.skip("a MemoryBackend's sessions live and die with its object: there is no store to reopen")
        return lambda: backend_from_url(state_url)


# -- the ABC's defaults ---------------------------------------------------------------


class OnlyTheAbstractMethods(StateBackend):
    """A backend of the five abstract methods alone (over a `MemoryBackend`), counting what it is asked."""

    def __init__(self) -> None:
        self.inner = MemoryBackend()
        self.calls: list[str] = []

    async def load(
        self,
        session_id: str,
        *,
        now: float,
        known_version: int | None = None,
        known_created_at: float | None = None,
    ) -> SessionRecord | None:
        return await self.inner.load(
            session_id, now=now, known_version=known_version, known_created_at=known_created_at
        )

    async def commit_all(self, commits: Sequence[Commit], *, now: float) -> list[int]:
        self.calls.append(f"commit_all({len(commits)})")
        return await self.inner.commit_all(commits, now=now)

    async def touch(self, session_id: str, *, expires_at: float | None, now: float) -> bool:
        return await self.inner.touch(session_id, expires_at=expires_at, now=now)

    async def delete(self, session_id: str) -> bool:
        return await self.inner.delete(session_id)

    async def take_expired(self, *, now: float, limit: int) -> list[SessionRecord]:
        self.calls.append(f"take_expired({limit})")
        return await self.inner.take_expired(now=now, limit=limit)


class TestABackendOfOnlyTheAbstractMethodsPassesTheSuite(StateBackendConformance):
    """A subclass as a backend's author writes it: the suite runs, its optional parts skip."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[StateBackend]:
        async with OnlyTheAbstractMethods() as b:
            yield b


async def test_the_default_commit_is_a_commit_all_of_one() -> None:
    b = OnlyTheAbstractMethods()
    assert await b.commit(Commit("s1", 0, {"a": "1"}), now=NOW) == 1
    assert await b.commit(Commit("s1", 1, {"a": "2"}), now=NOW) == 2
    assert b.calls == ["commit_all(1)", "commit_all(1)"]
    record = await b.load("s1", now=NOW)
    assert record is not None and record.values == {"a": "2"}


async def test_the_default_clear_expired_takes_expired_sessions_a_batch_at_a_time() -> None:
    from concierge.state import base

    b = OnlyTheAbstractMethods()
    batch = base._CLEAR_BATCH
    for i in range(batch + 3):
        await b.commit(Commit(f"old{i}", 0, expires_at=NOW + 1), now=NOW)
    await b.commit(Commit("live", 0), now=NOW)
    b.calls.clear()
    assert await b.clear_expired(now=NOW + 1) == batch + 3
    assert b.calls == [f"take_expired({batch})", f"take_expired({batch})"]
    assert await b.clear_expired(now=NOW + 1) == 0
    assert await b.load("live", now=NOW + 1) is not None


def test_a_backend_must_implement_the_five_abstract_methods_and_no_more() -> None:
    assert StateBackend.__abstractmethods__ == {"load", "commit_all", "touch", "delete", "take_expired"}

    class Missing(StateBackend):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Missing()  # type: ignore[abstract]
    OnlyTheAbstractMethods()  # nothing else is required


async def test_a_backend_without_list_sessions_says_so() -> None:
    class Minimal(MemoryBackend):
        list_sessions = StateBackend.list_sessions

    with pytest.raises(NotImplementedError, match="Minimal does not support listing sessions"):
        await Minimal().list_sessions(now=NOW)


async def test_a_backend_without_checkpoints_says_so() -> None:
    class Minimal(MemoryBackend):
        supports_checkpoints = False
        checkpoints = StateBackend.checkpoints

    with pytest.raises(NotImplementedError, match="Minimal does not record checkpoints"):
        await Minimal().checkpoints("s1")


# -- the documented way to run the suite ------------------------------------------------


def test_the_documented_subclass_runs_the_suite_and_skips_what_it_does_not_provide(tmp_path: Path) -> None:
    doc = concierge.testing.__doc__ or ""
    example = re.search(r"```python\n(.*?)```", doc, re.DOTALL)
    assert example is not None, "concierge.testing's docstring shows no example"
    code = example.group(1)
    assert "from my_package import MyBackend\n" in code
    own = "from concierge.state import MemoryBackend\n\n\nclass MyBackend(MemoryBackend):\n    pass\n"
    (tmp_path / "test_my_backend.py").write_text(code.replace("from my_package import MyBackend\n", own))
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "test_my_backend.py"],
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = {  # by test name, without the `[asyncio]` of anyio's parametrisation
        re.sub(r"\[.*\]$", "", case.get("name", "")): [child for child in case if child.tag != "system-out"]
        for case in cases
    }
    skipped = {name: found[0].get("message", "") for name, found in outcomes.items() if found}
    assert all(not found or found[0].tag == "skipped" for found in outcomes.values()), done.stdout
    assert len(outcomes) == len([n for n in dir(StateBackendConformance) if n.startswith("test_")])
    # MemoryBackend records checkpoints and lists sessions: only the tests of a store that outlives it skip
    assert sorted(skipped) == [
        "test_checkpoints_survive_a_restart",
        "test_close_without_open_is_safe",
        "test_committed_session_survives_a_restart",
        "test_two_backend_objects_on_one_store_detect_each_others_commits",
    ]
    assert all("provides no 'backend_factory' fixture" in message for message in skipped.values()), skipped


def test_importing_concierge_imports_neither_pytest_nor_the_suite() -> None:
    probe = "import sys, concierge; print(sorted(m for m in ('pytest', 'concierge.testing') if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
