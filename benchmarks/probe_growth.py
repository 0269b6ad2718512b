"""How much a careless or hostile caller can grow the store: the shop example over streamable HTTP on SQLite.

    python benchmarks/probe_growth.py [--calls 5000] [--initializes 1000]

Against one server (a subprocess on 127.0.0.1), one client at a time:

1. `view_cart` without `session_id` (2026-07-28), `--calls` times;
2. `add_to_cart` without `session_id`, `--calls` times;
3. `start_session`, `--calls` times;
4. legacy `initialize` on new connections, never deleted, `--initializes` times;
5. legacy stateless HTTP `view_cart` (a second server with `--stateless`), `--initializes` times.

After each step it prints the rows in the store (`list_sessions`, expired ones included) and
the size of the SQLite file, and how many calls were refused.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx2
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ServerProcess, start_all  # noqa: E402

from concierge.state import backend_from_url  # noqa: E402

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}},
}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


async def rows(url: str) -> int:
    backend = backend_from_url(url)
    async with backend:
        return len(await backend.list_sessions(now=time.time(), include_expired=True, limit=10_000_000))


def size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return f"{total / 1e6:.2f} MB"


async def calls(client: Client, n: int, tool: str, arguments: dict[str, str]) -> int:
    refused = 0
    for _ in range(n):
        refused += bool((await client.call_tool(tool, arguments)).is_error)
    return refused


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "probe.db"
        url = f"sqlite:///{db}"
        server = ServerProcess.cart("streamable-http", state_url=url)
        stateless = ServerProcess.cart("streamable-http", state_url=url, stateless=True)
        start_all(server, stateless)
        try:
            print(f"{'step':<52} {'refused':>8} {'rows':>7} {'file':>9}")

            def report(step: str, refused: int | str, count: int) -> None:
                print(f"{step:<52} {refused!s:>8} {count:>7} {size(db):>9}", flush=True)

            async with Client(server.url) as client:
                await client.list_tools()
                report("start (the handle key)", "-", await rows(url))
                for step, tool, arguments in (
                    (f"{args.calls} view_cart without session_id", "view_cart", {}),
                    (f"{args.calls} add_to_cart without session_id", "add_to_cart", {"item": "x"}),
                    (f"{args.calls} start_session", "start_session", {}),
                ):
                    refused = await calls(client, args.calls, tool, arguments)
                    report(step, refused, await rows(url))
            async with httpx2.AsyncClient(timeout=30) as http:
                for _ in range(args.initializes):  # a raw initialize: no DELETE ever follows
                    answer = await http.post(server.url, json=INITIALIZE, headers=HEADERS)
                    answer.raise_for_status()
            report(f"{args.initializes} legacy initialize, never deleted", 0, await rows(url))
            async with Client(stateless.url, mode="legacy") as client:
                refused = await calls(client, args.initializes, "view_cart", {})
            report(f"{args.initializes} stateless legacy view_cart", refused, await rows(url))
        finally:
            server.close()
            stateless.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--initializes", type=int, default=1000)
    anyio.run(main, parser.parse_args())
