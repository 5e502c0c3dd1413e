"""SCRAM users: create or change a user's password on the cluster (AlterUserScramCredentials).

aiokafka has no client for this API (Kafka's key 51), so its request is defined here with
aiokafka's protocol types. The password never leaves this process: the client derives the
salted password (PBKDF2 with a fresh random salt, RFC 5802) and sends only that, as Kafka's
own ``kafka-configs --alter --add-config SCRAM-SHA-512=[password=...]`` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)
from pydantic import SecretStr

from pipeline.errors import BrokerError, ConfigError
from pipeline.runtime.kafka import translate
from pipeline.security import Bootstrap, Mechanism, Security, connection

__all__ = ["ITERATIONS", "client_env", "ensure_users", "set_password"]

#: PBKDF2 rounds of a stored credential (Kafka's minimum is 4096).
ITERATIONS = 8192
_MECHANISMS = {Mechanism.SCRAM_SHA_256: (1, "sha256"), Mechanism.SCRAM_SHA_512: (2, "sha512")}


class _AlterScramResponseV0(Response):  # type: ignore[misc]
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScramV0(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterScramResponseV0
    SCHEMA = Schema(
        (
            "deletions",
            CompactArray(
                ("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields)
            ),
        ),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScram(Request[_AlterScramV0]):  # type: ignore[misc]
    API_KEY = 51

    def __init__(self, upsertions: list[tuple[Any, ...]]) -> None:
        self._upsertions = upsertions

    def build(self, request_struct_class: type[Any]) -> Any:
        return request_struct_class([], self._upsertions, {})


def _credential(name: str, password: str, mechanism: Mechanism) -> tuple[Any, ...]:
    code, digest = _MECHANISMS[mechanism]
    salt = os.urandom(32)
    salted = hashlib.pbkdf2_hmac(digest, password.encode(), salt, ITERATIONS)
    return (name, code, ITERATIONS, salt, salted, {})


async def set_password(
    target: Bootstrap,
    user: str,
    password: SecretStr,
    mechanisms: tuple[Mechanism, ...] = (Mechanism.SCRAM_SHA_512, Mechanism.SCRAM_SHA_256),
) -> None:
    """Create SCRAM user ``user`` or change its password (as a user allowed to, e.g. admin).

    Raises:
        ConfigError: An empty user name or password.
        BrokerError: The cluster refused (not authorized, SCRAM not enabled, ...).
    """
    secret = password.get_secret_value()
    if not user or not secret:
        raise ConfigError("a SCRAM user needs a name and a non-empty password")
    conn = connection(target)
    admin = AIOKafkaAdminClient(**conn.client_args(), client_id="pipeline-users")
    results: list[Any] = []
    try:
        await admin.start()
        # One request per mechanism: Kafka refuses two changes of one user in a request.
        for mechanism in mechanisms:
            request = _AlterScram([_credential(user, secret, mechanism)])
            results.extend((await admin._send_request(request)).results)
    except KafkaError as exc:
        raise translate(exc, f"setting the password of user '{user}'") from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    for name, code, message, _tags in results:
        if code:
            error = for_code(code)
            raise BrokerError(
                f"setting the password of user '{name}' failed: {error.__name__}: "
                f"{message or error.description}"
            )


def ensure_password_file(path: Path) -> bool:
    """Write a random password to ``path`` (mode 0600) unless it exists; whether it wrote."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24))
    return True


def password_file(directory: Path, user: str) -> Path:
    """``directory/<user>.password``, with a random password written there if missing."""
    path = directory / f"{user}.password"
    ensure_password_file(path)
    return path


async def ensure_users(target: Bootstrap, users: list[str], directory: Path) -> dict[str, Path]:
    """Give each user the password in ``directory/<user>.password`` (a random one written
    there first when the file is missing); returns each user's password file."""
    files = {}
    for user in users:
        files[user] = password_file(directory, user)
        await set_password(target, user, SecretStr(files[user].read_text().strip()))
    return files


def client_env(admin: Security, user: str, password: Path) -> dict[str, str]:
    """The ``PIPELINE_*`` variables a process needs to connect as ``user``: the admin's
    protocol, mechanism and CA, another user and its password file (never the password)."""
    env = {
        "PIPELINE_SECURITY_PROTOCOL": str(admin.protocol),
        "PIPELINE_SASL_MECHANISM": str(admin.mechanism),
        "PIPELINE_SASL_USERNAME": user,
        "PIPELINE_SASL_PASSWORD_FILE": str(password),
    }
    if admin.cafile is not None:
        env["PIPELINE_SSL_CAFILE"] = str(admin.cafile)
    return env
