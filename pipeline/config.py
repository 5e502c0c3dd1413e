"""Settings read from the environment (``PIPELINE_*``), validated and frozen.

Only the CLI and the test fixtures build :class:`Settings` from the environment; library code
takes explicit values so that it behaves the same wherever it is called from.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The Apache Kafka release the local broker runs.
KAFKA_VERSION = "4.1.1"


def _default_home() -> Path:
    return Path.home() / ".cache" / "kafka-pipeline"


class Settings(BaseSettings):
    """Framework settings, from ``PIPELINE_*`` environment variables.

    Example:
        >>> Settings(bootstrap="127.0.0.1:9092").bootstrap
        '127.0.0.1:9092'
    """

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", frozen=True, extra="ignore")

    bootstrap: str | None = Field(
        default=None,
        description="Bootstrap servers of an existing cluster; unset means a local broker.",
    )
    home: Path = Field(
        default_factory=_default_home,
        description="Cache for the broker's jars and the local broker's data (outside the repo).",
    )
    kafka_version: str = Field(default=KAFKA_VERSION, description="Apache Kafka release to run.")
    broker_heap_mb: int = Field(default=384, ge=128, le=512, description="Local broker heap (MB).")
    java_home: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("PIPELINE_JAVA_HOME", "JAVA_HOME"),
        description="Java to run the broker with (PIPELINE_JAVA_HOME, else JAVA_HOME, else PATH).",
    )
    use_docker: bool = Field(
        default=True, description="Try testcontainers when a Docker engine answers."
    )
