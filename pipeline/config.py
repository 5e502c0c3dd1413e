"""Settings read from the environment (``PIPELINE_*``), validated and frozen.

Only the CLI and the test fixtures build :class:`Settings` from the environment; library code
takes explicit values so that it behaves the same wherever it is called from.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.errors import ConfigError
from pipeline.security import Security

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
    security_protocol: str | None = Field(
        default=None,
        description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (unset: PLAINTEXT, or the "
        "admin credentials of a secure local broker).",
    )
    sasl_mechanism: str | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (default)."
    )
    sasl_username: str | None = Field(default=None, description="SASL user (the principal).")
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (prefer PIPELINE_SASL_PASSWORD_FILE)."
    )
    sasl_password_file: Path | None = Field(
        default=None, description="A file holding the SASL password (e.g. a mounted secret)."
    )
    ssl_cafile: Path | None = Field(default=None, description="CA certificates (PEM).")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (mTLS).")
    ssl_keyfile: Path | None = Field(default=None, description="Client key (mTLS).")
    ssl_check_hostname: bool = Field(
        default=True, description="Verify the broker certificate's host name."
    )

    @property
    def security_configured(self) -> bool:
        """Whether any security setting was given (else a secure local broker's admin).

        Any of them counts, so that a user and password given without the protocol are an
        error (:meth:`security` says which setting is missing) instead of being ignored.
        """
        return any(
            v is not None
            for v in (
                self.security_protocol, self.sasl_mechanism, self.sasl_username,
                self.sasl_password, self.sasl_password_file, self.ssl_cafile,
                self.ssl_certfile, self.ssl_keyfile,
            )
        )  # fmt: skip

    def security(self) -> Security:
        """The client :class:`~pipeline.security.Security` these settings describe.

        Raises:
            ConfigError: Inconsistent settings, or an unreadable password file.
        """
        password = self.sasl_password
        if self.sasl_password_file is not None:
            try:
                text = self.sasl_password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the SASL password file {self.sasl_password_file}: {exc.strerror}"
                ) from exc
            password = SecretStr(text)
        return Security(
            protocol=self.security_protocol or "PLAINTEXT",  # type: ignore[arg-type]
            mechanism=self.sasl_mechanism,  # type: ignore[arg-type]
            username=self.sasl_username,
            password=password,
            cafile=self.ssl_cafile,
            certfile=self.ssl_certfile,
            keyfile=self.ssl_keyfile,
            check_hostname=self.ssl_check_hostname,
        )
