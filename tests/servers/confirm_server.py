"""A server whose tool asks the client to confirm before it writes, for tests/test_request_state.py.

    python tests/servers/confirm_server.py PORT [--keys KEY1,KEY2] [--name NAME]

Streamable HTTP on 127.0.0.1. The store comes from `CONCIERGE_STATE_URL`; the
request-state keys from `--keys` (else `CONCIERGE_REQUEST_STATE_KEYS`, else the
store's). On the 2026-07-28 wire `order` answers its first round with an
`input_required` result (an elicitation) and orders in the next one. Every
result carries the server's pid, so a test can tell which process served it.
"""

from __future__ import annotations

import argparse
import os
from typing import Annotated, Any

from mcp.server.mcpserver.resolve import Elicit, Resolve
from pydantic import BaseModel

from concierge import Concierge


class Confirm(BaseModel):
    ok: bool


def ask_to_confirm(item: str) -> Elicit[Confirm]:
    return Elicit(f"Order {item}?", Confirm)


def build(name: str | None, keys: list[str] | None = None, **options: Any) -> Concierge:
    """The app (`options` pass to `Concierge`; the tests build it in process too)."""
    app = Concierge(name, request_state_keys=keys, **options)

    @app.tool()
    def order(item: str, confirm: Annotated[Confirm, Resolve(ask_to_confirm)]) -> dict:
        """Order `item` once the client confirms it."""
        orders = app.get_state("orders", [])
        if confirm.ok:
            orders.append(item)
            app.set_state("orders", orders)
        return {"orders": orders, "pid": os.getpid()}

    @app.tool()
    def view_orders() -> dict:
        """The session's orders."""
        return {"orders": app.get_state("orders", []), "pid": os.getpid()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--keys", default=None, help="comma-separated request-state keys")
    parser.add_argument("--name", default="confirm-server")
    args = parser.parse_args()
    keys = args.keys.split(",") if args.keys else None
    build(args.name, keys).run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
