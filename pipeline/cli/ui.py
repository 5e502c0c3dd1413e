"""``pipeline ui MODULE:PIPELINE... [--port N]``: the web dashboard (:mod:`pipeline.ui`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

import typer

from pipeline.cli.commands import BootstrapOpt, bootstrap_address
from pipeline.cli.console import console
from pipeline.loader import load_pipeline

out = console()


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)


def ui(
    refs: Annotated[
        list[str],
        typer.Argument(
            metavar="MODULE:PIPELINE...",
            help="One or more pipelines, drawn as one graph (branches join at their topics).",
        ),
    ],
    bootstrap: BootstrapOpt = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="0: any free port.")] = 8642,
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback exposes the dashboard.")
    ] = "127.0.0.1",
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between live updates.")] = 1.0,
) -> None:
    """Serve the dashboard: topology with live rates and lag, dead letters browsed and
    replayed, jobs looked up. Prints the address to open, with the token replays need."""
    from pipeline.ui import UiOptions, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # The page shows a broker that does not answer (and the log says so once per try):
    # aiokafka's own line per connection attempt would only repeat it.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    pipelines = [load_pipeline(ref) for ref in refs]
    address = bootstrap_address(bootstrap)
    options = UiOptions(host=host, port=port, interval=interval)

    def started(dashboard: object) -> None:
        url = getattr(dashboard, "url", "")
        names = ", ".join(p.name for p in pipelines)
        out.print(f"dashboard of {names} on {address}: open the address below (its token")
        out.print("allows replays; without it the pages are read-only). Ctrl-C stops.")
        print(f"url: {url}", flush=True)  # one plain line, never wrapped: scripts read it

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(address, pipelines, options, started))
