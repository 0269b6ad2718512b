"""`python -m concierge`: list the bundled examples, serve one, or inspect a state store.

    python -m concierge                     # list the examples (name and summary)
    python -m concierge shop                # serve one over stdio
    python -m concierge shop --transport streamable-http --port 8000 [--stateless]
    python -m concierge shop --transport sse --port 8000
    python -m concierge sessions list       # inspect stored sessions (see concierge.cli.sessions)

The examples are found by the package itself (`concierge.cli.examples`), so
the command works from any working directory. When serving stdio, stdout is
the MCP wire: every diagnostic goes to stderr through `logging`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from concierge.cli.examples import RESERVED, find_examples, listing, load_example
from concierge.cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from concierge.cli.transport import TRANSPORTS, find_in, serve
from concierge.errors import ConfigurationError, StateUnavailableError

__all__ = ["main"]

logger = logging.getLogger("concierge")


def _sessions(argv: list[str]) -> int:
    """`python -m concierge sessions ...`: the state store inspector."""
    from concierge.cli.sessions import main as inspect

    return inspect(argv)


# Subcommands take precedence over example names and get the rest of argv
# (name -> callable(argv) -> exit code); their names are in `RESERVED`.
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"sessions": _sessions}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m concierge",
        description="List the bundled concierge examples, or serve one over stdio or HTTP.",
    )
    parser.add_argument("example", nargs="?", help="the example to serve; omit to list them")
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="stdio",
        help="stdio (default), streamable-http, or sse (legacy HTTP+SSE)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument(
        "--stateless",
        action="store_true",
        help="streamable-http without an mcp-session-id (stateless_http=True); sessions then use handles",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (logs go to stderr)",
    )
    return parser


def _error(message: str, code: int = EXIT_USAGE) -> int:
    sys.stderr.write(f"concierge: error: {message}\n")
    sys.stderr.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code.

    0 on success, 1 when serving failed (e.g. the state store is unreachable),
    2 on a usage error (unknown example, bad option, bad configuration).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args_list[0]](args_list[1:])

    parser = _parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code or 0)

    examples = find_examples()
    if args.example is None:
        sys.stdout.write(listing(examples))
        sys.stdout.flush()
        return EXIT_OK

    if args.example in RESERVED:
        return _error(f"{args.example!r} is a command that is not available in this version")
    example = examples.get(args.example)
    if example is None:
        known = ", ".join(examples) or "none found"
        return _error(f"unknown example {args.example!r}; available examples: {known}")
    if args.stateless and args.transport != "streamable-http":
        return _error("--stateless applies only to --transport streamable-http")
    if args.transport == "stdio" and (args.host != "127.0.0.1" or args.port != 8000):
        logger.warning("--host and --port are ignored with --transport stdio")

    # Before the example builds its server: MCPServer configures logging with
    # basicConfig, which is then a no-op, so every record goes to stderr.
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = load_example(example)
    except ConfigurationError as exc:
        return _error(str(exc))

    if args.transport != "stdio":
        path = "/sse" if args.transport == "sse" else "/mcp"
        url = f"http://{args.host}:{args.port}{path}"
        logger.info("serving example %r over %s at %s", example.name, args.transport, url)
    try:
        started = serve(
            app,
            args.transport,
            host=args.host,
            port=args.port,
            stateless=args.stateless,
            log_level=args.log_level,
        )
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseException as exc:
        if find_in(exc, (KeyboardInterrupt,)) is not None:
            return EXIT_OK
        if (found := find_in(exc, (ConfigurationError,))) is not None:
            return _error(str(found))
        if (found := find_in(exc, (StateUnavailableError,))) is not None:
            return _error(str(found), EXIT_FAILURE)
        raise
    if not started:
        return _error(f"example {example.name!r} failed to start (see the log above)", EXIT_FAILURE)
    return EXIT_OK
