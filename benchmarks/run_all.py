"""Every benchmark in one run, and a table of the targets they are held to.

    python benchmarks/run_all.py [--quick] [--postgres-url URL] [--json-dir DIR]

Runs, one after the other, against one PostgreSQL (a throwaway server unless
`--postgres-url` names an admin URL) and one throwaway Redis:

1. `bench_state.py` on memory, SQLite, PostgreSQL and Redis: stateful vs
   stateless calls/s in-process and over streamable HTTP, latency at 1k vs 1M
   stored sessions, a 1-key vs a 1,000-key session, and what the store's own
   load and commit cost;
2. `bench_peers.py`: concierge vs fastmcp vs the original concierge-sdk on the
   cart workload over streamable HTTP with 64 concurrent sessions (the peers in
   virtualenvs of their own under benchmarks/.venvs/), and the bare mcp SDK
   keeping its carts in a dict (mcp-memory), the reference no store can beat.

Both print their own tables as they go; then a summary compares each figure
with its target. Every ratio in it was measured in this run. `--quick` runs
smaller series (for a smoke test of the scripts, not for figures to quote).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_state import Stores  # the scripts live side by side, not in a package

# (what, target, how it is compared)
THROUGHPUT_TARGETS = {"memory": 0.92, "sqlite": 0.75, "postgres": 0.60, "redis": 0.60}  # sticky traffic
SESSIONS_TARGET = 1.2  # latency at 1M stored sessions / at 1k, at most
KEYS_TARGET = 1.5  # latency with 1,000 keys in the session / with 1, at most
PEER_TARGETS = {"fastmcp": 2.0, "concierge-sdk": 1.2}  # concierge calls/s / the peer's, at least (loopback)


def _run(script: str, args: list[str]) -> None:
    command = [sys.executable, str(HERE / script), *args]
    shown = ["<admin URL>" if a.startswith(("postgresql://", "postgres://")) else a for a in args]
    print(f"\n$ python benchmarks/{script} {' '.join(shown)}\n", flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        print(f"(benchmarks/{script} exited with {done.returncode})", flush=True)


def _float(text: str) -> float:
    return float(text.replace(",", ""))


def _verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "met" if ok else "NOT met"


def summary(state: dict[str, Any] | None, peers: dict[str, Any] | None) -> list[list[str]]:
    """Rows of (measure, measured, target, verdict)."""
    rows: list[list[str]] = []

    def add(measure: str, value: float, target: float, at_least: bool) -> None:
        bound = f">= {target}" if at_least else f"<= {target}"
        rows.append([measure, f"{value:.2f}", bound, _verdict(value, target, at_least)])

    tables = (state or {}).get("tables", {})
    for label, key in (("in-process", "throughput_inprocess"), ("HTTP", "throughput_http")):
        for row in tables.get(key, []):
            backend, client, ratio = row[0], row[1], _float(row[4])
            # The targets are the in-process sticky rows; roaming, no feed, the reference floor and the
            # HTTP series are printed beside them, not held to them.
            if label == "HTTP" or "roaming" in client or "no change feed" in client or "reference" in client:
                measure = f"stateful/stateless calls/s, {backend}, {label}, {client.strip()}"
                rows.append([measure, f"{ratio:.2f}", "(reference)", "-"])
            elif backend in THROUGHPUT_TARGETS:
                add(
                    f"stateful/stateless calls/s, {backend}, {label}, {client.strip()}",
                    ratio,
                    THROUGHPUT_TARGETS[backend],
                    True,
                )
    # Not targets: the most the in-process ratios could be if concierge itself cost nothing, given what
    # the backend's own load and commit took in this run.
    for row in tables.get("roundtrips", []):
        if row[0] in THROUGHPUT_TARGETS:
            for client, value in zip(("2026-07-28 (handles)", "legacy (per connection)"), row[3:5]):
                if value != "-":
                    measure = f"ceiling left by the store calls alone, {row[0]}, in-process, {client}"
                    rows.append([measure, value, "(reference)", "-"])
    # Each backend's first row in these tables is its baseline; the others are compared with it.
    for key, measure, target in (
        ("sessions", "latency at {n} stored sessions / the fewest, {backend}", SESSIONS_TARGET),
        ("keys", "latency with {n} / 1 key in the session, {backend}", KEYS_TARGET),
    ):
        baseline_seen: set[str] = set()
        for row in tables.get(key, []):
            if row[0] in baseline_seen:
                add(measure.format(n=row[1].strip(), backend=row[0]), _float(row[4]), target, False)
            baseline_seen.add(row[0])
    systems = (peers or {}).get("systems", {})
    for name in ("concierge", "concierge-async"):  # the README's sync tools, and the same tools as async
        ours = systems.get(name, {}).get("summary")
        if not ours:
            continue
        lost = int(ours.get("lost", 0))
        rows.append([f"lost updates, {name}", str(lost), "0", _verdict(lost, 0, False)])
        for peer, target in PEER_TARGETS.items():
            theirs = systems.get(peer, {}).get("summary")
            if not theirs or theirs.get("status") != "ok" or not theirs.get("calls_per_s"):
                rows.append([f"calls/s {name} / {peer}", "not measured", f">= {target}", "-"])
                continue
            ratio = ours["calls_per_s"] / theirs["calls_per_s"]
            rows.append([f"calls/s {name} / {peer}", f"{ratio:.2f}", f">= {target}", _verdict(ratio, target, True)])
    # Not a target: the same ratio for the bare SDK with its carts in a dict, the most a server on
    # concierge's SDK could reach with no store at all.
    floor = systems.get("mcp-memory", {}).get("summary")
    if floor and floor.get("status") == "ok" and floor.get("calls_per_s"):
        for peer in PEER_TARGETS:
            theirs = systems.get(peer, {}).get("summary")
            if theirs and theirs.get("status") == "ok" and theirs.get("calls_per_s"):
                ratio = floor["calls_per_s"] / theirs["calls_per_s"]
                rows.append([f"calls/s mcp-memory (bare SDK, no store) / {peer}", f"{ratio:.2f}", "(reference)", "-"])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


async def _admin_url(given: str | None) -> tuple[Stores, str]:
    stores = Stores(given)
    reason = await stores.available("postgres")
    if reason:
        raise SystemExit(f"PostgreSQL is needed for these benchmarks: {reason}")
    return stores, stores.postgres_admin_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small series: checks the scripts run, not for quoting")
    parser.add_argument("--postgres-url", help="admin URL of an existing PostgreSQL (default: a throwaway server)")
    parser.add_argument("--json-dir", help="keep both scripts' JSON results in this directory")
    args = parser.parse_args(argv)

    loop = asyncio.new_event_loop()
    stores, admin = loop.run_until_complete(_admin_url(args.postgres_url))
    out = Path(args.json_dir) if args.json_dir else Path(tempfile.mkdtemp(prefix="concierge-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        state_args = ["--postgres-url", admin, "--transports", "inprocess,http", "--json", str(out / "state.json")]
        peer_args = ["--postgres-url", admin, "--json", str(out / "peers.json")]
        if args.quick:
            state_args += ["--calls", "200", "--rounds", "4", "--sessions", "1000,20000"]
            peer_args += ["--duration", "3", "--rounds", "1", "--sessions", "16"]
        _run("bench_state.py", state_args)
        _run("bench_peers.py", peer_args)
    finally:
        loop.run_until_complete(stores.close())
        loop.close()

    def load(name: str) -> dict[str, Any] | None:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else None

    rows = summary(load("state.json"), load("peers.json"))
    print("\nTargets (every figure from this run)\n")
    print(_table(["measure", "measured", "target", "verdict"], rows) if rows else "(no results)")
    if args.json_dir:
        print(f"\nJSON results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
