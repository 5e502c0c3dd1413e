"""``pipeline up``: every stage of a pipeline as its own supervised OS process.

The local stand-in for compose or Kubernetes on a machine without a container engine: each
instance is ``python -m pipeline.cli run MODULE:PIPELINE --stage NAME --http 127.0.0.1:PORT``
(its own process, its own HTTP surface), with N instances of a stage for ``--scale NAME=N``.
An instance that exits is started again after a backoff (1 s, doubling to 30 s; back to 1 s
once it ran for a minute), and said so in one line; a SIGTERM or Ctrl-C drains every instance
(SIGTERM, then SIGKILL after the shutdown timeout). Each instance logs to its own file.

Example:
    >>> sup = Supervisor("examples.orders.pipeline:pipeline", ["validate", "price"],
    ...                  bootstrap, logs=Path("/tmp/up"))                    # doctest: +SKIP
    >>> await sup.run(stop)                                                  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.broker.ports import free_port, port_is_free
from pipeline.security import Bootstrap

log = logging.getLogger(__name__)

_BACKOFF_FIRST, _BACKOFF_MAX, _STEADY_S = 1.0, 30.0, 60.0


@dataclass(slots=True)
class Instance:
    """One supervised stage process."""

    stage: str
    index: int
    port: int
    log: Path
    stats_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = _BACKOFF_FIRST
    next_start: float = 0.0
    last_exit: int | None = None
    history: list[int] = field(default_factory=list)  # exit codes, oldest first
    # not a framework worker: "schedule" (a replica, --schedule), "callbacks" (jobs),
    # "faust" (the stage as a Faust agent, pipeline faust)
    helper: str = ""

    @property
    def name(self) -> str:
        return f"{self.stage}[{self.index}]"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Starts, watches, restarts and drains the stage processes of one pipeline.

    Args:
        ref: ``MODULE:PIPELINE``, as ``pipeline run`` takes it.
        stages: The pipeline's stage names, in order.
        bootstrap: The brokers every instance talks to.
        logs: Directory of the instances' log files.
        scale: Instances per stage (1 when not named).
        extra: More ``pipeline run`` arguments for every instance.
        shutdown_timeout: Seconds an instance gets to drain before SIGKILL.
        stats_dir: Each instance writes its JSON counters to ``<stage>-<index>.json`` here.
        env: More environment variables for every instance.
        stage_env: More environment variables per stage (on a secure cluster, each stage's
            own principal: ``PIPELINE_SASL_USERNAME`` and ``PIPELINE_SASL_PASSWORD_FILE``).
        schedules: The pipeline's schedules to run replicas of (``scale`` counts them too; of
            all replicas of a schedule, one emits).
        callbacks: Run the pipeline's job callbacks (``pipeline jobs callbacks``) too.
        faust: Stages to run as agents of a faust-streaming app (``pipeline faust``) instead
            of framework workers (no HTTP surface; ``extra`` is not passed to them).
    """

    def __init__(
        self,
        ref: str,
        stages: Sequence[str],
        bootstrap: Bootstrap,
        *,
        logs: Path,
        scale: Mapping[str, int] | None = None,
        extra: Sequence[str] = (),
        shutdown_timeout: float = 30.0,
        stats_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        stage_env: Mapping[str, Mapping[str, str]] | None = None,
        schedules: Sequence[str] = (),
        callbacks: bool = False,
        faust: Collection[str] = (),
    ) -> None:
        self.ref = ref
        self.bootstrap = str(bootstrap)  # children resolve their security as the CLI does
        self.logs = logs
        self.extra = list(extra)
        self.shutdown_timeout = shutdown_timeout
        self.env = dict(env or {})
        self.stage_env = {stage: dict(extra) for stage, extra in (stage_env or {}).items()}
        scale = dict(scale or {})
        logs.mkdir(parents=True, exist_ok=True)
        self.instances = [
            Instance(
                stage, i, free_port(), logs / f"{stage}-{i}.log",
                None if stats_dir is None else stats_dir / f"{stage}-{i}.json",
                helper="faust" if stage in faust else "",
            )
            for stage in stages
            for i in range(scale.get(stage, 1))
        ]  # fmt: skip
        self.instances += [
            Instance(name, i, free_port(), logs / f"schedule-{name}-{i}.log", helper="schedule")
            for name in schedules
            for i in range(scale.get(name, 1))
        ]
        if callbacks:
            self.instances.append(
                Instance("callbacks", 0, 0, logs / "callbacks-0.log", helper="callbacks")
            )

    def _start(self, inst: Instance) -> None:
        if inst.helper == "schedule":
            self._spawn(inst, [
                sys.executable, "-m", "pipeline.cli", "run", self.ref, "--schedule", inst.stage,
                "--bootstrap", self.bootstrap,
            ])  # fmt: skip
            return
        if inst.helper == "callbacks":
            self._spawn(inst, [
                sys.executable, "-m", "pipeline.cli", "jobs", "callbacks", self.ref,
                "--bootstrap", self.bootstrap,
            ])  # fmt: skip
            return
        if inst.helper == "faust":
            cmd = [
                sys.executable, "-m", "pipeline.cli", "faust", self.ref, "--stage", inst.stage,
                "--bootstrap", self.bootstrap,
            ]  # fmt: skip
        else:
            cmd = [
                sys.executable, "-m", "pipeline.cli", "run", self.ref, "--stage", inst.stage,
                "--bootstrap", self.bootstrap, "--http", f"127.0.0.1:{inst.port}",
                "--shutdown-timeout", str(self.shutdown_timeout), *self.extra,
            ]  # fmt: skip
        if inst.stats_file is not None:
            cmd += ["--stats-file", str(inst.stats_file)]
        self._spawn(inst, cmd)

    def _spawn(self, inst: Instance, cmd: list[str]) -> None:
        with inst.log.open("ab") as out:
            inst.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={
                    **os.environ,
                    **self.env,
                    **self.stage_env.get(inst.stage, {}),
                    "PYTHONUNBUFFERED": "1",
                },
                start_new_session=True,  # the supervisor forwards signals itself
            )
        inst.started = time.monotonic()

    def start(self) -> None:
        """Start every instance."""
        for inst in self.instances:
            self._start(inst)
        log.info("started %d stage processes (logs in %s)", len(self.instances), self.logs)

    def check(self) -> list[str]:
        """Restart what exited (after its backoff); returns what happened, one line each."""
        events, now = [], time.monotonic()
        for inst in self.instances:
            if inst.proc is not None and inst.proc.poll() is not None:
                code = inst.proc.returncode
                inst.last_exit, inst.proc = code, None
                inst.history.append(code)
                if now - inst.started >= _STEADY_S:
                    inst.backoff = _BACKOFF_FIRST  # it ran well for a while: a fresh start
                inst.next_start = now + inst.backoff
                events.append(
                    f"{inst.name} exited with code {code}; starting it again in "
                    f"{inst.backoff:.0f}s (log: {inst.log})"
                )
                inst.backoff = min(inst.backoff * 2, _BACKOFF_MAX)
            elif inst.proc is None and now >= inst.next_start:
                if not port_is_free(inst.port):  # someone took it meanwhile: a new address
                    inst.port = free_port()
                self._start(inst)
                inst.restarts += 1
                events.append(f"{inst.name} started again (restart {inst.restarts})")
        for line in events:
            log.warning("%s", line)
        return events

    async def run(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Start everything, supervise until ``stop``, then drain."""
        self.start()
        try:
            while not stop.is_set():
                self.check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            await self.drain()

    async def drain(self) -> dict[str, int | None]:
        """SIGTERM every instance, SIGKILL what is left after the shutdown timeout."""
        running = [i for i in self.instances if i.running]
        for inst in running:
            assert inst.proc is not None
            with contextlib.suppress(ProcessLookupError):
                inst.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout + 5
        while any(i.running for i in running) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for inst in running:
            if inst.running:
                assert inst.proc is not None
                log.warning("%s did not stop in time: SIGKILL", inst.name)
                inst.proc.kill()
                inst.proc.wait()
        codes = {}
        for inst in self.instances:
            codes[inst.name] = None if inst.proc is None else inst.proc.returncode
            inst.proc = None
        return codes
