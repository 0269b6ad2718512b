"""Serving an example's server over stdio or HTTP, with every log line on stderr.

When serving stdio, stdout is the MCP wire: nothing but protocol messages may
reach it, so every diagnostic goes to stderr through `logging`.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import anyio
from mcp.server.mcpserver import MCPServer

__all__ = ["TRANSPORTS", "Transport", "find_in", "serve"]

Transport = Literal["stdio", "streamable-http", "sse"]
TRANSPORTS: tuple[Transport, ...] = ("stdio", "streamable-http", "sse")


def _uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging config with the access log moved from stdout to stderr."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config.get("handlers", {}).values():
        if handler.get("stream") == "ext://sys.stdout":
            handler["stream"] = "ext://sys.stderr"
    return config


async def _serve_http(
    app: MCPServer, transport: Transport, host: str, port: int, stateless: bool, log_level: str
) -> bool:
    """What `MCPServer.run_*_async` do for HTTP, with every log line on stderr.

    Returns whether the server started: on a failed start-up (the lifespan
    raised, e.g. the state store is unreachable; the port is taken) uvicorn
    logs why and exits, which is turned into `False` here.
    """
    import uvicorn

    if transport == "sse":
        asgi = app.sse_app(host=host)
    else:
        asgi = app.streamable_http_app(stateless_http=stateless, host=host)
    config = uvicorn.Config(asgi, host=host, port=port, log_level=log_level.lower(), log_config=_uvicorn_log_config())
    server = uvicorn.Server(config)
    try:
        await server.serve()
    except SystemExit:  # uvicorn's way out of a failed start-up (after logging why)
        return False
    return server.started


def serve(
    app: MCPServer,
    transport: Transport,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    stateless: bool = False,
    log_level: str = "INFO",
) -> bool:
    """Serve until the client leaves (stdio) or the process is stopped (HTTP); returns whether it started."""
    if transport == "stdio":
        app.run()
        return True
    prepare = getattr(app, "before_serving", None)  # a Concierge app tunes the process it runs in
    if prepare is not None:
        prepare()
    return anyio.run(_serve_http, app, transport, host, port, stateless, log_level)


def find_in(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """`exc` or the first exception of `types` inside it (task groups wrap what a lifespan raises)."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_in(inner, types)
            if found is not None:
                return found
    return None
