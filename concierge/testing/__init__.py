"""The `StateBackend` conformance suite, for the author of a backend of their own.

Every built-in backend (memory, SQLite, PostgreSQL, Redis) passes this suite
unchanged. To run it against yours, subclass `StateBackendConformance` in a
test module and give it a `backend` fixture that yields an opened, empty
backend:

```python
import pytest

from concierge.testing import StateBackendConformance
from my_package import MyBackend


class TestMyBackend(StateBackendConformance):
    @pytest.fixture
    async def backend(self):
        async with MyBackend() as backend:  # opened here, closed after the test
            yield backend
```

`pytest` then runs every `test_*` method against it. The tests are async,
marked `pytest.mark.anyio` (anyio's pytest plugin, installed with anyio, runs
them on asyncio unless an `anyio_backend` fixture says otherwise).

Optional parts skip with the reason when a backend does not have them:

- the checkpoint tests, when `MyBackend.supports_checkpoints` is false;
- the `list_sessions` tests, when `MyBackend` keeps the default `list_sessions`;
- the tests of a store that outlives its backend objects (a restart, two
  backend objects on one store, `close` before `open`), unless the subclass
  defines a `backend_factory` fixture method: a callable that returns a new,
  unopened backend on one store each time it is called, e.g.

```python
    @pytest.fixture
    def backend_factory(self, tmp_path):
        return lambda: MyBackend(tmp_path / "store")
```

A conflict's message is checked too: build it with
`concierge.state.base.update_conflict`, as the built-in backends do.

Importing `concierge` never imports this package (nor pytest).
"""

from __future__ import annotations

try:
    import pytest
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "concierge.testing is a pytest suite and needs pytest (and anyio's pytest plugin): pip install pytest"
    ) from exc

_PARTS = ("_checkpoints", "_concurrency", "_durability", "_expiry", "_listing", "_sessions", "_support")
# Before they are imported: their failed asserts then show the values compared, as in a test module.
pytest.register_assert_rewrite(*(f"{__name__}.{part}" for part in _PARTS))

from concierge.testing._checkpoints import CheckpointTests
from concierge.testing._concurrency import ConcurrencyTests
from concierge.testing._durability import DurabilityTests
from concierge.testing._expiry import ExpiryTests
from concierge.testing._listing import ListingTests
from concierge.testing._sessions import SessionTests
from concierge.testing._support import BackendFactory, no_durable_store

__all__ = ["StateBackendConformance"]


class StateBackendConformance(
    SessionTests, ExpiryTests, ConcurrencyTests, DurabilityTests, ListingTests, CheckpointTests
):
    """The contract of `concierge.state.StateBackend` as pytest tests: subclass it and supply a `backend` fixture.

    Fixtures a subclass provides:

    - `backend` (required; a method, or a fixture anywhere pytest finds one):
      an opened backend on an empty store, one per test;
    - `backend_factory` (optional; a method, overriding the one here): a
      zero-argument callable returning a new, unopened backend on one durable
      store - every call in a test on the same store, empty at the test's
      start. Without it, the tests that need one skip, saying so.
    """

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def backend_factory(self) -> BackendFactory:
        """None here: the tests of a durable store skip unless a subclass overrides this fixture."""
        return no_durable_store()
