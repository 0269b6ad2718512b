"""The JSON codec of state values and the rules for state keys.

Values are encoded once, at `set_state`, and decoded fresh for every
`get_state`, so every store gives the same semantics: what comes back is what
JSON keeps.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from concierge.errors import StateKeyError, StateTypeError, StateValueError

__all__ = ["MAX_KEY_LENGTH", "check_key", "decode", "encode"]

MAX_KEY_LENGTH = 256
"""Longest state key accepted, in characters."""


def check_key(key: object) -> str:
    """Validate a state key: a non-empty `str` of at most `MAX_KEY_LENGTH` characters.

    NUL and lone surrogates are refused too: PostgreSQL cannot store a NUL in text, and
    no store (nor the JSON on the wire) can carry a lone surrogate.
    """
    if type(key) is str and 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and "\x00" not in key:
        return key  # the common case, checked at once
    if not isinstance(key, str):
        raise StateKeyError(f"state key must be a str, not {type(key).__name__}")
    if not key:
        raise StateKeyError("state key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise StateKeyError(f"state key {key[:32]!r}... is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    if "\x00" in key:  # PostgreSQL text cannot hold it; refused everywhere so tools behave alike on every store
        raise StateKeyError(f"state key {key[:32]!r} contains a NUL character (U+0000), which no store accepts")
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError:  # a lone surrogate: no store can keep it, and it cannot be sent as JSON
            raise StateKeyError(
                f"state key {key[:32]!r} is not valid Unicode text (it contains a lone surrogate)"
            ) from None
    return key


def encode(key: str, value: Any, max_bytes: int | None = None) -> str:
    """Encode `value` as compact JSON text (pydantic models via `model_dump(mode="json")`).

    Raises:
        StateTypeError: the value (or something inside it) is not JSON-serialisable.
        StateValueError: the encoding is longer than `max_bytes`.
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        text = _ENCODER.encode(value)
    except _NotJSON as exc:
        hint = _HINTS.get(
            exc.type_name,
            "convert it to a JSON type (dict, list, str, int, float, bool, None)",
        )
        where = "value" if exc.value is value else "value contains an object that"
        raise StateTypeError(
            f"state key {key!r}: {where} of type {exc.type_name} is not JSON-serialisable; {hint}"
        ) from None
    except ValueError as exc:  # NaN / Infinity, or a circular reference
        raise StateTypeError(f"state key {key!r}: value is not valid JSON ({exc})") from None
    except TypeError as exc:  # e.g. a dict key that is not str, int, float, bool or None
        raise StateTypeError(f"state key {key!r}: value is not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise StateTypeError(f"state key {key!r}: value is nested too deeply to encode as JSON") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise StateTypeError(
            f"state key {key!r}: value contains a str that is not valid Unicode text (a lone surrogate)"
        ) from None
    if max_bytes is not None and size > max_bytes:
        raise StateValueError(
            f"state key {key!r}: value is {size} bytes as JSON; the limit (max_value_bytes) is {max_bytes}"
        )
    return text


def decode(text: str) -> Any:
    """A fresh Python value from stored JSON text."""
    return json.loads(text)


class _NotJSON(TypeError):
    def __init__(self, value: Any) -> None:
        super().__init__(type(value).__name__)
        self.value = value
        self.type_name = type(value).__name__


def _reject(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise _NotJSON(value)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_reject)
"""One encoder for every value (`json.dumps` with options builds a new one per call)."""

_HINTS = {
    "set": "convert it to a list",
    "frozenset": "convert it to a list",
    "bytes": "decode it to a str (e.g. base64)",
    "datetime": "store value.isoformat()",
    "date": "store value.isoformat()",
    "Decimal": "store it as a str or float",
    "UUID": "store str(value)",
}
