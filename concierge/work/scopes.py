"""Which shared scopes a piece of user code uses, and what it wants done on a conflict.

A tool (or hook) that reads or writes the `user` or `global` scope needs that
bucket loaded and locked for its call. Three ways get it there, none of which
runs the tool twice:

1. declared: `@app.tool(scopes={"user"})` - loaded before the tool runs;
2. found: the scope is named next to a `scope` keyword in the function's own
   code (`app.get_state("k", scope="user")`) - loaded before it runs too;
3. on first use: a sync tool runs in a worker thread, which can wait while the
   bucket is loaded; the scope is then remembered and loaded up front next time.

An async tool that reaches an undeclared scope some other way (a helper given
the scope as a variable) cannot wait inside the synchronous `get_state`: it
gets `UndeclaredScopeError`, naming the fix.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from concierge.errors import ConfigurationError

__all__ = [
    "ATTEMPTS",
    "SCOPES",
    "SHARED_SCOPES",
    "OnConflict",
    "Plan",
    "Plans",
    "declared_scopes",
    "on_conflict_of",
    "scopes_named_in",
]

SCOPES = ("session", "user", "global")
"""Where a state key lives: this session, the caller across sessions, or everyone."""

SHARED_SCOPES = ("user", "global")
"""The scopes many sessions write to; always locked and loaded in this order."""

OnConflict = Literal["error", "retry"]

ATTEMPTS = 16
"""Runs of a call with `on_conflict="retry"` before the conflict is reported."""

START = "hook:start"
END = "hook:end"


def declared_scopes(scopes: Iterable[str] | str | None, what: str) -> frozenset[str]:
    """Validate a `scopes=` declaration; `"session"` is always there and may be named."""
    if scopes is None:
        return frozenset()
    if isinstance(scopes, str):
        scopes = (scopes,)
    found = set()
    for scope in scopes:
        if scope not in SCOPES:
            raise ConfigurationError(
                f"{what}: scopes must name {', '.join(map(repr, SCOPES))}, not {scope!r}"
            )
        if scope != "session":
            found.add(scope)
    return frozenset(found)


def on_conflict_of(value: object, what: str) -> OnConflict:
    if value not in ("error", "retry"):
        raise ConfigurationError(f"{what}: on_conflict must be 'error' or 'retry', not {value!r}")
    return value  # type: ignore[return-value]


def scopes_named_in(fn: Callable[..., Any]) -> set[str]:
    """The shared scopes `fn`'s own code names next to a `scope` keyword, found in its bytecode.

    Only a way to load a bucket before the code runs: missing one costs
    nothing but the load on first use (sync code) or a clear error (async code).
    """
    code = getattr(inspect.unwrap(fn), "__code__", None)
    found: set[str] = set()
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        current = stack.pop()
        constants = set()
        for const in current.co_consts:
            if isinstance(const, types.CodeType):
                stack.append(const)
            elif isinstance(const, str):
                constants.add(const)
            elif isinstance(const, tuple):
                constants.update(c for c in const if isinstance(c, str))
        if "scope" in constants or "scope" in current.co_names:  # keyword names are constant tuples
            found.update(s for s in SHARED_SCOPES if s in constants)
    return found


STATE_API = frozenset(
    {
        "get_state",
        "set_state",
        "delete_state",
        "live",
        "alive",
        "cached",
        "acached",
        "resource",
        "aresource",
        "current_unit",
        "working_copy",
    }
)
"""Names whose use means code reaches a session's state (or its live objects)."""


def uses_state(fn: Callable[..., Any], *, depth: int = 4) -> bool:
    """Whether `fn`, or a function it names (a module-level helper, a closure), uses the state API.

    A careful guess made at registration: a tool it calls "stateless" gets no
    `session_id` argument on handle wires, and if it reaches state after all,
    the state call raises a clear error naming the fix (declare `scopes=`).
    """
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(fn, 0)]
    while todo:
        target, level = todo.pop()
        target = getattr(target, "__func__", target)  # a bound method: its function
        wrapped = getattr(target, "__wrapped__", None)  # a decorator's wrapper and what it wraps both count
        if wrapped is not None:
            todo.append((wrapped, level))
        code = getattr(target, "__code__", None)
        if not isinstance(code, types.CodeType) or id(code) in seen:
            continue
        seen.add(id(code))
        codes = [code]
        while codes:
            c = codes.pop()
            if STATE_API & set(c.co_names):
                return True
            codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        if level >= depth:
            continue
        namespace = getattr(target, "__globals__", {})
        cells = [cell.cell_contents for cell in getattr(target, "__closure__", None) or () if _filled(cell)]
        names = [namespace.get(n) for n in _all_names(code)]
        todo.extend((f, level + 1) for f in [*cells, *names] if isinstance(f, (types.FunctionType, types.MethodType)))
    return False


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _all_names(code: types.CodeType) -> set[str]:
    names: set[str] = set()
    codes = [code]
    while codes:
        c = codes.pop()
        names.update(c.co_names)
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names


@dataclass
class Plan:
    """How one piece of user code runs in a unit of work.

    Attributes:
        scopes: the shared scopes loaded before it runs (declared, found, or
            learned from an earlier call that loaded them on first use).
        retry: re-run it on a cross-process conflict (`on_conflict="retry"`).
        declared: the scopes its author declared (for messages).
        stateful: it uses session state (declared, or found by `uses_state`):
            on handle wires it takes the `session_id` argument.
    """

    scopes: set[str] = field(default_factory=set)
    retry: bool = False
    declared: frozenset[str] = frozenset()
    stateful: bool = True


class Plans:
    """The plan of every tool, hook kind, resource and prompt, by key (`tool:<name>`, `hook:start`, ...)."""

    def __init__(self, default: OnConflict = "error") -> None:
        self.default = default
        self._plans: dict[str, Plan] = {}

    def register(
        self,
        key: str,
        fn: Callable[..., Any] | None,
        *,
        scopes: Iterable[str] | str | None = None,
        on_conflict: OnConflict | None = None,
    ) -> Plan:
        """Record what `fn`, registered under `key`, uses and wants (adding to an earlier registration)."""
        given = None if scopes is None else tuple((scopes,) if isinstance(scopes, str) else scopes)
        declared = declared_scopes(given, key)
        plan = self._plans.setdefault(key, Plan(retry=self.default == "retry"))
        plan.declared |= declared
        plan.scopes |= declared | (scopes_named_in(fn) if fn is not None else set())
        plan.stateful = bool(given) or fn is None or uses_state(fn)
        if on_conflict is not None:
            plan.retry = on_conflict_of(on_conflict, key) == "retry"
        return plan

    def of(self, key: str) -> Plan:
        """The plan under `key`; one with the app's defaults when nothing registered it."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = Plan(retry=self.default == "retry")
        return plan
