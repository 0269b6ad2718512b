"""The `sessions` commands: each takes an open backend, its parsed arguments and the time, and returns its output."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

from concierge import ids
from concierge.checkpoints import DELETED, Checkpoint, revert_record
from concierge.cli.exits import Failure
from concierge.cli.format import dumps, expiry, size, table, when
from concierge.cli.records import find, select, summary_json
from concierge.errors import ConflictError, HistoryError
from concierge.state import StateBackend
from concierge.state.base import SessionSummary

__all__ = ["COMMANDS"]

Command = Callable[[StateBackend, argparse.Namespace, float], Awaitable[str]]

#: The kinds whose records all share one storage-id prefix, so the store itself can filter them.
_PREFIX_OF: dict[ids.Kind, str] = {"user": ids.USER, "wire": ids.WIRE, "caller": ids.CALLER}


async def _list(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    prefix: str | None = args.prefix or None
    conditions: list[Callable[[SessionSummary], bool]] = []
    kind: ids.Kind | None = args.scope
    if kind in _PREFIX_OF and prefix is None:
        prefix = _PREFIX_OF[kind]  # the store filters; nothing left here
    elif kind == "global" and prefix is None:
        prefix = ids.GLOBAL
        conditions.append(lambda s: s.session_id == ids.GLOBAL)
    elif kind is not None:
        conditions.append(lambda s: ids.kind_of(s.session_id) == kind)
    if args.stage is not None:
        stage = args.stage
        conditions.append(lambda s: s.stage == stage)
    keep = (lambda s: all(c(s) for c in conditions)) if conditions else None
    page, more = await select(
        backend,
        now=now,
        prefix=prefix,
        include_expired=args.include_expired,
        keep=keep,
        limit=args.limit,
        offset=args.offset,
    )
    if args.json:
        return dumps([summary_json(s, now) for s in page])
    if not page:
        return "no sessions\n" if args.offset == 0 else f"no sessions after the first {args.offset}\n"
    rows = [
        [
            s.session_id,
            ids.kind_of(s.session_id),
            s.stage or "-",
            str(s.keys),
            size(s.size),
            when(s.updated_at, now),
            expiry(s.expires_at, now),
        ]
        for s in page
    ]
    out = table(["ID", "SCOPE", "STAGE", "KEYS", "SIZE", "LAST ACTIVITY", "EXPIRES"], rows, frozenset({3, 4}))
    first, last = args.offset + 1, args.offset + len(page)
    if more:
        out += f"\nsessions {first}-{last}, newest first; more with --offset {last}\n"
    elif args.offset:
        out += f"\nsessions {first}-{last}, newest first; no more\n"
    return out


async def _show(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    found = await find(backend, args.id, now)
    if args.json:
        return dumps(found.document())
    r, s = found.record, found.summary
    expires = expiry(r.expires_at, now) + ("; not swept yet" if found.expired else "")
    fields = [
        ("session_id", r.session_id),
        ("scope", ids.kind_of(r.session_id)),
        ("stage", r.stage or "-"),
        ("version", str(r.version)),
        ("owner", r.owner or "-"),
        ("keys", str(len(r.values or {})) + (f" ({size(s.size)})" if s is not None else "")),
        ("created", when(r.created_at, now)),
    ]
    if s is not None:
        fields.append(("last activity", when(s.updated_at, now)))
    fields.append(("expires", expires))
    width = max(len(name) for name, _ in fields)
    head = "".join(f"{name:<{width}}  {value}\n" for name, value in fields)
    state = json.dumps(found.document()["state"], indent=2, ensure_ascii=False)
    return f"{head}\nstate:\n{state}\n"


async def _export(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    return dumps((await find(backend, args.id, now)).document())


async def _delete(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    found = await find(backend, args.id, now, details=False)
    sid = found.record.session_id
    if not await backend.delete(sid):  # deleted by someone else in between
        raise Failure(f"no session {sid!r} in this store")
    wire = ids.companion(sid)
    if wire is not None:  # a legacy HTTP session: its id must not be served again after a restart
        await backend.delete(wire)
    return dumps({"deleted": sid}) if args.json else f"deleted {sid}\n"


async def _purge(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    count = 0
    while batch := await backend.take_expired(now=now, limit=500):
        count += len(batch)
        for record in batch:
            wire = ids.companion(record.session_id)
            if wire is not None:
                await backend.delete(wire)
    if args.json:
        return dumps({"purged": count})
    return f"purged {count} expired session{'' if count == 1 else 's'}\n"


def _changed(changes: dict[str, Any]) -> str:
    """`cart, -note`: the keys a checkpoint wrote, deleted ones marked `-`."""
    return ", ".join(("-" if value is DELETED else "") + key for key, value in changes.items())


async def _history(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    sid = (await find(backend, args.id, now, details=False)).record.session_id
    try:
        kept = [Checkpoint.of(c) for c in await backend.checkpoints(sid)]
    except NotImplementedError as exc:
        raise Failure(f"this store does not record history: {exc}") from None
    if args.json:
        return dumps(
            [
                {
                    "version": c.version,
                    "at": c.at,
                    "tool": c.tool,
                    "changes": {k: v for k, v in c.changes.items() if v is not DELETED},
                    "deleted": [k for k, v in c.changes.items() if v is DELETED],
                    "stage_changed": c.stage_changed,
                    "stage": c.stage,
                }
                for c in kept
            ]
        )
    if not kept:
        return f"no history kept for {sid}\n"
    rows = [
        [
            str(c.version),
            when(c.at, now),
            c.tool or "-",
            _changed(c.changes) or "-",
            (c.stage or "(none)") if c.stage_changed else "",
        ]
        for c in kept
    ]
    out = table(["VERSION", "AT", "TOOL", "CHANGED KEYS", "STAGE"], rows, frozenset({0}))
    return out + f"\n{sid}: oldest version it can be reverted to: {kept[0].version - 1}\n"


async def _revert(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    found = await find(backend, args.id, now, details=False)
    if found.expired:
        raise Failure(f"session {found.record.session_id!r} has expired; it cannot be reverted")
    try:
        done = await revert_record(backend, found.record, args.version, now=now, keep=args.keep)
    except NotImplementedError as exc:
        raise Failure(f"this store does not record history: {exc}") from None
    except (HistoryError, ConflictError) as exc:
        raise Failure(str(exc)) from None
    document = {
        "session_id": done.session_id,
        "reverted_to": done.reverted_to,
        "version": done.version,
        "stage": done.stage,
        "state": done.state,
    }
    if args.json:
        return dumps(document)
    state = json.dumps(done.state, indent=2, ensure_ascii=False)
    return (
        f"reverted {done.session_id} to version {done.reverted_to} (now version {done.version})\n"
        f"stage: {done.stage or '-'}\n\nstate:\n{state}\n"
    )


COMMANDS: dict[str, Command] = {
    "list": _list,
    "show": _show,
    "export": _export,
    "delete": _delete,
    "purge-expired": _purge,
    "history": _history,
    "revert": _revert,
}
"""Each `sessions` command by name."""
