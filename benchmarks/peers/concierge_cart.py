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

from concierge import Concierge

app = Concierge("cart", state_url=os.environ["BENCH_STATE_URL"], log_level="WARNING")


@app.tool()
def add_to_cart(item: str) -> dict:
    """Add an item to the cart."""
    cart = app.get_state("cart", [])
    cart.append(item)
    app.set_state("cart", cart)
    return {"items": len(cart)}


@app.tool()
def view_cart() -> dict:
    """Show the cart."""
    return {"cart": app.get_state("cart", [])}


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
