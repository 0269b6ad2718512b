"""In-process memory backend: the default, and the reference for the contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from concierge.errors import ConflictError
from concierge.state.base import (
    UNCHANGED,
    ChangeCallback,
    Commit,
    SessionRecord,
    SessionSummary,
    StateBackend,
    StoredCheckpoint,
    check_page,
    checkpoint_of,
    update_conflict,
)

__all__ = ["MemoryBackend"]


@dataclass(slots=True)
class _Row:
    version: int
    stage: str | None
    owner: str | None
    expires_at: float | None
    created_at: float
    updated_at: float
    values: dict[str, str] = field(default_factory=dict)
    checkpoints: list[StoredCheckpoint] = field(default_factory=list)

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


class MemoryBackend(StateBackend):
    """Sessions in a dict of this process. Lost when the process exits.

    No method waits on anything (the defaults of `commit` and `clear_expired`
    only await these methods), so on one event loop each call is atomic
    without a lock.
    """

    scheme = "memory"
    persistent = False
    supports_checkpoints = True

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self._watchers: list[ChangeCallback] = []

    async def watch(self, on_change: ChangeCallback) -> bool:
        """Every commit and deletion is told at once, in the same call (every client is in this process)."""
        if on_change not in self._watchers:
            self._watchers.append(on_change)
        return True

    def caught_up(self) -> bool:
        return True

    def _tell(self, session_id: str, version: int | None) -> None:
        for on_change in self._watchers:
            on_change(session_id, version)

    async def load(
        self,
        session_id: str,
        *,
        now: float,
        known_version: int | None = None,
        known_created_at: float | None = None,
    ) -> SessionRecord | None:
        row = self._rows.get(session_id)
        if row is None or not row.live(now):
            return None
        current = known_version == row.version and known_created_at in (None, row.created_at)
        values = None if current else dict(row.values)
        return SessionRecord(session_id, row.version, values, row.stage, row.owner, row.expires_at, row.created_at)

    async def commit_all(self, commits: Sequence[Commit], *, now: float) -> list[int]:
        rows = [self._checked(commit, now) for commit in commits]  # every check before any write
        versions = []
        for commit, row in zip(commits, rows):
            if commit.clear:
                row.values.clear()
            for key, value in commit.changes.items():
                if value is None:
                    row.values.pop(key, None)
                else:
                    row.values[key] = value
            if commit.stage is not UNCHANGED:
                row.stage = commit.stage  # type: ignore[assignment]
            row.expires_at = commit.expires_at
            row.updated_at = now
            row.version += 1
            if commit.keep_checkpoints > 0:
                row.checkpoints.append(checkpoint_of(commit, row.version, now))
                oldest = row.version - commit.keep_checkpoints
                row.checkpoints = [c for c in row.checkpoints if c.version > oldest]
            self._rows[commit.session_id] = row
            versions.append(row.version)
        if self._watchers:
            for commit, version in zip(commits, versions):
                self._tell(commit.session_id, version)
        return versions

    def _checked(self, commit: Commit, now: float) -> _Row:
        """The row `commit` applies to (a new one when it creates the session), or `ConflictError`."""
        row = self._rows.get(commit.session_id)
        if row is not None and not row.live(now):
            row = None
        if commit.expected_version == 0:
            if row is not None:
                raise ConflictError(f"session {commit.session_id!r} was created concurrently")
            return _Row(version=0, stage=None, owner=commit.owner, expires_at=None, created_at=now, updated_at=now)
        if row is None or row.version != commit.expected_version:
            raise update_conflict(commit, None if row is None else row.version)
        return row

    async def checkpoints(self, session_id: str) -> list[StoredCheckpoint]:
        row = self._rows.get(session_id)
        return [] if row is None else list(row.checkpoints)

    async def touch(self, session_id: str, *, expires_at: float | None, now: float) -> bool:
        row = self._rows.get(session_id)
        if row is None or not row.live(now):
            return False
        row.expires_at = expires_at
        row.updated_at = max(row.updated_at, now)
        return True

    async def delete(self, session_id: str) -> bool:
        found = self._rows.pop(session_id, None) is not None
        if found:
            self._tell(session_id, None)
        return found

    async def take_expired(self, *, now: float, limit: int) -> list[SessionRecord]:
        taken = []
        for sid in [sid for sid, row in self._rows.items() if not row.live(now)][:limit]:
            row = self._rows.pop(sid)
            self._tell(sid, None)
            taken.append(
                SessionRecord(sid, row.version, row.values, row.stage, row.owner, row.expires_at, row.created_at)
            )
        return taken

    async def list_sessions(
        self,
        *,
        now: float,
        prefix: str | None = None,
        include_expired: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> list[SessionSummary]:
        check_page(limit, offset)
        found = [
            SessionSummary(
                session_id=sid,
                version=row.version,
                stage=row.stage,
                owner=row.owner,
                keys=len(row.values),
                size=sum(len(value.encode("utf-8")) for value in row.values.values()),
                created_at=row.created_at,
                updated_at=row.updated_at,
                expires_at=row.expires_at,
            )
            for sid, row in self._rows.items()
            if (prefix is None or sid.startswith(prefix)) and (include_expired or row.live(now))
        ]
        found.sort(key=lambda s: (-s.updated_at, s.session_id))
        return found[offset : offset + limit]
