"""Workflow: browse -> cart -> checkout, with the tools of each stage only.

A session starts in `browse`. `proceed_to_next_stage` moves it along the
transitions below; `terminate_session` clears it and returns it to `browse`
(both are added by Concierge). On legacy connections `tools/list` shows only
the current stage's tools; on the 2026-07-28 wire every tool is listed and a
tool from another stage is refused when called, naming the way forward.
"""

from mcp.server.mcpserver.exceptions import ToolError

from concierge import Concierge

app = Concierge(
    "workflow",
    instructions=(
        "A shop with a checkout workflow. Search and add products in 'browse', review the cart in 'cart', "
        "pay in 'checkout'. Use proceed_to_next_stage to move between stages."
    ),
)

PRODUCTS = {
    "kettle": {"name": "Electric kettle", "price": 29.0},
    "mug": {"name": "Stoneware mug", "price": 8.5},
    "teapot": {"name": "Cast-iron teapot", "price": 42.0},
    "tea": {"name": "Loose-leaf green tea, 100 g", "price": 6.75},
}

app.stages = {
    "browse": ["search", "add_to_cart"],
    "cart": ["view_cart", "remove_from_cart"],
    "checkout": ["pay"],
}
app.transitions = {
    "browse": ["cart"],
    "cart": ["browse", "checkout"],
    "checkout": [],
}


def _cart_summary() -> dict:
    cart: dict[str, int] = app.get_state("cart", {})
    lines = [{"product_id": p, "quantity": q, "subtotal": round(PRODUCTS[p]["price"] * q, 2)} for p, q in cart.items()]
    return {"items": lines, "total": round(sum(line["subtotal"] for line in lines), 2)}


@app.tool()
def search(query: str = "") -> list[dict]:
    """Find products whose id or name contains `query` (all products when empty)."""
    q = query.lower()
    return [
        {"product_id": pid, **info}
        for pid, info in PRODUCTS.items()
        if q in pid or q in info["name"].lower()
    ]


@app.tool()
def add_to_cart(product_id: str, quantity: int = 1) -> dict:
    """Add `quantity` of a product to the cart."""
    if product_id not in PRODUCTS:
        raise ToolError(f"unknown product {product_id!r}; use search to find one of {sorted(PRODUCTS)}")
    if quantity < 1:
        raise ToolError(f"quantity must be at least 1, got {quantity}")
    cart: dict[str, int] = app.get_state("cart", {})
    cart[product_id] = cart.get(product_id, 0) + quantity
    app.set_state("cart", cart)
    return _cart_summary()


@app.tool()
def view_cart() -> dict:
    """Show the cart's items and total."""
    return _cart_summary()


@app.tool()
def remove_from_cart(product_id: str) -> dict:
    """Remove a product from the cart entirely."""
    cart: dict[str, int] = app.get_state("cart", {})
    if cart.pop(product_id, None) is None:
        raise ToolError(f"{product_id!r} is not in the cart; the cart holds {sorted(cart) or 'nothing'}")
    app.set_state("cart", cart)
    return _cart_summary()


@app.tool()
def pay(card_last4: str) -> dict:
    """Pay for the cart with the card ending in `card_last4`; empties the cart."""
    if len(card_last4) != 4 or not card_last4.isdigit():
        raise ToolError(f"card_last4 must be the last four digits of the card, got {card_last4!r}")
    summary = _cart_summary()
    if not summary["items"]:
        raise ToolError("the cart is empty, nothing to pay; call terminate_session to start over")
    orders = app.get_state("orders", 0) + 1
    app.set_state("orders", orders)
    app.delete_state("cart")
    return {"order": f"ORD-{orders:04d}", "charged": summary["total"], "card": f"**** {card_last4}", **summary}


if __name__ == "__main__":
    app.run()
