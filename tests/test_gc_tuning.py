"""`tune_gc`: a server that concierge runs itself freezes its start-up objects and collects less often.

Through the real thing: a stdio subprocess (`app.run()`), a streamable-HTTP
subprocess both ways it can be served (`app.run("streamable-http")` and the
CLI's own serving), each with the option on and off; and an app used
in-process, which must leave the host's collector alone.
"""

from __future__ import annotations

import gc
import sys

import anyio
import pytest
from helpers import SERVERS, ServerProcess, free_port, payload, running, server_env
from mcp import Client, StdioServerParameters

from concierge import Concierge, ConfigurationError
from concierge.serve.process import YOUNG_THRESHOLD

pytestmark = pytest.mark.anyio

GC_SERVER = SERVERS / "gc_server.py"
LIMIT = 30


def _default_threshold() -> int:
    """CPython's young-generation threshold in a fresh interpreter (700 on every version this runs on)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", "import gc; print(gc.get_threshold()[0])"], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def _check(report: dict, tuned: bool) -> None:
    if tuned:
        assert report["threshold"][0] == YOUNG_THRESHOLD
        # the SDK, pydantic, uvicorn and the app: tens of thousands of objects, out of every collection
        assert report["frozen"] > 10_000
    else:
        assert report["threshold"][0] == _default_threshold()
        assert report["frozen"] == 0


@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "untouched"])
async def test_a_stdio_server_run_by_app_run_tunes_its_collector_unless_told_not_to(tuned: bool) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=[str(GC_SERVER), "stdio", *([] if tuned else ["--no-tune"])],
        env=server_env(None),
    )
    with anyio.fail_after(LIMIT):
        async with Client(params) as client:
            _check(payload(await client.call_tool("collector", {})), tuned)


@pytest.mark.parametrize("how", ["streamable-http", "cli-http"])
@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "untouched"])
async def test_an_http_server_tunes_its_collector_unless_told_not_to(how: str, tuned: bool) -> None:
    port = free_port()
    server = ServerProcess(
        [str(GC_SERVER), how, str(port), *([] if tuned else ["--no-tune"])], port=port, state_url=None
    )
    with running(server), anyio.fail_after(LIMIT):
        async with Client(server.url, mode="legacy") as client:
            report = payload(await client.call_tool("collector", {}))
            assert report["pid"] == server.pid
            _check(report, tuned)


async def test_an_app_used_in_process_leaves_the_host_s_collector_alone() -> None:
    app = Concierge("embedded", state_url="memory://")
    before = (gc.get_threshold(), gc.get_freeze_count())

    @app.tool()
    def collector() -> dict:
        """Report the collector."""
        return {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()}

    async with Client(app, mode="legacy") as client:
        report = payload(await client.call_tool("collector", {}))
    assert (tuple(report["threshold"]), report["frozen"]) == before
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_tune_gc_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError, match="tune_gc must be True or False, not 'yes'"):
        Concierge("x", state_url="memory://", tune_gc="yes")  # type: ignore[arg-type]
