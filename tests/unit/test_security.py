"""Client security settings, least-privilege ACLs and secure deploy files, without a broker."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from aiokafka import errors as kerr
from cryptography import x509
from pydantic import SecretStr

from examples.orders.pipeline import build
from pipeline import (
    AuthenticationError,
    AuthorizationError,
    ConfigError,
    Connection,
    Pipeline,
    Security,
    Settings,
)
from pipeline.broker.tls import issue
from pipeline.deploy import kubernetes, to_yaml
from pipeline.ops.acl import Acl, Operation, Resource, pipeline_acls, stage_acls
from pipeline.runtime.kafka import translate
from pipeline.security import Protocol, connection
from tests.integration.apps import twostage

SECRET = "s3cret-that-must-never-show"


def sasl(**more: object) -> Security:
    args: dict[str, object] = {
        "protocol": "sasl_ssl", "username": "orders.validate", "password": SecretStr(SECRET),
    }  # fmt: skip
    return Security(**{**args, **more})  # type: ignore[arg-type]


def test_sasl_defaults_to_scram_sha_512_and_never_shows_the_password() -> None:
    sec = sasl()
    assert sec.protocol is Protocol.SASL_SSL and str(sec.mechanism) == "SCRAM-SHA-512"
    assert sec.principal == "User:orders.validate"
    for shown in (repr(sec), str(sec), sec.describe(), Connection("h:1", sec).describe()):
        assert SECRET not in shown
    args = sec.client_args()
    assert args["sasl_plain_password"] == SECRET  # only what goes to aiokafka holds it
    assert args["security_protocol"] == "SASL_SSL"
    assert isinstance(args["ssl_context"], ssl.SSLContext)
    assert sec.ssl_context() is sasl().ssl_context()  # one context per settings, shared


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"protocol": "SASL_SSL", "password": SecretStr("x")}, "needs a SASL user"),
        ({"protocol": "SASL_PLAINTEXT", "username": "u"}, "PIPELINE_SASL_PASSWORD_FILE"),
        ({"protocol": "PLAINTEXT", "username": "u"}, "security protocol is PLAINTEXT"),
        ({"protocol": "PLAINTEXT", "cafile": Path("/x.pem")}, "TLS files are set"),
        ({"protocol": "SSL", "cafile": Path("/no/such/ca.pem")}, "does not exist"),
        ({"protocol": "TLS"}, "is not one of"),
        ({"protocol": "SASL_SSL", "mechanism": "GSSAPI", "username": "u",
          "password": SecretStr("p")}, "mechanism 'GSSAPI'"),
    ],
)  # fmt: skip
def test_inconsistent_settings_are_refused_with_what_to_set(
    kwargs: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        Security(**kwargs)  # type: ignore[arg-type]


def test_settings_read_the_password_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    monkeypatch.setenv("PIPELINE_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("PIPELINE_SASL_USERNAME", "svc")
    monkeypatch.setenv("PIPELINE_SASL_PASSWORD_FILE", str(secret))
    settings = Settings()
    assert settings.security_configured
    sec = settings.security()
    assert sec.password is not None and sec.password.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    secret.unlink()
    with pytest.raises(ConfigError, match="cannot read the SASL password file"):
        Settings().security()


def test_a_user_without_a_protocol_is_an_error_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_SASL_USERNAME", "orders.validate")
    monkeypatch.setenv("PIPELINE_SASL_PASSWORD", SECRET)
    settings = Settings()
    assert settings.security_configured  # not silently the local broker's admin
    with pytest.raises(ConfigError, match="PIPELINE_SECURITY_PROTOCOL=SASL_SSL"):
        settings.security()


def test_a_bootstrap_string_is_a_plaintext_connection() -> None:
    conn = connection("127.0.0.1:9092")
    assert conn.client_args() == {
        "bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT",
    }  # fmt: skip
    assert connection(conn) is conn and str(conn) == "127.0.0.1:9092"


def test_a_stage_gets_its_own_topics_and_nothing_else() -> None:
    p = twostage.build("sec", "at_least_once")
    mark = p.node("mark")
    user = "User:sec.mark"
    R, W, C, D = Operation.READ, Operation.WRITE, Operation.CREATE, Operation.DESCRIBE
    expected = {
        Acl(user, Resource.TOPIC, "sec.in", R), Acl(user, Resource.TOPIC, "sec.in", D),
        Acl(user, Resource.GROUP, "sec.mark", R),
        *(Acl(user, Resource.TOPIC, "sec.mark", op) for op in (W, D, C)),
        *(Acl(user, Resource.TOPIC, "sec.mark.dlq", op) for op in (W, D, C)),
        *(Acl(user, Resource.TOPIC, "sec.mark.state", op) for op in (R, W, D, C)),
        Acl(user, Resource.CLUSTER, "kafka-cluster", Operation.IDEMPOTENT_WRITE),
    }  # fmt: skip
    assert set(stage_acls(mark, p)) == expected
    # The next stage's topics are not the first stage's business.
    assert not any("count" in a.name for a in stage_acls(mark, p))


def test_exactly_once_adds_the_stage_transactional_id_prefix() -> None:
    p = twostage.build("sec", "exactly_once")
    acls = stage_acls(p.node("count"), p)
    txn = [a for a in acls if a.resource is Resource.TRANSACTIONAL_ID]
    assert {a.operation for a in txn} == {Operation.WRITE, Operation.DESCRIBE}
    assert all(a.prefixed and a.name == "sec.count." for a in txn)
    # ... which every transactional id of the stage starts with.
    assert "sec.count.sec.mark.2".startswith(txn[0].name)


def test_a_table_the_stage_reads_and_a_chosen_principal_are_granted() -> None:
    orders = build("shop")
    acls = pipeline_acls(orders, publisher="checkout-api")
    enrich = acls["shop.enrich"]
    assert Acl("User:shop.enrich", Resource.TOPIC, "shop.customers", Operation.READ) in enrich
    assert set(acls) == {*(f"shop.{s}" for s in ("validate", "enrich", "price", "fraud",
                                                  "notify")), "checkout-api"}  # fmt: skip
    assert {a.name for a in acls["checkout-api"]} == {"shop.placed", "kafka-cluster"}

    base = Pipeline("own", source="own.in", key="key", schemas=twostage.SCHEMAS)
    named = base.then(twostage.mark, principal="svc-mark")
    assert named.node("mark").principal == "svc-mark"
    assert set(pipeline_acls(named)) == {"svc-mark", "own.publisher"}


def test_a_denied_write_names_the_operation_and_the_topic() -> None:
    exc = translate(
        kerr.TopicAuthorizationFailedError(), "writing records", topic="p.s", operation="WRITE"
    )
    assert isinstance(exc, AuthorizationError) and not exc.retriable
    assert "WRITE on the topic p.s" in str(exc) and "pipeline acl" in str(exc)
    group = translate(kerr.GroupAuthorizationFailedError(), "joining", group="p.s")
    assert "access on the consumer group p.s" in str(group)


def test_secure_kubernetes_manifests_reference_secrets_and_validate() -> None:
    orders = build()
    docs = list(yaml.safe_load_all(to_yaml(kubernetes(orders, "m:p", secure=True))))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    auths = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert len(deployments) == len(auths) == len(orders.nodes())
    for doc, node in zip(deployments, orders.nodes(), strict=True):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        [container] = doc["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PIPELINE_SASL_USERNAME"] == node.principal
        assert env["PIPELINE_SASL_PASSWORD_FILE"].startswith("/var/run/secrets/")
        assert "PIPELINE_SASL_PASSWORD" not in env  # a file from a Secret, never a value
        volumes = doc["spec"]["template"]["spec"]["volumes"]
        assert {v["secret"]["secretName"] for v in volumes} == {
            f"{doc['metadata']['name']}-kafka", "kafka-ca",
        }  # fmt: skip


def test_the_local_ca_signs_a_certificate_for_loopback(tmp_path: Path) -> None:
    files = issue(tmp_path, "kafka-broker", ca_dir=tmp_path)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert files.key.stat().st_mode & 0o077 == 0 and files.keystore.stat().st_mode & 0o077 == 0
    context = ssl.create_default_context(cafile=str(files.ca))  # Python trusts the CA file
    assert context.cert_store_stats()["x509_ca"] == 1
    again = issue(tmp_path, "kafka-broker", ca_dir=tmp_path)
    assert again.cert.read_bytes() == files.cert.read_bytes()  # kept, not re-issued


async def test_a_listener_that_hangs_up_is_explained_and_a_closed_port_is_unreachable() -> None:
    from pipeline import BrokerUnavailableError
    from pipeline.broker.local import free_port
    from pipeline.runtime.diagnose import check

    async def hang_up(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        found = await check(f"127.0.0.1:{port}", wait=2)
    assert isinstance(found, AuthenticationError)
    assert f"127.0.0.1:{port} closed the connection" in str(found)
    assert "expects SASL" in str(found)
    gone = await check(f"127.0.0.1:{free_port()}", wait=2)
    assert isinstance(gone, BrokerUnavailableError) and "no Kafka broker answers" in str(gone)
