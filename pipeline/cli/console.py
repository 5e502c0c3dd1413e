"""The CLI's consoles: rich on a terminal; never wrapped at 80 columns when piped to a file."""

from __future__ import annotations

import sys

from rich.console import Console


def console(*, stderr: bool = False) -> Console:
    """A console for stdout (or stderr) that does not wrap lines when it is not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, width=None if tty else 220, soft_wrap=not tty)
