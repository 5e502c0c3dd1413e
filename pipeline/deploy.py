"""Deployment files for a pipeline: one service per stage, scaled on its own.

``pipeline deploy compose MODULE:PIPELINE`` prints a docker-compose file: a single-node KRaft
Kafka, a one-shot ``setup`` service (creates the pipeline's topics, then runs any ``--setup``
commands, e.g. seeding a table), and one service per stage running ``pipeline run
MODULE:PIPELINE --stage NAME --http 0.0.0.0:9400`` with a healthcheck on ``/health``.

``pipeline deploy k8s MODULE:PIPELINE`` prints, per stage, a Deployment (liveness probe on
``/health``, readiness on ``/ready``, resource requests and limits) and a KEDA ``ScaledObject``
that scales it on its consumer group's lag, up to the input's partition count (more instances
than partitions would sit idle). With ``--secure`` each stage connects over SASL_SSL as its
own principal (``pipeline acl``): its password comes from a Secret ``<stage>-kafka`` mounted
as a file and the CA from a Secret ``kafka-ca``; the files reference them and never hold a
password (create them with ``kubectl create secret generic ... --from-file``).

Both are generated from the pipeline, so they cannot drift from its stages, and written with
PyYAML. ``compose/docker-compose.yml`` is this output for the orders example (a test keeps it
so).
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.dsl import Pipeline

KAFKA_IMAGE = "apache/kafka:4.1.1"
HTTP_PORT = 9400
_HEALTHCHECK = (
    f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{HTTP_PORT}/health', "
    "timeout=2)"
)


def compose(
    pipeline: Pipeline,
    ref: str,
    *,
    image: str = "kafka-pipeline:latest",
    setup: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A docker-compose document: Kafka, a setup job, and one service per stage.

    Args:
        setup: Shell commands the one-shot setup service runs after creating the topics.
    """
    bootstrap = "kafka:9092"
    commands = " && ".join([f"pipeline topics create {ref}", *setup])
    services: dict[str, Any] = {
        "kafka": {
            "image": KAFKA_IMAGE,
            "environment": {
                "KAFKA_NODE_ID": "1",
                "KAFKA_PROCESS_ROLES": "broker,controller",
                "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
                "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{bootstrap}",
                "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
                "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@kafka:9093",
                "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
                "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
                "KAFKA_HEAP_OPTS": "-Xmx512m",
            },
            "healthcheck": {
                "test": [
                    "CMD", "/opt/kafka/bin/kafka-broker-api-versions.sh",
                    "--bootstrap-server", "localhost:9092",
                ],
                "interval": "5s",
                "retries": 30,
            },
        },
        "setup": {
            "image": image,
            "command": ["sh", "-c", commands],
            "environment": {"PIPELINE_BOOTSTRAP": bootstrap},
            "depends_on": {"kafka": {"condition": "service_healthy"}},
        },
    }  # fmt: skip
    for node in _one_per_stage(pipeline):
        services[f"stage-{node.name}"] = {
            "image": image,
            "command": [
                "pipeline", "run", ref, "--stage", node.name, "--http", f"0.0.0.0:{HTTP_PORT}",
            ],
            "environment": {"PIPELINE_BOOTSTRAP": bootstrap},
            "depends_on": {"setup": {"condition": "service_completed_successfully"}},
            "healthcheck": {
                "test": ["CMD", "python", "-c", _HEALTHCHECK],
                "interval": "10s",
                "timeout": "3s",
                "retries": 3,
                "start_period": "30s",
            },
            "restart": "on-failure",
            "stop_grace_period": "40s",  # the worker drains and commits on SIGTERM
            "deploy": {"replicas": 1},
        }  # fmt: skip
    return {"name": pipeline.name.replace(".", "-"), "services": services}


def kubernetes(
    pipeline: Pipeline,
    ref: str,
    *,
    image: str = "kafka-pipeline:latest",
    bootstrap: str = "kafka:9092",
    lag_threshold: int = 1000,
    secure: bool = False,
) -> list[dict[str, Any]]:
    """Per stage a Deployment with probes and resources, and a KEDA ScaledObject on its lag.

    Args:
        secure: Each stage over SASL_SSL (SCRAM-SHA-512) as its own principal, its password
            and the CA mounted from Secrets (referenced, never inlined).
    """
    docs: list[dict[str, Any]] = []
    for node in _one_per_stage(pipeline):
        name = f"{pipeline.name}-{node.name}".replace(".", "-").replace("_", "-").lower()
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": pipeline.name}
        probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
        container = {
            "name": "stage",
            "image": image,
            "args": ["pipeline", "run", ref, "--stage", node.name, "--http",
                     f"0.0.0.0:{HTTP_PORT}"],
            "env": [{"name": "PIPELINE_BOOTSTRAP", "value": bootstrap}],
            "ports": [{"name": "http", "containerPort": HTTP_PORT}],
            "livenessProbe": {**probe, "initialDelaySeconds": 10, "failureThreshold": 3},
            "readinessProbe": {
                "httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5,
            },
            "resources": {
                "requests": {"cpu": "250m", "memory": "256Mi"},
                "limits": {"memory": "1Gi"},
            },
        }  # fmt: skip
        pod: dict[str, Any] = {"terminationGracePeriodSeconds": 40, "containers": [container]}
        auth: dict[str, Any] = {}
        if secure:
            auth = _secure(container, pod, node.principal, name)
            docs.append(auth.pop("doc"))
        docs.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": pod,
                    },
                },
            }
        )
        docs.append(
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "ScaledObject",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "scaleTargetRef": {"name": name},
                    "minReplicaCount": 1,
                    # More instances than input partitions would sit idle.
                    "maxReplicaCount": pipeline.topics.partitions,
                    "triggers": [
                        {
                            "type": "kafka",
                            "metadata": {
                                "bootstrapServers": bootstrap,
                                "consumerGroup": node.group,
                                "topic": node.input_topic,
                                "lagThreshold": str(lag_threshold),
                                **auth.get("metadata", {}),
                            },
                            **auth.get("trigger", {}),
                        }
                    ],
                },
            }
        )
    return docs


_SECRETS = "/var/run/secrets/kafka"
_CA = "/var/run/secrets/kafka-ca"


def _secure(
    container: dict[str, Any], pod: dict[str, Any], principal: str, name: str
) -> dict[str, Any]:
    """Point a stage's container at its credentials (Secret ``<name>-kafka``: key
    ``password``; Secret ``kafka-ca``: key ``ca.pem``); returns the KEDA trigger's
    authentication (a TriggerAuthentication reading the same Secrets)."""
    secret = f"{name}-kafka"
    container["env"] += [
        {"name": "PIPELINE_SECURITY_PROTOCOL", "value": "SASL_SSL"},
        {"name": "PIPELINE_SASL_MECHANISM", "value": "SCRAM-SHA-512"},
        {"name": "PIPELINE_SASL_USERNAME", "value": principal},
        {"name": "PIPELINE_SASL_PASSWORD_FILE", "value": f"{_SECRETS}/password"},
        {"name": "PIPELINE_SSL_CAFILE", "value": f"{_CA}/ca.pem"},
    ]
    container["volumeMounts"] = [
        {"name": "kafka-credentials", "mountPath": _SECRETS, "readOnly": True},
        {"name": "kafka-ca", "mountPath": _CA, "readOnly": True},
    ]
    pod["volumes"] = [
        {"name": "kafka-credentials", "secret": {"secretName": secret}},
        {"name": "kafka-ca", "secret": {"secretName": "kafka-ca"}},
    ]
    doc = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": secret},
        "spec": {
            "secretTargetRef": [
                {"parameter": "username", "name": secret, "key": "username"},
                {"parameter": "password", "name": secret, "key": "password"},
                {"parameter": "ca", "name": "kafka-ca", "key": "ca.pem"},
            ]
        },
    }
    return {
        "doc": doc,
        "metadata": {"sasl": "scram_sha512", "tls": "enable"},
        "trigger": {"authenticationRef": {"name": secret}},
    }


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """One YAML stream (documents separated by ``---``), keys in the order written."""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=100)


def _one_per_stage(pipeline: Pipeline) -> list[Any]:
    """A node per stage: the priority lanes of a stage run in one process (their turns)."""
    first: dict[str, Any] = {}
    for node in pipeline.nodes():
        first.setdefault(node.name, node)
    return list(first.values())
