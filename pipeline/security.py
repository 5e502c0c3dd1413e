"""How every connection the framework opens authenticates and encrypts.

A :class:`Connection` is the bootstrap address plus its :class:`Security`; every Kafka client
the framework builds (stage workers, publishers, admin, tables, dead-letter tools, ``tail``,
status) takes its arguments from :meth:`Connection.client_args`, the one place settings turn
into aiokafka arguments. APIs that took a bootstrap string still do: a plain string is a
PLAINTEXT connection (:func:`connection`).

The password is a :class:`pydantic.SecretStr`: its ``repr`` and ``str`` are ``**********``, and
:meth:`Security.describe` (what logs, errors and ``pipeline graph`` show) names the protocol,
mechanism, user and CA file, never the password.

Example:
    >>> sec = Security(protocol="SASL_SSL", mechanism="SCRAM-SHA-512", username="orders.validate",
    ...                password=SecretStr("s3cret"), cafile=None)
    >>> sec.describe()
    "SASL_SSL, SCRAM-SHA-512 as 'orders.validate', system CAs"
    >>> "s3cret" in repr(sec)
    False
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias

from pydantic import SecretStr

from pipeline.errors import ConfigError

__all__ = [
    "PLAINTEXT", "Bootstrap", "Connection", "Mechanism", "Protocol", "SecretStr", "Security",
    "connection",
]  # fmt: skip


class Protocol(StrEnum):
    """Kafka's ``security.protocol``: transport (plain or TLS) x authentication (SASL or not)."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def tls(self) -> bool:
        return self in (Protocol.SSL, Protocol.SASL_SSL)

    @property
    def sasl(self) -> bool:
        return self in (Protocol.SASL_PLAINTEXT, Protocol.SASL_SSL)


class Mechanism(StrEnum):
    """The SASL mechanisms a username and password work with."""

    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


def _enum(kind: type[StrEnum], value: object, what: str) -> Any:
    try:
        return kind(str(value).upper())
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(f"{what} {value!r} is not one of {choices}") from None


@dataclass(frozen=True, slots=True)
class Security:
    """Authentication and encryption of a client connection.

    Args:
        protocol: PLAINTEXT (default), SSL, SASL_PLAINTEXT or SASL_SSL.
        mechanism: SASL mechanism (SASL protocols only; default SCRAM-SHA-512).
        username: SASL user (the principal ``User:<username>``).
        password: SASL password; never printed, logged or written to files.
        cafile: PEM file of the CAs that sign the brokers' certificates (``None``: the
            system's CAs).
        certfile: Client certificate (PEM) for mutual TLS.
        keyfile: Its private key (PEM; default: inside ``certfile``).
        check_hostname: Verify that the broker's certificate names the address dialled.

    Raises:
        ConfigError: A SASL protocol without user or password, a file that does not exist,
            a client key without its certificate.
    """

    protocol: Protocol = Protocol.PLAINTEXT
    mechanism: Mechanism | None = None
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=True)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        protocol = _enum(Protocol, self.protocol, "security protocol")
        object.__setattr__(self, "protocol", protocol)
        if self.password is not None and not isinstance(self.password, SecretStr):
            object.__setattr__(self, "password", SecretStr(str(self.password)))
        if protocol.sasl:
            mechanism = _enum(Mechanism, self.mechanism or Mechanism.SCRAM_SHA_512, "mechanism")
            object.__setattr__(self, "mechanism", mechanism)
            if not self.username:
                raise ConfigError(
                    f"security protocol {protocol} needs a SASL user: set "
                    f"PIPELINE_SASL_USERNAME (or --sasl-username)"
                )
            if self.password is None or not self.password.get_secret_value():
                raise ConfigError(
                    f"security protocol {protocol} needs the password of SASL user "
                    f"'{self.username}': set PIPELINE_SASL_PASSWORD_FILE (a file holding it) "
                    f"or PIPELINE_SASL_PASSWORD"
                )
        elif any(v is not None for v in (self.mechanism, self.username, self.password)):
            raise ConfigError(
                f"a SASL user, password or mechanism is set but the security protocol is "
                f"{protocol}: "
                f"set PIPELINE_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)"
            )
        if not protocol.tls and (self.cafile or self.certfile or self.keyfile):
            raise ConfigError(
                f"TLS files are set but the security protocol is {protocol}: set "
                f"PIPELINE_SECURITY_PROTOCOL=SSL or SASL_SSL"
            )
        if self.keyfile is not None and self.certfile is None:
            raise ConfigError("a client key file needs its certificate (PIPELINE_SSL_CERTFILE)")
        for what, path in (("CA", self.cafile), ("certificate", self.certfile),
                           ("key", self.keyfile)):  # fmt: skip
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"the TLS {what} file {path} does not exist")

    def describe(self) -> str:
        """The settings in words, for logs and errors (never the password)."""
        parts = [str(self.protocol)]
        if self.protocol.sasl:
            parts.append(f"{self.mechanism} as '{self.username}'")
        if self.protocol.tls:
            parts.append(f"CA {self.cafile}" if self.cafile else "system CAs")
            if self.certfile:
                parts.append(f"client certificate {self.certfile}")
            if not self.check_hostname:
                parts.append("hostname not verified")
        return ", ".join(parts)

    @property
    def principal(self) -> str | None:
        """``User:<name>`` as the broker's authorizer sees this client (SASL only)."""
        return f"User:{self.username}" if self.protocol.sasl else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (one per settings, shared by every client), or ``None``."""
        if not self.protocol.tls:
            return None
        return _context(
            self.cafile, self.certfile, self.keyfile, self.check_hostname,
        )  # fmt: skip

    def client_args(self) -> dict[str, Any]:
        """aiokafka's keyword arguments for these settings."""
        args: dict[str, Any] = {"security_protocol": str(self.protocol)}
        if self.protocol.tls:
            args["ssl_context"] = self.ssl_context()
        if self.protocol.sasl:
            assert self.password is not None  # checked in __post_init__
            args["sasl_mechanism"] = str(self.mechanism)
            args["sasl_plain_username"] = self.username
            args["sasl_plain_password"] = self.password.get_secret_value()
        return args


@functools.lru_cache(maxsize=16)
def _context(
    cafile: Path | None, certfile: Path | None, keyfile: Path | None, check_hostname: bool
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        context.check_hostname = check_hostname
        if certfile is not None:
            context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS files (CA {cafile}, certificate {certfile}, key {keyfile}): {exc}"
        ) from exc
    return context


PLAINTEXT = Security()


@dataclass(frozen=True, slots=True)
class Connection:
    """Where a Kafka cluster is and how to talk to it.

    Example:
        >>> str(Connection("127.0.0.1:9092"))
        '127.0.0.1:9092'
        >>> Connection("127.0.0.1:9092").client_args()["security_protocol"]
        'PLAINTEXT'
    """

    bootstrap: str
    security: Security = PLAINTEXT

    def client_args(self) -> dict[str, Any]:
        """``bootstrap_servers`` and the security arguments, for any aiokafka client."""
        return {"bootstrap_servers": self.bootstrap, **self.security.client_args()}

    def describe(self) -> str:
        """``127.0.0.1:9093 (SASL_SSL, SCRAM-SHA-512 as 'x', CA ...)``: for messages."""
        if self.security.protocol is Protocol.PLAINTEXT:
            return self.bootstrap
        return f"{self.bootstrap} ({self.security.describe()})"

    def __str__(self) -> str:
        return self.bootstrap


#: What APIs that connect accept: a bootstrap string (PLAINTEXT) or a :class:`Connection`.
Bootstrap: TypeAlias = str | Connection


def connection(target: Bootstrap) -> Connection:
    """``target`` as a :class:`Connection` (a string is a PLAINTEXT one)."""
    return target if isinstance(target, Connection) else Connection(target)
