"""Progress bars on stderr (rich), silent when disabled or not a terminal-worthy task."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_enabled = False


def enable(on: bool = True) -> None:
    """The CLI turns bars on; the Python API stays quiet unless asked."""
    global _enabled
    _enabled = on


@contextmanager
def task(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar with rate and ETA when progress is enabled."""
    if not _enabled or total <= 0:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    ) as bar:
        tid = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(tid, n)


def note(message: str) -> None:
    """A one-line notice for the CLI user (what datablame assumed); silent in the API."""
    if not _enabled_notes:
        return
    from rich.console import Console

    Console(stderr=True).print(f"[cyan]note:[/] {message}", highlight=False, soft_wrap=True)


_enabled_notes = False


def enable_notes(on: bool = True) -> None:
    global _enabled_notes
    _enabled_notes = on
