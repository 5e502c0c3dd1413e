"""Job callbacks: each job's end POSTed to the URL it was submitted with.

Runs as its own process (``pipeline jobs callbacks MODULE:PIPELINE``), a member of the group
``P.jobs.callbacks`` on the reply topic, where every job's end (completed or failed) is written
once per end by the stage that ended it. For each end with a callback URL: a POST of the job's
status (JSON, as ``GET /jobs/ID`` shows it) with the header ``Idempotency-Key: JOB:STATE:TIME``
(the same for every attempt at that end, so the receiver can drop repeats), retried with
backoff on a connection error, a timeout, 408, 429 or a 5xx; given up (logged at ERROR, counted)
after ``attempts``, or at once on any other 4xx. Offsets are committed after a batch's POSTs
are done: a restart POSTs again what was not committed (at least once; the key makes it once
for a receiver that honours it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer
from aiokafka import errors as kerr

from pipeline.dsl import Pipeline
from pipeline.errors import DefinitionError, PipelineError
from pipeline.jobs import JobStatus
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import translate
from pipeline.security import Bootstrap, connection
from pipeline.stage import RetryPolicy

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    """How job callbacks are delivered.

    Example:
        >>> CallbackPolicy().attempts
        8
    """

    attempts: int = 8  # POSTs per job end, at most
    first_backoff: float = 0.5  # seconds before the second attempt, doubling ...
    max_backoff: float = 30.0  # ... up to this
    timeout: float = 10.0  # seconds per POST
    concurrency: int = 16  # POSTs in flight at once

    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.attempts, initial_backoff=self.first_backoff,
            max_backoff=self.max_backoff,
        )  # fmt: skip


@dataclass(slots=True)
class CallbackStats:
    """What the dispatcher did (logged when it stops)."""

    delivered: int = 0
    given_up: int = 0
    attempts: int = 0


def idempotency_key(status: JobStatus) -> str:
    """The same for every attempt at one end of one job; another for a later end (a job
    that failed and completes after a replay is two ends)."""
    return f"{status.job}:{status.state.value}:{status.time}"


async def deliver(
    session: aiohttp.ClientSession,
    status: JobStatus,
    policy: CallbackPolicy,
    stats: CallbackStats,
) -> bool:
    """POST ``status`` to its callback URL until it is taken, or give up; True if taken."""
    assert status.callback is not None
    retry = policy.retry()
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key(status)}
    body, why = status.encode(), ""
    for attempt in range(1, policy.attempts + 1):
        stats.attempts += 1
        try:
            timeout = aiohttp.ClientTimeout(total=policy.timeout)
            async with session.post(
                status.callback, data=body, headers=headers, timeout=timeout
            ) as response:
                if 200 <= response.status < 300:
                    stats.delivered += 1
                    return True
                why = f"HTTP {response.status}"
                if response.status < 500 and response.status not in _RETRY_STATUSES:
                    break  # the receiver refuses it: asking again will not change that
        except (aiohttp.ClientError, TimeoutError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if attempt < policy.attempts:
            await asyncio.sleep(retry.backoff(attempt))
    stats.given_up += 1
    log.error(
        "job %s: the callback to %s was not taken (%s) after %d attempt(s); its status stays "
        "in the status table", status.job, status.callback, why, attempt,
    )  # fmt: skip
    return False


async def _until_done_or(stop: asyncio.Event, work: asyncio.Future[Any]) -> bool:
    """Wait for ``work``; cancel it when ``stop`` is set first (False then)."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        waits: set[asyncio.Future[Any]] = {work, stopping}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if work in done:
        work.result()
        return True
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return False


async def run_callbacks(
    bootstrap: Bootstrap,
    pipeline: Pipeline,
    policy: CallbackPolicy = CallbackPolicy(),
    stop: asyncio.Event | None = None,
) -> CallbackStats:
    """Deliver job callbacks until ``stop`` is set (by default: until SIGTERM or SIGINT)."""
    if pipeline.jobs is None:
        raise DefinitionError(f"pipeline '{pipeline.name}' does not track jobs")
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    group = f"{pipeline.jobs.status}.callbacks"
    consumer = AIOKafkaConsumer(
        pipeline.jobs.replies, **connection(bootstrap).client_args(), group_id=group,
        enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed",
    )  # fmt: skip
    await start_client(consumer, bootstrap, "starting the job callbacks")
    stats = CallbackStats()
    gate = asyncio.Semaphore(policy.concurrency)

    async def one(session: aiohttp.ClientSession, status: JobStatus) -> None:
        async with gate:
            await deliver(session, status, policy, stats)

    log.info("job callbacks of %s: delivering (group %s)", pipeline.name, group)
    try:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500)
                ends = []
                for records in batches.values():
                    for record in records:
                        if record.value is None:
                            continue
                        try:
                            status = JobStatus.decode(record.value)
                        except PipelineError as exc:
                            log.warning("job callbacks: skipping %s", exc)
                            continue
                        if status.callback and status.done:
                            ends.append(status)
                if ends and not await _until_done_or(
                    stop, asyncio.gather(*(one(session, s) for s in ends))
                ):
                    break  # stopped mid-delivery: not committed, a restart POSTs them again
                if batches:
                    await consumer.commit()
    except kerr.KafkaError as exc:
        raise translate(exc, "delivering job callbacks", group=group) from exc
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        log.info(
            "job callbacks of %s: %d delivered, %d given up (%d POSTs)",
            pipeline.name, stats.delivered, stats.given_up, stats.attempts,
        )  # fmt: skip
    return stats
