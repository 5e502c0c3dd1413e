"""Priority lanes: one stage reading several input topics, with weights.

``Pipeline(..., source=Priority({"orders.high": 8, "orders.low": 1}))`` gives the first stage
one *lane* per topic. Each lane is read by its own worker (group, dead letters and state of its
own: ``P.S.<lane>``, ``P.S.<lane>.dlq``, ``P.S.<lane>.state``), so dedup, dead letters and
replay work per lane and each key keeps its order within its lane; all lanes write the stage's
one output topic. The lanes of a stage run in one process, sharing a
:class:`~pipeline.runtime.priority.LaneGate`: while more than one lane has a backlog, they take
turns, each taking ``weight`` units of records per round, the heaviest first; a lane alone with
records runs at full speed.

Example:
    >>> Priority({"orders.low": 1, "orders.high": 8}).topics
    ('orders.high', 'orders.low')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import DefinitionError

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True, slots=True)
class Priority:
    """The input topics of a pipeline's first stage and their weights (heaviest first).

    Args:
        lanes: Topic -> weight (a positive integer: records taken per round, relatively).

    Raises:
        DefinitionError: Fewer than two lanes, a weight below 1, a bad topic name.
    """

    lanes: tuple[tuple[str, int], ...]

    def __init__(self, lanes: Mapping[str, int]) -> None:
        if len(lanes) < 2:
            raise DefinitionError("Priority needs at least two lanes (topic: weight)")
        for topic, weight in lanes.items():
            if not isinstance(topic, str) or not _TOPIC.match(topic):
                raise DefinitionError(f"Priority: {topic!r} is not a topic name")
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
                raise DefinitionError(
                    f"Priority: the weight of lane {topic} must be a whole number >= 1, "
                    f"not {weight!r}"
                )
        ordered = sorted(lanes.items(), key=lambda item: (-item[1], item[0]))
        object.__setattr__(self, "lanes", tuple(ordered))

    @property
    def topics(self) -> tuple[str, ...]:
        """The lanes' topics, heaviest first."""
        return tuple(topic for topic, _ in self.lanes)

    def weights(self) -> dict[str, int]:
        return dict(self.lanes)


def lane_label(topic: str) -> str:
    """The part of a lane's names that tells it apart: its topic, dots as dashes.

    Example:
        >>> lane_label("orders.high")
        'orders-high'
    """
    return topic.replace(".", "-")
