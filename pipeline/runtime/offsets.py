"""What a stage does when its position is gone from the log: stop (the default), or skip on.

Retention, ``kafka-delete-records`` or a recreated topic can leave a stage's committed offset
below the partition's log start (the records it has not read yet are deleted) or past its end.
Kafka's usual answer, ``auto.offset.reset``, silently jumps; here the default is to stop with
an :class:`~pipeline.errors.OffsetOutOfRangeError` that says what is gone and how to go on.
:class:`OffsetReset` ``.earliest()`` / ``.latest()`` (``pipeline run --offset-reset``) resume
instead, counting the records passed over in the stage's ``skipped`` counter and logging them
once at ERROR.

Example:
    >>> OffsetReset.parse("earliest").mode
    <ResetMode.EARLIEST: 'earliest'>
    >>> out_of_range("in", 1, position=10, start=110, end=150, group="g").lost
    100
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pipeline.errors import ConfigError, OffsetOutOfRangeError


class ResetMode(enum.Enum):
    """Where a stage goes when its position is out of range."""

    FAIL = "fail"
    EARLIEST = "earliest"
    LATEST = "latest"


@dataclass(frozen=True, slots=True)
class OffsetReset:
    """The out-of-range policy of a stage worker.

    Example:
        >>> OffsetReset.latest().seek_to(out_of_range("t", 0, position=1, start=5, end=9))
        (9, 8)
    """

    mode: ResetMode = ResetMode.FAIL

    @classmethod
    def fail(cls) -> OffsetReset:
        """Stop with an error that says what is gone (the default)."""
        return cls(ResetMode.FAIL)

    @classmethod
    def earliest(cls) -> OffsetReset:
        """Go on from the log start (deleted records are skipped, counted, logged)."""
        return cls(ResetMode.EARLIEST)

    @classmethod
    def latest(cls) -> OffsetReset:
        """Go on from the log end (everything before it is skipped, counted, logged)."""
        return cls(ResetMode.LATEST)

    @classmethod
    def parse(cls, text: str) -> OffsetReset:
        """``fail``, ``earliest`` or ``latest`` (the CLI's ``--offset-reset``).

        Raises:
            ConfigError: Anything else.
        """
        try:
            return cls(ResetMode(text.strip().lower()))
        except ValueError:
            raise ConfigError(
                f"--offset-reset must be fail, earliest or latest, not {text!r}"
            ) from None

    def seek_to(self, gone: OffsetOutOfRangeError) -> tuple[int, int]:
        """Where to go on, and how many records that skips.

        Raises:
            OffsetOutOfRangeError: ``gone`` itself, in ``fail`` mode.
        """
        if self.mode is ResetMode.FAIL:
            raise gone
        if self.mode is ResetMode.EARLIEST:
            return gone.start, gone.lost
        return gone.end, max(0, gone.end - gone.position)


def combined(gaps: list[OffsetOutOfRangeError]) -> OffsetOutOfRangeError:
    """One error for several partitions out of range (the first one's, when alone).

    Example:
        >>> a = out_of_range("in", 0, position=10, start=110, end=150)
        >>> b = out_of_range("in", 2, position=5, start=25, end=30)
        >>> both = combined([a, b])
        >>> both.lost, "partition 0: position 10 is below the log start 110" in str(both)
        (120, True)
    """
    if len(gaps) == 1:
        return gaps[0]
    gaps = sorted(gaps, key=lambda g: g.partition)
    first = gaps[0]
    lost = sum(g.lost for g in gaps)
    parts = "; ".join(
        f"partition {g.partition}: position {g.position:,} is below the log start "
        f"{g.start:,} ({g.lost:,} deleted)"
        if g.position < g.start
        else f"partition {g.partition}: position {g.position:,} is past the log end {g.end:,}"
        for g in gaps
    )
    return OffsetOutOfRangeError(
        f"{len(gaps)} partitions of {first.topic} are out of range ({parts}): {lost:,} "
        f"records were deleted (retention or delete-records) before this stage read them. "
        f"The stage stopped without skipping anything. To go on, run it with --offset-reset "
        f"earliest (skip the deleted records; they are counted and logged) or --offset-reset "
        f"latest (skip to the end of each partition).",
        topic=first.topic, partition=first.partition, position=first.position,
        start=first.start, end=first.end, gaps=gaps,
    )  # fmt: skip


def out_of_range(
    topic: str, partition: int, *, position: int, start: int, end: int, group: str = ""
) -> OffsetOutOfRangeError:
    """The error for a position outside ``[start, end]``, in words a user can act on."""
    where = f"{topic} partition {partition}" + (f" (group {group})" if group else "")
    if position < start:
        lost = start - position
        what = (
            f"the position {position:,} of {where} is below the log start {start:,}: {lost:,} "
            f"records were deleted (retention or delete-records) before this stage read them"
        )
        options = (
            f"--offset-reset earliest (skip the {lost:,} deleted records; they are counted "
            f"and logged) or --offset-reset latest (also skip the {end - start:,} records "
            f"still in the partition)"
        )
    else:
        what = (
            f"the position {position:,} of {where} is past the log end {end:,} (was the topic "
            f"deleted and created again?)"
        )
        options = (
            f"--offset-reset earliest (read the {end - start:,} records now in the partition) "
            f"or --offset-reset latest (read only records written from now on)"
        )
    return OffsetOutOfRangeError(
        f"{what}. The stage stopped without skipping anything. To go on, run it with {options}.",
        topic=topic, partition=partition, position=position, start=start, end=end,
    )  # fmt: skip
