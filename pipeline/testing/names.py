"""Unique topic, group and pipeline names, so tests never see each other's records."""

from __future__ import annotations

import re
import uuid


class Names:
    """Makes names unique to one test.

    Example:
        >>> names = Names("test_roundtrip")
        >>> names.topic("orders").startswith("test_roundtrip-")
        True
    """

    __slots__ = ("prefix",)

    def __init__(self, label: str) -> None:
        clean = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")[:80] or "test"
        self.prefix = f"{clean}-{uuid.uuid4().hex[:8]}"

    def topic(self, suffix: str = "topic") -> str:
        """A topic name no other test uses."""
        return f"{self.prefix}-{suffix}"

    def group(self, suffix: str = "group") -> str:
        """A consumer group id no other test uses."""
        return f"{self.prefix}-{suffix}"

    def pipeline(self, suffix: str = "p") -> str:
        """A pipeline name (the prefix of its topics and groups) no other test uses."""
        return f"{self.prefix}-{suffix}"
