"""The code in README.md and docs/ runs, and the docs site builds.

Which blocks run. A fenced ```python block is a *complete program* when it has a
line starting with `from concierge import` and no `...` (Ellipsis) anywhere in
its code. Every other ```python block is a *fragment*: it is only compiled
(top-level `await` allowed), so it must be valid Python.

How a complete program runs. Its code is executed as a fresh module named
`concierge_docs_example` (so `if __name__ == "__main__": app.run()` does not
start a server), in an empty temporary working directory (SQLite files land
there), with `CONCIERGE_STATE_URL` and `CONCIERGE_SESSION_TTL` unset. It must
define at least one `Concierge` app at module level. Each app is driven through
the SDK's in-process client, once per wire era, each time on a fresh execution
of the program: `Client(app, mode="legacy")` (handshake era: the connection is
the session) and `Client(app)` (2026-07-28: the session handle each result
carries is passed back in the next call). In each era `list_tools()` must
succeed, then:

- the calls the block declares are made in order, in one session. A call is an
  HTML comment on the lines directly above the block's opening fence:

      <!-- call: TOOL {"arg": "value"} => EXPECTED -->
      <!-- call-error: TOOL {"arg": "value"} => "text the error contains" -->

  The arguments (a JSON object) may be left out, as may `=> EXPECTED` (a JSON
  value) after `call:`. A `call:` must not be an error result and, with
  `=> EXPECTED`, must return that value: the tool's structured result, or else
  its text content read as JSON. A `call-error:` must be an error result whose
  text contains the given string.
- without declared calls, every tool the legacy connection lists (built-in
  tools aside) that has no required argument is called once, in listing order,
  and must not be an error result.

A program that defines `async def main()` is executed once more and
`await main()` must return without raising.

Other markers. A block preceded by `<!-- test: pytest -->` is written to a
temporary `test_example.py` and run with pytest in a subprocess, which must
pass. A `call`/`test` comment above any other block is refused (it would
silently test nothing).

Every block gets its own test, with the id `file:line` of its opening fence, so a
failure names the block; a program's tracebacks point at lines of the Markdown
file itself.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client

from concierge import Concierge

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DOC_FILES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]

MODULE_NAME = "concierge_docs_example"
HANDLE_KEY = "concierge/session_id"
BUILTIN_TOOLS = frozenset({"start_session", "proceed_to_next_stage", "terminate_session"})
CLEARED_ENV = ("CONCIERGE_STATE_URL", "CONCIERGE_SESSION_TTL")
ERAS = ("legacy", "2026-07-28")
DRIVE_LIMIT = 60  # seconds one era of one program may take

FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*(?P<kind>call|call-error|test):\s*(?P<body>.*?)\s*-->\s*$")


# -- reading the Markdown -----------------------------------------------------------


@dataclass(frozen=True)
class Call:
    tool: str
    arguments: dict[str, Any]
    error: bool  # a call-error: the result must be an error
    expected: Any = None
    has_expected: bool = False

    def __str__(self) -> str:
        shown = f"{self.tool}({json.dumps(self.arguments)})"
        return ("call-error " if self.error else "call ") + shown


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directives: list[tuple[str, str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def calls(self) -> list[Call]:
        return [parse_call(kind, body, self.id) for kind, body in self.directives if kind in ("call", "call-error")]

    @property
    def markers(self) -> set[str]:
        return {body for kind, body in self.directives if kind == "test"}

    def source(self) -> str:
        """The code, preceded by blank lines so that its line numbers are the Markdown file's."""
        return "\n" * self.line + self.code


def parse_call(kind: str, body: str, where: str) -> Call:
    """`TOOL [ARGS-JSON] [=> EXPECTED-JSON]`, as written in a call comment."""
    match = re.match(r"(?P<tool>[A-Za-z_][\w.-]*)\s*(?P<rest>.*)$", body)
    if match is None:
        raise ValueError(f"{where}: cannot read the call comment {body!r}")
    tool, rest = match["tool"], match["rest"].strip()
    decoder = json.JSONDecoder()
    arguments: dict[str, Any] = {}
    if rest.startswith("{"):
        arguments, end = decoder.raw_decode(rest)
        rest = rest[end:].strip()
    if not rest:
        if kind == "call-error":
            raise ValueError(f'{where}: a call-error comment needs `=> "text the error contains"`')
        return Call(tool, arguments, error=False)
    if not rest.startswith("=>"):
        raise ValueError(f"{where}: expected `=> EXPECTED` after the arguments in {body!r}")
    expected = json.loads(rest[2:].strip())
    if kind == "call-error" and not isinstance(expected, str):
        raise ValueError(f"{where}: a call-error comment expects a string the error contains, got {expected!r}")
    return Call(tool, arguments, error=kind == "call-error", expected=expected, has_expected=True)


def blocks_of(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with the comment directives right above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        info = opening["info"].strip()
        lang = info.split()[0].lower() if info else ""
        directives: list[tuple[str, str]] = []
        j = i - 1
        while j >= 0 and (d := DIRECTIVE.match(lines[j])):
            directives.insert(0, (d["kind"], d["body"]))
            j -= 1
        body: list[str] = []
        k = i + 1
        while k < len(lines):
            closing = FENCE.match(lines[k])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            text = lines[k]
            body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
            k += 1
        found.append(Block(path, i + 1, lang, "\n".join(body) + "\n", directives))
        i = k + 1
    return found


def is_python(block: Block) -> bool:
    return block.lang in ("python", "py", "python3")


def is_program(block: Block) -> bool:
    """The rule of this module's docstring: `from concierge import` and no `...`."""
    if not is_python(block) or not re.search(r"^from concierge import ", block.code, re.MULTILINE):
        return False
    try:
        tree = ast.parse(block.code)
    except SyntaxError:
        return True  # let the program's own test report it
    return not any(isinstance(node, ast.Constant) and node.value is Ellipsis for node in ast.walk(tree))


ALL_BLOCKS = [block for path in DOC_FILES for block in blocks_of(path)]
PROGRAMS = [b for b in ALL_BLOCKS if is_program(b)]
FRAGMENTS = [b for b in ALL_BLOCKS if is_python(b) and not is_program(b)]
PYTEST_EXAMPLES = [b for b in ALL_BLOCKS if "pytest" in b.markers]


def _params(blocks: list[Block]) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in blocks]


# -- running a program --------------------------------------------------------------


@contextmanager
def executed(block: Block, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The block's code run as a fresh module (not `__main__`) in `workdir`, with concierge's env unset."""
    workdir.mkdir(parents=True, exist_ok=True)
    with monkeypatch.context() as patch:
        for name in CLEARED_ENV:
            patch.delenv(name, raising=False)
        patch.chdir(workdir)
        module = types.ModuleType(MODULE_NAME)
        module.__file__ = str(workdir / "example.py")
        patch.setitem(sys.modules, MODULE_NAME, module)  # pydantic models resolve their module
        exec(compile(block.source(), str(block.path), "exec"), module.__dict__)  # noqa: S102 - running it is the test
        yield module


def apps_in(module: types.ModuleType, block: Block) -> list[Concierge]:
    apps = [value for value in vars(module).values() if isinstance(value, Concierge)]
    assert apps, f"{block.id}: a complete program must define a Concierge app at module level"
    return apps


def _text(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def value_of(result: Any, output_schema: dict[str, Any] | None) -> Any:
    """What a tool returned: its structured result (unwrapped from the SDK's `{"result": ...}`), or its text as JSON."""
    structured = result.structured_content
    if structured is not None:
        schema = output_schema or {}
        wrapped = set(schema.get("properties") or {}) == {"result"} and schema.get("required") == ["result"]
        return structured["result"] if wrapped else structured
    texts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
    texts = [t for t in texts if not t.startswith("session_id: ")]  # the handle notice of handle wires
    values = []
    for text in texts:
        try:
            values.append(json.loads(text))
        except ValueError:
            values.append(text)
    return values[0] if len(values) == 1 else values


def client_for(app: Concierge, era: str) -> Client:
    return Client(app, mode="legacy") if era == "legacy" else Client(app)


async def tools_listed(app: Concierge, era: str) -> dict[str, Any]:
    async with client_for(app, era) as client:
        listed = await client.list_tools()
    return {tool.name: tool for tool in listed.tools}


def auto_calls(tools: dict[str, Any]) -> list[Call]:
    """Every listed tool of the program's own with no required argument."""
    return [
        Call(name, {}, error=False)
        for name, tool in tools.items()
        if name not in BUILTIN_TOOLS and not set((tool.input_schema or {}).get("required") or ()) - {"session_id"}
    ]


async def drive(app: Concierge, era: str, calls: list[Call], block: Block) -> None:
    """List the tools, then make `calls` in one session of `era`, checking each result."""
    where = f"{block.id} ({app.name}, {era})"
    async with client_for(app, era) as client:
        listed = await client.list_tools()
        schemas = {tool.name: tool.output_schema for tool in listed.tools}
        takes_handle = {t.name for t in listed.tools if "session_id" in ((t.input_schema or {}).get("properties") or {})}
        handle: str | None = None
        for call in calls:
            arguments = dict(call.arguments)
            if call.tool in takes_handle:  # handle wires: pass the session back, or start one
                arguments.setdefault("session_id", handle or "new")
            result = await client.call_tool(call.tool, arguments)
            handle = (result.meta or {}).get(HANDLE_KEY, handle)
            text = _text(result)
            if call.error:
                assert result.is_error, f"{where}: {call} should fail, but returned {text!r}"
                assert call.expected in text, f"{where}: {call} failed with {text!r}, which lacks {call.expected!r}"
                continue
            assert not result.is_error, f"{where}: {call} failed: {text}"
            if call.has_expected:
                got = value_of(result, schemas.get(call.tool))
                assert got == call.expected, f"{where}: {call} returned {got!r}, expected {call.expected!r}"


@pytest.mark.anyio
@pytest.mark.parametrize("block", _params(PROGRAMS))
async def test_complete_program_runs_on_both_wire_eras(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    declared = block.calls
    calls: dict[int, list[Call]] = {}  # per app, in the order the program defines them
    for era in ERAS:
        with executed(block, tmp_path / era, monkeypatch) as module:
            for n, app in enumerate(apps_in(module, block)):
                with anyio.fail_after(DRIVE_LIMIT):
                    if n not in calls:  # the legacy era comes first: its listing picks the calls
                        calls[n] = declared or auto_calls(await tools_listed(app, era))
                    await drive(app, era, calls[n], block)
    with executed(block, tmp_path / "main", monkeypatch) as module:
        main = getattr(module, "main", None)
        if inspect.iscoroutinefunction(main):
            with anyio.fail_after(DRIVE_LIMIT):
                await main()


# -- fragments and other markers ----------------------------------------------------


@pytest.mark.parametrize("block", _params(FRAGMENTS))
def test_fragment_is_valid_python(block: Block) -> None:
    compile(block.source(), str(block.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("block", _params(PYTEST_EXAMPLES))
def test_pytest_example_passes(block: Block, tmp_path: Path) -> None:
    (tmp_path / "test_example.py").write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k not in CLEARED_ENV},
    )
    assert done.returncode == 0, f"{block.id}: pytest failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"


def test_call_and_test_comments_sit_above_a_block_they_apply_to() -> None:
    misplaced = [
        b.id
        for b in ALL_BLOCKS
        if (b.calls and not is_program(b)) or (b.markers - {"pytest"}) or ("pytest" in b.markers and not is_python(b))
    ]
    assert not misplaced, f"call/test comments above blocks that are not run as such: {misplaced}"


def test_every_call_comment_can_be_read() -> None:
    for block in ALL_BLOCKS:
        assert isinstance(block.calls, list)  # reading them raises, naming the block, on a malformed comment


def test_the_docs_hold_complete_programs() -> None:
    assert len(PROGRAMS) >= 10, [b.id for b in PROGRAMS]
    assert any(b.path.name == "README.md" for b in PROGRAMS), "the README's quick start is a complete program"


# -- the site and the README --------------------------------------------------------


def _nav_pages(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def test_every_docs_page_is_in_the_nav() -> None:
    yaml_text = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w/-]+\.md)\s*$", yaml_text, re.MULTILINE))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == listed, (
        f"pages not in the nav: {sorted(pages - listed)}; nav entries with no page: {sorted(listed - pages)}"
    )


def test_readme_links_to_docs_pages_that_exist() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert targets, "the README links to the docs pages"
    missing = [t for t in targets if not (REPO / t).is_file()]
    assert not missing, f"README links to missing pages: {missing}"


def test_readme_gives_the_commands_ci_runs() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for command in ('pip install -e ".[dev]"', "python -m concierge shop", "python -m pytest"):
        assert command in readme, f"the README shows {command!r}"
    assert re.search(r"^python -m pytest$", ci, re.MULTILINE), ".ci/run runs the README's test command"


def test_docs_build_strict(tmp_path: Path) -> None:
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        reason = f'{" and ".join(missing)} not installed; the dev extra installs them (pip install -e ".[dev]")'
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
