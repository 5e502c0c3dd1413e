"""The framework's errors: one root, translated library errors, context where known.

Every error the framework raises derives from :class:`PipelineError`. Library errors (aiokafka,
fastavro, avro, OS) are translated at the boundary with ``raise ... from exc`` so a user sees
what went wrong and where, never a traceback from deep inside a library.

Tree::

    PipelineError
    ├── ConfigError                 bad settings or arguments
    ├── DefinitionError             a pipeline or stage that cannot be built
    │   └── SchemaError             a malformed .avsc, an unknown schema name
    │       └── SchemaCompatibilityError   stage N's output unreadable by stage N+1
    ├── CodecError                  bytes that are not a valid record (poison)
    │   ├── DecodeError
    │   └── EncodeError
    ├── BrokerError                 talking to Kafka failed
    │   ├── BrokerUnavailableError  no broker answers at the bootstrap address
    │   ├── AuthenticationError     the broker refused who we are (SASL, TLS, protocol)
    │   ├── AuthorizationError      an ACL denies an operation on a topic, group, ...
    │   ├── TopicError              a topic is missing or has the wrong shape
    │   ├── FencedError             another instance took over (this one is a zombie)
    │   └── OffsetOutOfRangeError   a stage's position is gone from the log (retention)
    ├── LocalBrokerError            the project's local Kafka broker cannot run
    │   ├── JavaNotFoundError
    │   ├── JarsUnavailableError
    │   ├── PortInUseError
    │   └── BrokerStartError
    ├── StageError                  a stage function failed (retriable or fatal)
    └── JobFailedError              a job's record was dead-lettered (pipeline.jobs)
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Root of every error this framework raises.

    Args:
        message: What went wrong, in one sentence a user can act on.
        retriable: Whether trying the same thing again may succeed.
        **context: Where it happened (stage, topic, partition, offset, file, ...).

    Example:
        >>> err = PipelineError("boom", topic="orders", partition=2)
        >>> str(err)
        'boom [topic=orders, partition=2]'
    """

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        if retriable is not None:
            self.retriable = retriable
        self.context = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        if not self.context:
            return self.message
        where = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.message} [{where}]"


class ConfigError(PipelineError):
    """Settings or arguments that cannot work."""


class DefinitionError(PipelineError):
    """A pipeline, stage or topology that cannot be built."""


class SchemaError(DefinitionError):
    """A malformed Avro schema file or an unknown schema name."""


class SchemaCompatibilityError(SchemaError):
    """A writer schema whose data the reader schema cannot read."""


class CodecError(PipelineError):
    """Bytes that are not a valid record, or a value that breaks its schema."""


class DecodeError(CodecError):
    """Bytes that cannot be decoded: truncated, corrupt, or an unknown schema fingerprint."""


class EncodeError(CodecError):
    """A value that does not match the schema it is written with."""


class BrokerError(PipelineError):
    """A Kafka operation failed."""


class BrokerUnavailableError(BrokerError):
    """No Kafka broker answered at the bootstrap address."""

    retriable = True


class AuthenticationError(BrokerError):
    """The connection's security does not match the broker's: credentials refused, a
    certificate not trusted, plaintext against a TLS listener. Retrying cannot help."""


class AuthorizationError(BrokerError):
    """The broker's ACLs deny this principal an operation (WRITE on a topic, READ on a
    group, ...). Retrying cannot help until someone grants it."""


class TopicError(BrokerError):
    """A topic is missing, or its shape (partitions, config) breaks the pipeline's contract."""


class FencedError(BrokerError):
    """Another instance owns the partition now: this one was fenced (a zombie)."""


class OffsetOutOfRangeError(BrokerError):
    """A stage's position in a partition is below the log start or past its end.

    Records were deleted (retention, ``delete-records``) before the stage read them, or the
    topic was recreated. The numbers are attributes, so a policy can act on them.

    Attributes:
        topic, partition: Where (the first partition, when several are out of range).
        position: The offset the stage was at (its committed offset after a restart).
        start, end: The partition's log start and end offsets now.
        gaps: One error per partition out of range (``[self]`` for one partition).
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str,
        partition: int,
        position: int,
        start: int,
        end: int,
        gaps: list[OffsetOutOfRangeError] | None = None,
    ) -> None:
        super().__init__(message, topic=topic, partition=partition)
        self.topic = topic
        self.partition = partition
        self.position = position
        self.start = start
        self.end = end
        self.gaps = gaps or [self]

    @property
    def lost(self) -> int:
        """Records deleted before the stage read them (0 when the position is past the end)."""
        if len(self.gaps) > 1:
            return sum(g.lost for g in self.gaps)
        return max(0, self.start - self.position)


class LocalBrokerError(PipelineError):
    """The project's local Kafka broker cannot be provisioned or started."""


class JavaNotFoundError(LocalBrokerError):
    """No usable Java runtime (17 or newer) was found."""


class JarsUnavailableError(LocalBrokerError):
    """The broker's jars are not cached and cannot be fetched."""


class PortInUseError(LocalBrokerError):
    """A port the broker must listen on is already taken."""


class BrokerStartError(LocalBrokerError):
    """The broker process exited or did not answer during start."""


class StageError(PipelineError):
    """Raised by stage code to choose how a failure is handled.

    ``StageError(msg, retriable=True)`` asks for a retry with backoff; ``retriable=False``
    sends the record to the dead-letter topic at once.
    """

    retriable = True


class JobFailedError(PipelineError):
    """A job's record was dead-lettered by one of the pipeline's stages.

    Attributes:
        job: The job id.
        stage: The stage that dead-lettered it.
        error_class: Why (``ValueError``, ``DecodeError``, ``CrashLoop``, ...).
    """

    def __init__(self, job: str, stage: str, error_class: str, error: str) -> None:
        super().__init__(
            f"job {job} failed in stage '{stage}': {error_class}: {error}",
            job=job, stage=stage,
        )  # fmt: skip
        self.job = job
        self.stage = stage
        self.error_class = error_class
