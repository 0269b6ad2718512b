"""What an operator sees of each unit of work, through the OpenTelemetry API (no SDK is required).

Each unit runs in a span `concierge.unit`, a child of the SDK's own request
span (`tools/call <tool>`), with:

| attribute                  | value                                                   |
|----------------------------|---------------------------------------------------------|
| `mcp.session.id`           | a hash of the session's storage id, never the handle    |
| `concierge.store`          | the store's scheme (`memory`, `sqlite`, `postgresql`, `redis`) |
| `concierge.scopes`         | the shared buckets the unit loaded (`user`, `global`)   |
| `concierge.load_ms`, `concierge.commit_ms` | time spent reading and writing the store |
| `concierge.outcome`        | `committed`, `nothing to write`, `not kept` (the call failed), |
|                            | `conflict`, `store unavailable`, `failed`, `unknown session` |
| `concierge.version`        | the session's version after the unit                    |
| `concierge.attempt`        | the run of the body (more than 1 only with `on_conflict="retry"`) |

Metrics (meter `concierge`): `concierge.unit.duration` (histogram, s, by
outcome), `concierge.commits`, `concierge.conflicts`, `concierge.retries`
(counters), `concierge.sweep.deleted` (counter), and `concierge.sessions.held`
(the sessions whose last values this process holds).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from opentelemetry import metrics, trace

__all__ = ["METER", "TRACER", "Instruments", "session_hash", "tracing"]

TRACER = trace.get_tracer("concierge")
METER = metrics.get_meter("concierge")


def tracing() -> bool:
    """Whether a tracer provider is installed (else spans are skipped: nobody would see them)."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def session_hash(storage_id: str) -> str:
    """A stable, non-reversible name for a session in traces (16 hex digits of SHA-256)."""
    return hashlib.sha256(storage_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Instruments:
    """The metric instruments, created once per process."""

    def __init__(self) -> None:
        self.duration = METER.create_histogram(
            "concierge.unit.duration", unit="s", description="Time to run one unit of work, by outcome"
        )
        self.commits = METER.create_counter("concierge.commits", description="Units of work that wrote to the store")
        self.conflicts = METER.create_counter(
            "concierge.conflicts", description="Commits refused because another process wrote first"
        )
        self.retries = METER.create_counter(
            "concierge.retries", description='Bodies run again on a conflict (on_conflict="retry")'
        )
        self.swept = METER.create_counter("concierge.sweep.deleted", description="Expired sessions the sweep deleted")
        self._held: list[Callable[[], int]] = []
        METER.create_observable_gauge(
            "concierge.sessions.held",
            callbacks=[self._observe_held],
            description="Sessions whose last committed values this process holds",
        )

    def watch_held(self, count: Callable[[], int]) -> None:
        self._held.append(count)

    def _observe_held(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(sum(count() for count in self._held))]


INSTRUMENTS = Instruments()
