"""Create a pipeline's topics and refuse existing ones that break co-partitioning.

Every topic a pipeline owns (source, outputs, dead letters, state changelogs) has the same
partition count, so that a key lives on partition p of each of them: the state of key k is on
the changelog partition that matches the input partition k is read from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from pipeline.dsl import Pipeline
from pipeline.errors import TopicError
from pipeline.runtime.kafka import translate

_TOPIC_ALREADY_EXISTS = 36
DLQ_RETENTION_MS = str(30 * 24 * 3600 * 1000)  # dead letters wait a month for their replay


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic a pipeline needs."""

    name: str
    role: str  # "source", "output", "dead letters", "state"
    partitions: int
    replication: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(pipeline: Pipeline) -> list[TopicSpec]:
    """Every topic ``pipeline`` reads or writes, in topology order."""
    policy = pipeline.topics
    n, r = policy.partitions, policy.replication
    specs = [TopicSpec(pipeline.source, "source", n, r)]
    for node in pipeline.nodes():
        if node.output_topic:
            specs.append(TopicSpec(node.output_topic, f"output of '{node.name}'", n, r))
        specs.append(
            TopicSpec(
                node.dlq_topic,
                f"dead letters of '{node.name}'",
                n,
                r,
                {"retention.ms": DLQ_RETENTION_MS},
            )
        )
        specs.append(
            TopicSpec(
                node.state_topic,
                f"state of '{node.name}'",
                n,
                r,
                {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
            )
        )
    return specs


async def ensure_topics(
    bootstrap: str, specs: list[TopicSpec], *, create: bool = True
) -> list[str]:
    """Create missing topics; check existing ones.

    Returns:
        The names of the topics created.

    Raises:
        TopicError: An existing topic has another partition count, or a topic is missing
            and ``create`` is false.
        BrokerUnavailableError: No broker answers.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="pipeline-admin")
    try:
        await admin.start()
        existing = await _partition_counts(admin, [s.name for s in specs])
        _check(specs, existing)
        missing = [s for s in specs if s.name not in existing]
        if missing and not create:
            names = ", ".join(f"{s.name} ({s.role})" for s in missing)
            raise TopicError(
                f"missing topics: {names}; create them with 'pipeline topics create' "
                f"or let the stage create them"
            )
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, s.replication, topic_configs=s.config)
                    for s in missing
                ]
            )
            for topic, code, message in (e[:3] for e in response.topic_errors):
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise TopicError(f"creating topic {topic} failed: {message} (error {code})")
            # Another worker may have created one at the same moment: check what exists now.
            _check(specs, await _partition_counts(admin, [s.name for s in specs]))
        return [s.name for s in missing]
    except KafkaError as exc:
        raise translate(exc, "creating the pipeline's topics") from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    topics = await admin.describe_topics(sorted(set(names)))
    return {t["topic"]: len(t["partitions"]) for t in topics if t["error_code"] == 0}


def _check(specs: list[TopicSpec], existing: dict[str, int]) -> None:
    for spec in specs:
        actual = existing.get(spec.name)
        if actual is not None and actual != spec.partitions:
            raise TopicError(
                f"topic {spec.name} ({spec.role}) has {actual} partitions, but the pipeline "
                f"needs {spec.partitions}: a key must live on the same partition number in the "
                f"input, state and output topics (co-partitioning). Set "
                f"TopicPolicy(partitions={actual}) or recreate the topic",
                topic=spec.name,
            )
