"""What the `sessions` commands read from a store: one record by the id an operator gives, or a page of them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from concierge import ids
from concierge.cli.exits import Failure
from concierge.state import StateBackend
from concierge.state.base import SessionRecord, SessionSummary

__all__ = ["Found", "find", "select", "summary_json"]

#: How many summaries one backend call fetches when a filter is applied here, not in the store.
BATCH = 500

logger = logging.getLogger("concierge")


@dataclass(slots=True)
class Found:
    """A stored record as `show` and `export` present it."""

    record: SessionRecord
    summary: SessionSummary | None  # None when the store cannot list sessions
    expired: bool

    def document(self) -> dict[str, Any]:
        """The record as one JSON document, its state decoded (times in epoch seconds)."""
        r = self.record
        doc: dict[str, Any] = {
            "session_id": r.session_id,
            "scope": ids.kind_of(r.session_id),
            "stage": r.stage,
            "version": r.version,
            "owner": r.owner,
            "created_at": r.created_at,
        }
        if self.summary is not None:
            doc["updated_at"] = self.summary.updated_at
        doc["expires_at"] = r.expires_at
        doc["expired"] = self.expired
        if ids.kind_of(r.session_id) == "secrets":  # the handle-signing key is never printed
            doc["state"] = {key: "<secret>" for key in sorted(r.values or {})}
        else:
            doc["state"] = {key: _decode(key, text) for key, text in sorted((r.values or {}).items())}
        return doc


def _decode(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        logger.warning("state key %r does not hold valid JSON; shown as a string", key)
        return text


def summary_json(s: SessionSummary, now: float) -> dict[str, Any]:
    """One row of `list --json`."""
    return {
        "session_id": s.session_id,
        "scope": ids.kind_of(s.session_id),
        "stage": s.stage,
        "version": s.version,
        "owner": s.owner,
        "keys": s.keys,
        "size": s.size,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "expires_at": s.expires_at,
        "expired": s.expires_at is not None and s.expires_at <= now,
    }


async def find(backend: StateBackend, given: str, now: float, *, details: bool = True) -> Found:
    """The stored record `given` names, even when it has expired but is not swept yet.

    Raises:
        Failure: no record by any of the ids `given` may mean.
    """
    tried = ids.lookup_ids(given)
    for sid in tried:
        record = await backend.load(sid, now=float("-inf"))
        if record is not None:
            summary = await _summary(backend, sid, now) if details else None
            expired = record.expires_at is not None and record.expires_at <= now
            return Found(record, summary, expired)
    also = f" (also tried {tried[1]!r})" if len(tried) > 1 else ""
    raise Failure(f"no session {given!r} in this store{also}")


async def _summary(backend: StateBackend, session_id: str, now: float) -> SessionSummary | None:
    """`session_id`'s summary (for its last activity), or `None` when the store cannot list sessions."""
    offset = 0
    while True:
        try:
            batch = await backend.list_sessions(
                now=now, prefix=session_id, include_expired=True, limit=BATCH, offset=offset
            )
        except NotImplementedError:
            return None
        for s in batch:
            if s.session_id == session_id:
                return s
        if len(batch) < BATCH:
            return None
        offset += BATCH


async def select(
    backend: StateBackend,
    *,
    now: float,
    prefix: str | None,
    include_expired: bool,
    keep: Callable[[SessionSummary], bool] | None,
    limit: int,
    offset: int,
) -> tuple[list[SessionSummary], bool]:
    """One page of summaries that pass `keep`, and whether more follow it.

    Raises:
        Failure: the store cannot list its sessions.
    """
    try:
        if keep is None:
            rows = await backend.list_sessions(
                now=now, prefix=prefix, include_expired=include_expired, limit=limit + 1, offset=offset
            )
            return rows[:limit], len(rows) > limit
        page: list[SessionSummary] = []
        skipped = at = 0
        while True:
            batch = await backend.list_sessions(
                now=now, prefix=prefix, include_expired=include_expired, limit=BATCH, offset=at
            )
            for s in batch:
                if not keep(s):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                if len(page) == limit:
                    return page, True
                page.append(s)
            if len(batch) < BATCH:
                return page, False
            at += BATCH
    except NotImplementedError as exc:
        raise Failure(f"this store cannot list its sessions: {exc}") from None
