"""A staged shop served over streamable HTTP, for tests/test_stages.py.

Run by file path: `python tests/servers/staged_server.py PORT [STATE_URL]`.
Stages: browse -> cart -> checkout (terminal; cart may go back to browse).
The unstaged `executions` tool reports how often each staged tool has run, so
the test can check that a refused call never executed.
"""

from __future__ import annotations

import sys
from collections import Counter

from concierge import Concierge

app = Concierge("staged-shop", state_url=sys.argv[2] if len(sys.argv) > 2 else "memory://")
runs: Counter[str] = Counter()

# browse's tools come from the @app.stage decorators below; it is listed first, so it is the start.
app.stages = {"browse": [], "cart": ["set_address"], "checkout": ["pay"]}
app.transitions = {"browse": ["cart"], "cart": ["browse", "checkout"], "checkout": []}

CATALOGUE = {"p1": "kettle", "p2": "teapot", "p3": "mug"}


@app.stage("browse")
@app.tool()
def search(query: str) -> dict:
    """Search the catalogue"""
    runs["search"] += 1
    return {"results": [pid for pid, name in CATALOGUE.items() if query in name]}


@app.tool()
@app.stage("browse")
def add_to_cart(product_id: str) -> dict:
    """Put a product in the cart"""
    runs["add_to_cart"] += 1
    cart = app.get_state("cart", [])
    cart.append(product_id)
    app.set_state("cart", cart)
    return {"cart": cart}


@app.tool()
def view_cart() -> dict:
    """Show the cart"""
    return {"cart": app.get_state("cart", [])}


@app.tool()
def set_address(address: str) -> dict:
    """Set the delivery address"""
    runs["set_address"] += 1
    app.set_state("address", address)
    return {"address": address}


@app.tool()
def pay() -> dict:
    """Pay for the cart"""
    runs["pay"] += 1
    order = {"items": app.get_state("cart", []), "address": app.get_state("address")}
    app.set_state("order", order)
    return {"paid": True, "order": order}


@app.tool()
def executions() -> dict:
    """How often each staged tool has run in this process"""
    return dict(runs)


if __name__ == "__main__":
    app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
