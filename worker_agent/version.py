"""The agent's version; `pyproject.toml` carries the same number (a test checks both)."""

__version__ = "0.1.0"
