"""What concierge does to the interpreter when it runs the server itself (`Concierge.run`, `python -m concierge`).

A server process imports tens of thousands of long-lived objects (the SDK,
pydantic, uvicorn, the app and its tool schemas) before its first request.
CPython's cyclic garbage collector walks all of them on every full
collection: 40-50 ms here at start-up, 140 ms under load, during which no
request on the event loop moves. Frozen (`gc.freeze()`), they are left out of
every later collection; refcounting still frees them as usual (one that
later becomes part of a garbage cycle is never reclaimed). The young
generation's threshold is raised as well, so a busy server collects less often
for the same garbage. An app embedded in another program (`Client(app)`, its
`streamable_http_app()` mounted in a host's own server) never touches the
collector: the process is not its own.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "tune_collector"]

YOUNG_THRESHOLD = 10_000
"""Allocations (minus deallocations) of tracked objects between two young collections; CPython's default is 700."""


def tune_collector() -> None:
    """Collect once, freeze what survives, and collect the young generation every `YOUNG_THRESHOLD` allocations.

    A threshold the program set higher, or a collector it turned off
    (threshold 0 or `gc.disable()`), is left as it is.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_THRESHOLD:
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)
