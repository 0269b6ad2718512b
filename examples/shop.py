"""Shop: a cart that lives in the session — the guard pattern.

`checkout` refuses until the cart has something in it.
"""

from mcp.server.mcpserver.exceptions import ToolError

from concierge import Concierge

app = Concierge("shop", instructions="A small shop. Add products to the cart, view it, then check out.")

CATALOGUE = {"apple": 0.5, "bread": 2.25, "coffee": 7.0, "milk": 1.2}


@app.tool()
def add_to_cart(product_id: str, quantity: int = 1) -> dict:
    """Add a product to the cart."""
    if product_id not in CATALOGUE:
        raise ToolError(f"unknown product {product_id!r}; choose one of {sorted(CATALOGUE)}")
    cart = app.get_state("cart", [])
    cart.extend([product_id] * quantity)
    app.set_state("cart", cart)
    return {"cart": cart}


@app.tool()
def view_cart() -> dict:
    """Show the cart and its total."""
    cart = app.get_state("cart", [])
    return {"cart": cart, "total": round(sum(CATALOGUE[p] for p in cart), 2)}


@app.tool()
def checkout() -> str:
    """Pay for the cart and empty it."""
    cart = app.get_state("cart", [])
    if not cart:
        return "Cart is empty. Add items first."
    total = round(sum(CATALOGUE[p] for p in cart), 2)
    app.delete_state("cart")
    orders = app.get_state("orders", 0) + 1
    app.set_state("orders", orders)
    return f"Order #{orders} placed: {len(cart)} items, total {total:.2f}."


if __name__ == "__main__":
    app.run()
