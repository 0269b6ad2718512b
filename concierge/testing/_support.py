"""What every part of the conformance suite shares: the clock, commit builders, the optional fixtures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from concierge.state.base import Commit, StateBackend

#: The `now` of the tests: a fixed instant, so expiry is driven by arithmetic, not by waiting.
NOW = 1_000_000.0

#: A zero-argument callable returning a new, unopened backend on the test's durable store.
BackendFactory = Callable[[], StateBackend]

FACTORY_FIXTURE = "backend_factory"


async def make(backend: StateBackend, sid: str, values: dict[str, str], **fields: Any) -> int:
    """Create session `sid` holding `values` (a commit at version 0, at `NOW`); return its version."""
    return await backend.commit(Commit(sid, 0, dict(values), **fields), now=NOW)  # type: ignore[arg-type]


def step(
    sid: str, expected: int, changes: dict[str, str | None], before: dict[str, str | None], **fields: Any
) -> Commit:
    """A commit that records a checkpoint (keeping the last 10 unless told otherwise)."""
    fields.setdefault("keep_checkpoints", 10)
    fields.setdefault("tool", "t")
    return Commit(sid, expected, changes, before=before, **fields)


def no_durable_store() -> BackendFactory:
    """What the default `backend_factory` fixture does: skip the test, saying what it needs."""
    pytest.skip(
        f"needs a durable store: this StateBackendConformance subclass provides no {FACTORY_FIXTURE!r} fixture "
        "(a callable returning a new, unopened backend on one store that outlives backend objects)"
    )


def require_checkpoints(backend: StateBackend) -> StateBackend:
    """`backend`, or a skip when it records no checkpoints (`supports_checkpoints` is false)."""
    if not backend.supports_checkpoints:
        pytest.skip(f"{type(backend).__name__} does not record checkpoints (supports_checkpoints is False)")
    return backend


def require_listing(backend: StateBackend) -> StateBackend:
    """`backend`, or a skip when it keeps the default `list_sessions` (which raises `NotImplementedError`)."""
    if type(backend).list_sessions is StateBackend.list_sessions:
        pytest.skip(f"{type(backend).__name__} does not implement list_sessions (optional)")
    return backend
