"""Spans and metrics of the unit of work, collected with the OpenTelemetry SDK's in-memory exporters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from helpers import handle_of, text
from mcp import Client
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from concierge import Concierge

pytestmark = pytest.mark.anyio

_EXPORTER = InMemorySpanExporter()
_READER = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def _providers() -> Iterator[None]:
    """Install SDK providers once per process (the API allows setting the global ones only once)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        pytest.fail("another test installed a tracer provider first; these tests need the SDK's")
    yield


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'otel.db'}"


def _units() -> list[Any]:
    return [s for s in _EXPORTER.get_finished_spans() if s.name == "concierge.unit"]


def _points(name: str) -> list[Any]:
    data = _READER.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def _app(url: str) -> Concierge:
    app = Concierge("otel", state_url=url)

    @app.tool()
    def add(item: str) -> list[str]:
        cart = app.get_state("cart", []) + [item]
        app.set_state("cart", cart)
        app.set_state("seen", True, scope="global")
        return cart

    @app.tool()
    def view() -> list[str]:
        return app.get_state("cart", [])

    @app.tool()
    def fail() -> None:
        app.set_state("cart", ["never"])
        raise ValueError("boom")

    return app


async def test_each_unit_is_a_span_with_a_hashed_session_the_store_buckets_timings_outcome_and_version(
    store_url: str,
) -> None:
    _EXPORTER.clear()
    app = _app(store_url)
    async with Client(app) as client:
        handle = handle_of(await client.call_tool("add", {"item": "a", "session_id": "new"}))
        await client.call_tool("view", {"session_id": handle})
        assert (await client.call_tool("fail", {"session_id": handle})).is_error
        gone = await client.call_tool("view", {"session_id": "A" * 43})
        assert gone.is_error, text(gone)
    spans = _units()
    outcomes = [s.attributes["concierge.outcome"] for s in spans]
    assert outcomes == ["committed", "nothing to write", "not kept", "unknown session"]
    committed = spans[0]
    attrs = committed.attributes
    assert attrs["concierge.store"] == store_url.partition(":")[0]
    assert attrs["concierge.scopes"] == ("global",)
    assert attrs["concierge.version"] == 1 and attrs["concierge.commit_ms"] >= 0 and attrs["concierge.load_ms"] >= 0
    assert len(attrs["mcp.session.id"]) == 16
    for span in spans:  # never the raw handle, in any attribute
        assert all(handle not in str(value) for value in span.attributes.values())
    parent = committed.parent
    assert parent is not None  # a child of the SDK's own request span
    assert any(s.context.span_id == parent.span_id and s.name.startswith("tools/call") for s in
               _EXPORTER.get_finished_spans())


async def test_metrics_count_commits_and_conflicts_and_time_units_by_outcome(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'metrics.db'}"
    one, two = _app(url), _app(url)
    before = sum(p.value for p in _points("concierge.commits"))
    conflicts_before = sum(p.value for p in _points("concierge.conflicts"))
    gate = anyio.Event()
    read = anyio.Event()

    @one.tool()
    async def slow_bump() -> int:
        n = one.get_state("n", 0, scope="global") + 1
        read.set()
        await gate.wait()
        one.set_state("n", n, scope="global")
        return n

    @two.tool()
    def bump() -> int:
        n = two.get_state("n", 0, scope="global") + 1
        two.set_state("n", n, scope="global")
        return n

    async with Client(one, mode="legacy") as a, Client(two, mode="legacy") as b:
        await a.call_tool("add", {"item": "x"})
        results: list[Any] = []

        async def slow() -> None:
            results.append(await a.call_tool("slow_bump", {}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await read.wait()
            await b.call_tool("bump", {})
            gate.set()
    assert results[0].is_error and "conflict" in text(results[0])
    assert sum(p.value for p in _points("concierge.commits")) - before == 2
    assert sum(p.value for p in _points("concierge.conflicts")) - conflicts_before == 1
    outcomes = {dict(p.attributes)["outcome"] for p in _points("concierge.unit.duration")}
    assert {"committed", "conflict"} <= outcomes
    held = _points("concierge.sessions.held")
    assert held and held[-1].value >= 1
