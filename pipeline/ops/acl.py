"""Least privilege: the ACLs each stage's principal and the publisher's need, and applying them.

A stage reads its input (and any topic it declares in ``Stage.reads``, e.g. a table), joins its
consumer group, and writes and creates its own topics: output, dead letters and state (the
changelog it also reads back to restore). Its producer is idempotent (``IDEMPOTENT_WRITE`` on
the cluster); under exactly-once its transactional ids all start with ``<group>.``, so one
prefixed ACL covers every partition's producer. The publisher writes the pipeline's source.
Nothing else: no wildcard, no ``ALL``, no other stage's topics.

:func:`pipeline_acls` derives them from the compiled pipeline (``pipeline acl`` prints them);
:func:`apply` creates them with CreateAcls (idempotent: Kafka keeps one copy of an ACL);
:func:`describe` reads back what a principal holds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import (
    CreateAclsRequest_v1,
    DeleteAclsRequest_v1,
    DescribeAclsRequest_v1,
)
from aiokafka.protocol.api import Request

from pipeline.dsl import Pipeline, StageNode
from pipeline.errors import BrokerError
from pipeline.runtime.kafka import translate
from pipeline.security import Bootstrap, connection

__all__ = ["Acl", "Operation", "Resource", "apply", "describe", "pipeline_acls", "revoke"]


class Resource(IntEnum):
    """Kafka's ACL resource types (wire codes)."""

    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class Operation(IntEnum):
    """Kafka's ACL operations (wire codes)."""

    READ = 3
    WRITE = 4
    CREATE = 5
    DESCRIBE = 8
    IDEMPOTENT_WRITE = 12


_LITERAL, _PREFIXED, _ALLOW, _ANY = 3, 4, 3, 1
_CLUSTER = "kafka-cluster"


@dataclass(frozen=True, slots=True, order=True)
class Acl:
    """One ALLOW rule: ``principal`` may do ``operation`` on a resource.

    Example:
        >>> print(Acl("User:orders.validate", Resource.TOPIC, "orders.placed", Operation.READ))
        User:orders.validate  READ  topic orders.placed
    """

    principal: str
    resource: Resource
    name: str
    operation: Operation
    prefixed: bool = False

    def __str__(self) -> str:
        kind = self.resource.name.lower().replace("_", "-")
        name = f"{self.name}*" if self.prefixed else self.name
        return f"{self.principal}  {self.operation.name}  {kind} {name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "principal": self.principal,
            "resource": self.resource.name.lower(),
            "name": self.name,
            "pattern": "prefixed" if self.prefixed else "literal",
            "operation": self.operation.name,
        }


def _topic(principal: str, topic: str, *ops: Operation) -> list[Acl]:
    return [Acl(principal, Resource.TOPIC, topic, op) for op in ops]


def stage_acls(node: StageNode, pipeline: Pipeline) -> list[Acl]:
    """What ``node``'s principal needs, and nothing more."""
    user = f"User:{node.principal}"
    R, W, C, D = Operation.READ, Operation.WRITE, Operation.CREATE, Operation.DESCRIBE
    acls = _topic(user, node.input_topic, R, D)
    acls += [Acl(user, Resource.GROUP, node.group, R)]
    for topic in node.stage.reads:
        acls += _topic(user, topic, R, D)
    if node.output_topic:
        acls += _topic(user, node.output_topic, W, D, C)
    acls += _topic(user, node.dlq_topic, W, D, C)
    acls += _topic(user, node.state_topic, R, W, D, C)
    if node.jobs is not None:  # it reports each job's record
        acls += _topic(user, node.jobs.status, W, D, C) + _topic(user, node.jobs.replies, W, D, C)
    if node.undo_topic:  # its dead letters ask an earlier stage to compensate
        acls += _topic(user, node.undo_topic, W, D, C)
    if node.compensate_topic:  # it compensates: reads the requests, remembers what it ran
        acls += _topic(user, node.compensate_topic, R, D, C)
        acls += [Acl(user, Resource.GROUP, node.compensate_topic, R)]
        acls += _topic(user, f"{node.compensate_topic}.done", R, W, D, C)
    acls += [Acl(user, Resource.CLUSTER, _CLUSTER, Operation.IDEMPOTENT_WRITE)]
    if pipeline.delivery.value == "exactly_once":
        prefix = node.transactional_prefix
        acls += [Acl(user, Resource.TRANSACTIONAL_ID, prefix, op, prefixed=True) for op in (W, D)]
    return sorted(set(acls))


def publisher_acls(pipeline: Pipeline, principal: str) -> list[Acl]:
    """What an application publishing to ``pipeline`` needs: write its source topic."""
    user = f"User:{principal}"
    acls = _topic(user, pipeline.source, Operation.WRITE, Operation.DESCRIBE)
    acls += [Acl(user, Resource.CLUSTER, _CLUSTER, Operation.IDEMPOTENT_WRITE)]
    if pipeline.jobs is not None:  # a JobClient: writes "accepted", reads the ends
        acls += _topic(
            user, pipeline.jobs.status, Operation.WRITE, Operation.READ, Operation.DESCRIBE
        )
        acls += _topic(user, pipeline.jobs.replies, Operation.READ, Operation.DESCRIBE)
    return sorted(acls)


def pipeline_acls(pipeline: Pipeline, *, publisher: str | None = None) -> dict[str, list[Acl]]:
    """Every principal of ``pipeline`` (each stage's, then the publisher's) and its ACLs.

    Args:
        publisher: The publisher's user (default ``<pipeline>.publisher``).
    """
    found: dict[str, list[Acl]] = {}
    for node in pipeline.nodes():
        found.setdefault(node.principal, []).extend(stage_acls(node, pipeline))
    user = publisher or f"{pipeline.name}.publisher"
    found.setdefault(user, []).extend(publisher_acls(pipeline, user))
    return {p: sorted(set(acls)) for p, acls in found.items()}


def _wire(a: Acl) -> tuple[int, str, int, str, str, int, int]:
    """An ACL as CreateAcls v1 / DeleteAcls v1 carry it (any host)."""
    pattern = _PREFIXED if a.prefixed else _LITERAL
    return (a.resource, a.name, pattern, a.principal, "*", a.operation, _ALLOW)


class _CreateAcls(Request[CreateAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 30

    def __init__(self, acls: list[Acl]) -> None:
        self._acls = acls

    def build(self, request_struct_class: type[Any]) -> Any:
        return request_struct_class([_wire(a) for a in self._acls])


class _DescribeAcls(Request[DescribeAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 29

    def __init__(self, principal: str | None) -> None:
        self._principal = principal

    def build(self, request_struct_class: type[Any]) -> Any:
        # Any resource, name, pattern, host, operation; ALLOW rules of one principal (or all).
        return request_struct_class(_ANY, None, _ANY, self._principal, None, _ANY, _ALLOW)


class _DeleteAcls(Request[DeleteAclsRequest_v1]):  # type: ignore[misc]
    API_KEY = 31

    def __init__(self, acls: list[Acl]) -> None:
        self._acls = acls

    def build(self, request_struct_class: type[Any]) -> Any:
        return request_struct_class([_wire(a) for a in self._acls])


async def _admin_call(target: Bootstrap, action: str, request: Request[Any]) -> Any:
    conn = connection(target)
    admin = AIOKafkaAdminClient(**conn.client_args(), client_id="pipeline-acl")
    try:
        await admin.start()
        return await admin._send_request(request)
    except KafkaError as exc:
        raise translate(exc, action) from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _raise_errors(action: str, codes: list[tuple[int, str | None]]) -> None:
    for code, message in codes:
        if code:
            error = for_code(code)
            raise BrokerError(f"{action}: {error.__name__}: {message or error.description}")


async def apply(target: Bootstrap, acls: list[Acl]) -> int:
    """Create ``acls`` (as a principal allowed to alter ACLs, e.g. the admin); returns how
    many were sent. Creating an ACL that exists changes nothing."""
    if not acls:
        return 0
    response = await _admin_call(target, "creating ACLs", _CreateAcls(acls))
    _raise_errors("creating ACLs", [(r[0], r[1]) for r in response.creation_responses])
    return len(acls)


async def revoke(target: Bootstrap, acls: list[Acl]) -> int:
    """Delete exactly ``acls``; returns how many rules the broker removed."""
    if not acls:
        return 0
    response = await _admin_call(target, "deleting ACLs", _DeleteAcls(acls))
    results = response.filter_responses
    _raise_errors("deleting ACLs", [(r[0], r[1]) for r in results])
    return sum(len(r[2]) for r in results)


async def describe(target: Bootstrap, principal: str | None = None) -> list[Acl]:
    """The ALLOW rules the cluster holds (of ``principal``, e.g. ``User:x``, or all)."""
    response = await _admin_call(target, "reading ACLs", _DescribeAcls(principal))
    _raise_errors("reading ACLs", [(response.error_code, response.error_message)])
    found = []
    for rtype, name, pattern, rules in response.resources:
        for who, _host, op, _perm in rules:
            with contextlib.suppress(ValueError):
                found.append(
                    Acl(who, Resource(rtype), name, Operation(op), prefixed=pattern == _PREFIXED)
                )
    return sorted(found)
