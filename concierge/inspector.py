"""`python -m concierge sessions`: look into a state store from the command line.

    python -m concierge sessions list [--scope S] [--prefix P] [--stage S] [--include-expired]
                                      [--limit N] [--offset N]
    python -m concierge sessions show ID
    python -m concierge sessions export ID
    python -m concierge sessions delete ID
    python -m concierge sessions purge-expired
    python -m concierge sessions history ID
    python -m concierge sessions revert ID VERSION [--keep N]

The store is the one `--url` names, or else `CONCIERGE_STATE_URL` (a shared
store such as SQLite or PostgreSQL: a memory store lives inside its server
process and cannot be seen from another one). Output is a plain table or text
for a terminal; `--json` prints JSON instead, for scripts (`export` always
prints JSON; its times are epoch seconds). `delete` and `purge-expired` remove
sessions directly, without running any `on_session_end` hook. `history` and
`revert` read and use the checkpoints a server with `history=N` records.

Exit codes: 0 success; 1 when the store cannot be reached, the session is
unknown or the store cannot do what was asked; 2 on a usage or configuration
error (bad option, no URL, malformed URL, unsupported scheme). Every error is
one line on stderr, and no message ever carries the store's password.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from concierge.errors import ConfigurationError, StateUnavailableError
from concierge.roaming import WIRE_PREFIX, companion
from concierge.state import ENV_STATE_URL, StateBackend, backend_from_url, url_secrets
from concierge.state.base import SessionRecord, SessionSummary

__all__ = ["main", "scope_of", "storage_ids"]

PROG = "python -m concierge sessions"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: Storage-id prefixes of sessions (the origin of each session) and of user buckets.
SESSION_PREFIXES = ("h:", "http:", "sse:", "stdio:", "conn:")
USER_PREFIX = "user:"
GLOBAL_ID = "global"
HANDLE_PREFIX = "h:"
#: "wire" records hold what a legacy HTTP session negotiated, so another process can serve it (roaming).
SCOPES = ("session", "user", "global", "wire")

#: How many summaries one backend call fetches when a filter is applied here, not in the store.
_BATCH = 500


class _Failure(Exception):
    """A one-line error for the user, with the exit code it ends the command with."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def scope_of(session_id: str) -> str:
    """`"user"` for a `user:<principal>` bucket, `"global"` for the global bucket, `"wire"` for a
    legacy HTTP session's wire record, else `"session"`."""
    if session_id.startswith(USER_PREFIX):
        return "user"
    if session_id.startswith(WIRE_PREFIX):
        return "wire"
    if session_id == GLOBAL_ID:
        return "global"
    return "session"


# -- formatting -----------------------------------------------------------------------
def _iso(ts: float | None) -> str:
    if ts is None:
        return "never"
    try:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def _span(seconds: float) -> str:
    """A duration in at most two units: `45s`, `12m`, `3h 5m`, `2d 4h`."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d {h}h" if h else f"{d}d"


def _when(ts: float, now: float) -> str:
    """`2025-06-01T12:00:05Z (5m ago)`."""
    delta = now - ts
    relative = "just now" if abs(delta) < 1 else (f"{_span(delta)} ago" if delta > 0 else f"in {_span(delta)}")
    return f"{_iso(ts)} ({relative})"


def _expiry(expires_at: float | None, now: float) -> str:
    if expires_at is None:
        return "never"
    if expires_at <= now:
        return f"{_iso(expires_at)} (expired {_span(now - expires_at)} ago)"
    return f"{_iso(expires_at)} (in {_span(expires_at - now)})"


def _size(n: int) -> str:
    """`312 B`, `1.2 KiB`, `3.4 MiB`."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Columns two spaces apart; the columns in `right` aligned right."""
    widths = [max(len(cells[i]) for cells in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return "\n".join(line(cells) for cells in [headers, *rows]) + "\n"


def _dumps(document: Any, *, pretty: bool = True) -> str:
    """JSON text, non-ASCII kept as is when stdout can carry it (escaped otherwise: still valid JSON)."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    return json.dumps(document, indent=2 if pretty else None, ensure_ascii=encoding != "utf8") + "\n"


# -- what is read from the store ------------------------------------------------------
@dataclass(slots=True)
class _Found:
    """A session as `show` and `export` present it."""

    record: SessionRecord
    summary: SessionSummary | None  # None when the store cannot list sessions
    expired: bool

    def document(self) -> dict[str, Any]:
        r = self.record
        doc: dict[str, Any] = {
            "session_id": r.session_id,
            "scope": scope_of(r.session_id),
            "stage": r.stage,
            "version": r.version,
            "owner": r.owner,
            "created_at": r.created_at,
        }
        if self.summary is not None:
            doc["updated_at"] = self.summary.updated_at
        doc["expires_at"] = r.expires_at
        doc["expired"] = self.expired
        doc["state"] = {key: _decode(key, text) for key, text in sorted((r.values or {}).items())}
        return doc


def _decode(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        logging.getLogger("concierge").warning("state key %r does not hold valid JSON; shown as a string", key)
        return text


def _summary_json(s: SessionSummary, now: float) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "scope": scope_of(s.session_id),
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


def storage_ids(given: str) -> list[str]:
    """The storage ids `given` may name: itself, and for a bare handle also `h:<handle>`."""
    if given == GLOBAL_ID or given.startswith((*SESSION_PREFIXES, USER_PREFIX)):
        return [given]
    return [given, HANDLE_PREFIX + given]


async def _find(backend: StateBackend, given: str, now: float, *, details: bool = True) -> _Found:
    """The stored session `given` names, even when it has expired but is not swept yet."""
    tried = storage_ids(given)
    for sid in tried:
        record = await backend.load(sid, now=float("-inf"))
        if record is not None:
            summary = await _summary(backend, sid, now) if details else None
            expired = record.expires_at is not None and record.expires_at <= now
            return _Found(record, summary, expired)
    also = f" (also tried {tried[1]!r})" if len(tried) > 1 else ""
    raise _Failure(f"no session {given!r} in this store{also}")


async def _summary(backend: StateBackend, session_id: str, now: float) -> SessionSummary | None:
    """`session_id`'s summary (for its last activity), or `None` when the store cannot list sessions."""
    offset = 0
    while True:
        try:
            batch = await backend.list_sessions(
                now=now, prefix=session_id, include_expired=True, limit=_BATCH, offset=offset
            )
        except NotImplementedError:
            return None
        for s in batch:
            if s.session_id == session_id:
                return s
        if len(batch) < _BATCH:
            return None
        offset += _BATCH


async def _select(
    backend: StateBackend,
    *,
    now: float,
    prefix: str | None,
    include_expired: bool,
    keep: Callable[[SessionSummary], bool] | None,
    limit: int,
    offset: int,
) -> tuple[list[SessionSummary], bool]:
    """One page of summaries that pass `keep`, and whether more follow it."""
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
                now=now, prefix=prefix, include_expired=include_expired, limit=_BATCH, offset=at
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
            if len(batch) < _BATCH:
                return page, False
            at += _BATCH
    except NotImplementedError as exc:
        raise _Failure(f"this store cannot list its sessions: {exc}") from None


# -- the commands -----------------------------------------------------------------------
async def _list(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    prefix: str | None = args.prefix or None
    conditions: list[Callable[[SessionSummary], bool]] = []
    if args.scope in ("user", "wire") and prefix is None:
        prefix = USER_PREFIX if args.scope == "user" else WIRE_PREFIX  # the store filters; nothing left here
    elif args.scope == "global" and prefix is None:
        prefix = GLOBAL_ID
        conditions.append(lambda s: s.session_id == GLOBAL_ID)
    elif args.scope is not None:
        scope = args.scope
        conditions.append(lambda s: scope_of(s.session_id) == scope)
    if args.stage is not None:
        stage = args.stage
        conditions.append(lambda s: s.stage == stage)
    keep = (lambda s: all(c(s) for c in conditions)) if conditions else None
    page, more = await _select(
        backend,
        now=now,
        prefix=prefix,
        include_expired=args.include_expired,
        keep=keep,
        limit=args.limit,
        offset=args.offset,
    )
    if args.json:
        return _dumps([_summary_json(s, now) for s in page])
    if not page:
        return "no sessions\n" if args.offset == 0 else f"no sessions after the first {args.offset}\n"
    rows = [
        [
            s.session_id,
            scope_of(s.session_id),
            s.stage or "-",
            str(s.keys),
            _size(s.size),
            _when(s.updated_at, now),
            _expiry(s.expires_at, now),
        ]
        for s in page
    ]
    out = _table(["ID", "SCOPE", "STAGE", "KEYS", "SIZE", "LAST ACTIVITY", "EXPIRES"], rows, frozenset({3, 4}))
    first, last = args.offset + 1, args.offset + len(page)
    if more:
        out += f"\nsessions {first}-{last}, newest first; more with --offset {last}\n"
    elif args.offset:
        out += f"\nsessions {first}-{last}, newest first; no more\n"
    return out


async def _show(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    found = await _find(backend, args.id, now)
    if args.json:
        return _dumps(found.document())
    r, s = found.record, found.summary
    expires = _expiry(r.expires_at, now) + ("; not swept yet" if found.expired else "")
    fields = [
        ("session_id", r.session_id),
        ("scope", scope_of(r.session_id)),
        ("stage", r.stage or "-"),
        ("version", str(r.version)),
        ("owner", r.owner or "-"),
        ("keys", str(len(r.values or {})) + (f" ({_size(s.size)})" if s is not None else "")),
        ("created", _when(r.created_at, now)),
    ]
    if s is not None:
        fields.append(("last activity", _when(s.updated_at, now)))
    fields.append(("expires", expires))
    width = max(len(name) for name, _ in fields)
    head = "".join(f"{name:<{width}}  {value}\n" for name, value in fields)
    state = json.dumps(found.document()["state"], indent=2, ensure_ascii=False)
    return f"{head}\nstate:\n{state}\n"


async def _export(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    return _dumps((await _find(backend, args.id, now)).document())


async def _delete(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    found = await _find(backend, args.id, now, details=False)
    sid = found.record.session_id
    if not await backend.delete(sid):  # deleted by someone else in between
        raise _Failure(f"no session {sid!r} in this store")
    wire = companion(sid)
    if wire is not None:  # a legacy HTTP session: its id must not be served again after a restart
        await backend.delete(wire)
    return _dumps({"deleted": sid}) if args.json else f"deleted {sid}\n"


async def _purge(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    count = 0
    while batch := await backend.take_expired(now=now, limit=500):
        count += len(batch)
        for record in batch:
            wire = companion(record.session_id)
            if wire is not None:
                await backend.delete(wire)
    if args.json:
        return _dumps({"purged": count})
    return f"purged {count} expired session{'' if count == 1 else 's'}\n"


def _changed(changes: dict[str, Any]) -> str:
    """`cart, -note`: the keys a checkpoint wrote, deleted ones marked `-`."""
    from concierge.history import DELETED

    return ", ".join(("-" if value is DELETED else "") + key for key, value in changes.items())


async def _history(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    from concierge.history import DELETED, Checkpoint

    sid = (await _find(backend, args.id, now, details=False)).record.session_id
    try:
        kept = [Checkpoint.of(c) for c in await backend.history(sid)]
    except NotImplementedError as exc:
        raise _Failure(f"this store does not record history: {exc}") from None
    if args.json:
        return _dumps(
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
            _when(c.at, now),
            c.tool or "-",
            _changed(c.changes) or "-",
            (c.stage or "(none)") if c.stage_changed else "",
        ]
        for c in kept
    ]
    out = _table(["VERSION", "AT", "TOOL", "CHANGED KEYS", "STAGE"], rows, frozenset({0}))
    return out + f"\n{sid}: oldest version it can be reverted to: {kept[0].version - 1}\n"


async def _revert(backend: StateBackend, args: argparse.Namespace, now: float) -> str:
    from concierge.errors import ConflictError, HistoryError
    from concierge.history import revert_record

    found = await _find(backend, args.id, now, details=False)
    if found.expired:
        raise _Failure(f"session {found.record.session_id!r} has expired; it cannot be reverted")
    try:
        done = await revert_record(backend, found.record, args.version, now=now, keep=args.keep)
    except NotImplementedError as exc:
        raise _Failure(f"this store does not record history: {exc}") from None
    except (HistoryError, ConflictError) as exc:
        raise _Failure(str(exc)) from None
    document = {
        "session_id": done.session_id,
        "reverted_to": done.reverted_to,
        "version": done.version,
        "stage": done.stage,
        "state": done.state,
    }
    if args.json:
        return _dumps(document)
    state = json.dumps(done.state, indent=2, ensure_ascii=False)
    return (
        f"reverted {done.session_id} to version {done.reverted_to} (now version {done.version})\n"
        f"stage: {done.stage or '-'}\n\nstate:\n{state}\n"
    )


_COMMANDS = {
    "list": _list,
    "show": _show,
    "export": _export,
    "delete": _delete,
    "purge-expired": _purge,
    "history": _history,
    "revert": _revert,
}


# -- the command line ---------------------------------------------------------------------
def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return n


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`--url` and `--json`, accepted before and after the command.

    After the command they default to SUPPRESS, so a subcommand never
    overwrites what was given before it.
    """
    parser.add_argument(
        "--url",
        default=None if top else argparse.SUPPRESS,
        help=f"the state store (sqlite:///path.db or postgresql://...); default: ${ENV_STATE_URL}",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print JSON instead of text (for scripts)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m concierge sessions`."""
    common = argparse.ArgumentParser(add_help=False)
    _common(common, top=False)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect the sessions in a concierge state store.",
        epilog=(
            "Exit codes: 0 success; 1 store unreachable, unknown session or unsupported operation; "
            "2 usage or configuration error."
        ),
    )
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    listing = commands.add_parser(
        "list",
        parents=[common],
        help="list sessions, newest activity first",
        description="List sessions, newest activity first: id, scope, stage, keys, size, last activity, expiry.",
    )
    listing.add_argument(
        "--scope",
        choices=SCOPES,
        help="only sessions, user buckets, the global bucket, or wire records (what a legacy HTTP session negotiated)",
    )
    listing.add_argument("--prefix", metavar="PREFIX", help="only ids starting with PREFIX (e.g. h: or http:)")
    listing.add_argument("--stage", metavar="STAGE", help="only sessions in STAGE")
    listing.add_argument(
        "--include-expired",
        action="store_true",
        help="also list expired sessions that have not been purged yet",
    )
    listing.add_argument("--limit", type=_count, default=50, metavar="N", help="at most N sessions (default 50)")
    listing.add_argument("--offset", type=_count, default=0, metavar="N", help="skip the first N (default 0)")

    id_help = "a stored id (h:..., http:..., user:..., global) or a bare session handle"
    for name, summary in [
        ("show", "show one session: its metadata, stage and state"),
        ("export", "print one session as a JSON document"),
        ("delete", "delete one session and all its state"),
    ]:
        command = commands.add_parser(
            name, parents=[common], help=summary, description=summary[0].upper() + summary[1:] + "."
        )
        command.add_argument("id", metavar="ID", help=id_help)
    commands.add_parser(
        "purge-expired",
        parents=[common],
        help="delete every expired session and print how many",
        description="Delete every expired session and print how many were deleted.",
    )
    history = commands.add_parser(
        "history",
        parents=[common],
        help="list the checkpoints kept for one session, oldest first",
        description="List the checkpoints kept for one session (a server with history=N records them), "
        "oldest first: version, time, tool and changed keys (deleted ones marked -).",
    )
    history.add_argument("id", metavar="ID", help=id_help)
    revert = commands.add_parser(
        "revert",
        parents=[common],
        help="restore one session's state and stage as of VERSION, and print it",
        description="Restore one session's state and stage as of VERSION, as a new commit, and print it.",
    )
    revert.add_argument("id", metavar="ID", help=id_help)
    revert.add_argument("version", metavar="VERSION", type=_count, help="the version to go back to")
    revert.add_argument(
        "--keep",
        type=_count,
        default=None,
        metavar="N",
        help="checkpoints to keep for the session, the revert's own included (0: record none); "
        "default: every one kept so far plus the revert's, or none if the session has no history",
    )
    return parser


def _secrets(url: str) -> set[str]:
    """Every spelling of the password(s) a URL carries, to scrub from messages."""
    return url_secrets(url)


def _open_from_url(url: str | None, *, from_flag: bool) -> StateBackend:
    """The backend `url` names, for inspection (raises `_Failure`)."""
    if url is None or not url.strip():
        raise _Failure(
            f"no state store given: pass --url or set {ENV_STATE_URL} "
            "(sqlite:///path.db or postgresql://user:password@host:port/db)",
            EXIT_USAGE,
        )
    try:
        backend = backend_from_url(url)
    except ConfigurationError as exc:
        message = str(exc)
        if from_flag:
            message = message.replace(f"{ENV_STATE_URL}=", "--url ", 1)
        raise _Failure(message, EXIT_USAGE) from None
    if backend.scheme == "memory":
        raise _Failure(
            "a memory:// store lives inside its server process and cannot be inspected from another one; "
            "point --url at the shared store the server uses (e.g. sqlite:// or postgresql://)",
            EXIT_USAGE,
        )
    path = getattr(backend, "path", None)
    if backend.scheme == "sqlite" and isinstance(path, Path) and not path.exists():
        raise _Failure(f"SQLite state file {str(path)!r} does not exist")
    return backend


async def _run(
    args: argparse.Namespace, backend: StateBackend | None, url: str | None, clock: Callable[[], float]
) -> str:
    own = backend is None
    if backend is None:
        backend = _open_from_url(url, from_flag=args.url is not None)
    try:
        await backend.open()
        return await _COMMANDS[args.command](backend, args, clock())
    finally:
        if own:
            await backend.close()


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"concierge sessions: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return code


def main(
    argv: Sequence[str] | None = None,
    *,
    backend: StateBackend | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run `python -m concierge sessions ARGV`; returns the exit code.

    Args:
        argv: the arguments after `sessions`.
        backend: inspect this backend instead of the one `--url` or
            `CONCIERGE_STATE_URL` names (it is opened, and left open: the
            caller owns it). The way to inspect an in-process memory store.
        clock: the current time in epoch seconds, for expiry and relative times.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(args_list)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code or 0)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    url = args.url if args.url is not None else os.environ.get(ENV_STATE_URL)
    secrets = _secrets(url) if url and backend is None else set()

    def scrub(message: str) -> str:
        for secret in sorted(secrets, key=len, reverse=True):
            message = message.replace(secret, "***")
        return message

    try:
        output = anyio.run(_run, args, backend, url, clock)
    except _Failure as exc:
        return _fail(scrub(str(exc)), exc.code)
    except StateUnavailableError as exc:
        return _fail(scrub(str(exc)), EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback that could carry the URL
        return _fail(scrub(f"{type(exc).__name__}: {exc}"), EXIT_FAILURE)
    try:
        sys.stdout.write(output)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `| head`: the reader left, nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush stays quiet
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
