"""Schedule triggers: a pipeline's input fed by the clock (every N seconds, or a cron line).

A :class:`Schedule` only describes when and what (the DSL is immutable); the runtime's
:mod:`pipeline.runtime.scheduler` runs it. However many replicas run a schedule, one emits:
the member that owns the single partition of the schedule's own topic in its consumer group
(``<pipeline>.schedule.<name>``). Each tick is published keyed and sequenced by its *scheduled*
time (writer ``schedule:<name>``, sequence = the tick's epoch second), so a tick that a new
leader emits again after a takeover is a duplicate the first stage's dedup table drops.

Missed ticks (every replica was down) follow ``catch_up``:

- ``"all"``: every tick since the last one emitted, oldest first;
- ``"latest"`` (default): only the most recent missed tick;
- ``"none"``: none; the schedule resumes at the next tick to come.

Example:
    >>> s = Schedule("nightly", cron="0 2 * * *", make=lambda at: {"run": at.isoformat()})
    >>> [t.isoformat() for t in s.due(after=_utc(2026, 1, 1), now=_utc(2026, 1, 3))]
    ['2026-01-02T02:00:00+00:00']
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from croniter import croniter

from pipeline.errors import DefinitionError

__all__ = ["CatchUp", "Schedule"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_MAX_CATCH_UP = 100_000  # ticks "all" emits at most after a long outage


class CatchUp(StrEnum):
    """What happens to ticks missed while no replica ran."""

    ALL = "all"
    LATEST = "latest"
    NONE = "none"


def _utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class Schedule:
    """Publish ``make(tick_time)`` to the pipeline's source at each tick.

    Args:
        name: Part of the schedule's topic and group names.
        make: The event of a tick (a dict of the source schema), from its scheduled time (UTC).
        every: Seconds between ticks (ticks on multiples of it since the epoch).
        cron: A cron line (UTC), e.g. ``"0 2 * * *"``; exactly one of ``every`` and ``cron``.
        catch_up: Missed ticks after downtime: ``"all"``, ``"latest"`` or ``"none"``; the
            same for ticks that came due while a tick was held (``overlap``).
        overlap: Whether a tick may start while the previous tick's run is still in flight.
            By default it may not: the tick is held until the previous run completed or
            failed, which the pipeline's job status tells (it must track jobs:
            :meth:`~pipeline.dsl.Pipeline.with_jobs`; each tick is then a job).

    Raises:
        DefinitionError: A bad name, both or neither of ``every`` and ``cron``, an invalid cron
            line, a ``make`` that is not callable.
    """

    name: str
    make: Callable[[dt.datetime], Any]
    every: float | None = None
    cron: str | None = None
    catch_up: CatchUp = CatchUp.LATEST
    overlap: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise DefinitionError(
                f"schedule name {self.name!r} is not valid: letters, digits, '_' or '-', "
                f"starting with a letter"
            )
        if (self.every is None) == (self.cron is None):
            raise DefinitionError(f"schedule '{self.name}': give exactly one of every= and cron=")
        if self.every is not None and self.every <= 0:
            raise DefinitionError(f"schedule '{self.name}': every= must be positive seconds")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise DefinitionError(f"schedule '{self.name}': {self.cron!r} is not a cron line")
        if not callable(self.make):
            raise DefinitionError(f"schedule '{self.name}': make must be a function")
        try:
            object.__setattr__(self, "catch_up", CatchUp(str(self.catch_up)))
        except ValueError:
            raise DefinitionError(
                f"schedule '{self.name}': catch_up must be 'all', 'latest' or 'none', "
                f"not {self.catch_up!r}"
            ) from None

    def after(self, moment: dt.datetime) -> dt.datetime:
        """The first tick strictly after ``moment``."""
        if self.every is not None:
            step = self.every
            n = int(moment.timestamp() // step) + 1
            return dt.datetime.fromtimestamp(n * step, dt.UTC)
        nxt = croniter(self.cron, moment.astimezone(dt.UTC)).get_next(dt.datetime)
        return nxt.astimezone(dt.UTC)  # type: ignore[no-any-return]

    def due(self, *, after: dt.datetime | None, now: dt.datetime) -> list[dt.datetime]:
        """The ticks to emit now: those in ``(after, now]`` as ``catch_up`` says.

        ``after`` is the last tick emitted (``None``: never); the tick at ``now`` or just
        before it is always due, missed older ones only with ``catch_up="all"`` (or the latest
        of them with ``"latest"``).
        """
        if after is None:  # first run: start with the next tick, nothing to catch up
            return []
        ticks: list[dt.datetime] = []
        tick = self.after(after)
        while tick <= now and len(ticks) < _MAX_CATCH_UP:
            ticks.append(tick)
            tick = self.after(tick)
        if not ticks or self.catch_up is CatchUp.ALL:
            return ticks
        if self.catch_up is CatchUp.LATEST:
            return ticks[-1:]
        current = self._current(ticks[-1], now)  # NONE: only the tick of this moment
        return [current] if current is not None else []

    def _current(self, last: dt.datetime, now: dt.datetime) -> dt.datetime | None:
        """``last`` if it is the tick of this moment (not one missed earlier), else None."""
        period = self.every if self.every is not None else 60.0
        return last if (now - last).total_seconds() < max(1.0, period) else None

    def sequence(self, tick: dt.datetime) -> int:
        """The tick's sequence number: its epoch second (increasing, unique per schedule)."""
        return int(tick.timestamp())

    def event_id(self, tick: dt.datetime) -> str:
        return f"{self.name}@{tick.isoformat()}"
