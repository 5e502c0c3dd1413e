"""kafka-pipeline: pipes-and-filters stream processing on Apache Kafka.

The public API is re-exported here; everything else is internal.
"""

from pipeline.codec import Codec
from pipeline.config import Settings
from pipeline.dsl import Delivery, Names, Pipeline, StageNode, TopicPolicy
from pipeline.errors import (
    AuthenticationError,
    AuthorizationError,
    BrokerError,
    BrokerUnavailableError,
    CodecError,
    ConfigError,
    DecodeError,
    DefinitionError,
    EncodeError,
    FencedError,
    JobFailedError,
    OffsetOutOfRangeError,
    PipelineError,
    SchemaCompatibilityError,
    SchemaError,
    StageError,
    TopicError,
)
from pipeline.jobs import JobClient, JobState, JobStatus
from pipeline.priority import Priority
from pipeline.publish import Publisher, SyncPublisher
from pipeline.record import Emit, Record
from pipeline.runtime.offsets import OffsetReset
from pipeline.schedule import CatchUp, Schedule
from pipeline.schema import Schema, SchemaStore
from pipeline.security import Connection, Security
from pipeline.stage import (
    BreakerPolicy,
    CrashPolicy,
    DeadLetterPolicy,
    DedupPolicy,
    RetryPolicy,
    Stage,
    stage,
)

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "BreakerPolicy",
    "BrokerError",
    "BrokerUnavailableError",
    "CatchUp",
    "Codec",
    "CodecError",
    "ConfigError",
    "Connection",
    "CrashPolicy",
    "DeadLetterPolicy",
    "DecodeError",
    "DedupPolicy",
    "DefinitionError",
    "Delivery",
    "Emit",
    "EncodeError",
    "FencedError",
    "JobClient",
    "JobFailedError",
    "JobState",
    "JobStatus",
    "Names",
    "OffsetOutOfRangeError",
    "OffsetReset",
    "Pipeline",
    "PipelineError",
    "Priority",
    "Publisher",
    "Record",
    "RetryPolicy",
    "Schedule",
    "Schema",
    "SchemaCompatibilityError",
    "SchemaError",
    "SchemaStore",
    "Security",
    "Settings",
    "Stage",
    "StageError",
    "StageNode",
    "SyncPublisher",
    "TopicError",
    "TopicPolicy",
    "stage",
]
