"""What a stage reports about jobs: each record of a job it passed on, completed or
dead-lettered (see :mod:`pipeline.jobs` for the model and the client).

Reports are appended to the transport like outputs and dead letters, from the same input
partition: they become durable in the same commit as the outputs (one transaction under
exactly-once), so a job never shows a stage passed whose output is not there, and a worker that
dies before its commit reports nothing (its successor does). A duplicate dropped by the dedup
table reports nothing: the original did.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from pipeline.dsl import StageNode
from pipeline.errors import PipelineError
from pipeline.jobs import JobState, JobStatus, now_ms
from pipeline.record import CALLBACK_HEADER, JOB_HEADER, Emit
from pipeline.runtime.deadletter import error_class
from pipeline.runtime.transport import Transport

_MAX_ERROR = 500


def job_of(headers: Sequence[tuple[str, bytes]]) -> tuple[bytes | None, bytes | None]:
    """The job id and callback URL a record carries (``None`` when not a job's)."""
    job = callback = None
    for k, v in headers:
        if k == JOB_HEADER:
            job = v
        elif k == CALLBACK_HEADER:
            callback = v
    return job, callback


class JobReports:
    """Appends one stage's job reports to the status table (and a job's end to the replies).

    Args:
        node: The stage (its pipeline tracks jobs: ``node.jobs`` is set).
        transport: Where the reports are buffered, with the stage's outputs.
    """

    __slots__ = ("_last", "_replies", "_stage", "_status", "_step", "_steps", "_transport")

    def __init__(self, node: StageNode, transport: Transport) -> None:
        if node.jobs is None:
            raise PipelineError(f"stage {node.name}: its pipeline does not track jobs")
        self._status, self._replies = node.jobs.status, node.jobs.replies
        self._stage, self._step, self._steps = node.name, node.index + 1, node.steps
        self._last = node.last
        self._transport = transport

    def topics(self) -> tuple[str, str]:
        """The topics reports go to (prepared before the first one is appended)."""
        return self._status, self._replies

    def passed(self, msg: Any, result: Any) -> None:
        """``msg`` was handled: its job moves on, or ends here (the last stage, or filtered)."""
        job, callback = job_of(msg.headers)
        if job is None:
            return
        done = self._last or result is None
        status = JobStatus(
            job.decode(), JobState.COMPLETED if done else JobState.RUNNING, stage=self._stage,
            step=self._step, steps=self._steps, result=_jsonable(result) if done else None,
            callback=callback.decode() if callback else None, time=now_ms(),
        )  # fmt: skip
        self._append(msg, job, status)

    def failed(self, msg: Any, exc: BaseException) -> None:
        """``msg`` was dead-lettered: its job failed here (until a replay)."""
        job, callback = job_of(msg.headers)
        if job is None:
            return
        status = JobStatus(
            job.decode(), JobState.FAILED, stage=self._stage, step=self._step, steps=self._steps,
            error_class=error_class(exc), error=str(exc)[:_MAX_ERROR],
            callback=callback.decode() if callback else None, time=now_ms(),
        )  # fmt: skip
        self._append(msg, job, status)

    def _append(self, msg: Any, job: bytes, status: JobStatus) -> None:
        t, data, headers = self._transport, status.encode(), [(JOB_HEADER, job)]
        for topic in (self._status, self._replies) if status.done else (self._status,):
            t.append(topic, t.partition_for(topic, job), job, data, headers, None, msg.partition)


def _jsonable(value: Any) -> Any:
    """A stage's result as JSON can hold it (bytes as base64, anything else odd as text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Emit):
        return _jsonable(value.value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)
