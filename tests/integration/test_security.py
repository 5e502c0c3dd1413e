"""Issue 11 on the secure local broker: SASL_SSL, one principal per stage, ACLs enforced.

The module's broker (``secure_broker``) listens for clients with SASL_SSL only (SCRAM over TLS
from a CA generated for it), talks to itself over mutual TLS, and runs Kafka's
StandardAuthorizer: a principal may do only what an ACL allows.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from examples.orders.pipeline import STAGES
from examples.orders.pipeline import pipeline as orders
from pipeline import (
    AuthenticationError,
    AuthorizationError,
    Connection,
    Publisher,
    SchemaStore,
    Security,
)
from pipeline.broker.local import LocalBroker
from pipeline.broker.secure import BrokerSecurity
from pipeline.broker.tls import ensure_ca
from pipeline.ops.acl import Acl, Operation, Resource, apply, describe, pipeline_acls, revoke
from pipeline.ops.users import client_env, ensure_users
from pipeline.runtime.diagnose import check
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import twostage
from tests.integration.helpers import ROOT, StageProcess, count, read_all, seq_of


def admin_of(broker: LocalBroker) -> Connection:
    address = broker.address()
    assert address is not None
    return broker.connection(address)


def admin_env(broker: LocalBroker) -> dict[str, str]:
    """The CLI's settings for the broker's admin (a password file, never the password)."""
    assert broker.security is not None
    admin = admin_of(broker)
    password = broker.security.directory / "admin.password"
    return {"PIPELINE_BOOTSTRAP": admin.bootstrap, **client_env(admin.security, "admin", password)}


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


def secrets_of(broker: LocalBroker, *directories: Path) -> list[str]:
    """Every password in play: the admin's and each file in ``directories``."""
    assert broker.security is not None
    found = [broker.security.admin_password().get_secret_value()]
    for directory in directories:
        found += [p.read_text().strip() for p in directory.glob("*.password")]
    assert all(len(s) >= 16 for s in found)
    return found


def test_orders_demo_over_sasl_ssl_with_one_least_privilege_principal_per_stage(
    secure_broker: LocalBroker, tmp_path: Path
) -> None:
    env = {**admin_env(secure_broker), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "examples.orders.demo", "--secure", "--orders", "3000",
         "--workdir", str(tmp_path)],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=400,
        check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    logs = {p.stem: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert done.returncode == 0, output + "\n".join(v[-1500:] for v in logs.values())
    assert "PASS" in output and "FAIL" not in output, output

    # Each stage ran as its own user, not as the admin the demo set up with.
    for stage in STAGES:
        [log] = [text for name, text in logs.items() if name.startswith(stage)]
        assert f"SCRAM-SHA-512 as 'orders.{stage}'" in log, log[-2000:]
        assert "as 'admin'" not in log
    # ... holding exactly the ACLs 'pipeline acl' prints, no more.
    printed = cli("acl", "examples.orders.pipeline:pipeline", "--json", env=env)
    assert printed.returncode == 0, printed.stderr
    expected = pipeline_acls(orders)
    admin = admin_of(secure_broker)
    for principal, acls in expected.items():
        held = asyncio.run(describe(admin, f"User:{principal}"))
        assert held == acls, principal
        for rule in acls:
            assert f'"principal": "User:{principal}"' in printed.stdout
            assert f'"name": "{rule.name}"' in printed.stdout

    # No password anywhere: demo output, stage logs, stats files, graph, deploy files.
    passwords = secrets_of(secure_broker, tmp_path / "secrets")
    graph = cli("graph", "examples.orders.pipeline:pipeline", env=env).stdout
    deploy = cli("deploy", "k8s", "examples.orders.pipeline:pipeline", "--secure", env=env).stdout
    stats = "\n".join(p.read_text() for p in tmp_path.glob("*.json"))
    assert "kind: Deployment" in deploy and "secretName: orders-validate-kafka" in deploy
    assert "orders.validate" in graph and stats
    for where, text in {
        "demo output": output, "stage logs": "\n".join(logs.values()), "stats files": stats,
        "pipeline graph": graph, "deploy output": deploy, "acl output": printed.stdout,
    }.items():  # fmt: skip
        for secret in passwords:
            assert secret not in text, f"a password appears in the {where}"


def test_a_wrong_password_fails_in_one_paragraph_within_15s_without_a_retry_storm(
    secure_broker: LocalBroker, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password-0123456789")
    env = {
        **admin_env(secure_broker),
        "PIPELINE_SASL_USERNAME": "orders.validate",
        "PIPELINE_SASL_PASSWORD_FILE": str(wrong),
    }
    t0 = time.monotonic()
    done = cli("run", "examples.orders.pipeline:pipeline", "--stage", "validate", env=env)
    elapsed = time.monotonic() - t0
    err = done.stdout + done.stderr
    assert done.returncode != 0
    assert elapsed < 15, f"took {elapsed:.1f}s"
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "SASL authentication" in line and "'orders.validate'" in line, line
    assert "SCRAM-SHA-512" in line and "127.0.0.1:" in line, line
    assert "not-the-password" not in err
    assert "Traceback" not in err
    assert len(err.splitlines()) <= 4, err  # one client line from aiokafka at most, no storm


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_a_stage_without_its_write_acl_commits_nothing_and_loses_nothing_once_granted(
    secure_broker: LocalBroker, names: Names, tmp_path: Path, delivery: str
) -> None:
    admin = admin_of(secure_broker)
    name = names.pipeline()
    p = twostage.build(name, delivery)
    node = p.node("mark")
    records = 300
    asyncio.run(ensure_topics(admin, topic_specs(p)))
    acls = pipeline_acls(p)
    files = asyncio.run(ensure_users(admin, list(acls), tmp_path / "secrets"))
    write_output = Acl(f"User:{node.principal}", Resource.TOPIC, node.output_topic or "",
                       Operation.WRITE)  # fmt: skip
    assert write_output in acls[node.principal]
    asyncio.run(apply(admin, [a for a in acls[node.principal] if a != write_output]))
    asyncio.run(apply(admin, acls[f"{name}.publisher"]))

    publisher = Connection(
        admin.bootstrap,
        Security(
            protocol="SASL_SSL",  # type: ignore[arg-type]
            username=f"{name}.publisher",
            password=SecretStr(files[f"{name}.publisher"].read_text().strip()),
            cafile=admin.security.cafile,
        ),
    )
    asyncio.run(_publish(publisher, p.source, records))
    with pytest.raises(AuthorizationError, match=f"the topic {node.output_topic}"):
        asyncio.run(_publish(publisher, node.output_topic or "", 1))  # not the publisher's

    env = {
        "TWO_PIPELINE": name, "TWO_DELIVERY": delivery,
        **client_env(admin.security, node.principal, files[node.principal]),
    }  # fmt: skip
    ref = "tests.integration.apps.twostage:build"
    denied = StageProcess(ref, "mark", admin.bootstrap, env, tmp_path / "denied.log")
    code = denied.proc.wait(60)
    denied.terminate()
    log = denied.output()
    assert code != 0, log[-2000:]
    [line] = [x for x in log.splitlines() if x.startswith("error:")]
    assert "not authorized" in line and f"WRITE on the topic {node.output_topic}" in line, line
    assert f"principal=User:{node.principal}" in line, line
    # Nothing committed past records whose output was never written.
    committed = asyncio.run(_committed(admin, node.group, node.input_topic))
    assert sum(committed.values()) == 0, committed
    assert asyncio.run(count(admin, node.output_topic or "")) == 0

    asyncio.run(apply(admin, [write_output]))
    granted = StageProcess(ref, "mark", admin.bootstrap, env, tmp_path / "granted.log")
    try:
        deadline = time.monotonic() + 60
        while asyncio.run(_lag(admin, node.group, node.input_topic)) and (
            time.monotonic() < deadline
        ):
            assert granted.proc.poll() is None, granted.output()[-2000:]
            time.sleep(0.5)
    finally:
        assert granted.terminate() == 0, granted.output()[-2000:]
    out = asyncio.run(read_all(admin, node.output_topic or "", read_committed=True))
    assert sorted(seq_of(r) for r in out) == list(range(1, records + 1))


async def _publish(target: Connection, topic: str, records: int) -> None:
    codec = SchemaStore.from_directory(twostage.SCHEMAS).codec(twostage.EVENT)
    async with Publisher(target, topic, codec, "key") as pub:
        for i in range(records):
            pub.buffer({"key": f"k{i % 7}", "n": i, "hops": 0, "payload": "x"}, seq=i + 1)


async def _committed(admin: Connection, group: str, topic: str) -> dict[int, int]:
    from aiokafka.admin import AIOKafkaAdminClient

    client = AIOKafkaAdminClient(**admin.client_args())
    await client.start()
    try:
        found = await client.list_consumer_group_offsets(group)
    finally:
        await client.close()
    return {tp.partition: max(0, m.offset) for tp, m in found.items() if tp.topic == topic}


async def _lag(admin: Connection, group: str, topic: str) -> int:
    from tests.integration.helpers import end_offsets

    ends = await end_offsets(admin, topic)
    done = await _committed(admin, group, topic)
    return sum(end - done.get(p, 0) for p, end in ends.items())


def test_plaintext_against_tls_and_an_untrusted_ca_are_named(
    secure_broker: LocalBroker, tmp_path: Path
) -> None:
    admin = admin_of(secure_broker)
    plain = asyncio.run(check(Connection(admin.bootstrap)))
    assert isinstance(plain, AuthenticationError)
    assert "speaks TLS" in str(plain) and "PLAINTEXT" in str(plain), plain

    other_ca = ensure_ca(tmp_path / "other-ca")
    fields = {
        "protocol": "SASL_SSL", "username": "admin",
        "password": secure_broker.security.admin_password() if secure_broker.security else None,
    }  # fmt: skip
    untrusted = Connection(admin.bootstrap, Security(**fields, cafile=other_ca))  # type: ignore[arg-type]
    wrong_ca = asyncio.run(check(untrusted))
    assert isinstance(wrong_ca, AuthenticationError)
    assert "not trusted" in str(wrong_ca) and str(other_ca) in str(wrong_ca), wrong_ca

    assert asyncio.run(check(admin)) is None  # the right settings pass the same check

    # The CLI says the same in one paragraph and exits non-zero.
    env = {"PIPELINE_BOOTSTRAP": admin.bootstrap, "PIPELINE_SECURITY_PROTOCOL": "PLAINTEXT"}
    done = cli("tail", "orders.placed", env=env, timeout=30)
    assert done.returncode != 0
    assert re.search(r"error: .*speaks TLS", done.stderr), done.stderr


def test_acl_revoke_and_describe_round_trip(secure_broker: LocalBroker, names: Names) -> None:
    admin = admin_of(secure_broker)
    rule = Acl(f"User:{names.pipeline()}", Resource.TOPIC, names.topic("x"), Operation.READ)
    asyncio.run(apply(admin, [rule, rule]))  # the same ACL twice: kept once
    assert asyncio.run(describe(admin, rule.principal)) == [rule]
    assert asyncio.run(revoke(admin, [rule])) == 1
    assert asyncio.run(describe(admin, rule.principal)) == []


def test_the_broker_material_is_private(secure_broker: LocalBroker) -> None:
    assert isinstance(secure_broker.security, BrokerSecurity)
    directory = secure_broker.security.directory
    for secret in ("admin.password", "ca.key", "kafka-broker.key", "kafka-broker.keystore.pem"):
        assert (directory / secret).stat().st_mode & 0o077 == 0, secret


def test_a_secure_three_node_cluster_replicates_over_mutual_tls(
    tmp_path: Path, names: Names
) -> None:
    from pipeline.broker.cluster import LocalCluster
    from pipeline.broker.select import local_parts
    from pipeline.config import Settings
    from pipeline.runtime.topics import TopicSpec

    settings = Settings()
    if settings.bootstrap:
        pytest.skip("a cluster of this test's own needs the local JVM broker")
    java, jars = local_parts(settings)
    cluster = LocalCluster(tmp_path / "c", size=3, jars=jars, java=java, heap_mb=256, secure=True)
    cluster.start()
    try:
        admin = cluster.connection()
        assert admin.security.protocol.sasl and len(admin.bootstrap.split(",")) == 3
        assert asyncio.run(check(Connection(admin.bootstrap))) is not None  # plaintext refused
        topic = names.topic()
        asyncio.run(ensure_topics(admin, [TopicSpec(topic, "test", 3)]))  # RF 3, min ISR 2
        asyncio.run(_publish(admin, topic, 200))  # acks=all: written on two nodes over mTLS
        records = asyncio.run(read_all(admin, topic))
        assert sorted(seq_of(r) for r in records) == list(range(1, 201))
        # Every node answers its admin over SASL_SSL and leads partitions of the cluster.
        status = cluster.status()
        assert all(n.broker.answering for n in status), status
        assert sum(n.leads or 0 for n in status) >= 3
    finally:
        cluster.stop()


def test_mutual_tls_client_certificates(secure_broker: LocalBroker) -> None:
    """The nodes' own listener wants a client certificate: the mTLS settings pass it."""
    assert secure_broker.security is not None
    ports = secure_broker.ports()
    assert ports is not None and ports[2] is not None
    material = secure_broker.security.directory
    internal = f"127.0.0.1:{ports[2]}"
    with_cert = Security(
        protocol="SSL",  # type: ignore[arg-type]
        cafile=material / "ca.pem",
        certfile=material / "kafka-broker.pem",
        keyfile=material / "kafka-broker.key",
    )
    assert asyncio.run(check(Connection(internal, with_cert))) is None
    without = Security(protocol="SSL", cafile=material / "ca.pem")  # type: ignore[arg-type]
    refused = asyncio.run(check(Connection(internal, without)))
    assert isinstance(refused, AuthenticationError)
    assert "client certificate" in str(refused), refused


def test_tls_against_a_plaintext_listener_is_named(kafka_bootstrap: str, tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path / "ca")
    tls = Security(protocol="SSL", cafile=ca)  # type: ignore[arg-type]
    found = asyncio.run(check(Connection(kafka_bootstrap, tls)))
    assert isinstance(found, AuthenticationError)
    assert "does not speak TLS" in str(found) and "PLAINTEXT" in str(found), found


def test_kafka_user_creates_a_scram_user_that_can_log_in(
    secure_broker: LocalBroker, names: Names, tmp_path: Path
) -> None:
    admin = admin_of(secure_broker)
    user, secret = names.pipeline("svc"), tmp_path / "svc.password"
    made = cli("kafka", "user", user, "--password-file", str(secret), env=admin_env(secure_broker))
    assert made.returncode == 0, made.stderr
    assert "a new random password written to" in made.stdout
    assert secret.stat().st_mode & 0o077 == 0
    assert secret.read_text().strip() not in made.stdout + made.stderr
    login = Security(
        protocol="SASL_SSL",  # type: ignore[arg-type]
        mechanism="SCRAM-SHA-256",  # type: ignore[arg-type]
        username=user,
        password=SecretStr(secret.read_text().strip()),
        cafile=admin.security.cafile,
    )
    assert asyncio.run(check(Connection(admin.bootstrap, login))) is None
    again = cli("kafka", "user", user, "--password-file", str(secret), env=admin_env(secure_broker))
    assert again.returncode == 0 and "the password in" in again.stdout  # kept, set again
