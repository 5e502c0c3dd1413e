"""A pyinstrument profile of one run, reduced to figures a result file can hold.

:mod:`bench.profiling` writes the text report; this adds a summary: how much of the sampled
wall time the event loop sat idle in ``select`` (waiting for the broker), and where the busy
time went, by area (framework, aiokafka, fastavro, asyncio, ...) and by function.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import profiling

T = TypeVar("T")

# The selector's system call: where a single-loop worker waits for the broker.
_IDLE_FUNCTIONS = frozenset({"epoll.poll", "poll.poll", "select.select", "kqueue.control"})
_AREAS = (
    ("pipeline/", "framework (pipeline/)"),
    ("bench/", "benchmark instruments (bench/)"),
    ("aiokafka/producer", "aiokafka producer + transactions"),
    ("aiokafka/consumer", "aiokafka consumer"),
    ("aiokafka/record", "aiokafka record batches"),
    ("aiokafka/", "aiokafka other (client, protocol, conn)"),
    ("fastavro", "fastavro"),
    ("asyncio/", "asyncio event loop"),
)


def profile_and_summarize(
    path: Path, holder: dict[str, Any], interval: float = 0.0005
) -> Callable[[Awaitable[T]], Awaitable[T]]:
    """A ``wrap`` that profiles the awaited work, writes ``path``, fills ``holder['summary']``."""
    from pyinstrument import Profiler

    async def wrap(work: Awaitable[T]) -> T:
        prof = Profiler(interval=interval, async_mode="disabled")
        prof.start()
        try:
            return await work
        finally:
            prof.stop()
            holder["summary"] = _save(prof, path)

    return wrap


def _save(prof: Any, path: Path) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiling._render(prof))
    session = prof.last_session
    return summarize(session.root_frame() if session is not None else None)


def summarize(root: Any, top: int = 15) -> dict[str, Any]:
    """Idle share, busy time by area, and the functions with the most self time."""
    by_function: Counter[str] = Counter()
    by_area: Counter[str] = Counter()
    idle = 0.0
    stack = [root] if root is not None else []
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        if frame.is_synthetic:  # "[self]"-style leaves: already in their parent's self time
            continue
        own = frame.total_self_time
        if own <= 0:
            continue
        path = (frame.file_path or "").replace("\\", "/")
        if frame.function in _IDLE_FUNCTIONS:
            idle += own
            continue
        by_function[f"{frame.function} ({frame.file_path_short}:{frame.line_no})"] += own
        by_area[_area(path)] += own
    total = root.time if root is not None else 0.0
    busy = total - idle
    return {
        "sampled_seconds": round(total, 3),
        "idle_in_select_seconds": round(idle, 3),
        "idle_share": round(idle / total, 3) if total else None,
        "busy_seconds": round(busy, 3),
        "busy_by_area": {k: round(v / busy, 3) for k, v in by_area.most_common()} if busy else {},
        "top_self_time": [
            {"function": k, "seconds": round(v, 3), "share_of_busy": round(v / busy, 3)}
            for k, v in by_function.most_common(top)
        ]
        if busy
        else [],
        "note": "the profile covers the whole run_stages call (group join and shutdown too)",
    }


def _area(path: str) -> str:
    for needle, area in _AREAS:
        if needle in path:
            return area
    return "other (stdlib, builtins)"
