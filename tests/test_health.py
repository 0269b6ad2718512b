"""`GET /healthz` through a real streamable-HTTP server: 200 with the store up, 503 within its timeout
with PostgreSQL stopped, and no password in any body or log."""

from __future__ import annotations

import time

import httpx2
import pytest
from helpers import ServerProcess, start_all
from test_faults import _StoppablePostgres, own_postgres  # noqa: F401 - the fixture, shared

pytestmark = pytest.mark.anyio

PASSWORD = "pw-never-shown-7Qx"


def _get(server: ServerProcess, path: str = "/healthz") -> httpx2.Response:
    return httpx2.get(f"http://127.0.0.1:{server.port}{path}", timeout=30)


def test_healthz_is_200_with_the_store_up_and_names_the_store(state_url: str) -> None:
    server = ServerProcess.cart("streamable-http", state_url=state_url)
    start_all(server)
    try:
        answer = _get(server)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        scheme = {"memory": "memory", "sqlite": "sqlite", "postgresql": "postgresql", "redis": "redis"}
        assert body["status"] == "ok" and body["store"] == scheme[state_url.partition(":")[0]]
        assert isinstance(body["latency_ms"], (int, float)) and body["latency_ms"] >= 0
    finally:
        server.close()


@pytest.mark.postgres
def test_healthz_is_503_within_its_timeout_with_postgres_stopped_and_never_shows_the_password(
    own_postgres: _StoppablePostgres,  # noqa: F811
) -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{own_postgres.port}/postgres"  # trust auth: any password
    server = ServerProcess.cart("streamable-http", state_url=url)
    start_all(server)
    try:
        assert _get(server).status_code == 200
        own_postgres.halt()
        started = time.monotonic()
        answer = _get(server)
        took = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["status"] == "unavailable" and body["store"] == "postgresql" and body["error"]
        assert took < 2.0 + 3.0, f"the health check took {took:.1f} s; its timeout is 2 s"
        own_postgres.resume()
        deadline = time.monotonic() + 30
        while (answer := _get(server)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answer.status_code == 200, answer.text  # the same process recovers
        log = server.log()
        assert PASSWORD not in log and PASSWORD not in body["error"], "a password reached a body or the log"
    finally:
        server.close()


def test_the_health_route_is_on_by_default_on_every_http_transport_and_can_be_turned_off() -> None:
    from concierge import Concierge

    on = Concierge("on")
    for app in (on.streamable_http_app(), on.sse_app()):
        assert "/healthz" in [getattr(r, "path", None) for r in app.routes]
    off = Concierge("off", health_path=None)
    assert "/healthz" not in [getattr(r, "path", None) for r in off.streamable_http_app().routes]
