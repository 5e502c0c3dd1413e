"""Profile one contender run with pyinstrument (an optional tool, not a project dependency)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def available() -> bool:
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        return False
    return True


def profiler(text_path: Path, interval: float = 0.0005) -> Callable[[Awaitable[T]], Awaitable[T]]:
    """A ``wrap`` for a contender: runs the awaitable under pyinstrument, writes a text report.

    The event loop's own frames are kept (``async_mode="disabled"``): on a single-loop
    worker they are part of the per-record cost.
    """
    from pyinstrument import Profiler

    async def wrap(work: Awaitable[T]) -> T:
        prof = Profiler(interval=interval, async_mode="disabled")
        prof.start()
        try:
            return await work
        finally:
            prof.stop()
            _save(prof, text_path)

    return wrap


def _save(prof: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_render(prof))


def _render(prof: Any) -> str:
    """Self time per function (where the per-record cost is), then the call tree."""
    flat = prof.output_text(unicode=False, color=False, flat=True, flat_time="self")
    tree = prof.output_text(unicode=False, color=False, show_all=False)
    return f"{flat}\n\n{tree}"
