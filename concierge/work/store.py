"""`SessionStore`: working copies in and out of a backend, serialised per record in this process.

It loads a record into a `WorkingCopy`, commits the dirty copies of one unit
of work in one atomic backend call, renews the expiry of a session a call only
read, and keeps two things per process: a bounded cache of the last committed
values of each record, and a lock per record (so calls in one process never
conflict with each other).

The cache: a call on a record this process served last reads no values again
(the load checks the version only); and while the backend's change feed is
live (`StateBackend.watch`), it is not read at all - its commit's version check
proves the held values current. A record another process wrote lately is read
before each call for `SHARED_FOR` seconds (it roams: a notice of its next
change may be on its way). A commit that lost the version race moves onto the
newer version when the unit read nothing that changed (`WorkingCopy.rebase`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio

from concierge import ids
from concierge.errors import ConfigurationError, ConflictError, StateValueError
from concierge.state.base import UNCHANGED, Commit, SessionRecord, StateBackend
from concierge.work.record import WorkingCopy
from concierge.work.telemetry import INSTRUMENTS

__all__ = ["REBASES", "SHARED_FOR", "SessionStore"]

REBASES = 3
"""Times a commit that lost a version race moves onto the newer version and tries again (see `commit`)."""
SHARED_FOR = 60.0
"""Seconds a record another process wrote is loaded before each call, not started from held values."""
SHARED_AT_MOST = 4096
_V = TypeVar("_V")


def _remember(items: OrderedDict[str, _V], key: str, value: _V, at_most: int) -> None:
    """Put `key` last in `items` (the most recent), forgetting the oldest beyond `at_most`."""
    items[key] = value
    items.move_to_end(key)
    while len(items) > at_most:
        items.popitem(last=False)


@dataclass(slots=True)
class _Held:
    """What this process knows of a record as it last loaded or committed it (version 0: that it does not exist)."""

    version: int
    created_at: float
    values: dict[str, str]
    size: int | None
    stage: str | None
    owner: str | None
    expires_at: float | None
    trusted: bool
    """Recorded while the store's change feed was live and heard of no newer version meanwhile."""

    @classmethod
    def of(cls, record: SessionRecord, values: dict[str, str], size: int | None, trusted: bool) -> _Held:
        return cls(
            record.version, record.created_at, values, size, record.stage, record.owner, record.expires_at, trusted
        )


class _Snapshots:
    """A bounded LRU of the last committed values per record, with their version and life.

    With it, a call on a record this process served last only checks the
    stored version instead of reading every key again (a call costs the same
    whether the record holds one key or a thousand); and with a live change
    feed, a trusted entry is not checked at all.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, _Held] = OrderedDict()

    def get(self, record_id: str) -> _Held | None:
        item = self._items.get(record_id)
        if item is not None:
            self._items.move_to_end(record_id)
        return item

    def peek(self, record_id: str) -> _Held | None:
        return self._items.get(record_id)

    def put(self, record_id: str, held: _Held) -> None:
        if self.capacity <= 0:
            return
        _remember(self._items, record_id, held, self.capacity)

    def drop(self, record_id: str) -> None:
        self._items.pop(record_id, None)

    def distrust(self) -> None:
        for held in self._items.values():
            held.trusted = False

    def __len__(self) -> int:
        return len(self._items)


class _Locks:
    """Per-record locks that exist only while someone holds or waits for them.

    An uncontended acquire takes the lock with no await and no lock object;
    a waiter queues an event that the holder's release sets, handing the lock
    over. Any task may release a lock another acquired: a bucket loaded on
    first use is acquired by a task started from a worker thread and released
    by the request's own task.
    """

    def __init__(self) -> None:
        self._held: dict[str, deque[anyio.Event]] = {}

    async def acquire(self, record_id: str) -> None:
        waiters = self._held.get(record_id)
        if waiters is None:
            self._held[record_id] = deque()
            return
        turn = anyio.Event()
        waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # handed over as this wait was cancelled: pass it on
                self.release(record_id)
            else:
                waiters.remove(turn)
            raise

    def release(self, record_id: str) -> None:
        waiters = self._held[record_id]
        if waiters:
            waiters.popleft().set()  # the next waiter holds it now
        else:
            del self._held[record_id]


class SessionStore:
    """Runs working copies against a backend.

    Args:
        backend: where records persist.
        ttl: seconds of inactivity after which a session expires (`None` = never).
        clock: returns the current time in epoch seconds; inject one in tests.
        max_value_bytes: largest JSON encoding accepted by `set_state`.
        snapshot_capacity: records whose last values are cached in this process.
        keep_checkpoints: checkpoints kept per record (0: none are recorded).
        max_keys: keys one record may hold (`None`: no limit).
        max_record_bytes: total JSON bytes of one record's values (`None`: no limit).
    """

    def __init__(
        self,
        backend: StateBackend,
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        max_value_bytes: int | None = None,
        snapshot_capacity: int = 4096,
        keep_checkpoints: int = 0,
        max_keys: int | None = None,
        max_record_bytes: int | None = None,
    ) -> None:
        if max_value_bytes is not None and (
            isinstance(max_value_bytes, bool) or not isinstance(max_value_bytes, int) or max_value_bytes <= 0
        ):
            raise ConfigurationError(
                f"max_value_bytes must be a positive whole number of bytes (or None for no limit), "
                f"got {max_value_bytes!r}"
            )
        self.backend = backend
        self.keep_checkpoints = keep_checkpoints
        self.ttl = ttl
        self.clock = clock
        self.max_value_bytes = max_value_bytes
        self.max_keys = max_keys
        self.max_record_bytes = max_record_bytes
        self._snapshots = _Snapshots(snapshot_capacity)
        INSTRUMENTS.watch_held(self._snapshots.__len__)
        self._locks = _Locks()
        self._opened = 0
        self._open_lock = anyio.Lock()
        self._feed = False
        """Whether the backend's change feed is on (see `StateBackend.watch`)."""
        self._flights: dict[str, list[float]] = {}
        """Records being loaded or committed: [calls in flight, the newest version the feed told of meanwhile,
        1 when what lands may be stale for another reason]."""
        self._own: OrderedDict[str, int] = OrderedDict()
        """The newest version this process's commits made, per record lately committed: a notice or a load
        that tells of it is not another process's doing."""
        self._shared: OrderedDict[str, float] = OrderedDict()
        """Records another process wrote lately (when this process heard or met it): loaded before each call
        for `SHARED_FOR` seconds, so a session that roams between processes does not start from values a
        notice still on its way would have dropped."""

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[SessionStore]:
        """Open the backend for the span of a server lifespan.

        Lifespans nest (every in-process client enters one), so the backend is
        opened by the first and closed by the last.
        """
        async with self._open_lock:
            if self._opened == 0:
                await self.backend.open()
                self._snapshots.distrust()  # whatever happened while it was closed went unheard
                self._feed = await self.backend.watch(self._changed)
            self._opened += 1
        try:
            yield self
        finally:
            with anyio.CancelScope(shield=True):
                async with self._open_lock:
                    self._opened -= 1
                    if self._opened == 0:
                        self._feed = False
                        self._snapshots.distrust()
                        await self.backend.close()

    # -- locks ------------------------------------------------------------------
    async def acquire(self, record_id: str) -> None:
        """Wait for the record's lock in this process (release it with `release`)."""
        await self._locks.acquire(record_id)

    def release(self, record_id: str) -> None:
        self._locks.release(record_id)

    @asynccontextmanager
    async def locked(self, record_id: str) -> AsyncIterator[None]:
        """Serialise work on one record within this process."""
        await self._locks.acquire(record_id)
        try:
            yield
        finally:
            self._locks.release(record_id)

    # -- the change feed ----------------------------------------------------------
    def _changed(self, record_id: str | None, version: int | None) -> None:
        """The backend's feed: `record_id` is now at `version` (`None`: deleted); no id: anything may have moved."""
        if record_id is None:
            self._snapshots.distrust()
            for flight in self._flights.values():
                flight[2] = 1.0  # what lands now may be stale, though nobody is known to have written it
            return
        if version is None:
            self._own.pop(record_id, None)  # deleted: a new life counts its versions from 1 again
        heard = math.inf if version is None else float(version)
        flight = self._flights.get(record_id)
        if flight is not None and heard > flight[1]:
            flight[1] = heard
        held = self._snapshots.peek(record_id)
        if held is not None and heard > held.version:
            self._snapshots.drop(record_id)
            if flight is None:  # in flight, it may be this process's own commit: judged when it lands
                self._share(record_id, heard)

    def _share(self, record_id: str, heard: float) -> None:
        """Mark `record_id` as written by another process, unless `heard` is a version this process made."""
        if heard <= self._own.get(record_id, 0):
            return  # a load overtaken by this process's own commit, or the late notice of one
        _remember(self._shared, record_id, self.clock(), SHARED_AT_MOST)

    def _made(self, record_id: str, version: int) -> None:
        """Remember that this process's commit made `version` of `record_id` (the newest it made)."""
        _remember(self._own, record_id, version, SHARED_AT_MOST)

    def _roams(self, record_id: str, now: float) -> bool:
        since = self._shared.get(record_id)
        if since is None:
            return False
        if now - since < SHARED_FOR:
            return True
        del self._shared[record_id]
        return False

    def _depart(self, record_id: str) -> None:
        flight = self._flights.get(record_id)
        if flight is None:
            self._flights[record_id] = [1, -1.0, 0.0]
        else:
            flight[0] += 1
            flight[2] = 1.0  # two at once: neither result is trusted

    def _arrive(self, record_id: str) -> tuple[float, bool]:
        """End a flight: the newest version the feed told of during it (`inf`: deleted), and whether what
        landed may be stale for another reason (changes may have been missed, or two flights at once)."""
        flight = self._flights[record_id]
        flight[0] -= 1
        if flight[0] == 0:
            del self._flights[record_id]
        return flight[1], flight[2] > 0

    def holds(self, record_id: str) -> bool:
        """Whether the next load of `record_id` makes no round trip (this process holds its latest version)."""
        held = self._snapshots.peek(record_id)
        if held is None or not self._current(record_id, held, self.clock()) or not self.backend.caught_up():
            return False
        return self._snapshots.peek(record_id) is held and held.trusted

    def _current(self, record_id: str, held: _Held, now: float) -> bool:
        """Whether `held` may serve a call without a load, as far as this process knows before catching up."""
        live = held.expires_at is None or held.expires_at > now
        return held.trusted and self._feed and live and not self._roams(record_id, now)

    def _settle(self, record_id: str, version: int, live: bool) -> bool:
        """End the flight of `record_id`, which landed at `version` (0: absent); whether that can be trusted.

        A newer version the feed told of meanwhile is another process's: the record is marked as roaming.
        """
        heard, spoiled = self._arrive(record_id)
        if heard > version:
            self._share(record_id, heard)
        return live and not spoiled and heard <= version

    # -- load -------------------------------------------------------------------
    async def load(self, record_id: str, *, create: bool, catch_up: bool = True) -> WorkingCopy | None:
        """Load a record into a fresh working copy.

        Returns `None` when the record does not exist and `create` is false.
        With `create`, a missing record yields an empty copy at version 0 that
        the commit will create. A record this process holds the latest version
        of (a live change feed, nothing heard since) is not read at all.

        Args:
            catch_up: before starting from held values, let in the change notices
                already on their way (`StateBackend.catch_up`: a few turns of the
                event loop). `False` for a look whose answer a commit's version
                check confirms later anyway.
        """
        now = self.clock()
        held = self._snapshots.get(record_id)
        if (
            held is not None
            and self._current(record_id, held, now)
            and (await self.backend.catch_up() if catch_up else self.backend.caught_up())
            and self._snapshots.peek(record_id) is held  # catching up may have told of a change
            and held.trusted
        ):
            if held.version == 0:  # known not to exist
                return self.blank(record_id) if create else None
            return self._copy(record_id, held)
        self._depart(record_id)
        try:
            if held is None or held.version == 0:
                record = await self.backend.load(record_id, now=now)
            else:
                record = await self.backend.load(
                    record_id, now=now, known_version=held.version, known_created_at=held.created_at
                )
            live = self._feed and self.backend.caught_up()  # before landing: what it tells counts for this flight
        except BaseException:
            self._arrive(record_id)
            raise
        trusted = self._settle(record_id, 0 if record is None else record.version, live)
        if record is None:
            if trusted:  # held as absent: the feed tells if anyone creates it
                self._snapshots.put(record_id, _Held(0, 0.0, {}, 0, None, None, None, trusted=True))
            else:
                self._snapshots.drop(record_id)
            if not create:
                return None
            return self.blank(record_id)
        if record.values is None:
            assert held is not None
            values, size = held.values, held.size
        else:
            values, size = record.values, None
        fresh = _Held.of(record, values, size, trusted)
        self._snapshots.put(record_id, fresh)
        return self._copy(record_id, fresh)

    def blank(self, record_id: str) -> WorkingCopy:
        """An empty copy of a record known not to exist yet (its commit creates it)."""
        return WorkingCopy(record_id, max_value_bytes=self.max_value_bytes)

    def detached(self, record: SessionRecord) -> WorkingCopy:
        """A copy of a session that is already gone from the store (for its end hooks).

        Its values can be read; changes to them are written nowhere.
        """
        copy = self._copy(record.session_id, _Held.of(record, record.values or {}, None, trusted=False))
        copy.detached = True
        return copy

    def _copy(self, record_id: str, held: _Held) -> WorkingCopy:
        return WorkingCopy(
            record_id,
            version=held.version,
            base=held.values,
            stage=held.stage,
            owner=held.owner,
            expires_at=held.expires_at,
            created_at=held.created_at,
            max_value_bytes=self.max_value_bytes,
            base_bytes=held.size,
        )

    # -- commit -----------------------------------------------------------------
    async def commit(self, *copies: WorkingCopy, tool: str | None = None) -> None:
        """Write the dirty ones of `copies` in one atomic backend call (nothing when none is dirty).

        When another process committed to one of them first, and every copy is
        `rebasable` and read nothing that differs in the newer versions, the
        changes move onto those versions and commit again (up to `REBASES`
        times): no write is lost and no code runs again.

        Args:
            tool: what made the commit, recorded in its checkpoints.

        Raises:
            ConflictError: another process committed to one of them first, and
                changed something this unit of work read.
            StateUnavailableError: the backend could not be reached.
        """
        dirty = [c for c in copies if c.dirty and not c.detached]
        if not dirty:
            return
        for attempt in range(REBASES + 1):
            try:
                await self._write(dirty, tool)
                return
            except ConflictError:
                if attempt == REBASES or not await self._rebased(dirty):
                    raise

    async def _write(self, dirty: list[WorkingCopy], tool: str | None) -> None:
        sizes = [self._checked_size(c) for c in dirty]
        now = self.clock()
        keep = self.keep_checkpoints
        commits = [
            Commit(
                session_id=c.session_id,
                expected_version=c.version,
                changes=dict(c.changes),
                clear=c.cleared,
                stage=c.stage if c.stage_changed else UNCHANGED,
                owner=c.owner,
                expires_at=self.expiry(now) if c.expiring else None,
                tool=tool,
                keep_checkpoints=keep,
                before=c.overwritten() if keep > 0 else {},
                stage_before=c.base_stage,
            )
            for c in dirty
        ]
        for c in dirty:
            self._depart(c.session_id)
        try:
            if len(commits) == 1:
                versions = [await self.backend.commit(commits[0], now=now)]
            else:
                versions = await self.backend.commit_all(commits, now=now)
            live = self._feed and self.backend.caught_up()
        except BaseException as exc:
            for c in dirty:
                self._arrive(c.session_id)
                self._snapshots.drop(c.session_id)
                if isinstance(exc, ConflictError):
                    self._share(c.session_id, math.inf)
            raise
        for c, commit, version, size in zip(dirty, commits, versions, sizes):
            self._made(c.session_id, version)
            trusted = self._settle(c.session_id, version, live)
            created_at = now if c.version == 0 else c.created_at  # a creating commit starts a new life
            held = _Held(version, created_at, c.committed_values(), size, c.stage, c.owner, commit.expires_at, trusted)
            self._snapshots.put(c.session_id, held)

    async def _rebased(self, dirty: list[WorkingCopy]) -> bool:
        """Load the newest versions of `dirty` and move their changes onto them; whether every one moved."""
        if not all(c.rebasable for c in dirty):
            return False
        fresh: list[WorkingCopy] = []
        for c in dirty:
            newer = await self.load(c.session_id, create=not c.expiring)
            if newer is None:
                return False  # the session was deleted or expired meanwhile
            fresh.append(newer)
        if not all(c.can_rebase(newer) for c, newer in zip(dirty, fresh)):
            return False
        for c, newer in zip(dirty, fresh):
            c.rebase(newer)
        return True

    def _checked_size(self, copy: WorkingCopy) -> int | None:
        """The bytes `copy` leaves its record with (`None` when no limit asks), refusing a commit that would
        leave it over `max_keys` or `max_record_bytes` (nothing is written)."""
        if self.max_keys is None and self.max_record_bytes is None:
            return None
        keys, size = copy.committed_size()
        if not any(text is not None for text in copy.changes.values()):
            return size  # only deletions: a record never grows by them
        kind = ids.kind_of(copy.session_id)
        if kind == "caller":
            return size  # concierge's count of a caller's sessions: bounded by max_live_sessions_per_caller
        what = "this session" if kind == "session" else f"the {kind} scope"
        if self.max_keys is not None and keys > self.max_keys:
            raise StateValueError(
                f"{what} would hold {keys} keys; the limit (max_keys_per_session) is {self.max_keys}. "
                "Nothing this call wrote was saved; delete keys you no longer need"
            )
        if self.max_record_bytes is not None:
            if size > self.max_record_bytes:
                raise StateValueError(
                    f"{what} would hold {size} bytes of state; the limit (max_session_bytes) is "
                    f"{self.max_record_bytes}. Nothing this call wrote was saved; delete keys you no longer need"
                )
        return size

    def expiry(self, now: float) -> float | None:
        return None if self.ttl is None else now + self.ttl

    async def renew(self, copy: WorkingCopy) -> None:
        """Push back the expiry of a session a call only read, at most once a minute.

        Renewing on every read would turn every read into a write; a session
        idle for the full TTL still expires within a minute of it.
        """
        if copy.version == 0 or self.ttl is None or not copy.expiring or copy.detached or copy.dirty:
            return
        now = self.clock()
        if copy.expires_at is not None and copy.expires_at - now > self.ttl - min(60.0, self.ttl / 10):
            return
        found = await self.backend.touch(copy.session_id, expires_at=now + self.ttl, now=now)
        held = self._snapshots.peek(copy.session_id)
        if held is not None:
            if not found:
                self._snapshots.drop(copy.session_id)
            elif held.version == copy.version:
                held.expires_at = now + self.ttl

    # -- removal ----------------------------------------------------------------
    def forget(self, record_id: str) -> None:
        """Drop what this process caches of a record (it was deleted behind the store's back)."""
        self._snapshots.drop(record_id)

    async def delete(self, record_id: str) -> bool:
        """Delete a record outright; whether it existed."""
        self._snapshots.drop(record_id)
        return await self.backend.delete(record_id)

    def __repr__(self) -> str:
        return f"SessionStore({type(self.backend).__name__}, ttl={self.ttl!r})"
