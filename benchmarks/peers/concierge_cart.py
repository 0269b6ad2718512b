"""The cart server on concierge (this repository), state on PostgreSQL.

    BENCH_STATE_URL=postgresql://... python benchmarks/peers/concierge_cart.py --port 8000

Serves streamable HTTP on 127.0.0.1:<port>/mcp until SIGTERM. The tools are the
README's quick start; `add_to_cart` answers with the cart's size instead of the
whole cart so that every system in the comparison sends the same small reply. `ping`
touches no state: it shows how long an unrelated call waits while the cart calls run.
The store URL comes from the environment, so no password is on a command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from concierge import Concierge

app = Concierge(
    "cart", state_url=os.environ["BENCH_STATE_URL"], log_level="WARNING", tune_gc="--no-tune-gc" not in sys.argv
)


def add_to_cart(item: str) -> dict:
    """Add an item to the cart."""
    cart = app.get_state("cart", [])
    cart.append(item)
    app.set_state("cart", cart)
    return {"items": len(cart)}


def view_cart() -> dict:
    """Show the cart."""
    return {"cart": app.get_state("cart", [])}


async def add_to_cart_async(item: str) -> dict:
    """Add an item to the cart."""
    return add_to_cart(item)


async def view_cart_async() -> dict:
    """Show the cart."""
    return view_cart()


@app.tool()
async def ping() -> dict:
    """Answer at once (no state): how long an unrelated call waits on a busy server."""
    return {"pong": True}


def main() -> None:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--tools",
        choices=("sync", "async"),
        default="sync",
        help="sync: plain functions, run in a worker thread by the SDK (the README's form); async: coroutines "
        "on the event loop (get_state/set_state never block, so both forms are correct)",
    )
    parser.add_argument(
        "--no-tune-gc",
        action="store_true",
        help="Concierge(tune_gc=False): leave the garbage collector as the interpreter starts it (read from sys.argv"
        " when the module is imported, as the app is built at import)",
    )
    args = parser.parse_args()
    if args.tools == "sync":
        app.tool(name="add_to_cart")(add_to_cart)
        app.tool(name="view_cart")(view_cart)
    else:
        app.tool(name="add_to_cart", scopes={"session"})(add_to_cart_async)
        app.tool(name="view_cart", scopes={"session"})(view_cart_async)
    logging.basicConfig(level=logging.WARNING)
    app.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
