"""The ``pipeline`` command: thin; it parses arguments and calls the public API."""

from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from pipeline import cli_dlq, cli_pipeline
from pipeline.config import Settings
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.broker import LocalBroker

app = typer.Typer(
    help="Pipes-and-filters stream processing on Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
kafka_app = typer.Typer(help="Run a local single-node Apache Kafka broker.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
cli_pipeline.register(app)
cli_dlq.register(app)

out = Console()
err = Console(stderr=True)


def _local_broker(
    settings: Settings, *, port: int | None = None, provision: bool = False
) -> LocalBroker:
    """The CLI's broker lives in ``$PIPELINE_HOME/broker``; only ``start`` needs Java and jars."""
    from pipeline.broker import LocalBroker, ensure_jars, find_java

    workdir = settings.home / "broker"
    if not provision:
        return LocalBroker(workdir)
    java, _ = find_java(settings.java_home)
    jars = ensure_jars(settings.home, settings.kafka_version)
    return LocalBroker(workdir, jars=jars, java=java, port=port, heap_mb=settings.broker_heap_mb)


@kafka_app.command("start")
def kafka_start(
    port: Annotated[int | None, typer.Option(help="Client port (default: a free one).")] = None,
    fresh: Annotated[bool, typer.Option(help="Delete the broker's data first.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 90.0,
) -> None:
    """Start the local broker (KRaft, 127.0.0.1) and print its bootstrap address."""
    settings = Settings()
    if fresh:
        _local_broker(settings).stop()
        shutil.rmtree(settings.home / "broker", ignore_errors=True)
    broker = _local_broker(settings, port=port, provision=True)
    with out.status(f"Starting Apache Kafka {settings.kafka_version} ..."):
        bootstrap = broker.start(timeout=timeout)
    status = broker.status()
    out.print(f"Kafka {settings.kafka_version} running at [bold]{bootstrap}[/] (pid {status.pid})")
    out.print(f"  export PIPELINE_BOOTSTRAP={bootstrap}")


@kafka_app.command("status")
def kafka_status() -> None:
    """Show whether the local broker runs, where, and its memory."""
    status = _local_broker(Settings()).status()
    if not status.running:
        out.print("Kafka: stopped")
        raise typer.Exit(3)
    answer = "answering" if status.answering else "NOT answering"
    out.print(
        f"Kafka: running at [bold]{status.bootstrap}[/] ({answer}), pid {status.pid}, "
        f"RSS {status.rss_mb or 0:.0f} MB, up {status.uptime_s or 0:.0f}s, dir {status.workdir}"
    )


@kafka_app.command("stop")
def kafka_stop(
    timeout: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 30.0,
) -> None:
    """Stop the local broker cleanly (SIGKILL after the timeout)."""
    broker = _local_broker(Settings())
    before = broker.status()
    if broker.stop(timeout=timeout):
        out.print(f"Kafka at {before.bootstrap} stopped (pid {before.pid}).")
    else:
        out.print("Kafka was not running.")


def main() -> None:
    """Entry point: run the CLI, turning framework errors into one readable paragraph."""
    try:
        app()
    except PipelineError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
