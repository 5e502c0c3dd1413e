"""Deployment files for a pipeline: one service per stage, scaled on its own.

``pipeline deploy compose MODULE:PIPELINE`` prints a docker-compose file (a single-node KRaft
Kafka plus one service per stage, each running ``pipeline run MODULE:PIPELINE --stage NAME``);
``pipeline deploy k8s MODULE:PIPELINE`` prints Kubernetes Deployments, one per stage. Both are
generated from the pipeline itself, so they cannot drift from its stages.
"""

from __future__ import annotations

from typing import Any

from pipeline.dsl import Pipeline

KAFKA_IMAGE = "apache/kafka:4.1.1"


def compose(
    pipeline: Pipeline, ref: str, *, image: str = "kafka-pipeline:latest"
) -> dict[str, Any]:
    """A docker-compose document: Kafka, a topic-creating job, and one service per stage."""
    bootstrap = "kafka:9092"
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
        "topics": {
            "image": image,
            "command": ["pipeline", "topics", "create", ref],
            "environment": {"PIPELINE_BOOTSTRAP": bootstrap},
            "depends_on": {"kafka": {"condition": "service_healthy"}},
        },
    }  # fmt: skip
    for node in pipeline.nodes():
        services[f"stage-{node.name}"] = {
            "image": image,
            "command": ["pipeline", "run", ref, "--stage", node.name],
            "environment": {"PIPELINE_BOOTSTRAP": bootstrap},
            "depends_on": {"topics": {"condition": "service_completed_successfully"}},
            "restart": "on-failure",
            "stop_grace_period": "40s",  # the worker drains and commits on SIGTERM
            "deploy": {"replicas": 1},
        }
    return {"name": pipeline.name.replace(".", "-"), "services": services}


def kubernetes(
    pipeline: Pipeline,
    ref: str,
    *,
    image: str = "kafka-pipeline:latest",
    bootstrap: str = "kafka:9092",
) -> list[dict[str, Any]]:
    """One Deployment per stage; scale a stage with its replica count (up to its partitions)."""
    docs = []
    for node in pipeline.nodes():
        name = f"{pipeline.name}-{node.name}".replace(".", "-").replace("_", "-").lower()
        labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": pipeline.name}
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
                        "spec": {
                            "terminationGracePeriodSeconds": 40,
                            "containers": [
                                {
                                    "name": "stage",
                                    "image": image,
                                    "args": ["pipeline", "run", ref, "--stage", node.name],
                                    "env": [{"name": "PIPELINE_BOOTSTRAP", "value": bootstrap}],
                                    "resources": {
                                        "requests": {"cpu": "250m", "memory": "256Mi"},
                                        "limits": {"memory": "1Gi"},
                                    },
                                }
                            ],
                        },
                    },
                },
            }
        )
    return docs


def to_yaml(doc: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists and scalars (strings always quoted: no surprises)."""
    pad = "  " * indent
    if isinstance(doc, dict):
        if not doc:
            return "{}\n"
        lines = []
        for key, value in doc.items():
            if isinstance(value, dict | list) and value:
                lines.append(f"{pad}{key}:\n{to_yaml(value, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(value)}\n")
        return "".join(lines)
    if isinstance(doc, list):
        lines = []
        for item in doc:
            if isinstance(item, dict | list) and item:
                body = to_yaml(item, indent + 1)
                lines.append(f"{pad}- {body[len(pad) + 2 :]}")
            else:
                lines.append(f"{pad}- {_scalar(item)}\n")
        return "".join(lines)
    return f"{pad}{_scalar(doc)}\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
