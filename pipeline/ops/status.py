"""``pipeline status``: how far behind each stage of a pipeline is, asked of the broker and the
workers, never of a file.

Per stage, from the broker: the group's members and their partitions (DescribeGroups), the
committed offset and the end of every input partition (lag), the records committed and written
per second over an interval (two samples), and the records in its dead-letter topic. From the
workers: each member started with ``--http`` tells its group where its HTTP surface is (in its
client id, ``<group>@<url>``), and its ``/health`` and ``/ready`` are asked.

Under exactly-once a committed offset stops before the transaction's commit marker, so an idle
partition shows a lag of 1 (Kafka's own tools show the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import (
    DescribeGroupsRequest_v0,
    DescribeGroupsRequest_v1,
    DescribeGroupsRequest_v2,
    DescribeGroupsRequest_v3,
    DescribeGroupsResponse_v3,
)
from aiokafka.protocol.api import Request, RequestStruct
from aiokafka.structs import TopicPartition

from pipeline.dsl import Pipeline, StageNode
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import translate
from pipeline.security import Bootstrap, connection

T = TypeVar("T")


@dataclass(slots=True)
class Member:
    """One instance of a stage: a member of its consumer group."""

    client_id: str
    host: str
    partitions: list[int]
    url: str | None = None  # its HTTP surface, when it advertised one
    health: str | None = None  # "ok", "failed", "no answer"; None without a surface
    ready: bool | None = None


@dataclass(slots=True)
class StageStatus:
    """One stage of a pipeline, as ``pipeline status`` shows it."""

    stage: str
    group: str
    group_state: str
    members: list[Member] = field(default_factory=list)
    lag: dict[int, int] = field(default_factory=dict)  # per input partition
    committed: dict[int, int | None] = field(default_factory=dict)
    in_per_s: float = 0.0  # committed input records per second, over the interval
    out_per_s: float | None = None  # records written to its output per second
    dead_letters: int = 0  # records in its dead-letter topic now

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_lag"] = self.total_lag
        out["lag"] = {str(p): v for p, v in sorted(self.lag.items())}
        out["committed"] = {str(p): v for p, v in sorted(self.committed.items())}
        return out


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    committed: dict[str, dict[int, int | None]]  # per group
    ends: dict[str, dict[int, int]]  # per topic
    starts: dict[str, dict[int, int]]


async def pipeline_status(
    bootstrap: Bootstrap, pipeline: Pipeline, interval: float = 1.0
) -> list[StageStatus]:
    """Every stage of ``pipeline``: members, lag, rates over ``interval`` seconds, DLQ size.

    Raises:
        BrokerUnavailableError: No broker answers.
    """
    async with StatusSampler(bootstrap, pipeline.nodes()) as sampler:
        await sampler.sample()
        await asyncio.sleep(interval)
        return await sampler.sample()


class StatusSampler:
    """Samples the status of stages again and again over the same clients (the dashboard's
    live view); rates are over the time since the previous sample (0 at the first).

    Example:
        >>> async with StatusSampler(bootstrap, pipeline.nodes()) as sampler:  # doctest: +SKIP
        ...     await sampler.sample(); await asyncio.sleep(1)
        ...     statuses = await sampler.sample()
    """

    def __init__(
        self, bootstrap: Bootstrap, nodes: Iterable[StageNode], ask_within: float = 2.0
    ) -> None:
        self.bootstrap = bootstrap
        self.nodes = list(nodes)
        self._ask_within = ask_within
        args = connection(bootstrap).client_args()
        self._admin = AIOKafkaAdminClient(**args, client_id="pipeline-status")
        self._reader = AIOKafkaConsumer(**args, enable_auto_commit=False)
        self._previous: _Sample | None = None

    async def __aenter__(self) -> StatusSampler:
        try:
            await start_client(self._admin, self.bootstrap, "reading the pipeline's status")
        except BaseException:
            await self._close()  # the reader too: it was made, never started
            raise
        try:
            await self._reader.start()
        except KafkaError as exc:
            await self._close()
            raise translate(exc, "reading the pipeline's status") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self._reader.stop()
        with contextlib.suppress(Exception):
            await self._admin.close()

    async def sample(self) -> list[StageStatus]:
        """Every stage's status now.

        Raises:
            BrokerUnavailableError: The broker stopped answering.
        """
        try:
            second = await _sample(self._admin, self._reader, self.nodes)
            groups = await _describe(self._admin, [n.group for n in self.nodes])
        except KafkaError as exc:
            raise translate(exc, "reading the pipeline's status") from exc
        first = self._previous or second
        self._previous = second
        statuses = [_stage(node, first, second, groups) for node in self.nodes]
        await _ask_workers([m for s in statuses for m in s.members], self._ask_within)
        return statuses


async def _sample(
    admin: AIOKafkaAdminClient, reader: AIOKafkaConsumer, nodes: list[StageNode]
) -> _Sample:
    topics = {n.input_topic for n in nodes}
    topics |= {n.output_topic for n in nodes if n.output_topic}
    topics |= {n.dlq_topic for n in nodes}
    tps: list[TopicPartition] = []
    for topic in sorted(topics):
        parts = reader.partitions_for_topic(topic)
        if not parts:
            await reader._client.force_metadata_update()
            parts = reader.partitions_for_topic(topic) or set()
        tps.extend(TopicPartition(topic, p) for p in sorted(parts))
    at = time.monotonic()
    ends_raw = await reader.end_offsets(tps)
    starts_raw = await reader.beginning_offsets(tps)
    ends: dict[str, dict[int, int]] = {}
    starts: dict[str, dict[int, int]] = {}
    for tp, end in ends_raw.items():
        ends.setdefault(tp.topic, {})[tp.partition] = end
    for tp, start in starts_raw.items():
        starts.setdefault(tp.topic, {})[tp.partition] = start
    committed: dict[str, dict[int, int | None]] = {}
    for node in nodes:

        async def offsets_of(group: str = node.group) -> Any:
            return await admin.list_consumer_group_offsets(group)

        offsets = await _retrying(offsets_of)
        mine: dict[int, int | None] = dict.fromkeys(ends.get(node.input_topic, {}))
        for tp, meta in offsets.items():
            if tp.topic == node.input_topic and meta.offset >= 0:
                mine[tp.partition] = meta.offset
        committed[node.group] = mine
    return _Sample(at, committed, ends, starts)


class _DescribeGroupsV3(RequestStruct):  # type: ignore[misc]
    """DescribeGroups v3 decoded with its own response schema: aiokafka 0.14 pairs the v3
    request with the v2 response, which misreads every group after the first
    (``Buffer underrun decoding string`` on Kafka 4.x, which answers v3)."""

    API_KEY = 15
    API_VERSION = 3
    RESPONSE_TYPE = DescribeGroupsResponse_v3
    SCHEMA = DescribeGroupsRequest_v3.SCHEMA


_Structs = (
    DescribeGroupsRequest_v0
    | DescribeGroupsRequest_v1
    | DescribeGroupsRequest_v2
    | _DescribeGroupsV3
)


class _DescribeGroups(Request[_Structs]):  # type: ignore[misc]
    API_KEY = 15

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(self, request_struct_class: type[Any]) -> Any:
        if request_struct_class.API_VERSION < 3:
            return request_struct_class(self._groups)
        return request_struct_class(self._groups, False)


async def _describe(admin: AIOKafkaAdminClient, groups: list[str]) -> dict[str, Any]:
    """Each group's state and members (DescribeGroups, at each group's coordinator)."""
    found: dict[str, Any] = {}
    for name in groups:

        async def ask(group: str = name) -> Any:
            node = await admin.find_coordinator(group)
            return await admin._send_request(_DescribeGroups([group]), node)

        response = await _retrying(ask)
        for group in response.groups:
            error, gname, state, _ptype, _proto, members = group[:6]
            found[gname] = (state if error == 0 else f"error {error}", members)
    return found


async def _retrying(call: Callable[[], Awaitable[T]], attempts: int = 20) -> T:
    """``call()``, again after a pause while it fails with a retriable error (a coordinator
    that is not there yet: the offsets topic of a fresh broker, a coordinator moving)."""
    for attempt in range(attempts):
        try:
            return await call()
        except KafkaError as exc:
            if not getattr(exc, "retriable", False) or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.25)
    raise AssertionError("unreachable")


def _stage(
    node: StageNode, first: _Sample, second: _Sample, groups: Mapping[str, Any]
) -> StageStatus:
    state, raw_members = groups.get(node.group, ("unknown", []))
    status = StageStatus(node.label, node.group, state or "Empty")
    for raw in raw_members:
        _member_id, client_id, host, _meta, assignment = raw[:5]
        partitions: list[int] = []
        if assignment:
            with contextlib.suppress(Exception):  # an assignment of another protocol
                decoded = ConsumerProtocol.ASSIGNMENT.decode(assignment)
                partitions = sorted(tp.partition for tp in decoded.partitions())
        url = client_id.split("@", 1)[1] if "@http" in client_id else None
        status.members.append(Member(client_id, host.lstrip("/"), partitions, url))
    ends = second.ends.get(node.input_topic, {})
    committed = second.committed[node.group]
    starts = second.starts.get(node.input_topic, {})
    for partition, end in ends.items():
        done = committed.get(partition)
        status.committed[partition] = done
        status.lag[partition] = max(0, end - (done if done is not None else starts[partition]))
    dt = max(1e-6, second.at - first.at)
    before = first.committed[node.group]
    moved = sum(
        (committed.get(p) or 0) - (before.get(p) or 0) for p in committed if committed.get(p)
    )
    status.in_per_s = round(max(0, moved) / dt, 1)
    if node.output_topic:
        out0 = sum(first.ends.get(node.output_topic, {}).values())
        out1 = sum(second.ends.get(node.output_topic, {}).values())
        status.out_per_s = round(max(0, out1 - out0) / dt, 1)
    dlq_ends, dlq_starts = (
        second.ends.get(node.dlq_topic, {}),
        second.starts.get(node.dlq_topic, {}),
    )
    status.dead_letters = sum(e - dlq_starts.get(p, 0) for p, e in dlq_ends.items())
    return status


async def _ask_workers(members: list[Member], limit_s: float = 2.0) -> None:
    """Each member's ``/health`` and ``/ready``, where it advertised its HTTP surface."""
    with_url = [m for m in members if m.url]
    if not with_url:
        return
    import aiohttp

    async def ask(session: aiohttp.ClientSession, member: Member) -> None:
        try:
            async with session.get(f"{member.url}/health") as r:
                member.health = "ok" if r.status == 200 else "failed"
            async with session.get(f"{member.url}/ready") as r:
                member.ready = r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            member.health = "no answer"

    limit = aiohttp.ClientTimeout(total=limit_s)
    async with aiohttp.ClientSession(timeout=limit) as session:
        await asyncio.gather(*(ask(session, m) for m in with_url))
