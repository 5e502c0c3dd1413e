"""The secure local broker: SASL_SSL for clients, mutual TLS between nodes, ACLs enforced.

``pipeline kafka start --secure`` runs the local broker (or every node of the local cluster)
as a production cluster is run:

- clients connect to a ``SASL_SSL`` listener (SCRAM-SHA-256/512 over TLS) with a certificate
  signed by a CA generated on first start (:mod:`.tls`), for ``localhost`` and ``127.0.0.1``;
- nodes talk to each other and to the controller quorum over mutual TLS (their certificate
  is their principal, ``User:kafka-broker``), not over an unauthenticated port;
- Kafka's ``StandardAuthorizer`` is on and denies what no ACL allows; ``User:admin`` (its
  SCRAM password generated on first start, kept in a 0600 file) is the super user the CLI
  uses to create users, topics and ACLs.

The material lives in one directory shared by every node (``secure/`` beside the broker's or
cluster's data): ``ca.pem`` (what clients trust), ``kafka-broker.*`` and ``admin.password``.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from pipeline.broker.tls import CertificateFiles, ensure_ca, issue
from pipeline.security import Connection, Security

__all__ = ["ADMIN", "BROKER_PRINCIPAL", "BrokerSecurity"]

#: The super user of the secure local broker.
ADMIN = "admin"
#: The nodes' certificate name, their principal between each other.
BROKER_PRINCIPAL = "kafka-broker"
_SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


@dataclass(frozen=True, slots=True)
class BrokerSecurity:
    """The TLS material and admin credentials of a secure local broker or cluster.

    Args:
        directory: Where the CA, the nodes' certificate and the admin password live.
    """

    directory: Path

    @property
    def exists(self) -> bool:
        """Whether this broker was set up secure (its material is on disk)."""
        return (self.directory / "admin.password").exists()

    @property
    def cafile(self) -> Path:
        return self.directory / "ca.pem"

    def ensure(self) -> CertificateFiles:
        """Create the CA, the nodes' certificate and the admin password (first start only)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ensure_ca(self.directory)
        files = issue(self.directory, BROKER_PRINCIPAL, ca_dir=self.directory)
        password = self.directory / "admin.password"
        if not password.exists():
            fd = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return files

    def admin_password(self) -> SecretStr:
        return SecretStr((self.directory / "admin.password").read_text().strip())

    def admin(self) -> Security:
        """The super user's client settings."""
        return Security(
            protocol="SASL_SSL",  # type: ignore[arg-type]
            mechanism="SCRAM-SHA-512",  # type: ignore[arg-type]
            username=ADMIN,
            password=self.admin_password(),
            cafile=self.cafile,
        )

    def admin_connection(self, bootstrap: str) -> Connection:
        return Connection(bootstrap, self.admin())

    def scram_bootstrap(self) -> list[str]:
        """The storage tool's arguments that create the admin's SCRAM credentials at format
        time (the credentials live in the cluster metadata, so they cannot be added before)."""
        password = self.admin_password().get_secret_value()
        return [
            "--add-scram",
            f"SCRAM-SHA-512=[name={ADMIN},password={password}]",
            "--add-scram",
            f"SCRAM-SHA-256=[name={ADMIN},password={password}]",
        ]

    def listener_settings(self, client: int, internal: int, controller: int) -> dict[str, str]:
        """A node's listener, TLS and authorizer settings (``server.properties``)."""
        keystore = self.ensure().keystore
        return {
            "listeners": (
                f"CLIENT://127.0.0.1:{client},CONTROLLER://127.0.0.1:{controller},"
                f"INTERNAL://127.0.0.1:{internal}"
            ),
            "advertised.listeners": (
                f"CLIENT://127.0.0.1:{client},INTERNAL://127.0.0.1:{internal}"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "INTERNAL",
            "listener.security.protocol.map": "CLIENT:SASL_SSL,CONTROLLER:SSL,INTERNAL:SSL",
            "sasl.enabled.mechanisms": "SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.client.scram-sha-256.sasl.jaas.config": _SCRAM,
            "listener.name.client.scram-sha-512.sasl.jaas.config": _SCRAM,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.cafile),
            # Node to node: both sides show a certificate of the local CA.
            "listener.name.controller.ssl.client.auth": "required",
            "listener.name.internal.ssl.client.auth": "required",
            # A certificate's principal is its CN (User:kafka-broker), not the whole DN.
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+)$/$1/,DEFAULT",
            "authorizer.class.name": ("org.apache.kafka.metadata.authorizer.StandardAuthorizer"),
            "super.users": f"User:{ADMIN};User:{BROKER_PRINCIPAL}",
            "allow.everyone.if.no.acl.found": "false",
        }
