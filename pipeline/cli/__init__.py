"""The ``pipeline`` command: thin; it parses arguments and calls the public API.

- :mod:`.kafka`: ``pipeline kafka ...``, the local broker or cluster;
- :mod:`.commands`: ``run``, ``graph``, ``topics``, ``publish``, ``tail``, ``deploy``;
- :mod:`.dlq`: ``pipeline dlq ...``, dead letters and their replay;
- :mod:`.jobs`: ``pipeline jobs ...``, jobs: submit, status, callbacks;
- :mod:`.status`: ``pipeline status``, lag, rates, instances and their health;
- :mod:`.up`: ``pipeline up``, every stage as a supervised process;
- :mod:`.acl`: ``pipeline acl``, each stage's least-privilege ACLs;
- :mod:`.ui`: ``pipeline ui``, the web dashboard.

Security settings (``--security-protocol``, ``--sasl-*``, ``--ssl-*``) are options of the
``pipeline`` command itself, before the verb; they set the ``PIPELINE_*`` variables the
settings read, so that processes the CLI starts (``pipeline up``) connect the same way.
A password is never an option (it would show in ``ps``): ``--sasl-password-file`` or
``PIPELINE_SASL_PASSWORD(_FILE)``.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer
from rich.markup import escape

from pipeline.cli import acl, commands, dlq, faust, jobs, kafka, status, ui, up
from pipeline.cli.console import console
from pipeline.errors import PipelineError

app = typer.Typer(
    help="Pipes-and-filters stream processing on Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(kafka.app, name="kafka")
commands.register(app)
dlq.register(app)
jobs.register(app)
status.register(app)
up.register(app)
acl.register(app)
faust.register(app)
ui.register(app)

err = console(stderr=True)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="On an error, print the traceback too.")
    ] = False,
    security_protocol: Annotated[
        str | None,
        typer.Option(
            help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL [PIPELINE_SECURITY_PROTOCOL]"
        ),
    ] = None,
    sasl_mechanism: Annotated[
        str | None, typer.Option(help="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (default)")
    ] = None,
    sasl_username: Annotated[str | None, typer.Option(help="SASL user (the principal).")] = None,
    sasl_password_file: Annotated[
        str | None, typer.Option(help="File holding the SASL password.")
    ] = None,
    ssl_cafile: Annotated[str | None, typer.Option(help="CA certificates (PEM).")] = None,
    ssl_certfile: Annotated[str | None, typer.Option(help="Client certificate (mTLS).")] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="Client key (mTLS).")] = None,
) -> None:
    if debug:
        os.environ["PIPELINE_DEBUG"] = "1"
    given = {
        "SECURITY_PROTOCOL": security_protocol, "SASL_MECHANISM": sasl_mechanism,
        "SASL_USERNAME": sasl_username, "SASL_PASSWORD_FILE": sasl_password_file,
        "SSL_CAFILE": ssl_cafile, "SSL_CERTFILE": ssl_certfile, "SSL_KEYFILE": ssl_keyfile,
    }  # fmt: skip
    for name, value in given.items():
        if value is not None:
            os.environ[f"PIPELINE_{name}"] = value


def main() -> None:
    """Entry point: run the CLI, turning framework errors into one readable paragraph."""
    try:
        app()
    except PipelineError as exc:
        if os.environ.get("PIPELINE_DEBUG"):
            traceback.print_exception(exc)
        # Escaped: an error's context ("[topic=x, partition=1]") is not console markup.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
