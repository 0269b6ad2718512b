"""The cart server on fastmcp 4.x, session state in PostgreSQL through py-key-value-aio.

    BENCH_STATE_URL=postgresql://... benchmarks/.venvs/fastmcp/bin/python benchmarks/peers/fastmcp_cart.py \
        --port 8000 [--api context|session-id]

Runs in its own virtualenv (never in the project's environment) and serves
streamable HTTP on 127.0.0.1:<port>/mcp until SIGTERM.

Both state APIs fastmcp 4 documents are available, each backed by
`FastMCP(session_state_store=PostgreSQLStore(url=...))` (py-key-value-aio's
asyncpg store; one `kv_store` table):

- `--api context` (default): `await ctx.get_state(key)` / `await ctx.set_state(key, value)`
  ("Session State" in docs/servers/context.mdx): keys are prefixed with
  `ctx.session_id`, which on a handshake-era streamable-HTTP connection is the
  `mcp-session-id`.
- `--api session-id`: a `session_id: SessionId` argument, ids minted by the
  `create_session` tool of a `SessionProvider`, state through the `Session` that
  `await get_session(session_id)` resolves (`fastmcp.server.sessions`; the
  "Distinct sessions" example of docs/servers/sessions.mdx is this very cart).

`add_to_cart` answers with the cart's size, and `ping` (async, no state) answers at
once, as on every system in the comparison.
"""

from __future__ import annotations

import argparse
import os

from fastmcp import Context, FastMCP
from fastmcp.server.dependencies import get_session
from fastmcp.server.sessions import SessionId, SessionProvider
from key_value.aio.stores.postgresql import PostgreSQLStore


def context_api_server(url: str) -> FastMCP:
    """The cart on `ctx.get_state` / `ctx.set_state` (keyed by the MCP session)."""
    mcp = FastMCP("cart", session_state_store=PostgreSQLStore(url=url))

    @mcp.tool
    async def add_to_cart(item: str, ctx: Context) -> dict:
        """Add an item to the cart."""
        cart = await ctx.get_state("cart") or []
        cart.append(item)
        await ctx.set_state("cart", cart)
        return {"items": len(cart)}

    @mcp.tool
    async def view_cart(ctx: Context) -> dict:
        """Show the cart."""
        return {"cart": await ctx.get_state("cart") or []}

    return mcp


def session_id_api_server(url: str) -> FastMCP:
    """The cart on `SessionId` arguments and `get_session` (ids minted by `create_session`)."""
    mcp = FastMCP("cart", session_state_store=PostgreSQLStore(url=url))
    mcp.add_provider(SessionProvider())

    @mcp.tool
    async def add_to_cart(item: str, session_id: SessionId) -> dict:
        """Add an item to the cart."""
        session = await get_session(session_id)
        cart = await session.get("cart", default=[])
        cart.append(item)
        await session.set("cart", cart)
        return {"items": len(cart)}

    @mcp.tool
    async def view_cart(session_id: SessionId) -> dict:
        """Show the cart."""
        session = await get_session(session_id)
        return {"cart": await session.get("cart", default=[])}

    return mcp


def main() -> None:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api", choices=("context", "session-id"), default="context")
    args = parser.parse_args()
    url = os.environ["BENCH_STATE_URL"]
    mcp = context_api_server(url) if args.api == "context" else session_id_api_server(url)

    @mcp.tool
    async def ping() -> dict:
        """Answer at once (no state): how long an unrelated call waits on a busy server."""
        return {"pong": True}

    mcp.run(transport="http", host="127.0.0.1", port=args.port, show_banner=False, log_level="WARNING")


if __name__ == "__main__":
    main()
