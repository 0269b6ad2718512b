"""`python -m concierge` and the `concierge` console script; the command line lives in `concierge.cli`."""

from __future__ import annotations

from concierge.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
