"""Testing helpers: pytest fixtures for a real broker (:mod:`pipeline.testing.fixtures`)."""

from pipeline.testing.names import Names

__all__ = ["Names"]
