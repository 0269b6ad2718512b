"""History and revert: the checkpoints commits record, and how a session goes back to one.

With `Concierge(..., keep_checkpoints=N)` every committed unit of work records a
checkpoint of the session (and of each shared bucket) it wrote: its new
version, when, which tool, and each changed key's new value - not a copy of
the state. The last N per session are kept; older ones are pruned in the same
transaction.

To make going back possible, a checkpoint also stores what it overwrote (each
changed key's previous JSON text, the previous stage). Reverting to version V
starts from the current state and undoes the checkpoints newer than V, newest
first; so every checkpoint after V must still be kept. The revert is itself a
commit, with its own checkpoint (tool `"revert"`), so it can be reverted too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from concierge.errors import ConflictError, HistoryError, UnknownSessionError
from concierge.ids import kind_of, lookup_ids
from concierge.state.base import UNCHANGED, Commit, SessionRecord, StateBackend, StoredCheckpoint
from concierge.work import SessionStore, decode

__all__ = ["DELETED", "REVERT_TOOL", "Checkpoint", "CheckpointMethods", "Reverted", "restore"]

REVERT_TOOL = "revert"
"""The `tool` recorded in the checkpoint of a revert."""


class _Deleted:
    """Sentinel: in `Checkpoint.changes`, the key was deleted (a stored JSON `null` is `None`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DELETED"

    def __reduce__(self) -> str:
        return "DELETED"


DELETED: Any = _Deleted()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One committed unit of work on a session, as `Concierge.checkpoints` returns it.

    Attributes:
        version: the session's version after the commit (1 for the commit that created it).
        at: when it was committed (epoch seconds).
        tool: the tool whose call made it; `"revert"` for a revert. A commit
            made outside a tool call names what made it instead
            (`resources/read:<uri>`, `prompts/get:<name>`, `hook:end`).
        changes: every key whose value changed -> its new value (decoded), or
            `DELETED` when the key was removed (`None` is a stored JSON `null`).
        stage_changed: whether the commit moved the session to another stage.
        stage: the stage it moved to (`None`: no stage) when `stage_changed`, else `None`.
    """

    version: int
    at: float
    tool: str | None
    changes: dict[str, Any]
    stage_changed: bool = False
    stage: str | None = None

    @classmethod
    def of(cls, stored: StoredCheckpoint) -> Checkpoint:
        changes = {key: DELETED if text is None else decode(text) for key, text in stored.changes.items()}
        return cls(stored.version, stored.at, stored.tool, changes, stored.stage_changed, stored.stage)


@dataclass(frozen=True, slots=True)
class Reverted:
    """The outcome of a revert.

    Attributes:
        session_id: the storage id of the session (e.g. `h:<handle>`).
        reverted_to: the version whose state and stage were restored.
        version: the session's version after the revert (it is a commit of its own).
        state: the restored state (decoded).
        stage: the restored stage (`None`: no stage).
    """

    session_id: str
    reverted_to: int
    version: int
    state: dict[str, Any]
    stage: str | None


def restore(
    session_id: str,
    values: dict[str, str],
    stage: str | None,
    version: int,
    checkpoints: list[StoredCheckpoint],
    target: int,
) -> tuple[dict[str, str], str | None]:
    """The values (JSON text) and stage of a session at version `target`.

    Undoes, newest first, the checkpoints from the current `version` down to
    `target + 1`, starting from the current `values` and `stage`.

    Raises:
        HistoryError: `target` is not between 0 and `version`, or a checkpoint
            it needs is no longer kept (the message names the oldest version
            that can still be restored).
    """
    if target > version or target < 0:
        raise HistoryError(f"session {session_id!r} is at version {version}; cannot revert to version {target}")
    by_version = {c.version: c for c in checkpoints}
    oldest = version
    while oldest > target and oldest in by_version:
        oldest -= 1
    if oldest > target:
        while oldest in by_version:
            oldest -= 1
        if oldest == version:
            raise HistoryError(
                f"cannot revert session {session_id!r} to version {target}: its last commit (version {version}) "
                "recorded no checkpoint, so no earlier version can be restored"
            )
        raise HistoryError(
            f"cannot revert session {session_id!r} to version {target}: the checkpoints it needs are no longer "
            f"kept; the oldest version it can be reverted to is {oldest}"
        )
    values = dict(values)
    for v in range(version, target, -1):
        checkpoint = by_version[v]
        for key, text in checkpoint.previous.items():
            if text is None:
                values.pop(key, None)
            else:
                values[key] = text
        if checkpoint.stage_changed:
            stage = checkpoint.previous_stage
    return values, stage


def _diff(current: dict[str, str], wanted: dict[str, str]) -> dict[str, str | None]:
    """The changes that turn `current` into `wanted` (`None`: delete)."""
    return {key: wanted.get(key) for key in sorted(set(current) | set(wanted)) if current.get(key) != wanted.get(key)}


def _history_off() -> HistoryError:
    return HistoryError(
        "checkpoints are not recorded: create the app with Concierge(..., keep_checkpoints=N) to keep N per session"
    )


async def _locate(store: SessionStore, given: str) -> str:
    """The storage id of the live session `given` names (a bare handle is tried as `h:<handle>`)."""
    tried = lookup_ids(given)
    now = store.clock()
    for session_id in tried:
        if await store.backend.load(session_id, now=now) is not None:
            return session_id
    also = f" (also tried {tried[1]!r})" if len(tried) > 1 else ""
    raise UnknownSessionError(f"unknown or expired session {given!r}{also}")


async def checkpoints(store: SessionStore, session_id: str) -> list[Checkpoint]:
    """`Concierge.checkpoints`: the checkpoints kept for a session, oldest first."""
    if store.keep_checkpoints <= 0:
        raise _history_off()
    async with store.opened():
        found = await _locate(store, session_id)
        return [Checkpoint.of(c) for c in await store.backend.checkpoints(found)]


async def revert(store: SessionStore, session_id: str, version: int) -> Reverted:
    """`Concierge.revert`: restore a session's state and stage as of `version`, as a new commit."""
    if store.keep_checkpoints <= 0:
        raise _history_off()
    async with store.opened():
        found = await _locate(store, session_id)
        async with store.locked(found):
            copy = await store.load(found, create=False)
            if copy is None:
                raise UnknownSessionError(f"unknown or expired session {session_id!r}")
            stored = await store.backend.checkpoints(found)
            values, stage = restore(found, copy.base, copy.stage, copy.version, stored, version)
            copy.changes.update(_diff(copy.base, values))
            copy.set_stage(stage)
            copy.expiring = kind_of(found) == "session"  # user and global buckets never expire
            copy.must_persist = True  # even a revert that changes nothing is recorded
            await store.commit(copy, tool=REVERT_TOOL)
    return Reverted(found, version, copy.version + 1, {k: decode(v) for k, v in sorted(values.items())}, stage)


async def revert_record(
    backend: StateBackend, record: SessionRecord, version: int, *, now: float, keep: int | None = None
) -> Reverted:
    """Revert a stored session straight on its backend (the `sessions revert` command).

    The commit keeps the session's expiry and goes through the version check:
    it fails with `ConflictError` if the session changed since `record` was
    loaded. It records a checkpoint when `keep` > 0; by default (`None`) when
    the session already has checkpoints, keeping all of them plus this one
    (a server with `keep_checkpoints=N` prunes back to N at its next commit).
    """
    sid = record.session_id
    current = dict(record.values or {})
    stored = await backend.checkpoints(sid)
    values, stage = restore(sid, current, record.stage, record.version, stored, version)
    if keep is None:
        keep = len(stored) + 1 if stored else 0
    changes = _diff(current, values)
    commit = Commit(
        sid,
        record.version,
        changes,
        stage=stage if stage != record.stage else UNCHANGED,
        owner=record.owner,
        expires_at=record.expires_at,
        tool=REVERT_TOOL,
        keep_checkpoints=keep,
        before={key: current.get(key) for key in changes},
        stage_before=record.stage,
    )
    try:
        new_version = await backend.commit(commit, now=now)
    except ConflictError as exc:
        raise ConflictError(f"{exc}; the session changed while it was being reverted, nothing was written") from None
    return Reverted(sid, version, new_version, {k: decode(v) for k, v in sorted(values.items())}, stage)


class CheckpointMethods:
    """The app's checkpoint API: `checkpoints`, `revert` (and the deprecated `history`), mixed into `Concierge`."""

    _store: SessionStore

    async def checkpoints(self, session_id: str) -> list[Checkpoint]:
        """The checkpoints kept for a session, oldest first (needs `keep_checkpoints=N`).

        `session_id` is a storage id (`h:<handle>`, `http:...`, `user:<principal>`,
        `global`) or a bare handle. Works outside a running server too.

        Raises:
            HistoryError: checkpoints are off for this app.
            UnknownSessionError: no live session has that id.
        """
        return await checkpoints(self._store, session_id)  # the module function, not this method

    async def history(self, session_id: str) -> list[Checkpoint]:
        """Deprecated: the old name of `checkpoints`."""
        warnings.warn("app.history() is deprecated; use app.checkpoints()", DeprecationWarning, 2)
        return await self.checkpoints(session_id)

    async def revert(self, session_id: str, version: int) -> Reverted:
        """Restore a session's state and stage as of `version`, as a new commit (itself revertible).

        It waits for any call running on the session in this process and
        commits with the usual version check. Versions from (the oldest kept
        checkpoint's version - 1) to the current one can be restored.

        Raises:
            HistoryError: checkpoints are off, or `version` cannot be restored
                (the message names the oldest version that can).
            UnknownSessionError: no live session has that id.
            ConflictError: another process committed to the session meanwhile.
        """
        return await revert(self._store, session_id, version)
