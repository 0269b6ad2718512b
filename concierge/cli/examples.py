"""The bundled examples: where they are, what each one is, and loading one's server.

The examples ship inside the wheel as `concierge/examples/`; in a source
checkout or an editable install they are the top-level `examples/` directory
next to the `concierge/` package. Either way they are loaded by file path, so
the command works from any working directory.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from mcp.server.mcpserver import MCPServer

from concierge.errors import ConfigurationError

__all__ = ["RESERVED", "Example", "examples_dir", "find_examples", "listing", "load_example"]

RESERVED = frozenset({"sessions", "help"})
"""Names of `python -m concierge` commands: never taken as examples, even when a module has the name."""

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Example:
    """A bundled example: a module with a module-level `app`."""

    name: str
    path: Path
    summary: str


def examples_dir() -> Path | None:
    """Where the bundled examples live, or `None` when they cannot be found.

    A wheel carries them as `concierge/examples/`. A source checkout (and an
    editable install, which points into one) has them at `examples/` beside the
    package, recognised by the `pyproject.toml` next to it, so an unrelated
    top-level `examples` directory in site-packages is never picked up.
    """
    bundled = _PACKAGE_DIR / "examples"
    if bundled.is_dir():
        return bundled
    checkout = _PACKAGE_DIR.parent
    if (checkout / "examples").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "examples"
    return None


def _summary(path: Path) -> str:
    """The first line of a module's docstring, read without importing it."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    except (OSError, SyntaxError, ValueError) as exc:
        return f"(unreadable: {exc})"
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def find_examples() -> dict[str, Example]:
    """The bundled examples by name, sorted (private modules and `RESERVED` names excluded)."""
    where = examples_dir()
    if where is None:
        return {}
    found = {}
    for path in sorted(where.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name in RESERVED:
            continue
        found[name] = Example(name, path, _summary(path))
    return found


def load_example(example: Example) -> MCPServer:
    """Import an example by file path and return its module-level `app`.

    Raises:
        ConfigurationError: the module has no `app`, or `app` is not an MCP server
            (or building it failed on bad configuration, e.g. `CONCIERGE_STATE_URL`).
    """
    module_name = f"concierge.examples.{example.name}"
    spec = importlib.util.spec_from_file_location(module_name, example.path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot load example {example.name!r} from {example.path}")
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so the example's own imports and pickling can find it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    app = getattr(module, "app", None)
    if not isinstance(app, MCPServer):
        raise ConfigurationError(f"example {example.name!r} ({example.path}) has no module-level MCP server `app`")
    return app


def listing(examples: dict[str, Example]) -> str:
    """What `python -m concierge` prints: each example's name and summary, and how to run one."""
    if not examples:
        return "no bundled examples found\n"
    width = max(len(name) for name in examples)
    lines = [f"  {ex.name:<{width}}  {ex.summary}" for ex in examples.values()]
    return (
        "Bundled examples (run one with `python -m concierge NAME`):\n\n"
        + "\n".join(lines)
        + "\n\nOptions: --transport {stdio,streamable-http,sse} --host HOST --port PORT --stateless\n"
        + "Stored sessions: python -m concierge sessions --help\n"
    )
