"""Unit tests of the unit of work's value rules (beside the client-level tests)."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from pydantic import BaseModel

from concierge.errors import StateKeyError, StateTypeError, StateValueError
from concierge.work import MAX_KEY_LENGTH, UnitOfWork, encode


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
    unit = UnitOfWork(session_id="s")
    with pytest.raises(StateKeyError):
        unit.set(key, 1)  # type: ignore[arg-type]


def test_get_returns_a_fresh_copy_each_time() -> None:
    unit = UnitOfWork(session_id="s", base={"cart": '["a"]'})
    first = unit.get("cart")
    first.append("b")
    assert unit.get("cart") == ["a"]
    assert unit.changes == {}


def test_delete_then_get_gives_default_and_clear_hides_base() -> None:
    unit = UnitOfWork(session_id="s", base={"a": "1", "b": "2"})
    unit.delete("a")
    assert unit.get("a", "gone") == "gone"
    assert list(unit.keys()) == ["b"]
    unit.clear()
    assert list(unit.keys()) == []
    unit.set("c", 3)
    assert unit.committed_values() == {"c": "3"}


def test_deleting_an_absent_key_writes_nothing() -> None:
    unit = UnitOfWork(session_id="s")
    unit.delete("nothing")
    assert not unit.dirty
