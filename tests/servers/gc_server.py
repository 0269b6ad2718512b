"""A server whose one tool reports the process's garbage-collector settings.

    python gc_server.py stdio [--no-tune]
    python gc_server.py streamable-http PORT [--no-tune]   (app.run)
    python gc_server.py cli-http PORT [--no-tune]           (the CLI's HTTP serving, as `python -m concierge`)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

from concierge import Concierge


def build(tune: bool) -> Concierge:
    app = Concierge("gc", state_url="memory://", tune_gc=tune)

    @app.tool()
    def collector() -> dict:
        """The collector's thresholds and how many objects are frozen out of it."""
        return {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count(), "pid": os.getpid()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "streamable-http", "cli-http"])
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--no-tune", action="store_true")
    args = parser.parse_args()
    app = build(not args.no_tune)
    if args.transport == "stdio":
        app.run()
    elif args.transport == "streamable-http":
        app.run("streamable-http", host="127.0.0.1", port=args.port)
    else:
        from concierge.cli.transport import serve

        sys.exit(0 if serve(app, "streamable-http", port=args.port, log_level="WARNING") else 1)


if __name__ == "__main__":
    main()
