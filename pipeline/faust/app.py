"""Building (or extending) a faust-streaming ``App`` that runs pipeline stages.

One app per stage is the default shape: its id is the stage's consumer group (``P.S``), so a
stage moves between the framework's worker and Faust keeping its committed offsets, and
``pipeline status`` reads its lag as for any stage. An app running several stages commits
them all under its own id.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.dsl import Pipeline
from pipeline.errors import ConfigError
from pipeline.faust.runner import FaustStages
from pipeline.security import Bootstrap, Protocol, connection


@dataclass(frozen=True, slots=True)
class FaustOptions:
    """How the Faust-run stages run.

    Attributes:
        commit_interval: Seconds between Faust's offset commits (``broker_commit_interval``).
        session_timeout: Seconds the group waits for a silent member before its partitions
            move (``broker_session_timeout``; the framework's workers use 10 s, Faust 60 s).
        stats_file: Write the stages' JSON counters here (as ``pipeline run --stats-file``).
        stats_interval: Seconds between two writes of ``stats_file``.
        datadir: Where each app gets its Faust data directory (``DATADIR/<app id>``; default:
            ``pipeline-faust`` under the system's temp directory; ``pipeline faust`` passes
            ``PIPELINE_HOME/faust``).

    Example:
        >>> FaustOptions().commit_interval
        1.0
    """

    commit_interval: float = 1.0
    session_timeout: float = 10.0
    stats_file: Path | None = None
    stats_interval: float = 1.0
    datadir: Path | None = None

    def __post_init__(self) -> None:
        if min(self.commit_interval, self.session_timeout, self.stats_interval) <= 0:
            raise ConfigError(
                "FaustOptions: commit_interval, session_timeout and stats_interval must be > 0"
            )


def faust_app(
    pipeline: Pipeline,
    stages: Sequence[str],
    bootstrap: Bootstrap,
    *,
    options: FaustOptions = FaustOptions(),
) -> Any:
    """A ``faust.App`` running ``stages`` of ``pipeline`` as agents.

    The app never creates topics itself (``topic_allow_declare=False``): the stages' topics
    are checked (and created, as a framework stage does) before the app's consumer starts.

    Raises:
        DefinitionError: An unknown stage name.
        ConfigError: No stage named, or a secure connection (configure your own app's
            ``broker_credentials`` and use :func:`add_to`).
    """
    import faust

    conn = connection(bootstrap)
    if conn.security.protocol is not Protocol.PLAINTEXT:
        raise ConfigError(
            "faust_app() connects over PLAINTEXT only; for "
            f"{conn.security.protocol.value}, build a faust.App with broker_credentials and "
            "call pipeline.faust.add_to(app, pipeline, stages, connection)"
        )
    if not stages:
        raise ConfigError("faust_app(): name at least one stage")
    nodes = [node for name in stages for node in pipeline.lanes_of(name)]
    app_id = nodes[0].group if len(stages) == 1 else f"{pipeline.name}.faust"
    datadir = (options.datadir or Path(tempfile.gettempdir()) / "pipeline-faust") / app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)  # Faust makes the last part only
    app = faust.App(
        app_id,
        broker=[f"kafka://{b.strip()}" for b in conn.bootstrap.split(",")],
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        topic_allow_declare=False,  # the framework creates and checks the stages' topics
        topic_disable_leader=True,  # no Faust leader topic: nothing beside the pipeline's
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=options.commit_interval,
        broker_session_timeout=options.session_timeout,
        broker_heartbeat_interval=max(1.0, options.session_timeout / 4),
        key_serializer="raw",
        value_serializer="raw",
    )
    add_to(app, pipeline, stages, conn, options=options)
    return app


def add_to(
    app: Any,
    pipeline: Pipeline,
    stages: Sequence[str],
    bootstrap: Bootstrap,
    *,
    options: FaustOptions = FaustOptions(),
) -> FaustStages:
    """Add ``stages`` of ``pipeline`` to the Faust ``app`` (before it starts), one agent each.

    ``bootstrap`` is how the stages' own clients connect (their producer and the changelog
    reader); the app's consumer uses the app's broker settings.

    Returns:
        The service that runs them (its ``stages`` hold each stage's counters), also set as
        ``app.pipeline_stages``.

    Raises:
        DefinitionError: An unknown stage name.
    """
    nodes = [node for name in stages for node in pipeline.lanes_of(name)]
    service = FaustStages(app, pipeline, nodes, connection(bootstrap), options)
    # Started before the app's own parts (its consumer, its agents): the topics are there and
    # the producer runs when the first event arrives.
    app.add_dependency(service)
    for stage in service.stages:
        channel = app.topic(stage.node.input_topic, key_serializer="raw", value_serializer="raw")
        app.agent(channel, name=f"pipeline.{stage.node.label}")(stage.agent)
    app.on_partitions_revoked.connect(service.revoked)
    app.on_partitions_assigned.connect(service.assigned)
    app.pipeline_stages = service
    return service
