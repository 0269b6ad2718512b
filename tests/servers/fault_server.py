"""The cart server (tests/servers/cart_server.py) plus a tool that writes two keys in one call.

Run by file path, with the cart server's arguments:

    python tests/servers/fault_server.py streamable-http PORT [--stateless]

`add_pair` appends its item to the cart and to a separate "receipts" list in
one call: the two keys are committed together, so a store that applied a
call halfway would show an item in one list and not the other.
"""

from __future__ import annotations

import os
import sys

import anyio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cart_server  # found next to this file
from cart_server import app


@app.tool()
async def add_pair(item: str, pad: int = 0, delay: float = 0.0) -> dict:
    """Append an item to the cart and to the receipts (two keys, one call).

    `pad` bytes of filler ride along with the receipt; `delay` seconds pass
    between reading the state and writing it.
    """
    cart = app.get_state("cart", [])
    receipts = app.get_state("receipts", [])
    await anyio.sleep(delay)
    cart.append(item)
    receipts.append({"item": item, "pad": "x" * pad})
    app.set_state("cart", cart)
    app.set_state("receipts", receipts)
    return {"cart": cart, "receipts": len(receipts), "pid": os.getpid()}


@app.tool()
def view_all() -> dict:
    """The cart and the receipts' items."""
    receipts = app.get_state("receipts", [])
    return {"cart": app.get_state("cart", []), "receipts": [r["item"] for r in receipts], "pid": os.getpid()}


if __name__ == "__main__":
    cart_server.main()
