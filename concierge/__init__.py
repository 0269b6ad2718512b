"""concierge: per-session state and workflow stages for MCP servers.

```python
from concierge import Concierge

app = Concierge("shop")

@app.tool()
def add_to_cart(product_id: str) -> dict:
    cart = app.get_state("cart", [])
    cart.append(product_id)
    app.set_state("cart", cart)
    return {"cart": cart}
```
"""

from concierge.app import Concierge
from concierge.checkpoints import DELETED, Checkpoint, Reverted
from concierge.errors import (
    ConciergeError,
    ConfigurationError,
    ConflictError,
    HistoryError,
    LiveObjectError,
    NoSessionError,
    SessionExpiredError,
    StageError,
    StateKeyError,
    StateScopeError,
    StateTypeError,
    StateUnavailableError,
    StateValueError,
    UndeclaredScopeError,
    UnknownSessionError,
)
from concierge.state import MemoryBackend, StateBackend, backend_from_url

__all__ = [
    "DELETED",
    "Checkpoint",
    "Concierge",
    "ConciergeError",
    "ConfigurationError",
    "ConflictError",
    "HistoryError",
    "LiveObjectError",
    "MemoryBackend",
    "NoSessionError",
    "Reverted",
    "SessionExpiredError",
    "StageError",
    "StateBackend",
    "StateKeyError",
    "StateScopeError",
    "StateTypeError",
    "StateUnavailableError",
    "StateValueError",
    "UndeclaredScopeError",
    "UnknownSessionError",
    "backend_from_url",
]

__version__ = "0.1.0"
