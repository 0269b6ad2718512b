"""A second process on a shared store, for tests/test_run_once.py: one tool bumps a shared counter.

    python tests/servers/shared_server.py     # stdio; the store comes from CONCIERGE_STATE_URL
"""

from __future__ import annotations

from concierge import Concierge

app = Concierge("shared-server")


@app.tool()
def bump(scope: str) -> int:
    """Add one to the counter `n` of the shared `scope` ("user" or "global")."""
    n = app.get_state("n", 0, scope=scope) + 1  # type: ignore[arg-type]
    app.set_state("n", n, scope=scope)  # type: ignore[arg-type]
    return n


if __name__ == "__main__":
    app.run()
