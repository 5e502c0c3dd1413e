"""Why a connection to Kafka failed, in words a user can act on.

aiokafka reports every failed bootstrap as ``Unable to bootstrap from [...]`` and logs the
cause (a refused password, an untrusted certificate, a TLS listener dialled in plaintext) at
ERROR on its own logger. When a client of the framework cannot start, :func:`explain` dials
the bootstrap servers once more itself, with the same settings, and turns what happens into
one paragraph: which address, which protocol, mechanism and user (never the password), what
the broker said, and which setting to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from aiokafka import errors as kerr
from aiokafka.conn import create_conn

from pipeline.errors import AuthenticationError, BrokerUnavailableError, PipelineError
from pipeline.runtime.kafka import translate
from pipeline.security import Bootstrap, Connection, connection

__all__ = ["check", "explain", "start_client"]


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    found = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        with contextlib.suppress(ValueError):
            found.append((host.strip("[]") or "127.0.0.1", int(port)))
    return found


async def _accepts(host: str, port: int, wait: float, *, tls: bool = False) -> bool:
    """Whether the listener accepts a TCP connection (and, with ``tls``, completes a TLS
    handshake, its certificate not checked)."""
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context), wait)
    except (TimeoutError, OSError, ssl.SSLError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


async def _check_one(conn: Connection, host: str, port: int, wait: float) -> PipelineError | None:
    sec = conn.security
    address = f"{host}:{port}"
    args = sec.client_args()
    try:
        client = await asyncio.wait_for(
            create_conn(host, port, request_timeout_ms=int(wait * 1000), **args), wait
        )
    except ssl.SSLCertVerificationError as exc:
        if "hostname" in str(exc.verify_message).lower():
            return AuthenticationError(
                f"TLS to the Kafka broker at {address} failed: its certificate does not name "
                f"{host} ({exc.verify_message}). Connect by a name the certificate has, or "
                f"set PIPELINE_SSL_CHECK_HOSTNAME=false (weaker: any certificate of the CA "
                f"passes)"
            )
        trusted = f"the CA file {sec.cafile}" if sec.cafile else "the system's CAs"
        return AuthenticationError(
            f"TLS to the Kafka broker at {address} failed: its certificate is not trusted by "
            f"{trusted} ({exc.verify_message}). Point PIPELINE_SSL_CAFILE at the CA that "
            f"signed the brokers' certificates"
        )
    except ssl.SSLError as exc:
        return AuthenticationError(
            f"TLS to the Kafka broker at {address} failed ({exc.reason or exc}): the listener "
            f"there does not speak TLS. Its security protocol is probably PLAINTEXT or "
            f"SASL_PLAINTEXT, not {sec.protocol}"
        )
    except kerr.SaslAuthenticationFailed as exc:
        return AuthenticationError(
            f"SASL authentication at the Kafka broker at {address} failed: the broker refused "
            f"user '{sec.username}' with {sec.mechanism} (a wrong password, or no such user "
            f"for that mechanism). The broker said: {exc}"
        )
    except kerr.UnsupportedSaslMechanismError as exc:
        return AuthenticationError(
            f"the Kafka broker at {address} does not enable SASL mechanism {sec.mechanism} "
            f"(user '{sec.username}'): {exc}. Set PIPELINE_SASL_MECHANISM to one it enables"
        )
    except (ConnectionError, OSError) as exc:
        if sec.protocol.tls and await _accepts(host, port, wait):
            return AuthenticationError(
                f"TLS to the Kafka broker at {address} failed: the listener hung up during the "
                f"handshake ({type(exc).__name__}): it does not speak TLS. Its security "
                f"protocol is probably PLAINTEXT or SASL_PLAINTEXT, not {sec.protocol}"
            )
        return BrokerUnavailableError(
            f"no Kafka broker answers at {address} ({exc}); check the bootstrap address",
            retriable=True,
        )
    except TimeoutError:
        return BrokerUnavailableError(f"the broker at {address} did not answer in {wait:g}s")
    except kerr.KafkaError as exc:
        return await _closed(conn, host, port, wait, exc)
    client.close()
    return None


async def _closed(
    conn: Connection, host: str, port: int, wait: float, exc: BaseException
) -> PipelineError:
    """The broker hung up during the first exchange: say what it probably expected."""
    sec = conn.security
    address = f"{host}:{port}"
    if not sec.protocol.tls and await _accepts(host, port, wait, tls=True):
        return AuthenticationError(
            f"the Kafka broker at {address} closed the connection: its listener speaks TLS, "
            f"and this client connects in {sec.protocol}. Set PIPELINE_SECURITY_PROTOCOL="
            f"SASL_SSL (or SSL) and PIPELINE_SSL_CAFILE"
        )
    if not sec.protocol.sasl:
        after = "TLS handshake" if sec.protocol.tls else "first request"
        expects = "SASL authentication (security protocol SASL_SSL or SASL_PLAINTEXT)"
        if sec.protocol.tls:
            expects += (
                ", or does not accept this client certificate" if sec.certfile else
                ", or a client certificate (mutual TLS: PIPELINE_SSL_CERTFILE and "
                "PIPELINE_SSL_KEYFILE)"
            )  # fmt: skip
        return AuthenticationError(
            f"the Kafka broker at {address} closed the connection after the {after}: its "
            f"listener probably expects {expects} ({exc})"
        )
    return BrokerUnavailableError(f"the broker at {address} closed the connection ({exc})")


async def check(target: Bootstrap, wait: float = 5.0) -> PipelineError | None:
    """Dial each bootstrap server with the connection's security until one works.

    Returns:
        ``None`` when one server accepts the connection (TLS and SASL included), else the
        most telling failure (a security mismatch before an unreachable address).
    """
    conn = connection(target)
    problems: list[PipelineError] = []
    for host, port in _hosts(conn.bootstrap):
        problem = await _check_one(conn, host, port, wait)
        if problem is None:
            return None
        problems.append(problem)
    for problem in problems:
        if isinstance(problem, AuthenticationError):
            return problem
    return problems[0] if problems else None


async def explain(target: Bootstrap, exc: BaseException, action: str) -> PipelineError:
    """``exc`` (a client that could not start) as the framework's error, with the cause
    found by dialling again when it is a connection failure."""
    if isinstance(exc, kerr.KafkaConnectionError | kerr.NoBrokersAvailable):
        found = await check(target)
        if found is not None:
            found.message = f"{action}: {found.message}"
            found.args = (found.message,)
            return found
    return translate(exc, action)


async def start_client(client: Any, target: Bootstrap, action: str) -> None:
    """``await client.start()``, its failure explained (see :func:`explain`).

    Raises:
        AuthenticationError: Credentials, certificate or protocol refused.
        BrokerUnavailableError: No broker answers.
    """
    try:
        await client.start()
    except kerr.KafkaError as exc:
        with contextlib.suppress(Exception):
            await (client.close() if hasattr(client, "close") else client.stop())
        raise await explain(target, exc, action) from exc
