"""Bundled examples: `python -m concierge` lists them, `python -m concierge NAME` runs one."""
