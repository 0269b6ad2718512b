"""Run by .ci/run with a fresh venv's Python after `pip install .` (no extras).

Proves the base install serves the shop example over stdio on memory and on
SQLite, and that neither store driver of an extra (asyncpg, redis) was pulled in.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile

import anyio
from mcp import Client, StdioServerParameters


async def shop_round_trip(state_url: str, cwd: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONCIERGE_")}
    env["CONCIERGE_STATE_URL"] = state_url
    params = StdioServerParameters(command=sys.executable, args=["-m", "concierge", "shop"], env=env, cwd=cwd)
    with anyio.fail_after(60):
        async with Client(params, mode="legacy") as client:
            await client.call_tool("add_to_cart", {"product_id": "apple"})
            await client.call_tool("add_to_cart", {"product_id": "bread"})
            viewed = await client.call_tool("view_cart", {})
    assert not viewed.is_error and json.loads(viewed.content[0].text) == {"cart": ["apple", "bread"], "total": 2.75}
    print(f"base install: shop on {state_url.partition(':')[0]} ok")


async def main() -> None:
    for driver in ("asyncpg", "redis"):
        assert importlib.util.find_spec(driver) is None, f"{driver} is installed by the base install"
    with tempfile.TemporaryDirectory() as cwd:
        await shop_round_trip("memory://", cwd)
        await shop_round_trip("sqlite:///shop.db", cwd)
        assert os.path.exists(os.path.join(cwd, "shop.db")), "the SQLite store was not written"


if __name__ == "__main__":
    anyio.run(main)
