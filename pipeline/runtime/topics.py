"""Create a pipeline's topics and refuse existing ones that break co-partitioning or durability.

Every topic a pipeline owns (source, outputs, dead letters, state changelogs) has the same
partition count, so that a key lives on partition p of each of them: the state of key k is on
the changelog partition that matches the input partition k is read from.

Replication follows :class:`~pipeline.dsl.TopicPolicy`: by default ``min(3, brokers)`` replicas
and ``min.insync.replicas=min(2, replicas)``, so that on a cluster an acknowledged write
(acks=all) is on two brokers before a stage commits past it. An existing topic with fewer
replicas than that is refused, as a wrong partition count is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from pipeline.dsl import Pipeline, StageNode, TopicPolicy
from pipeline.errors import AuthorizationError, TopicError
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import translate
from pipeline.security import Bootstrap, connection

_TOPIC_ALREADY_EXISTS = 36
_NOT_AUTHORIZED = 29  # TOPIC_AUTHORIZATION_FAILED
DLQ_RETENTION_MS = str(30 * 24 * 3600 * 1000)  # dead letters wait a month for their replay
REPLY_RETENTION_MS = str(24 * 3600 * 1000)  # a job's end waits a day for its caller


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic a pipeline needs."""

    name: str
    role: str  # "source", "output", "dead letters", "state"
    partitions: int
    replication: int | None = None  # None: min(3, brokers)
    config: dict[str, str] = field(default_factory=dict)
    min_insync: int | None = None  # None: min(2, replicas)

    def replicas_for(self, brokers: int) -> int:
        return TopicPolicy(self.partitions, self.replication, self.min_insync).replicas_for(brokers)

    def topic_config(self, brokers: int) -> dict[str, str]:
        """The topic's config on a cluster of ``brokers`` (with its min.insync.replicas)."""
        policy = TopicPolicy(self.partitions, self.replication, self.min_insync)
        return {"min.insync.replicas": str(policy.min_insync_for(brokers)), **self.config}


def done_topic(compensate_topic: str) -> str:
    """Where a stage remembers the compensations it ran (compacted; key = request id)."""
    return f"{compensate_topic}.done"


def topic_specs(pipeline: Pipeline) -> list[TopicSpec]:
    """Every topic ``pipeline`` reads or writes, in topology order."""
    policy = pipeline.topics
    n, r, isr = policy.partitions, policy.replication, policy.min_insync
    sources = pipeline.priority.topics if pipeline.priority is not None else (pipeline.source,)
    specs = [TopicSpec(topic, "source", n, r, min_insync=isr) for topic in sources]
    for node in pipeline.nodes():
        if node.output_topic:
            role = f"output of '{node.name}'"
            specs.append(TopicSpec(node.output_topic, role, n, r, min_insync=isr))
        dlq = {"retention.ms": DLQ_RETENTION_MS}
        role = f"dead letters of '{node.label}'"
        specs.append(TopicSpec(node.dlq_topic, role, n, r, dlq, isr))
        state = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
        specs.append(TopicSpec(node.state_topic, f"state of '{node.label}'", n, r, state, isr))
        if node.compensate_topic:
            role = f"compensations of '{node.name}'"
            specs.append(TopicSpec(node.compensate_topic, role, n, r, dlq, isr))
            done = f"compensations done by '{node.name}'"
            specs.append(TopicSpec(done_topic(node.compensate_topic), done, n, r, state, isr))
    if pipeline.jobs is not None:
        table = {"cleanup.policy": "compact"}
        specs.append(TopicSpec(pipeline.jobs.status, "job status table", n, r, table, isr))
        replies = {"retention.ms": REPLY_RETENTION_MS}
        specs.append(TopicSpec(pipeline.jobs.replies, "job replies", n, r, replies, isr))
    unique: dict[str, TopicSpec] = {}
    for spec in specs:  # the lanes of a stage share its output and compensations
        unique.setdefault(spec.name, spec)
    return list(unique.values())


def stage_topic_specs(pipeline: Pipeline, nodes: list[StageNode]) -> list[TopicSpec]:
    """The topics the stages ``nodes`` read and own (input, output, dead letters, state):
    what a stage running with its own least-privilege principal checks and creates."""
    names = set()
    for node in nodes:
        names |= {node.input_topic, node.dlq_topic, node.state_topic}
        if node.output_topic:
            names.add(node.output_topic)
        if node.jobs is not None:  # every stage reports jobs
            names |= {node.jobs.status, node.jobs.replies}
        if node.compensate_topic:  # its compensations: read, remembered, passed on
            names |= {node.compensate_topic, done_topic(node.compensate_topic)}
        if node.undo_topic:  # its dead letters ask an earlier stage to compensate
            names.add(node.undo_topic)
    return [s for s in topic_specs(pipeline) if s.name in names]


async def ensure_topics(
    bootstrap: Bootstrap, specs: list[TopicSpec], *, create: bool = True
) -> list[str]:
    """Create missing topics; check existing ones.

    Returns:
        The names of the topics created.

    Raises:
        TopicError: An existing topic has another partition count, or a topic is missing
            and ``create`` is false.
        BrokerUnavailableError: No broker answers.
    """
    admin = AIOKafkaAdminClient(**connection(bootstrap).client_args(), client_id="pipeline-admin")
    await start_client(admin, bootstrap, "checking the pipeline's topics")
    try:
        brokers = len(admin._client.cluster.brokers())
        existing = await _describe(admin, [s.name for s in specs])
        _check(specs, existing, brokers)
        missing = [s for s in specs if s.name not in existing]
        if missing and not create:
            names = ", ".join(f"{s.name} ({s.role})" for s in missing)
            raise TopicError(
                f"missing topics: {names}; create them with 'pipeline topics create' "
                f"or let the stage create them"
            )
        if missing:
            for spec in missing:
                if spec.replicas_for(brokers) > brokers:
                    raise TopicError(
                        f"topic {spec.name} ({spec.role}) needs {spec.replicas_for(brokers)} "
                        f"replicas, but {brokers} broker(s) answer: start the missing brokers "
                        f"or lower TopicPolicy(replication=...)",
                        topic=spec.name,
                    )
            new = [
                NewTopic(
                    s.name, s.partitions, s.replicas_for(brokers),
                    topic_configs=s.topic_config(brokers),
                )
                for s in missing
            ]  # fmt: skip
            response = await admin.create_topics(new)
            for topic, code, message in (e[:3] for e in response.topic_errors):
                if code == _NOT_AUTHORIZED:
                    raise AuthorizationError(
                        f"creating topic {topic} failed: this principal may not create it "
                        f"(CREATE on the topic; a stage's ACLs let it create only its own "
                        f"output, dead-letter and state topics). Create it as an admin "
                        f"('pipeline topics create MODULE:PIPELINE') or start the stage "
                        f"that owns it first",
                        topic=topic,
                    )
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise TopicError(f"creating topic {topic} failed: {message} (error {code})")
            # Another worker may have created one at the same moment: check what exists now.
            _check(specs, await _describe(admin, [s.name for s in specs]), brokers)
        return [s.name for s in missing]
    except KafkaError as exc:
        raise translate(exc, "creating the pipeline's topics") from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, tuple[int, int]]:
    """Partition count and replication factor (the smallest of any partition) per topic."""
    topics = await admin.describe_topics(sorted(set(names)))
    return {
        t["topic"]: (
            len(t["partitions"]),
            min((len(p["replicas"]) for p in t["partitions"]), default=0),
        )
        for t in topics
        if t["error_code"] == 0
    }


def _check(specs: list[TopicSpec], existing: dict[str, tuple[int, int]], brokers: int) -> None:
    for spec in specs:
        if spec.name not in existing:
            continue
        actual, replicas = existing[spec.name]
        if actual != spec.partitions:
            raise TopicError(
                f"topic {spec.name} ({spec.role}) has {actual} partitions, but the pipeline "
                f"needs {spec.partitions}: a key must live on the same partition number in the "
                f"input, state and output topics (co-partitioning). Set "
                f"TopicPolicy(partitions={actual}) or recreate the topic",
                topic=spec.name,
            )
        wanted = spec.replicas_for(brokers)
        if spec.replication is not None and replicas != wanted:
            raise TopicError(
                f"topic {spec.name} ({spec.role}) has {replicas} replica(s), but "
                f"TopicPolicy(replication={wanted}) asks for {wanted}. Recreate the topic, "
                f"reassign its replicas (kafka-reassign-partitions), or set "
                f"TopicPolicy(replication={replicas})",
                topic=spec.name,
            )
        if replicas < wanted:
            raise TopicError(
                f"topic {spec.name} ({spec.role}) has {replicas} replica(s), but the pipeline "
                f"needs {wanted} on this cluster of {brokers} broker(s): with fewer, a broker "
                f"that fails loses acknowledged records. Recreate the topic, add replicas "
                f"(kafka-reassign-partitions), or set TopicPolicy(replication={replicas})",
                topic=spec.name,
            )
