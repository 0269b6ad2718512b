"""How many live sessions one caller may hold: a record per caller in the store, written with its sessions.

A caller is who `caller_of` says (its principal, or its client address on
unauthenticated HTTP); connections local to the machine are not counted. Each
caller that stores a session has a record `caller:<who>` (`concierge.ids`)
whose keys are the storage ids of its sessions. A new session's first commit
adds its id there and `end_session` removes it, each in the same transaction
as the session's own write, so every process sharing the store counts the same
sessions, restarts included. Two processes adding at once meet at the record's
version check: the loser loads the record again and commits once more (the
tool does not run again), or is refused if the cap was reached meanwhile.

A session that ends another way (it expires, its HTTP session is deleted, an
operator deletes it) leaves its id behind. When a caller is at the cap, the ids
whose session is gone are dropped first: a store read each, so a pass that
frees nothing is not repeated for a minute per caller in this process.

The record expires like a session, a TTL after the last write to it or the
caller's last use of one of its sessions (renewed at most once a minute per
caller and process), so it is gone with the last of them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from mcp.server.context import ServerRequestContext

from concierge import ids
from concierge.errors import ConciergeError, ConflictError
from concierge.serve.limits import caller_of
from concierge.work import SessionStore, WorkingCopy

__all__ = ["CallerSessions", "HeldSessions", "SessionLimitError"]

logger = logging.getLogger("concierge")

_AGAIN_AFTER = 60.0
"""Seconds before a caller's record is renewed again, or a pass that freed nothing is repeated."""
_TRACKED_AT_MOST = 10_000
"""Callers whose renewal and last fruitless pass this process remembers; the least recently seen is forgotten."""


class SessionLimitError(ConciergeError, RuntimeError):
    """The caller already holds `max_live_sessions_per_caller` live sessions; nothing was stored."""


class _Recent:
    """When something last happened per caller, for the callers seen most recently."""

    def __init__(self) -> None:
        self._at: OrderedDict[str, float] = OrderedDict()

    def within(self, who: str, now: float, seconds: float) -> bool:
        at = self._at.get(who)
        return at is not None and now - at < seconds

    def mark(self, who: str, now: float) -> None:
        self._at[who] = now
        self._at.move_to_end(who)
        while len(self._at) > _TRACKED_AT_MOST:
            self._at.popitem(last=False)

    def forget(self, who: str) -> None:
        self._at.pop(who, None)


class HeldSessions:
    """At most `limit` live sessions per caller (`None`: no limit); see the module docstring."""

    def __init__(self, limit: int | None, store: SessionStore) -> None:
        self.limit = limit
        self.store = store
        self.renewed = _Recent()
        """When this process last renewed each caller's record."""
        self.fruitless = _Recent()
        """When a pass over each caller's ids last freed nothing."""

    def of(self, ctx: ServerRequestContext[Any, Any], via_handle: bool) -> CallerSessions | None:
        """The tally of this request's caller, for its job; `None` when it is not limited."""
        if self.limit is None:
            return None
        who = caller_of(ctx)
        return None if who is None else CallerSessions(self, who, via_handle)


class CallerSessions:
    """The sessions of one caller, as one request counts them (a `concierge.work.runner.Tally`)."""

    def __init__(self, held: HeldSessions, who: str, via_handle: bool) -> None:
        self.held = held
        self.who = who
        self.via_handle = via_handle
        self.record_id = ids.caller(who)

    async def admit(self) -> None:
        """Refuse a new session when the caller is at the cap, after dropping the ids of sessions gone."""
        store, limit = self.held.store, self.held.limit
        assert limit is not None
        # A first look, from held values when this process has them: the commit that adds the session
        # (`updated`) counts again on the stored version, so a notice still on its way costs no wrong count.
        record = await store.load(self.record_id, create=True, catch_up=False)
        assert record is not None
        if _count(record) < limit:
            return
        now = store.clock()
        if self.held.fruitless.within(self.who, now, _AGAIN_AFTER):
            raise self._refusal(_count(record))
        async with store.locked(self.record_id):
            record = await store.load(self.record_id, create=True)
            assert record is not None
            if await self._drop_gone(record):
                try:
                    await store.commit(record, tool="concierge: sessions gone")
                except ConflictError:  # another process changed it meanwhile: count what it holds now
                    record = await store.load(self.record_id, create=True)
                    assert record is not None
        held = _count(record)
        if held >= limit:
            self.held.fruitless.mark(self.who, now)
            raise self._refusal(held)

    async def updated(self, session: WorkingCopy, new: bool) -> WorkingCopy | None:
        """The caller's record with `session` added (a new session) or removed (ended).

        At the cap it refuses without dropping the ids of sessions gone: that
        reads the store once per session, and this runs while the unit holds
        its locks. The next new session's `admit` does it.
        """
        store, limit = self.held.store, self.held.limit
        assert limit is not None
        record = await store.load(self.record_id, create=True)
        assert record is not None
        sid = session.session_id
        if session.stage == ids.ENDED:
            if record.raw(sid) is None:
                return None
            record.delete(sid)
        else:
            if not new or record.raw(sid) is not None:
                return None
            held = _count(record)
            if held >= limit:
                raise self._refusal(held)
            record.set(sid, int(store.clock()))
        if record.version == 0:
            record.owner = session.owner
        self.held.renewed.forget(self.who)  # the commit renews it: the next use renews it again
        return record

    async def used(self) -> None:
        """Keep the record alive as long as the sessions the caller goes on using (at most once a minute)."""
        store = self.held.store
        ttl, now = store.ttl, store.clock()
        if ttl is None or self.held.renewed.within(self.who, now, _AGAIN_AFTER):
            return
        self.held.renewed.mark(self.who, now)
        try:
            # Past the session's own expiry by the renewal interval: a session used since the
            # last renewal still expires before the record that counts it.
            await store.backend.touch(self.record_id, expires_at=now + ttl + _AGAIN_AFTER, now=now)
        except Exception:  # the call itself succeeded; the next use tries again
            self.held.renewed.forget(self.who)
            logger.debug("concierge: renewing the session count of a caller failed", exc_info=True)

    async def _drop_gone(self, record: WorkingCopy) -> bool:
        """Delete from `record` the ids whose session no longer exists (or was ended); whether any went."""
        store = self.held.store
        now = store.clock()
        dropped = False
        for sid in list(record.keys()):
            # known_version=1: a session written only once (most of those a cap is reached with)
            # comes back without its values.
            found = await store.backend.load(sid, now=now, known_version=1)
            if found is None or found.stage == ids.ENDED:
                record.delete(sid)
                dropped = True
        return dropped

    def _refusal(self, held: int) -> SessionLimitError:
        way_out = (
            "Pass the session_id of a session you already have, or end one with end_session"
            if self.via_handle
            else "Use a session you already have, or wait until one of them expires"
        )
        return SessionLimitError(
            f"this caller holds {held} live session{'' if held == 1 else 's'}; the limit "
            f"(max_live_sessions_per_caller) is "
            f"{self.held.limit}. Nothing of this call was saved. {way_out}"
        )


def _count(record: WorkingCopy) -> int:
    return len(list(record.keys()))
