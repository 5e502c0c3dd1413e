"""The pipeline DSL: an immutable description of stages joined by topics.

``Pipeline(...) | stage_a | stage_b`` returns a new pipeline at each step and validates as it
goes: unique stage names, known schemas, the sequence key in the source schema, and each
stage's output readable by the next stage's input. The runtime compiles the description
(:meth:`Pipeline.nodes`) into one worker per stage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.compat import check_compatible
from pipeline.errors import DefinitionError, SchemaError
from pipeline.priority import Priority, lane_label
from pipeline.schedule import Schedule
from pipeline.schema import SchemaStore
from pipeline.stage import Stage


def _delivery(pipeline: str, delivery: Delivery | str) -> Delivery:
    try:
        return Delivery(delivery)
    except ValueError:
        raise DefinitionError(
            f"pipeline '{pipeline}': delivery {delivery!r} is not one of "
            f"{', '.join(d.value for d in Delivery)}"
        ) from None


class Delivery(enum.Enum):
    """Delivery guarantee of a pipeline's stages."""

    AT_LEAST_ONCE = "at_least_once"
    EXACTLY_ONCE = "exactly_once"


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    """How the pipeline's topics are created.

    By default a topic gets ``min(3, brokers)`` replicas and ``min.insync.replicas`` of
    ``min(2, replicas)``: on a replicated cluster an acknowledged record survives the loss of
    a broker, and a write waits for a second copy; on one broker, one replica. Existing topics
    are checked: their partition count must match, and their replication factor must be the
    one asked for (or, by default, at least ``min(3, brokers)``).

    Example:
        >>> TopicPolicy(partitions=6).replicas_for(brokers=5)
        3
        >>> TopicPolicy(replication=2).min_insync_for(brokers=5)
        2
    """

    partitions: int = 3
    replication: int | None = None  # None: min(3, brokers in the cluster)
    min_insync: int | None = None  # None: min(2, replication)
    create: bool = True  # create missing topics when a stage starts

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise DefinitionError("TopicPolicy: partitions must be at least 1")
        for name in ("replication", "min_insync"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DefinitionError(f"TopicPolicy: {name} must be at least 1")
        if self.replication and self.min_insync and self.min_insync > self.replication:
            raise DefinitionError(
                f"TopicPolicy: min_insync ({self.min_insync}) cannot exceed replication "
                f"({self.replication}): no write could ever be acknowledged"
            )

    def replicas_for(self, brokers: int) -> int:
        """The replication factor of a topic created on a cluster of ``brokers``."""
        return self.replication or min(3, max(1, brokers))

    def min_insync_for(self, brokers: int) -> int:
        """The ``min.insync.replicas`` of a topic created on a cluster of ``brokers``."""
        return self.min_insync or min(2, self.replicas_for(brokers))


@dataclass(frozen=True, slots=True)
class Names:
    """Topic and group names of one stage; ``None`` means the default from DESIGN.md."""

    output: str | None = None
    dlq: str | None = None
    state: str | None = None
    group: str | None = None
    principal: str | None = None


@dataclass(frozen=True, slots=True)
class JobTopics:
    """Where a pipeline's jobs are tracked (see :meth:`Pipeline.with_jobs`)."""

    status: str  # compacted; key = job id; the latest status of each job (JSON)
    replies: str  # each job's end (completed or failed), for callers waiting on it


@dataclass(frozen=True, slots=True)
class StageNode:
    """One stage compiled into its place in the topology."""

    pipeline: str
    stage: Stage
    index: int
    input_topic: str
    output_topic: str | None
    dlq_topic: str
    state_topic: str
    group: str
    principal: str = ""  # the SASL user it runs as (default: the group's name)
    jobs: JobTopics | None = None  # the pipeline tracks jobs: where this stage reports
    steps: int = 1  # stages in the pipeline (the last one completes a job)
    compensate_topic: str | None = None  # its compensation requests (it has compensate=)
    undo_topic: str | None = None  # where its dead letters ask an earlier stage to compensate
    lane: str | None = None  # a priority lane of the first stage: its input topic
    weight: int = 1  # the lane's weight (pipeline.priority)

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def label(self) -> str:
        """The stage's name, with its lane when it has one (``price[orders.low]``)."""
        return self.name if self.lane is None else f"{self.name}[{self.lane}]"

    @property
    def last(self) -> bool:
        """Whether this is the pipeline's last stage (its result completes a job)."""
        return self.index == self.steps - 1

    @property
    def transactional_prefix(self) -> str:
        """What every transactional id of the stage (exactly-once) starts with."""
        return f"{self.group}."


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A chain of stages joined by Kafka topics.

    Args:
        name: Pipeline name; prefix of every topic and group it owns.
        source: The input topic applications publish to, or a :class:`~pipeline.priority.Priority`
            of several (lanes with weights; ``source`` is then the heaviest lane's topic).
        key: Field of the first stage's input schema that is the sequence key.
        schemas: A :class:`SchemaStore` or a directory of ``.avsc`` files.
        topics: How topics are created.
        delivery: At-least-once (default) or exactly-once.

    Example:
        >>> p = Pipeline("orders", source="orders.in", key="id", schemas=store)  # doctest: +SKIP
        >>> p = p | validate | enrich                                          # doctest: +SKIP
        >>> [n.output_topic for n in p.nodes()]                                # doctest: +SKIP
        ['orders.validate', 'orders.enrich']
    """

    name: str
    source: str
    key: str
    schemas: SchemaStore = field(repr=False)
    stages: tuple[Stage, ...] = ()
    names: tuple[Names, ...] = ()
    topics: TopicPolicy = TopicPolicy()
    delivery: Delivery = Delivery.AT_LEAST_ONCE
    schedules: tuple[Schedule, ...] = ()
    jobs: JobTopics | None = None
    priority: Priority | None = None

    def __init__(
        self,
        name: str,
        *,
        source: str | Priority,
        key: str,
        schemas: SchemaStore | str | Path = "schemas",
        topics: TopicPolicy | None = None,
        delivery: Delivery | str = Delivery.AT_LEAST_ONCE,
        stages: tuple[Stage, ...] = (),
        names: tuple[Names, ...] = (),
        schedules: tuple[Schedule, ...] = (),
        jobs: JobTopics | None = None,
        priority: Priority | None = None,
    ) -> None:
        if isinstance(source, Priority):  # lanes: the heaviest is "the" source
            priority, source = source, source.topics[0]
        if not name or any(c in name for c in " /\\:"):
            raise DefinitionError(f"pipeline name {name!r} is not valid (no spaces, '/', ':')")
        store = schemas if isinstance(schemas, SchemaStore) else SchemaStore.from_directory(schemas)
        delivery = _delivery(name, delivery)
        for attr, value in (
            ("name", name),
            ("source", source),
            ("key", key),
            ("schemas", store),
            ("topics", topics or TopicPolicy()),
            ("delivery", delivery),
            ("stages", stages),
            ("names", names),
            ("schedules", schedules),
            ("jobs", jobs),
            ("priority", priority),
        ):
            object.__setattr__(self, attr, value)

    def __or__(self, other: Stage) -> Pipeline:
        return self.then(other)

    def then(
        self,
        stage: Stage,
        *,
        output_topic: str | None = None,
        dlq_topic: str | None = None,
        state_topic: str | None = None,
        group: str | None = None,
        principal: str | None = None,
    ) -> Pipeline:
        """Return a new pipeline with ``stage`` appended (names optionally overridden).

        ``principal`` is the SASL user the stage runs as on a secure cluster (default: its
        group, ``P.S``): ``pipeline acl`` grants it what the stage needs and ``pipeline
        deploy`` gives each stage its own credentials.

        Raises:
            DefinitionError: A duplicate stage name, a stage after a sink, an unknown schema.
            SchemaCompatibilityError: The previous stage's output cannot be read as this
                stage's input; the message names both stages and the field.
        """
        if not isinstance(stage, Stage):
            raise DefinitionError(
                f"pipeline '{self.name}': {stage!r} is not a Stage (decorate it with @stage)"
            )
        if any(s.name == stage.name for s in self.stages):
            raise DefinitionError(
                f"pipeline '{self.name}' already has a stage named '{stage.name}'"
            )
        reader = self._schema(stage, stage.input)
        if stage.output is not None:
            self._schema(stage, stage.output)
        if not self.stages:
            self._check_key(stage, reader.raw)
        else:
            prev = self.stages[-1]
            if prev.output is None:
                raise DefinitionError(
                    f"pipeline '{self.name}': stage '{stage.name}' follows '{prev.name}', "
                    f"which is a sink (output=None)"
                )
            check_compatible(
                self.schemas.get(prev.output),
                reader,
                writer_label=f"stage '{prev.name}'",
                reader_label=f"stage '{stage.name}'",
            )
        grown = replace(
            self,
            stages=(*self.stages, stage),
            names=(*self.names, Names(output_topic, dlq_topic, state_topic, group, principal)),
        )
        grown._check_unique_names()
        return grown

    def with_schedule(self, schedule: Schedule) -> Pipeline:
        """Return a copy whose source is also fed by ``schedule`` (``pipeline run --schedule``).

        Raises:
            DefinitionError: Not a Schedule, or another schedule has its name.
        """
        if not isinstance(schedule, Schedule):
            raise DefinitionError(f"pipeline '{self.name}': {schedule!r} is not a Schedule")
        if any(s.name == schedule.name for s in self.schedules):
            raise DefinitionError(
                f"pipeline '{self.name}' already has a schedule named '{schedule.name}'"
            )
        return replace(self, schedules=(*self.schedules, schedule))

    def schedule(self, name: str) -> Schedule:
        """The schedule called ``name``.

        Raises:
            DefinitionError: No such schedule (the message lists the known ones).
        """
        for s in self.schedules:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.schedules) or "none"
        raise DefinitionError(
            f"pipeline '{self.name}' has no schedule '{name}' (its schedules: {known})"
        )

    def with_jobs(self, *, status: str | None = None, replies: str | None = None) -> Pipeline:
        """Return a copy that tracks each event published with a job id as a *job*.

        Every stage reports what it did with a job's record to the status table (a compacted
        topic, ``P.jobs`` by default, key = job id): passed it on (``running``), completed it
        (the last stage, with its result), or dead-lettered it (``failed``, with the stage and
        error class); the end also goes to the reply topic (``P.replies``), where a
        :class:`~pipeline.jobs.JobClient` waits for it. Records without a job id cost nothing.

        Example:
            >>> p = Pipeline("orders", source="in", key="id", schemas=store)  # doctest: +SKIP
            >>> (p | price).with_jobs().jobs                                 # doctest: +SKIP
            JobTopics(status='orders.jobs', replies='orders.replies')
        """
        return replace(
            self, jobs=JobTopics(status or f"{self.name}.jobs", replies or f"{self.name}.replies")
        )

    def with_topics(self, topics: TopicPolicy) -> Pipeline:
        """Return a copy with another topic policy."""
        return replace(self, topics=topics)

    def with_delivery(self, delivery: Delivery | str) -> Pipeline:
        """Return a copy with another delivery guarantee."""
        return replace(self, delivery=_delivery(self.name, delivery))

    def nodes(self) -> list[StageNode]:
        """The compiled topology: one node per stage, with its topics and group."""
        nodes: list[StageNode] = []
        upstream = self.source
        undo = None  # the compensation topic of the nearest earlier stage with compensate=
        for i, (stage, names) in enumerate(zip(self.stages, self.names, strict=True)):
            base = f"{self.name}.{stage.name}"
            mine = f"{base}.compensate" if stage.compensate is not None else None
            output = None if stage.output is None else (names.output or base)
            node = StageNode(
                pipeline=self.name,
                stage=stage,
                index=i,
                input_topic=upstream,
                output_topic=output,
                dlq_topic=names.dlq or f"{base}.dlq",
                state_topic=names.state or f"{base}.state",
                group=names.group or base,
                principal=names.principal or names.group or base,
                jobs=self.jobs,
                steps=len(self.stages),
                compensate_topic=mine,
                undo_topic=undo,
            )
            if i == 0 and self.priority is not None:
                # One worker per lane: a group, dead letters and state of its own.
                for topic, weight in self.priority.lanes:
                    own = f"{base}.{lane_label(topic)}"
                    nodes.append(
                        replace(
                            node, input_topic=topic, dlq_topic=f"{own}.dlq",
                            state_topic=f"{own}.state", group=own, lane=topic, weight=weight,
                        )
                    )  # fmt: skip
            else:
                nodes.append(node)
            upstream = output or ""
            undo = mine or undo
        return nodes

    def node(self, stage_name: str, lane: str | None = None) -> StageNode:
        """The node of stage ``stage_name`` (of its ``lane``, for a stage with priority lanes).

        Raises:
            DefinitionError: No such stage (the message lists the pipeline's stages), or a
                stage with lanes and no (or another) ``lane``.
        """
        found = self.lanes_of(stage_name)
        if len(found) == 1 and lane is None:
            return found[0]
        for node in found:
            if node.lane == lane:
                return node
        known = ", ".join(str(n.lane) for n in found)
        if lane is None:
            raise DefinitionError(
                f"stage '{stage_name}' of pipeline '{self.name}' reads priority lanes: say "
                f"which (its lanes: {known})"
            )
        raise DefinitionError(
            f"stage '{stage_name}' of pipeline '{self.name}' has no lane {lane} (its lanes: "
            f"{known})"
        )

    def lanes_of(self, stage_name: str) -> list[StageNode]:
        """Every node of stage ``stage_name``: one, or one per priority lane.

        Raises:
            DefinitionError: No such stage; the message lists the pipeline's stages.
        """
        found = [node for node in self.nodes() if node.name == stage_name]
        if found:
            return found
        known = ", ".join(s.name for s in self.stages) or "none"
        raise DefinitionError(
            f"pipeline '{self.name}' has no stage named '{stage_name}'; its stages: {known}"
        )

    @property
    def sink_topic(self) -> str | None:
        """The last stage's output topic (``None`` when the last stage is a sink)."""
        nodes = self.nodes()
        return nodes[-1].output_topic if nodes else None

    def _check_unique_names(self) -> None:
        """No two roles may share a topic or group: that would loop or mix records."""
        sources = self.priority.topics if self.priority is not None else (self.source,)
        owners: dict[str, str] = dict.fromkeys(sources, "the source")
        for node in self.nodes():
            named = [
                (node.output_topic, f"the output of '{node.name}'"),
                (node.dlq_topic, f"the dead letters of '{node.label}'"),
                (node.state_topic, f"the state of '{node.label}'"),
                (f"group:{node.group}", f"the group of '{node.label}'"),
            ]
            for topic, role in named:
                if topic is None:
                    continue
                other = owners.setdefault(topic, role)
                if other != role:
                    shown = topic.removeprefix("group:")
                    raise DefinitionError(
                        f"pipeline '{self.name}': {shown} would be both {other} and {role}"
                    )

    def _schema(self, stage: Stage, name: str) -> Any:
        try:
            return self.schemas.get(name)
        except SchemaError as exc:
            raise SchemaError(f"pipeline '{self.name}', stage '{stage.name}': {exc}") from exc

    def _check_key(self, stage: Stage, raw: Any) -> None:
        fields = [f.get("name") for f in raw.get("fields", [])] if isinstance(raw, dict) else []
        if self.key not in fields:
            raise DefinitionError(
                f"pipeline '{self.name}': sequence key '{self.key}' is not a field of "
                f"{stage.input}, the input of the first stage '{stage.name}' "
                f"(fields: {', '.join(map(str, fields)) or 'none'})"
            )
