"""Legacy streamable-HTTP sessions that survive restarts and roam across replicas.

On the handshake-era wire a streamable-HTTP session is named by the
`mcp-session-id` the server minted at `initialize`, and the SDK keeps it only in
the memory of the process that minted it. With a persistent store concierge
records each such session:

- `wire:<id>`: the negotiated protocol version and the client's `initialize`
  parameters, owned by the caller's principal. Written at `initialize` with a
  short expiry (`idle`, default 30 minutes), so a round-robin balancer may send
  the next request anywhere; made permanent by the session's first write, in
  the same transaction. A session that never writes leaves nothing behind.
- `http:<id>`: the session's state, created by its first write, which expires
  and renews like any session.

A process that receives a request for an id it does not hold asks `find`: the
id is served again (see `concierge._sdk.enable_roaming`) only when both records
exist, the state is live and the caller is the principal that initialized it.
An HTTP DELETE ends the session for good (`ended` deletes the wire record); an
expired session's wire record goes when the sweep deletes its state, and one
whose state is gone without it (a crash between the two deletes) goes the next
time its id is asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from concierge import ids
from concierge._sdk import WireSession
from concierge.errors import ConflictError
from concierge.state.base import Commit
from concierge.work import SessionStore, WorkingCopy

__all__ = ["Roaming"]

logger = logging.getLogger("concierge")

_VERSION = "protocol_version"
_CLIENT = "client"


class Roaming:
    """The store side of roaming: record, find and end legacy HTTP sessions.

    Args:
        store: the app's session store (open while the server runs).
        closed: ends a session whose client deleted it (end hooks with reason
            "closed", live objects, `keep_closed_sessions`); given the
            session's storage id.
    """

    def __init__(self, store: SessionStore, closed: Callable[[str], Awaitable[None]], idle: float = 1800.0) -> None:
        self._store = store
        self._closed = closed
        self.idle = idle
        """Seconds a session recorded at `initialize` stays servable elsewhere without a write."""

    async def initialized(
        self, session_id: str, owner: str | None, protocol_version: str, client_params: dict[str, Any]
    ) -> None:
        """Record a session at `initialize`, for `idle` seconds: any replica can serve it before it writes.

        A session that never writes leaves only this record, which expires and is swept; its first
        write makes it permanent (`made_permanent`), in the same transaction as the write.
        """
        values = {
            _VERSION: json.dumps(protocol_version),
            _CLIENT: json.dumps(client_params, separators=(",", ":")),
        }
        now = self._store.clock()
        commit = Commit(ids.WIRE + session_id, 0, changes=values, owner=owner, expires_at=now + self.idle)
        try:
            await self._store.backend.commit(commit, now=now)
        except ConflictError:  # only a replayed initialize on the same id gets here; the first record stands
            logger.debug("concierge: session %s was already recorded", session_id[:64])

    async def made_permanent(self, session_id: str) -> list[WorkingCopy]:
        """The wire record of session `session_id`, never expiring from now on: written with its first commit."""
        copy = await self._store.load(ids.WIRE + session_id, create=False)
        if copy is None:  # it idled out before the first write: this process still holds the connection
            return []
        copy.expiring = False
        copy.must_persist = True
        return [copy]

    async def find(self, session_id: str, principal: str | None) -> WireSession | None:
        """The recorded session, if it is live and `principal` initialized it; else `None` (the SDK's 404)."""
        backend = self._store.backend
        now = self._store.clock()
        wire = await backend.load(ids.WIRE + session_id, now=now)
        if wire is None or wire.owner != principal or wire.values is None:
            return None
        state = await backend.load(ids.HTTP + session_id, now=now)
        if state is None and wire.expires_at is not None:
            pass  # initialized, not written yet: nothing to revive, the session is served as it is
        elif state is None:  # expired (or deleted): never revived
            if await backend.load(ids.HTTP + session_id, now=float("-inf")) is None:
                # The state is gone for good, yet the wire record stayed (a crash between the two
                # deletes): drop it now that its id is asked for. An expired state the sweep has
                # not taken yet keeps it, for the sweep to end the session with its hooks.
                await self._drop_orphan(session_id)
            return None
        try:
            version = json.loads(wire.values[_VERSION])
            client = json.loads(wire.values[_CLIENT])
        except (KeyError, ValueError):
            logger.warning("concierge: the wire record of session %s is damaged", session_id[:64])
            return None
        if not isinstance(version, str) or not isinstance(client, dict):
            return None
        return WireSession(protocol_version=version, client_params=client)

    async def _drop_orphan(self, session_id: str) -> None:
        try:
            await self._store.backend.delete(ids.WIRE + session_id)
        except Exception:  # the caller gets its 404 all the same
            logger.warning("concierge: dropping the orphaned record of %s failed", session_id[:64], exc_info=True)

    async def ended(self, session_id: str) -> None:
        """The client deleted session `session_id`: it can never be resumed, then it is closed."""
        try:
            await self._store.backend.delete(ids.WIRE + session_id)
        except Exception:
            logger.warning("concierge: forgetting deleted session %s failed", session_id[:64], exc_info=True)
        await self._closed(ids.HTTP + session_id)

    async def forget(self, storage_id: str) -> None:
        """A session's state was deleted (expired, or closed without keeping it): drop its wire record too."""
        wire = ids.companion(storage_id)
        if wire is not None:
            await self._store.backend.delete(wire)
