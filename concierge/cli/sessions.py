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
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

from concierge import ids
from concierge.cli.commands import COMMANDS
from concierge.cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Failure
from concierge.errors import ConfigurationError, StateUnavailableError
from concierge.state import ENV_STATE_URL, StateBackend, backend_from_url, url_secrets

__all__ = ["build_parser", "main"]

PROG = "python -m concierge sessions"


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
        choices=ids.KINDS,
        help="only sessions, user buckets, the global bucket, or wire records (what a legacy HTTP session negotiated)",
    )
    listing.add_argument(
        "--prefix", metavar="PREFIX", help=f"only ids starting with PREFIX (e.g. {ids.HANDLE} or {ids.HTTP})"
    )
    listing.add_argument("--stage", metavar="STAGE", help="only sessions in STAGE")
    listing.add_argument(
        "--include-expired",
        action="store_true",
        help="also list expired sessions that have not been purged yet",
    )
    listing.add_argument("--limit", type=_count, default=50, metavar="N", help="at most N sessions (default 50)")
    listing.add_argument("--offset", type=_count, default=0, metavar="N", help="skip the first N (default 0)")

    id_help = (
        f"a stored id ({ids.HANDLE}..., {ids.HTTP}..., {ids.USER}..., {ids.GLOBAL}) or a bare session handle"
    )
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


def _open_from_url(url: str | None, *, from_flag: bool) -> StateBackend:
    """The backend `url` names, for inspection (raises `Failure`)."""
    if url is None or not url.strip():
        raise Failure(
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
        raise Failure(message, EXIT_USAGE) from None
    if backend.scheme == "memory":
        raise Failure(
            "a memory:// store lives inside its server process and cannot be inspected from another one; "
            "point --url at the shared store the server uses (e.g. sqlite:// or postgresql://)",
            EXIT_USAGE,
        )
    path = getattr(backend, "path", None)
    if backend.scheme == "sqlite" and isinstance(path, Path) and not path.exists():
        raise Failure(f"SQLite state file {str(path)!r} does not exist")
    return backend


async def _run(
    args: argparse.Namespace, backend: StateBackend | None, url: str | None, clock: Callable[[], float]
) -> str:
    own = backend is None
    if backend is None:
        backend = _open_from_url(url, from_flag=args.url is not None)
    try:
        await backend.open()
        return await COMMANDS[args.command](backend, args, clock())
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
    secrets = url_secrets(url) if url and backend is None else set()

    def scrub(message: str) -> str:
        for secret in sorted(secrets, key=len, reverse=True):
            message = message.replace(secret, "***")
        return message

    try:
        output = anyio.run(_run, args, backend, url, clock)
    except Failure as exc:
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
