"""`python -m concierge`: the example listing, errors, and serving a bundled example for real.

Every command runs as a subprocess of this interpreter from a directory outside
the repository, so the examples must be found by the package itself, not by
the working directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult

import concierge.__main__
import concierge.cli.examples as examples
from concierge.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = ("shop", "travel", "workflow")
HANDLE_KEY = "concierge/session_id"
LIMIT = 30


def _env() -> dict[str, str]:
    """This environment without any concierge setting: the examples use the memory store."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONCIERGE_")}


def _cli(*args: str, python: str = sys.executable, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "concierge", *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )


def _payload(result: CallToolResult) -> dict:
    """The tool's JSON result (after the handle notice, where handles are in use)."""
    assert not result.is_error, result.content
    blocks = [c.text for c in result.content if getattr(c, "type", None) == "text"]
    return json.loads(blocks[1] if blocks[0].startswith("session_id: ") else blocks[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory with no `examples/` in it."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    return where


# -- listing and errors -------------------------------------------------------------
def test_listing_names_every_bundled_example_with_its_summary(outside: Path) -> None:
    done = _cli(cwd=outside)
    assert done.returncode == 0, done.stderr
    for name in EXAMPLES:
        assert f"  {name} " in done.stdout
    assert "accumulator pattern" in done.stdout  # travel's first docstring line
    assert "guard pattern" in done.stdout  # shop's


def test_unknown_example_exits_2_with_the_reason_on_stderr_and_nothing_on_stdout(outside: Path) -> None:
    done = _cli("no-such-example", cwd=outside)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "unknown example 'no-such-example'" in done.stderr
    assert "shop, travel, workflow" in done.stderr


def test_private_modules_and_reserved_command_names_are_not_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("demo", "sessions", "_helpers"):
        (tmp_path / f"{name}.py").write_text(f'"""The {name} module.\n\nMore text."""\napp = None\n')
    monkeypatch.setattr(examples, "examples_dir", lambda: tmp_path)
    found = examples.find_examples()
    assert list(found) == ["demo"]
    assert found["demo"].summary == "The demo module."


def test_the_console_script_and_python_m_run_the_same_main() -> None:
    assert concierge.__main__.main is main


def test_stateless_without_streamable_http_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shop", "--stateless"]) == 2
    assert "--stateless applies only to --transport streamable-http" in capsys.readouterr().err


def test_bad_state_url_is_reported_at_start_without_the_password(outside: Path) -> None:
    env = {**_env(), "CONCIERGE_STATE_URL": "mysql://user:hunter2@localhost/0"}
    done = subprocess.run(
        [sys.executable, "-m", "concierge", "shop"],
        cwd=outside,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "unsupported scheme 'mysql'" in done.stderr
    assert "hunter2" not in done.stderr


def test_unreachable_store_exits_1_with_the_reason_and_a_clean_stdout(outside: Path, tmp_path: Path) -> None:
    env = {**_env(), "CONCIERGE_STATE_URL": f"sqlite:///{tmp_path / 'missing-dir' / 'state.db'}"}
    done = subprocess.run(
        [sys.executable, "-m", "concierge", "shop"],
        cwd=outside,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("concierge: error: ") and "missing-dir" in done.stderr
    assert "Traceback" not in done.stderr


# -- serving over stdio -------------------------------------------------------------
def test_stdio_server_writes_only_json_rpc_to_stdout_and_exits_when_stdin_closes(outside: Path) -> None:
    messages = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "add_to_cart", "arguments": {"product_id": "apple"}},
        },
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "concierge", "shop"],
        cwd=outside,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("".join(json.dumps(m) + "\n" for m in messages))
        proc.stdin.flush()
        lines = []
        while not any(json.loads(line).get("id") == 2 for line in lines):  # a stray print fails to parse here
            line = proc.stdout.readline()
            assert line, f"stdout closed early; stderr:\n{proc.stderr.read() if proc.stderr else ''}"
            lines.append(line)
        rest, err = proc.communicate(timeout=LIMIT)  # closes stdin: the server must exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    replies = [json.loads(line) for line in [*lines, *rest.splitlines()]]
    assert all(r.get("jsonrpc") == "2.0" for r in replies)
    assert [r["id"] for r in replies if "id" in r] == [1, 2]
    assert json.loads(replies[-1]["result"]["content"][0]["text"]) == {"cart": ["apple"]}


def _stdio(python: str, cwd: Path, example: str = "shop") -> StdioServerParameters:
    return StdioServerParameters(command=python, args=["-m", "concierge", example], env=_env(), cwd=str(cwd))


async def _shop_round_trip(params: StdioServerParameters, mode: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(params, mode=mode) as client:
            assert (client.protocol_version == "2026-07-28") == (mode == "auto")
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"add_to_cart", "view_cart", "checkout"} <= tools
            assert "start_session" not in tools, "stdio has one session per process: no handles"
            first = await client.call_tool("add_to_cart", {"product_id": "apple"})
            assert HANDLE_KEY not in (first.meta or {})
            await client.call_tool("add_to_cart", {"product_id": "milk", "quantity": 2})
            cart = _payload(await client.call_tool("view_cart", {}))
            assert cart == {"cart": ["apple", "milk", "milk"], "total": 2.9}


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_stdio_shop_example_keeps_the_cart_between_calls(outside: Path, mode: str) -> None:
    await _shop_round_trip(_stdio(sys.executable, outside), mode)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_stdio_travel_example_books_only_after_both_selections(outside: Path, mode: str) -> None:
    with anyio.fail_after(LIMIT):
        async with Client(_stdio(sys.executable, outside, "travel"), mode=mode) as client:
            refused = await client.call_tool("book_trip", {"traveller": "Ada"})
            assert refused.is_error
            assert "no flight and no hotel selected" in refused.content[0].text
            await client.call_tool("select_flight", {"flight_id": "BA117"})
            await client.call_tool("select_hotel", {"hotel_id": "pod51", "nights": 2})
            booked = _payload(await client.call_tool("book_trip", {"traveller": "Ada"}))
            assert booked["booking"] == "TRIP-0001"
            assert booked["total"] == 495.0 + 2 * 120.0
            again = await client.call_tool("book_trip", {"traveller": "Ada"})
            assert again.is_error, "a booking clears the selections"


# -- serving over HTTP --------------------------------------------------------------
@pytest.fixture
def http_server(request: pytest.FixtureRequest, outside: Path) -> Iterator[str]:
    """`python -m concierge shop` with the transport flags in `request.param`; yields its URL."""
    flags: list[str] = list(request.param)
    port = _free_port()
    log = outside / "server.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "concierge", "shop", *flags, "--port", str(port)],
            cwd=outside,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + LIMIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server did not listen:\n{log.read_text(errors='replace')}")
                time.sleep(0.05)
        path = "/sse" if "sse" in flags else "/mcp"
        yield f"http://127.0.0.1:{port}{path}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


async def _add_twice_and_view(client: Client) -> tuple[dict, bool]:
    """Add two products, starting a session and passing its handle back where the tools take one;
    returns the cart and whether handles were used."""
    tools = {t.name: t for t in (await client.list_tools()).tools}
    takes_handle = "session_id" in ((tools["add_to_cart"].input_schema or {}).get("properties") or {})
    extra: dict[str, str] = {"session_id": "new"} if takes_handle else {}
    for product in ("apple", "bread"):
        result = await client.call_tool("add_to_cart", {"product_id": product, **extra})
        handle = (result.meta or {}).get(HANDLE_KEY)
        assert bool(handle) == takes_handle, result
        if handle:
            extra["session_id"] = handle
    return _payload(await client.call_tool("view_cart", extra)), takes_handle


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("http_server", "mode", "expect_handles"),
    [
        (["--transport", "streamable-http"], "legacy", False),
        (["--transport", "streamable-http"], "auto", True),
        (["--transport", "streamable-http", "--stateless"], "legacy", True),
        (["--transport", "sse"], "legacy", False),
    ],
    indirect=["http_server"],
    ids=["http-legacy", "http-modern", "stateless-legacy", "sse-legacy"],
)
async def test_http_flags_reach_the_server(http_server: str, mode: str, expect_handles: bool) -> None:
    if http_server.endswith("/sse"):
        from mcp.client.sse import sse_client

        target = sse_client(http_server)
    else:
        target = http_server
    with anyio.fail_after(LIMIT):
        async with Client(target, mode=mode) as client:
            cart, used_handles = await _add_twice_and_view(client)
    assert cart == {"cart": ["apple", "bread"], "total": 2.75}
    assert used_handles == expect_handles


# -- the installed wheel --------------------------------------------------------------
def _site_dirs() -> list[str]:
    """Where this interpreter finds its installed packages: its venv's, or the base interpreter's."""
    paths = sysconfig.get_paths()
    dirs = [*site.getsitepackages(), paths["purelib"], paths["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _venv_seeing_this_environment(venv: Path, wheel: Path) -> str:
    """A venv with `wheel` installed in it that also sees this interpreter's packages; returns its python.

    The wheel goes in first, while the venv sees nothing else, so pip finds no
    other concierge to replace. Then a `.pth` file appends this environment's
    site directories to the venv's path: after its own site-packages, so its
    own concierge wins, and as plain paths, so the `.pth` files there (an
    editable install of this checkout among them) are not run.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=LIMIT)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=LIMIT,
    ).stdout.strip()
    (Path(purelib) / "_running_environment.pth").write_text("".join(f"{d}\n" for d in _site_dirs()))
    return python


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of this checkout, built offline by this interpreter with the hatchling installed here."""
    if importlib.util.find_spec("hatchling") is None or importlib.util.find_spec("pip") is None:
        pytest.skip("pip and hatchling (the build backend) are needed to build the wheel offline")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(wheels),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("concierge-*.whl")
    return wheel


@pytest.mark.anyio
async def test_wheel_install_bundles_the_examples_and_serves_them(tmp_path: Path, outside: Path) -> None:
    """A non-editable install finds its examples inside the package (`concierge/examples`).

    Offline, in a venv or not: the wheel is built by this interpreter with the
    hatchling installed here (no build isolation, no index), and the venv it
    goes into borrows this interpreter's packages for concierge's dependencies.
    """
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    python = _venv_seeing_this_environment(venv, wheel)
    where = subprocess.run(
        [python, "-c", "import concierge.cli.examples as m; print(m.examples_dir())"],
        cwd=outside,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), "the installed package must use its bundled examples"
    listing = _cli(python=python, cwd=outside)
    assert listing.returncode == 0, listing.stderr
    assert all(f"  {name} " in listing.stdout for name in EXAMPLES)
    await _shop_round_trip(_stdio(python, outside), "legacy")


@pytest.mark.anyio
async def test_uvx_from_the_built_wheel_serves_the_shop_over_stdio(tmp_path: Path, outside: Path) -> None:
    """`uvx --from <wheel> concierge shop`, as docs/clients.md gives it to Claude Code and Claude Desktop.

    uv (a dev dependency) puts the wheel and its dependencies, resolved from
    PyPI into a cache of this test's own, in a throwaway environment on this
    interpreter's Python (it downloads no Python).
    """
    from uv import find_uv_bin

    uvx = Path(find_uv_bin()).with_name("uvx")
    assert uvx.is_file(), f"uv installs uvx beside {find_uv_bin()}"
    wheel = _build_wheel(tmp_path)
    env = {**_env(), "UV_CACHE_DIR": str(tmp_path / "uv-cache"), "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1"}
    command = [str(uvx), "--python", sys.executable, "--from", str(wheel), "concierge"]
    with anyio.fail_after(300):  # the first run installs; the servers below start from the cache
        listing = await anyio.run_process(command, cwd=outside, env=env, check=False)
    assert listing.returncode == 0, listing.stderr.decode(errors="replace")
    assert all(f"  {name} " in listing.stdout.decode() for name in EXAMPLES)
    params = StdioServerParameters(command=command[0], args=[*command[1:], "shop"], env=env, cwd=str(outside))
    for mode in ("legacy", "auto"):
        await _shop_round_trip(params, mode)
