"""Shared utilities for the transport tests: free ports, server subprocesses, result parsing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mcp_types import CallToolResult

HANDLE_KEY = "concierge/session_id"
STATUS_KEY = "concierge/session"
NEW: dict[str, str] = {"session_id": "new"}
"""The arguments that start a new session from any stateful tool on a handle wire."""
SERVERS = Path(__file__).parent / "servers"
CART_SERVER = SERVERS / "cart_server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(state_url: str | None) -> dict[str, str]:
    """This process's environment with `CONCIERGE_STATE_URL` set (or removed)."""
    env = dict(os.environ)
    env.pop("CONCIERGE_STATE_URL", None)
    if state_url is not None:
        env["CONCIERGE_STATE_URL"] = state_url
    return env


class ServerProcess:
    """A server subprocess on 127.0.0.1; its stderr goes to a log file shown when it fails.

    `start()` returns at once; `wait_ready()` waits (bounded) until the port accepts
    connections. `kill()` is SIGKILL, always safe to call.
    """

    def __init__(self, args: list[str], *, port: int, state_url: str | None, path: str = "/mcp") -> None:
        self.args = args
        self.port = port
        self.state_url = state_url
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="concierge-server-", suffix=".log", delete=False)

    @classmethod
    def cart(
        cls, transport: str, *, state_url: str | None = None, port: int | None = None, stateless: bool = False
    ) -> ServerProcess:
        port = port or free_port()
        args = [str(CART_SERVER), transport, str(port)] + (["--stateless"] if stateless else [])
        return cls(args, port=port, state_url=state_url, path="/sse" if transport == "sse" else "/mcp")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            env=server_env(self.state_url),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        return self

    def log(self) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")[-4000:]
        except OSError:
            return "<no log>"

    def wait_ready(self, timeout: float = 20.0) -> ServerProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"server did not listen on port {self.port} within {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the server (no clean shutdown) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        """Kill the server and drop its log, echoing the log to stderr (pytest shows it when a test fails)."""
        self.kill()
        log = self.log().strip()
        if log:
            print(
                f"--- log of server {' '.join(self.args)} (pid {self.proc.pid if self.proc else None}) ---\n{log}",
                file=sys.stderr,
            )
        try:
            os.unlink(self._log.name)
        except OSError:
            pass
        self._log.close()


def auth_server(state_url: str = "memory://", port: int | None = None) -> ServerProcess:
    """tests/servers/auth_server.py (bearer tokens `token-<name>`), not started yet."""
    port = port or free_port()
    return ServerProcess([str(SERVERS / "auth_server.py"), str(port)], port=port, state_url=state_url)


@contextmanager
def running(*servers: ServerProcess) -> Iterator[None]:
    """Start `servers` (as `start_all`) and close them all on leaving."""
    start_all(*servers)
    try:
        yield
    finally:
        for server in servers:
            server.close()


def start_all(*servers: ServerProcess, timeout: float = 20.0) -> None:
    """Start servers in parallel and wait until each listens; kill them all if one fails."""
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout)
    except BaseException:
        for server in servers:
            server.close()
        raise


# -- results --------------------------------------------------------------------------
def texts(result: CallToolResult) -> list[str]:
    return [c.text for c in result.content if getattr(c, "type", None) == "text"]


def notice(result: CallToolResult) -> str | None:
    """The session-handle notice concierge puts first on handle wires, or `None`."""
    first = texts(result)[:1]
    return first[0] if first and first[0].startswith("session_id: ") else None


def text(result: CallToolResult) -> str:
    return "\n".join(texts(result))


def payload(result: CallToolResult) -> Any:
    """The tool's return value: structured content, else the JSON of the first text block."""
    assert not result.is_error, f"tool call failed: {text(result)}"
    if isinstance(result.structured_content, dict) and "result" not in result.structured_content:
        return result.structured_content
    blocks = texts(result)
    return json.loads(blocks[1] if notice(result) is not None else blocks[0])


def handle_of(result: CallToolResult) -> str:
    meta = result.meta or {}
    handle = meta.get(HANDLE_KEY)
    assert isinstance(handle, str) and handle, f"no {HANDLE_KEY} in result _meta: {meta!r}"
    return handle


def has_handle(result: CallToolResult) -> bool:
    return HANDLE_KEY in (result.meta or {})


def status_of(result: CallToolResult) -> str | None:
    """`_meta["concierge/session"]`: what became of the handle the call carried (handle wires only)."""
    return (result.meta or {}).get(STATUS_KEY)


def new_session(mode: str) -> dict[str, str]:
    """The arguments that start a session on a first call: none on a legacy connection (it is the session)."""
    return {} if mode == "legacy" else dict(NEW)


SESSION_PREFIXES = ("h:", "http:", "sse:", "stdio:", "conn:")
"""The storage-id prefixes of sessions (the store also holds shared buckets and bookkeeping records)."""


async def stored_sessions(app: Any) -> list[str]:
    """The storage ids of every session in a running app's store (expired ones too), nothing else it holds."""
    listed = await app.state_backend.list_sessions(now=time.time(), include_expired=True, limit=10_000)
    return [summary.session_id for summary in listed if summary.session_id.startswith(SESSION_PREFIXES)]
