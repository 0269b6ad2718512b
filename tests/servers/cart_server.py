"""A cart server for the transport tests (tests/test_stdio.py, tests/test_http.py).

Run by file path:

    python tests/servers/cart_server.py stdio
    python tests/servers/cart_server.py streamable-http PORT [--stateless] [--no-roaming] [--max-live-sessions N]
    python tests/servers/cart_server.py sse PORT

The state store comes from `CONCIERGE_STATE_URL` (memory when unset). Every
result carries the server's pid so a test can tell which process served it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import anyio

from concierge import Concierge

# `--no-roaming` turns off serving legacy HTTP session ids across restarts (tests/test_roaming.py);
# `--max-live-sessions N` sets max_live_sessions_per_caller (tests/test_live_cap.py).
_LIVE = sys.argv[sys.argv.index("--max-live-sessions") + 1] if "--max-live-sessions" in sys.argv else None
app = Concierge(
    "cart-server",
    roaming=False if "--no-roaming" in sys.argv else None,
    **({"max_live_sessions_per_caller": int(_LIVE)} if _LIVE is not None else {}),
)


@app.tool()
def add_to_cart(item: str) -> dict:
    """Append an item to the cart (sync tool)."""
    cart = app.get_state("cart", [])
    cart.append(item)
    app.set_state("cart", cart)
    return {"cart": cart, "pid": os.getpid()}


@app.tool()
async def add_slowly(item: str, delay: float = 0.0) -> dict:
    """Append an item, awaiting `delay` seconds between reading and writing the cart."""
    cart = app.get_state("cart", [])
    await anyio.sleep(delay)
    cart.append(item)
    app.set_state("cart", cart)
    return {"cart": cart, "pid": os.getpid()}


@app.tool()
def add_blocking(item: str, delay: float = 0.0) -> dict:
    """Append an item, blocking the worker thread `delay` seconds between reading and writing."""
    cart = app.get_state("cart", [])
    time.sleep(delay)
    cart.append(item)
    app.set_state("cart", cart)
    return {"cart": cart, "pid": os.getpid()}


@app.tool()
def view_cart() -> dict:
    """Show the cart."""
    return {"cart": app.get_state("cart", []), "pid": os.getpid()}


@app.tool()
def save_for_later(item: str) -> dict:
    """Keep an item in the caller's user state (needs an authenticated caller over HTTP)."""
    saved = app.get_state("saved", [], scope="user")
    saved.append(item)
    app.set_state("saved", saved, scope="user")
    return {"saved": saved, "pid": os.getpid()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "sse", "streamable-http"])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--stateless", action="store_true")
    parser.add_argument("--no-roaming", action="store_true")
    parser.add_argument("--max-live-sessions", type=int)
    args = parser.parse_args()
    if args.transport == "stdio":
        app.run()
    elif args.transport == "sse":
        app.run("sse", host="127.0.0.1", port=args.port)
    else:
        app.run("streamable-http", host="127.0.0.1", port=args.port, stateless_http=args.stateless)


if __name__ == "__main__":
    main()
