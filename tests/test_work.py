"""Unit tests of the unit of work's value rules (beside the client-level tests)."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from pydantic import BaseModel

from concierge.errors import StateKeyError, StateTypeError, StateValueError
from concierge.work import MAX_KEY_LENGTH, WorkingCopy, encode


class Flight(BaseModel):
    code: str
    when: datetime


def test_set_of_values_names_key_and_type_and_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"state key 'cart'.*type set.*convert it to a list"):
        encode("cart", {1, 2})


def test_nested_non_json_value_names_the_inner_type() -> None:
    with pytest.raises(StateTypeError, match=r"state key 'cart'.*contains an object.*type object"):
        encode("cart", {"items": [object()]})


def test_nan_is_rejected() -> None:
    with pytest.raises(StateTypeError, match="state key 'x'"):
        encode("x", math.nan)


def test_pydantic_model_is_stored_as_its_json_dump() -> None:
    text = encode("flight", Flight(code="BA1", when=datetime(2026, 1, 2, 3, 4)))
    assert text == '{"code":"BA1","when":"2026-01-02T03:04:00"}'


def test_pydantic_model_nested_in_a_list_is_dumped() -> None:
    assert encode("f", [Flight(code="X", when=datetime(2026, 1, 1))]) == '[{"code":"X","when":"2026-01-01T00:00:00"}]'


def test_value_over_the_size_limit_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"max_value_bytes.*10"):
        encode("big", "x" * 20, max_bytes=10)
    assert issubclass(StateValueError, ValueError)


@pytest.mark.parametrize("key", ["", 3, None, "k" * (MAX_KEY_LENGTH + 1)])
def test_bad_keys_are_refused(key: object) -> None:
    unit = WorkingCopy("s")
    with pytest.raises(StateKeyError):
        unit.set(key, 1)  # type: ignore[arg-type]


def test_get_returns_a_fresh_copy_each_time() -> None:
    unit = WorkingCopy("s", base={"cart": '["a"]'})
    first = unit.get("cart")
    first.append("b")
    assert unit.get("cart") == ["a"]
    assert unit.changes == {}


def test_delete_then_get_gives_default_and_clear_hides_base() -> None:
    unit = WorkingCopy("s", base={"a": "1", "b": "2"})
    unit.delete("a")
    assert unit.get("a", "gone") == "gone"
    assert list(unit.keys()) == ["b"]
    unit.clear()
    assert list(unit.keys()) == []
    unit.set("c", 3)
    assert unit.committed_values() == {"c": "3"}


def test_deleting_an_absent_key_writes_nothing() -> None:
    unit = WorkingCopy("s")
    unit.delete("nothing")
    assert not unit.dirty


@pytest.mark.anyio
async def test_a_cached_session_recreated_elsewhere_after_expiry_is_read_again(state_url: str) -> None:
    """Versions restart at 1 for a new life of a session id; the cache must not mistake it for the old one."""
    from concierge.state import backend_from_url
    from concierge.work import SessionStore

    now = [1000.0]
    backend_a = backend_from_url(state_url)
    # memory:// is per process: share the instance so both stores see one store, as two processes would on SQL.
    backend_b = backend_a if state_url.startswith("memory") else backend_from_url(state_url)
    a = SessionStore(backend_a, ttl=10, clock=lambda: now[0])
    b = SessionStore(backend_b, ttl=10, clock=lambda: now[0])
    async with a.opened(), b.opened():
        unit = await a.load("s", create=True)
        assert unit is not None
        unit.set("cart", ["old"])
        await a.commit(unit)  # a caches (v1, old life)

        now[0] += 60  # the session expires; b starts a new life at version 1
        fresh = await b.load("s", create=True)
        assert fresh is not None and fresh.version == 0
        fresh.set("cart", ["new"])
        await b.commit(fresh)

        again = await a.load("s", create=False)
        assert again is not None
        assert again.get("cart") == ["new"]


def test_committed_size_counts_keys_and_bytes_from_the_changes_without_remeasuring_the_base() -> None:
    copy = WorkingCopy("s", base={"a": '"xx"', "b": "1"})
    assert copy.committed_size() == (2, len('a"xx"') + len("b1"))
    copy.base_bytes = 1_000  # a size the store carried: trusted, not counted again
    copy.set("a", "é")  # replaces 'a', 2 bytes of text become 2 (quotes) + 2 (é)
    copy.set("c", [1])
    copy.delete("b")
    assert copy.committed_size() == (2, 1_000 - len('a"xx"') + len('a"é"'.encode()) - len("b1") + len("c[1]"))
    copy.clear()
    copy.set("z", 0)
    assert copy.committed_size() == (1, 2)
    assert copy.committed_size()[0] == len(copy.committed_values())
