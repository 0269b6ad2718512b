"""The cart on the bare `mcp` SDK, state in a dict: the floor under every system compared.

    python benchmarks/peers/mcp_memory_cart.py --port 8000

Serves streamable HTTP on 127.0.0.1:<port>/mcp until SIGTERM, on the same mcp
SDK as concierge (the current environment). Each cart is a list in this
process's memory, keyed by the `mcp-session-id` header; nothing is stored
anywhere else, nothing survives the process, and no other process can serve
the session. The tools are `async`, so the SDK runs them on its event loop
(no worker thread) and a read-modify-write of one cart is never interleaved.
What this server costs per call is what the SDK's HTTP path costs on its own.
`ping` touches no cart, as on every system in the comparison.
"""

from __future__ import annotations

import argparse
import logging

from mcp.server.mcpserver import Context, MCPServer

app = MCPServer("cart", log_level="WARNING")
carts: dict[str, list[str]] = {}


def _cart(ctx: Context) -> list[str]:
    return carts.setdefault(ctx.headers.get("mcp-session-id", ""), [])


@app.tool()
async def add_to_cart(item: str, ctx: Context) -> dict:
    """Add an item to the cart."""
    cart = _cart(ctx)
    cart.append(item)
    return {"items": len(cart)}


@app.tool()
async def view_cart(ctx: Context) -> dict:
    """Show the cart."""
    return {"cart": list(_cart(ctx))}


@app.tool()
async def ping() -> dict:
    """Answer at once (no state): how long an unrelated call waits on a busy server."""
    return {"pong": True}


def main() -> None:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
