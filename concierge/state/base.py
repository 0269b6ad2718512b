"""The storage contract every state backend implements.

A backend only persists. Everything that is the same for every store — the
dict API, dirty tracking, JSON encoding, expiry arithmetic, the stage field —
lives above it (`concierge.work`). Values reach a backend already encoded as
JSON text and leave it the same way.

A session is one row of metadata (`version`, `stage`, `owner`, `expires_at`)
plus one entry per state key. `version` starts at 1 when the session is
created and grows by one with every commit; it is how a commit detects that
another process wrote to the session since it was loaded.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from concierge.errors import ConflictError

__all__ = [
    "UNCHANGED",
    "Commit",
    "SessionRecord",
    "SessionSummary",
    "StateBackend",
    "StoredCheckpoint",
    "checkpoint_of",
    "update_conflict",
]


class _Unchanged:
    """Sentinel: the commit leaves the stage as it is."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()


@dataclass(slots=True)
class SessionRecord:
    """A session as stored.

    `values` maps each key to its JSON text. It is `None` only when `load` was
    given the stored `known_version` (and `known_created_at`): the caller's
    cached values are still current and were not read again.

    `created_at` tells apart two lives of one session id: versions start again
    at 1 when a session is created anew after it expired or was deleted, so a
    cached `(created_at, version)` pair, not the version alone, names one state.
    """

    session_id: str
    version: int
    values: dict[str, str] | None
    stage: str | None = None
    owner: str | None = None
    expires_at: float | None = None
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One session as `StateBackend.list_sessions` describes it, without its values.

    Attributes:
        session_id: the storage id, as stored (e.g. `h:<handle>`, `user:<principal>`).
        version: the stored version (1 at creation, +1 per commit).
        stage: the session's stage, `None` when it has none.
        owner: the principal recorded when the session was created.
        keys: how many state keys it holds.
        size: the total size of its values' JSON text, in UTF-8 bytes.
        created_at: when this life of the session began (epoch seconds).
        updated_at: its last activity: the last commit, or the last renewal of
            its expiry by a call that only read (`touch`).
        expires_at: its absolute expiry (epoch seconds), `None` = never.
    """

    session_id: str
    version: int
    stage: str | None
    owner: str | None
    keys: int
    size: int
    created_at: float
    updated_at: float
    expires_at: float | None


@dataclass(slots=True)
class Commit:
    """The changes one unit of work writes to one session, atomically.

    Attributes:
        session_id: the session written to.
        expected_version: the version the unit of work loaded; 0 means the
            session did not exist and this commit creates it.
        changes: key -> new JSON text, or `None` to delete the key.
        clear: delete every key before applying `changes`.
        stage: the new stage, or `UNCHANGED`.
        owner: the principal recorded when the commit creates the session.
        expires_at: the new absolute expiry (epoch seconds), `None` = never.
        tool: what made the commit (a tool's name), recorded in its checkpoint.
        keep_checkpoints: how many checkpoints to keep for the session, this commit's
            included (older ones are pruned); 0 records none.
        before: what the commit overwrites, for its checkpoint (only read when
            `keep_checkpoints` > 0): for every key in `changes` - and, with `clear`,
            every key the session held - its JSON text at `expected_version`,
            `None` when it was absent.
        stage_before: the stage at `expected_version` (only read when `keep_checkpoints` > 0).
    """

    session_id: str
    expected_version: int
    changes: dict[str, str | None] = field(default_factory=dict)
    clear: bool = False
    stage: str | None | _Unchanged = UNCHANGED
    owner: str | None = None
    expires_at: float | None = None
    tool: str | None = None
    keep_checkpoints: int = 0
    before: dict[str, str | None] = field(default_factory=dict)
    stage_before: str | None = None

    @property
    def is_update(self) -> bool:
        """An update of an existing session's keys, stage and expiry: no creation, clear or checkpoint.

        The commit of most calls; a backend may give it a faster path.
        """
        return self.expected_version > 0 and not self.clear and self.keep_checkpoints == 0


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """What one commit changed, as `StateBackend.checkpoints` returns it (JSON text, as stored).

    Attributes:
        version: the version the commit brought the session to.
        at: when it was committed (epoch seconds).
        tool: what made it (`Commit.tool`).
        changes: every key whose value it changed -> its new JSON text, `None` when deleted.
        previous: the same keys -> their JSON text before it, `None` when absent.
        stage_changed: whether it changed the stage.
        stage: the new stage (`None` when unchanged or cleared).
        previous_stage: the stage before it (`None` when unchanged).
    """

    version: int
    at: float
    tool: str | None
    changes: dict[str, str | None]
    previous: dict[str, str | None]
    stage_changed: bool = False
    stage: str | None = None
    previous_stage: str | None = None


def update_conflict(commit: Commit, current: int | str | None) -> ConflictError:
    """Why the update `commit` found its session moved: it is at version `current`, or `None`: gone
    (deleted or expired). The same words on every backend."""
    if current is None:
        return ConflictError(f"session {commit.session_id!r} no longer exists (deleted or expired)")
    return ConflictError(f"session {commit.session_id!r} is at version {current}, expected {commit.expected_version}")


def check_page(limit: int, offset: int) -> None:
    """Refuse a negative page bound of `list_sessions` (every backend checks the same way)."""
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must not be negative (got limit={limit}, offset={offset})")


def checkpoint_of(commit: Commit, version: int, now: float) -> StoredCheckpoint:
    """The checkpoint `commit` records when it brings its session to `version`.

    Only keys whose value actually changes are kept (with `clear`, that
    includes every key the session held that the commit does not write again).
    """
    written = dict(commit.changes)
    if commit.clear:
        for key in commit.before:
            written.setdefault(key, None)
    changes: dict[str, str | None] = {}
    previous: dict[str, str | None] = {}
    for key, value in written.items():
        old = commit.before.get(key)
        if old != value:
            changes[key], previous[key] = value, old
    stage = commit.stage
    if isinstance(stage, _Unchanged) or stage == commit.stage_before:
        return StoredCheckpoint(version, now, commit.tool, changes, previous)
    return StoredCheckpoint(version, now, commit.tool, changes, previous, True, stage, commit.stage_before)


ChangeCallback = Callable[[str | None, int | None], None]
"""What `StateBackend.watch` calls: `(session_id, new version)`, `(session_id, None)` when it is deleted,
`(None, None)` when changes may have been missed."""


async def _let_notices_in() -> None:
    """Yield to the event loop until a change notice already waiting in a socket has been handed on.

    Three turns: the first's poll reads the socket and its protocol schedules the driver's callback
    (asyncpg hands a notice to its listener with `call_soon`; redis-py's reader task wakes the same way),
    the second runs that callback, and this coroutine, queued before it in the second, resumes in the
    third. What arrives later is the commit's version check's to catch.
    """
    for _ in range(3):
        await asyncio.sleep(0)


class StateBackend(ABC):
    """Async storage for sessions.

    A backend implements the five abstract methods: `load`, `commit_all`,
    `touch`, `delete` and `take_expired`. `commit` and `clear_expired` have
    defaults built on them, which a backend may override with a faster path;
    `list_sessions` and `checkpoints` are optional (their defaults raise
    `NotImplementedError`). `concierge.testing.StateBackendConformance` is the
    test suite a backend passes.

    All timestamps are epoch seconds supplied by the caller (`now`), so tests
    can drive expiry with an injected clock. A session whose `expires_at` is at
    or before `now` is treated everywhere as absent.
    """

    #: URL scheme(s) this backend serves, for messages.
    scheme: str = ""
    #: Whether sessions outlive the process (and can be shared by several processes).
    persistent: bool = True
    #: Whether the backend records checkpoints (`Commit.keep_checkpoints`) and implements `checkpoints`.
    supports_checkpoints: bool = False
    #: Whether the change feed (`watch`) is pushed over a connection (PostgreSQL LISTEN, Redis pub/sub), so
    #: `catch_up` lets the event loop read a notice already waiting in its socket first.
    pushes_changes: bool = False

    async def open(self) -> None:
        """Connect and apply migrations. Called once at server start; idempotent.

        Raises:
            StateUnavailableError: the store cannot be reached (the message names
                where it was looked for, never a password).
        """

    async def close(self) -> None:
        """Release connections. Safe to call more than once, or without `open`."""

    @abstractmethod
    async def load(
        self,
        session_id: str,
        *,
        now: float,
        known_version: int | None = None,
        known_created_at: float | None = None,
    ) -> SessionRecord | None:
        """Read a live session.

        Args:
            session_id: the session to read.
            now: the time expiry is judged at. `float("-inf")` returns a
                session whatever its expiry, as long as it has not been deleted
                (how an expired handle is told apart from an unknown one).
            known_version: the version whose values the caller already holds;
                when it equals the stored version (and `known_created_at`, when
                given, equals the stored `created_at`), the record comes back
                with `values=None` instead of reading every key again.
            known_created_at: the `created_at` of the session life the caller's
                values belong to.

        Returns:
            The session, its `values` a copy the caller may change; `None` when
            it does not exist, was deleted or has expired at `now`.

        Raises:
            StateUnavailableError: the store could not be reached.
        """

    async def commit(self, commit: Commit, *, now: float) -> int:
        """Apply one commit atomically: `commit_all` of one, unless a backend has a faster path.

        With `expected_version == 0` the commit creates the session at version
        1 (replacing an expired one of the same id, whose values and
        checkpoints go with it); otherwise the stored version must equal
        `expected_version`. Nothing is written when this raises - except that a
        connection lost during the final COMMIT leaves the outcome unknown; the
        version check then makes a retry safe (it fails with `ConflictError` if
        the first attempt landed).

        Args:
            commit: the changes, and the version they were computed from.
            now: the time of the commit: expiry is judged at it, and it becomes
                the session's `updated_at` (and `created_at`, when it creates it).

        Returns:
            The session's new version.

        Raises:
            ConflictError: the stored version differs, the session to create
                already exists (live), or the session to update no longer
                exists (it was deleted or expired: a deleted session is never
                resurrected).
            StateUnavailableError: the store could not be reached.
        """
        return (await self.commit_all([commit], now=now))[0]

    @abstractmethod
    async def commit_all(self, commits: Sequence[Commit], *, now: float) -> list[int]:
        """Apply several commits, to distinct sessions, atomically: all of them or none.

        One unit of work writes its session and the shared user and global
        buckets this way. Each commit is checked and applied as `commit`
        describes; an empty sequence writes nothing.

        Returns:
            The new versions, in the order of `commits`.

        Raises:
            ConflictError: any one of them conflicts (as in `commit`); nothing
                is written.
            StateUnavailableError: the store could not be reached.
        """

    # -- the change feed (optional) -----------------------------------------------
    async def watch(self, on_change: ChangeCallback) -> bool:
        """Start telling this process about commits and deletions, made by any client of the store.

        A backend that can, calls `on_change(session_id, version)` after a
        commit gives `session_id` the stored `version`, `on_change(session_id,
        None)` after it is deleted, and `on_change(None, None)` when it may have
        missed changes (a lost connection): whatever the process holds may be
        stale. It may call it for this process's own commits too. Called once,
        after `open`; the feed ends with `close`.

        With a feed, a process that committed a session last keeps its values
        and serves the next call on it with no load at all (a read-only call
        then makes no round trip); the commit's version check still guards
        every write. The default has no feed (`False`): every call loads.

        Returns:
            Whether `on_change` will be called.
        """
        return False

    def caught_up(self) -> bool:
        """Whether every change other clients made so far has reached the `watch` callback, as far as this
        process can know now, without waiting.

        A pushed feed (PostgreSQL LISTEN, Redis pub/sub) answers whether it is
        connected; a polled one (SQLite's `data_version`) polls here,
        delivering what it finds first. `False` means "load this time".
        """
        return False

    async def catch_up(self) -> bool:
        """`caught_up`, after letting in the notices already on their way: with `pushes_changes`, a few
        turns of the event loop first, so a notice waiting in its socket is read. What the store asks before
        a call starts from held values."""
        if self.pushes_changes:
            await _let_notices_in()
        return self.caught_up()

    @abstractmethod
    async def touch(self, session_id: str, *, expires_at: float | None, now: float) -> bool:
        """Move a live session's expiry to `expires_at` without changing its version.

        This is how a call that only reads renews its session; it never
        conflicts with a concurrent commit. It is activity: the session's
        `updated_at` moves forward to `now` (never back).

        Args:
            expires_at: the new absolute expiry, `None` = never.

        Returns:
            Whether a live session was found; an expired or missing one is left
            alone (`False`, nothing written).

        Raises:
            StateUnavailableError: the store could not be reached.
        """

    @abstractmethod
    async def delete(self, session_id: str) -> bool:
        """Delete the session with all its keys and checkpoints, expired or not.

        Returns:
            Whether it existed (`False` for an unknown id: a no-op).

        Raises:
            StateUnavailableError: the store could not be reached.
        """

    @abstractmethod
    async def take_expired(self, *, now: float, limit: int) -> list[SessionRecord]:
        """Delete up to `limit` sessions expired at `now` and return them as they were.

        Each expired session is returned by exactly one call, even with several
        processes sweeping one store, so end-of-session work runs once.

        Returns:
            The sessions taken, with their values; an empty list when none is
            left (or `limit` is 0).

        Raises:
            StateUnavailableError: the store could not be reached.
        """

    async def clear_expired(self, *, now: float) -> int:
        """Delete every session expired at `now` (with its keys and checkpoints).

        The default takes them with `take_expired`, a batch at a time; a backend
        may override it with a path that does not read the sessions first.

        Returns:
            How many were deleted (0 when none had expired).

        Raises:
            StateUnavailableError: the store could not be reached.
        """
        total = 0
        while True:
            taken = len(await self.take_expired(now=now, limit=_CLEAR_BATCH))
            total += taken
            if taken < _CLEAR_BATCH:
                return total

    async def list_sessions(
        self,
        *,
        now: float,
        prefix: str | None = None,
        include_expired: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> list[SessionSummary]:
        """Describe stored sessions, newest activity (`updated_at`) first, then by id.

        For inspection and administration, not for serving requests. The
        built-in backends implement it; another backend may not, in which case
        this default raises `NotImplementedError`.

        Args:
            now: the time expiry is judged at.
            prefix: only sessions whose id starts with it (matched literally:
                `%` and `_` are ordinary characters).
            include_expired: also list sessions expired at `now` that no sweep
                has deleted yet.
            limit: at most this many summaries (0 or more).
            offset: skip this many, in the order above (0 or more).

        Returns:
            The page asked for; an empty list past the last session.

        Raises:
            ValueError: `limit` or `offset` is negative.
            NotImplementedError: this backend cannot list its sessions.
            StateUnavailableError: the store could not be reached.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not support listing sessions (StateBackend.list_sessions)"
        )

    async def checkpoints(self, session_id: str) -> list[StoredCheckpoint]:
        """The checkpoints kept for a session.

        A commit with `keep_checkpoints` > 0 records one in the same transaction
        as its changes and prunes the session's checkpoints older than the last
        `keep_checkpoints` ones; they go with the session when it is deleted or
        expires, and a new life of its id starts with none. Every built-in
        backend implements it (see `supports_checkpoints`); another backend may
        not, in which case this default raises `NotImplementedError`.

        Returns:
            Its checkpoints, oldest first; an empty list when it has none or
            does not exist.

        Raises:
            NotImplementedError: this backend does not record checkpoints.
            StateUnavailableError: the store could not be reached.
        """
        raise NotImplementedError(f"{type(self).__name__} does not record checkpoints (StateBackend.checkpoints)")

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


#: Sessions per `take_expired` call of the default `clear_expired`.
_CLEAR_BATCH = 500
