"""``pipeline acl``: the least-privilege ACLs of each stage's principal, printed or applied.

``pipeline kafka user NAME --password-file FILE`` (in :mod:`.kafka`) creates the SCRAM users.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.commands import BootstrapOpt, bootstrap_address
from pipeline.cli.console import console
from pipeline.errors import ConfigError
from pipeline.loader import load_pipeline

out = console()


def acl(
    ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")],
    apply: Annotated[
        bool, typer.Option("--apply", help="Create the ACLs on the cluster (as an admin).")
    ] = False,
    publisher: Annotated[
        str | None,
        typer.Option(help="The publisher's user (default: <pipeline>.publisher)."),
    ] = None,
    users: Annotated[
        Path | None,
        typer.Option(
            help="With --apply: create each principal's SCRAM user too, its password in "
            "DIR/<user>.password (a random one written there when missing)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Print (or --apply) the ACLs each stage's principal and the publisher need, and no more.

    A stage reads its input and group, writes and creates its output, dead-letter and state
    topics, reads its state back, writes idempotently, and (exactly-once) owns the
    transactional ids '<group>.*'. Its principal is 'User:<group>' unless the pipeline says
    otherwise (Pipeline.then(..., principal=...)).
    """
    from pipeline.ops.acl import apply as create_acls
    from pipeline.ops.acl import pipeline_acls

    pipeline = load_pipeline(ref)
    found = pipeline_acls(pipeline, publisher=publisher)
    if as_json:
        rules = [a.to_json() for acls in found.values() for a in acls]
        out.print_json(json.dumps({"pipeline": pipeline.name, "acls": rules}))
    else:
        table = Table("principal", "operation", "resource", "name", box=None)
        for principal, acls in found.items():
            for a in acls:
                name = f"{a.name}*" if a.prefixed else a.name
                table.add_row(f"User:{principal}", a.operation.name, a.resource.name.lower(), name)
        out.print(table)
    if users is not None and not apply:
        raise ConfigError("--users creates users on the cluster: give --apply too")
    if apply:
        target = bootstrap_address(bootstrap)
        if users is not None:
            from pipeline.ops.users import ensure_users

            files = asyncio.run(ensure_users(target, list(found), users))
            out.print(f"{len(files)} SCRAM users set; password files in {users}")
        count = asyncio.run(create_acls(target, [a for acls in found.values() for a in acls]))
        out.print(
            f"applied {count} ACLs for {len(found)} principals at {target.describe()}",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    """Add ``pipeline acl``."""
    app.command("acl")(acl)
