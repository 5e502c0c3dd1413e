"""``pipeline up MODULE:PIPELINE [--scale STAGE=N ...]``: every stage as a supervised process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live

from pipeline.cli.commands import BootstrapOpt, bootstrap_address
from pipeline.cli.console import console
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.loader import load_pipeline
from pipeline.ops.supervisor import Instance, Supervisor

out = console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command("up")(up)


def _scale(items: list[str], stages: list[str]) -> dict[str, int]:
    scale = {}
    for item in items:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--scale wants STAGE=N with N >= 1, not {item!r}")
        if name not in stages:
            raise ConfigError(
                f"--scale {item}: no stage or schedule '{name}' (known: {', '.join(stages)})"
            )
        scale[name] = int(count)
    return scale


def _known(names: list[str], stages: list[str]) -> set[str]:
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise ConfigError(
            f"--faust {unknown[0]}: no stage '{unknown[0]}' (known: {', '.join(stages)})"
        )
    return set(names)


def up(
    ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")],
    scale: Annotated[
        list[str] | None, typer.Option("--scale", help="Instances of a stage: STAGE=N.")
    ] = None,
    bootstrap: BootstrapOpt = None,
    logs: Annotated[
        Path | None, typer.Option(help="Where each instance logs (default: PIPELINE_HOME/up).")
    ] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds to drain on stop.")] = 30.0,
    session_timeout_ms: Annotated[
        int | None,
        typer.Option(
            help="Group session timeout of every stage: how soon the group gives a dead "
            "process's partitions to its restarted self (default: pipeline run's)."
        ),
    ] = None,
    faust: Annotated[
        list[str] | None,
        typer.Option(
            "--faust", help="Run this stage as an agent of a faust-streaming app (repeatable)."
        ),
    ] = None,
) -> None:
    """Run every stage (and a replica of every schedule, and the job callbacks of a pipeline
    that tracks jobs) as its own OS process, restarted when it dies, drained on Ctrl-C."""
    pipeline = load_pipeline(ref)
    stages = [s.name for s in pipeline.stages]
    schedules = [s.name for s in pipeline.schedules]
    where = logs or Settings().home / "up" / pipeline.name
    timeout = [] if session_timeout_ms is None else [f"--session-timeout-ms={session_timeout_ms}"]
    sup = Supervisor(
        ref, stages, bootstrap_address(bootstrap), logs=where,
        scale=_scale(scale or [], stages + schedules), shutdown_timeout=shutdown_timeout,
        schedules=schedules, callbacks=pipeline.jobs is not None,
        extra=timeout, faust=_known(faust or [], stages),
    )  # fmt: skip
    out.print(f"pipeline {pipeline.name}: {len(sup.instances)} processes, logs in {where}")
    for inst in sup.instances:
        kinds = {"schedule": "schedule replica", "callbacks": "job callbacks", "faust": "faust"}
        kind = kinds.get(inst.helper)
        what = f"{kind}, log {inst.log}" if kind else f"{inst.url}/metrics"
        out.print(f"  {inst.name}: {what}", highlight=False)
    asyncio.run(_supervise(sup))


async def _supervise(sup: Supervisor) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(sup.run(stop))
    with Live(console=out, auto_refresh=False, transient=True) as live:
        while not task.done():
            live.update(await _line(sup.instances), refresh=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), 2.0)
    await task
    out.print("all stage processes stopped")


async def _line(instances: list[Instance]) -> str:
    """``stage up/ready/N`` per stage and the restarts so far, from the instances' /ready."""
    import aiohttp

    ready: dict[str, bool] = {}

    async def ask(session: aiohttp.ClientSession, inst: Instance) -> None:
        try:
            async with session.get(f"{inst.url}/ready") as r:
                ready[inst.name] = r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ready[inst.name] = False

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        await asyncio.gather(*(ask(session, i) for i in instances if i.running and not i.helper))
    for inst in instances:
        if inst.helper:  # no HTTP surface (a running schedule replica is ready to lead)
            ready[inst.name] = inst.running
    parts, restarts = [], sum(i.restarts for i in instances)
    for stage in dict.fromkeys(i.stage for i in instances):
        mine = [i for i in instances if i.stage == stage]
        up = sum(i.running for i in mine)
        ok = sum(ready.get(i.name, False) for i in mine)
        parts.append(f"{stage} {up}/{len(mine)} up, {ok} ready")
    return " | ".join(parts) + f" | restarts {restarts}"
