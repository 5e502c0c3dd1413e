"""Replays started from the dashboard: :func:`pipeline.dlq.replay` (the code behind ``pipeline
dlq replay``) run in the background, a dry run first to count what would go, with progress."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.dlq import Where, new_replay_id, replay
from pipeline.dsl import Pipeline, StageNode
from pipeline.errors import PipelineError
from pipeline.security import Bootstrap

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReplayRun:
    """One replay (or dry run) started from the dashboard, and how far it got."""

    id: str
    stage: str
    lane: str | None
    where: str
    dry_run: bool
    state: str = "running"  # running, done, failed
    read: int = 0
    total: int = 0
    report: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "stage": self.stage, "lane": self.lane, "where": self.where,
            "dry_run": self.dry_run, "state": self.state, "read": self.read,
            "total": self.total, "report": self.report, "error": self.error,
        }  # fmt: skip


class ReplayRuns:
    """Replays started from the dashboard, run one at a time per stage in the background."""

    def __init__(
        self, bootstrap: Bootstrap, keep: int = 100, on_done: Callable[[], None] | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self._on_done = on_done
        self.runs: dict[str, ReplayRun] = {}
        self._keep = keep
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def start(self, pipeline: Pipeline, node: StageNode, where: Where, dry_run: bool) -> ReplayRun:
        """Start a replay of ``node``'s dead letters matching ``where`` (``dry_run``: count)."""
        run = ReplayRun(new_replay_id(), node.name, node.lane, str(where), dry_run)
        self.runs[run.id] = run
        while len(self.runs) > self._keep:
            self.runs.pop(next(iter(self.runs)))
        task = asyncio.create_task(self._run(run, pipeline, node, where))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    async def _run(self, run: ReplayRun, pipeline: Pipeline, node: StageNode, where: Where) -> None:
        def progress(read: int, total: int) -> None:
            run.read, run.total = read, total

        lock = self._locks.setdefault(node.dlq_topic, asyncio.Lock())
        try:
            async with lock:  # two replays of one stage at once would race for the same records
                report = await replay(
                    self.bootstrap, pipeline, node.name, where=where, dry_run=run.dry_run,
                    progress=progress, replay_id=run.id, lane=node.lane,
                )  # fmt: skip
            run.report, run.state = report.as_dict(), "done"
            if self._on_done is not None:
                self._on_done()
        except PipelineError as exc:
            run.error, run.state = str(exc), "failed"
        except Exception as exc:  # shown on the page: a replay must never fail silently
            log.exception("replay %s failed", run.id)
            run.error, run.state = f"{type(exc).__name__}: {exc}", "failed"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
