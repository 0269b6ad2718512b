"""The cart server on concierge-sdk 0.8.0 (PyPI), state on PostgreSQL.

    CONCIERGE_STATE_URL=postgresql://... benchmarks/.venvs/concierge-sdk/bin/python \
        benchmarks/peers/concierge_sdk_cart.py --port 8000

Runs in its own virtualenv (the package imports `mcp.server.fastmcp`, so it needs
`mcp<2`; its import name, `concierge`, is also this repository's) and serves
streamable HTTP on 127.0.0.1:<port>/mcp until SIGTERM.

State API as that package documents it (docs/sdk/state.mdx of
concierge-hq/concierge): synchronous `app.get_state(key, default)` /
`app.set_state(key, value)`, keyed by the request's `mcp-session-id` header.
The store is chosen by `CONCIERGE_STATE_URL` (`postgresql://` selects its
`PostgresBackend`, psycopg2 with a pool of up to 10 connections; unset is in
memory). That backend expects its tables to exist ("Tables must exist (see
schema.sql)"), so the DDL of the project's `state/schema.sql`, which the wheel
does not ship, is applied first.

`add_to_cart` answers with the cart's size, and `ping` (async, no state) answers at
once, as on every system in the comparison.
"""

from __future__ import annotations

import argparse
import os

import psycopg2

from concierge import Concierge

SCHEMA = """
CREATE TABLE IF NOT EXISTS concierge_session_stages (
    session_id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS concierge_session_state (
    session_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value JSONB NOT NULL,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (session_id, key)
);
CREATE INDEX IF NOT EXISTS idx_session_state_session ON concierge_session_state(session_id);
"""


def apply_schema(url: str) -> None:
    """Create the backend's tables (the DDL of concierge-sdk's `state/schema.sql`)."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(SCHEMA)
    finally:
        conn.close()


def build(port: int) -> Concierge:
    """The cart app; `host`/`port` pass through to the underlying `FastMCP`."""
    app = Concierge("cart", host="127.0.0.1", port=port, log_level="WARNING")

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

    return app


def main() -> None:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    url = os.environ.get("CONCIERGE_STATE_URL")
    if url:
        apply_schema(url)
    build(args.port).run(transport="streamable-http")


if __name__ == "__main__":
    main()
