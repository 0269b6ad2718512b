"""`python -m concierge`: list the bundled examples, serve one, or inspect a state store.

    python -m concierge                     # list the examples (name and summary)
    python -m concierge shop                # serve one over stdio
    python -m concierge shop --transport streamable-http --port 8000 [--stateless]
    python -m concierge shop --transport sse --port 8000
    python -m concierge sessions list       # inspect stored sessions (see concierge.inspector)

The examples ship inside the wheel as `concierge/examples/`; in a source
checkout or an editable install they are the top-level `examples/` directory
next to the `concierge/` package. Either way they are loaded by file path, so
the command works from any working directory.

When serving stdio, stdout is the MCP wire: nothing but protocol messages may
reach it, so every diagnostic goes to stderr through `logging`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer

from concierge.errors import ConfigurationError, StateUnavailableError

__all__ = ["main"]

logger = logging.getLogger("concierge")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

TRANSPORTS = ("stdio", "streamable-http", "sse")

# Subcommands take precedence over example names and get the rest of argv.
# `sessions` is reserved for inspecting stored sessions; a module registers its
# handler here (name -> callable(argv) -> exit code).
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {}
RESERVED = frozenset({"sessions", "help"})


def _sessions(argv: list[str]) -> int:
    """`python -m concierge sessions ...`: the state store inspector."""
    from concierge.inspector import main as inspect

    return inspect(argv)


SUBCOMMANDS["sessions"] = _sessions

_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Example:
    """A bundled example: a module with a module-level `app`."""

    name: str
    path: Path
    summary: str


def examples_dir() -> Path | None:
    """Where the bundled examples live, or `None` when they cannot be found.

    A wheel carries them as `concierge/examples/`. A source checkout (and an
    editable install, which points into one) has them at `examples/` beside the
    package, recognised by the `pyproject.toml` next to it, so an unrelated
    top-level `examples` directory in site-packages is never picked up.
    """
    bundled = _PACKAGE_DIR / "examples"
    if bundled.is_dir():
        return bundled
    checkout = _PACKAGE_DIR.parent
    if (checkout / "examples").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "examples"
    return None


def _summary(path: Path) -> str:
    """The first line of a module's docstring, read without importing it."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    except (OSError, SyntaxError, ValueError) as exc:
        return f"(unreadable: {exc})"
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def find_examples() -> dict[str, Example]:
    """The bundled examples by name, sorted (private modules and reserved names excluded)."""
    where = examples_dir()
    if where is None:
        return {}
    found = {}
    for path in sorted(where.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name in RESERVED or name in SUBCOMMANDS:
            continue
        found[name] = Example(name, path, _summary(path))
    return found


def load_example(example: Example) -> MCPServer:
    """Import an example by file path and return its module-level `app`.

    Raises:
        ConfigurationError: the module has no `app`, or `app` is not an MCP server
            (or building it failed on bad configuration, e.g. `CONCIERGE_STATE_URL`).
    """
    module_name = f"concierge.examples.{example.name}"
    spec = importlib.util.spec_from_file_location(module_name, example.path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot load example {example.name!r} from {example.path}")
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so the example's own imports and pickling can find it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    app = getattr(module, "app", None)
    if not isinstance(app, MCPServer):
        raise ConfigurationError(f"example {example.name!r} ({example.path}) has no module-level MCP server `app`")
    return app


def _listing(examples: dict[str, Example]) -> str:
    if not examples:
        return "no bundled examples found\n"
    width = max(len(name) for name in examples)
    lines = [f"  {ex.name:<{width}}  {ex.summary}" for ex in examples.values()]
    return (
        "Bundled examples (run one with `python -m concierge NAME`):\n\n"
        + "\n".join(lines)
        + "\n\nOptions: --transport {stdio,streamable-http,sse} --host HOST --port PORT --stateless\n"
        + "Stored sessions: python -m concierge sessions --help\n"
    )


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


def _uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging config with the access log moved from stdout to stderr."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config.get("handlers", {}).values():
        if handler.get("stream") == "ext://sys.stdout":
            handler["stream"] = "ext://sys.stderr"
    return config


async def _serve_http(app: MCPServer, args: argparse.Namespace) -> bool:
    """What `MCPServer.run_*_async` do for HTTP, with every log line on stderr.

    Returns whether the server started: on a failed start-up (the lifespan
    raised, e.g. the state store is unreachable; the port is taken) uvicorn
    logs why and exits, which is turned into `False` here.
    """
    import uvicorn

    if args.transport == "sse":
        asgi = app.sse_app(host=args.host)
    else:
        asgi = app.streamable_http_app(stateless_http=args.stateless, host=args.host)
    config = uvicorn.Config(
        asgi, host=args.host, port=args.port, log_level=args.log_level.lower(), log_config=_uvicorn_log_config()
    )
    server = uvicorn.Server(config)
    try:
        await server.serve()
    except SystemExit:  # uvicorn's way out of a failed start-up (after logging why)
        return False
    return server.started


def _serve(app: MCPServer, args: argparse.Namespace) -> bool:
    """Serve until the client leaves (stdio) or the process is stopped (HTTP); returns whether it started."""
    if args.transport == "stdio":
        app.run()
        return True
    return anyio.run(_serve_http, app, args)


def _find(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """`exc` or the first exception of `types` inside it (task groups wrap what a lifespan raises)."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, types)
            if found is not None:
                return found
    return None


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
        sys.stdout.write(_listing(examples))
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
        started = _serve(app, args)
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseException as exc:
        if _find(exc, (KeyboardInterrupt,)) is not None:
            return EXIT_OK
        if (found := _find(exc, (ConfigurationError,))) is not None:
            return _error(str(found))
        if (found := _find(exc, (StateUnavailableError,))) is not None:
            return _error(str(found), EXIT_FAILURE)
        raise
    if not started:
        return _error(f"example {example.name!r} failed to start (see the log above)", EXIT_FAILURE)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
