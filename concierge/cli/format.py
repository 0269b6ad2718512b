"""How the command line shows times, durations, sizes, tables and JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = ["dumps", "expiry", "iso", "size", "span", "table", "when"]


def iso(ts: float | None) -> str:
    """`2025-06-01T12:00:05Z`, `never` for `None`, the raw number when it is no date at all."""
    if ts is None:
        return "never"
    try:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def span(seconds: float) -> str:
    """A duration in at most two units: `45s`, `12m`, `3h 5m`, `2d 4h`."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d {h}h" if h else f"{d}d"


def when(ts: float, now: float) -> str:
    """`2025-06-01T12:00:05Z (5m ago)`."""
    delta = now - ts
    relative = "just now" if abs(delta) < 1 else (f"{span(delta)} ago" if delta > 0 else f"in {span(delta)}")
    return f"{iso(ts)} ({relative})"


def expiry(expires_at: float | None, now: float) -> str:
    """`never`, `... (in 59m)` or `... (expired 1m ago)`."""
    if expires_at is None:
        return "never"
    if expires_at <= now:
        return f"{iso(expires_at)} (expired {span(now - expires_at)} ago)"
    return f"{iso(expires_at)} (in {span(expires_at - now)})"


def size(n: int) -> str:
    """`312 B`, `1.2 KiB`, `3.4 MiB`."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Columns two spaces apart; the columns in `right` aligned right."""
    widths = [max(len(cells[i]) for cells in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return "\n".join(line(cells) for cells in [headers, *rows]) + "\n"


def dumps(document: Any, *, pretty: bool = True) -> str:
    """JSON text, non-ASCII kept as is when stdout can carry it (escaped otherwise: still valid JSON)."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    return json.dumps(document, indent=2 if pretty else None, ensure_ascii=encoding != "utf8") + "\n"
