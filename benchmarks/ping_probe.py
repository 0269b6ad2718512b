"""One MCP client session calling a server's `ping` tool at a steady pace, in a process of its own.

    python benchmarks/ping_probe.py http://127.0.0.1:8000/mcp [--interval-ms 50]

Connects (`Client(url, mode="legacy")`, a session of its own), calls `ping`
once, prints `ready`, then waits for a line on stdin: `go` starts a call every
`--interval-ms` (the next one starts on the next tick after the previous
answered: never two at once), `stop` ends them and prints one JSON line,
`{"latencies": [seconds...], "errors": N, "error_samples": [...]}`, and exits.

It runs apart from the load driver so that the driver's own busy event loop
is not in the figures: what is measured is how long the server takes to
answer an unrelated call while it serves the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from mcp.client import Client


async def probe(url: str, interval: float) -> None:
    """Connect, report ready, ping from `go` until `stop`, print the latencies."""
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    latencies: list[float] = []
    errors: list[str] = []
    async with Client(url, mode="legacy", read_timeout_seconds=60) as client:
        first = await client.call_tool("ping", {})
        if first.is_error:
            raise RuntimeError(f"ping failed: {first.content}")
        print("ready", flush=True)
        if (await commands.readline()).strip() != b"go":
            return
        stopping = asyncio.ensure_future(commands.readline())
        tick = time.perf_counter()
        while not stopping.done():
            start = time.perf_counter()
            try:
                reply = await client.call_tool("ping", {})
                if reply.is_error:
                    errors.append(" ".join(getattr(b, "text", "") for b in reply.content)[:300])
                else:
                    latencies.append(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - counted, the probe goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
            now = time.perf_counter()
            tick += interval * max(1, -int((tick - now) // interval))
            await asyncio.wait([stopping], timeout=max(0.0, tick - now))
    print(json.dumps({"latencies": latencies, "errors": len(errors), "error_samples": errors[:3]}), flush=True)


def main() -> None:
    """Parse the options and probe."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--interval-ms", type=float, default=50.0)
    args = parser.parse_args()
    asyncio.run(probe(args.url, args.interval_ms / 1e3))


if __name__ == "__main__":
    main()
