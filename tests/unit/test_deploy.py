"""Deployment files validate against the Compose specification and the Kubernetes schemas
(with the packages made for that), and ``compose/docker-compose.yml`` is what the CLI prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from examples.orders.pipeline import pipeline as orders
from pipeline.deploy import HTTP_PORT, compose, kubernetes, to_yaml

ROOT = Path(__file__).resolve().parents[2]
REF = "examples.orders.pipeline:pipeline"
SEED = "python -m examples.orders.customers"


def test_the_compose_file_is_valid_and_probes_every_stage() -> None:
    text = to_yaml([compose(orders, REF, setup=(SEED,))])
    spec = PyCompose.from_yaml(text)
    spec.validate()  # the Compose specification's rules, not a string match
    stages = [n.name for n in orders.nodes()]
    assert sorted(spec.service_names()) == sorted(
        ["kafka", "setup", *(f"stage-{s}" for s in stages)]
    )
    doc = yaml.safe_load(text)
    assert SEED in doc["services"]["setup"]["command"][-1]
    for name in stages:
        service = doc["services"][f"stage-{name}"]
        assert service["command"][-2:] == ["--http", f"0.0.0.0:{HTTP_PORT}"]
        assert "/health" in service["healthcheck"]["test"][-1]
        assert service["depends_on"] == {"setup": {"condition": "service_completed_successfully"}}


def test_the_compose_validator_is_not_a_rubber_stamp() -> None:
    doc = compose(orders, REF)
    doc["services"]["stage-price"]["healthcheck"]["interval"] = "10 parsecs"
    with pytest.raises(ValueError, match="not a valid duration"):
        PyCompose.from_yaml(to_yaml([doc])).validate()


def test_the_committed_compose_file_is_the_generated_one() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "deploy", "compose", REF, "--setup", SEED],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    committed = (ROOT / "compose" / "docker-compose.yml").read_text()
    assert yaml.safe_load(committed) == yaml.safe_load(printed), (
        "compose/docker-compose.yml is stale: regenerate it with the command in its header"
    )


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_kubernetes_manifests_validate_and_scale_on_lag(version: str) -> None:
    docs = list(yaml.safe_load_all(to_yaml(kubernetes(orders, REF))))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    scalers = [d for d in docs if d["kind"] == "ScaledObject"]
    assert len(deployments) == len(scalers) == len(orders.nodes())
    for doc in deployments:
        kubernetes_validate.validate(doc, version, strict=True)  # the official schema
        [container] = doc["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["resources"]["requests"]["cpu"]
    # KEDA's ScaledObject is a custom resource: its schema is not among Kubernetes' own, so
    # its fields are checked against the pipeline instead.
    for doc, node in zip(scalers, orders.nodes(), strict=True):
        spec = doc["spec"]
        assert spec["scaleTargetRef"]["name"] == doc["metadata"]["name"]
        assert spec["maxReplicaCount"] == orders.topics.partitions
        [trigger] = spec["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == node.group
        assert trigger["metadata"]["topic"] == node.input_topic


def test_an_invalid_manifest_is_caught() -> None:
    """The validator is not a rubber stamp: a probe without a port is refused."""
    [doc, *_] = kubernetes(orders, REF)
    del doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
