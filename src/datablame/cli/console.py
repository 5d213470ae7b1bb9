"""The CLI's consoles (results to stdout, notes and errors to stderr) and its one way to
refuse (exit code 2, one line)."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)


def wide_console() -> Console:
    """Results on stdout: a terminal's own width, 160 columns when piped (tables stay one
    line per row)."""
    import sys

    return Console(width=None if sys.stdout.isatty() else 160)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
