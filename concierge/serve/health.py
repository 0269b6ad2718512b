"""`GET /healthz` on the HTTP transports: can this process reach its store, and how fast.

Answers 200 `{"status": "ok", "store": "<scheme>", "latency_ms": N}` when one
read of the store succeeds within the timeout, else 503 with `"status":
"unavailable"` and why (the store's own message, which never carries its
password, or that it did not answer in time). Like every custom route it needs
no authorization: it tells nothing about any session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from concierge.errors import StateUnavailableError
from concierge.work import SessionStore

__all__ = ["DEFAULT_HEALTH_TIMEOUT", "health_endpoint"]

logger = logging.getLogger("concierge")

DEFAULT_HEALTH_TIMEOUT = 2.0
_PROBE = "health-probe"
"""A record id no session has (no prefix): reading it is one plain round trip."""


def health_endpoint(store: SessionStore, timeout: float) -> Callable[[Request], Awaitable[JSONResponse]]:
    """The Starlette handler of the health route for `store`."""

    async def healthz(request: Request) -> JSONResponse:
        backend = store.backend
        started = time.perf_counter()
        body: dict[str, Any] = {"store": backend.scheme or type(backend).__name__}
        try:
            with anyio.fail_after(timeout):
                await backend.load(_PROBE, now=store.clock())
        except TimeoutError:
            reason = f"the store did not answer within {timeout:g} s"
        except StateUnavailableError as exc:
            reason = str(exc)
        except Exception as exc:  # a driver error no backend maps: name its kind only
            reason = f"the store failed ({type(exc).__name__})"
        else:
            body.update(status="ok", latency_ms=round((time.perf_counter() - started) * 1000, 2))
            return JSONResponse(body)
        logger.warning("concierge: health check failed: %s", reason)
        body.update(status="unavailable", error=reason, latency_ms=round((time.perf_counter() - started) * 1000, 2))
        return JSONResponse(body, status_code=503)

    return healthz
