"""Progress on stderr: rich bars on a terminal, plain periodic lines in logs and CI.

A log gets "row gradients: 512/2000 (25%)" every 10% or every 30 s, whichever comes
first, and a last line with the elapsed time: a bar would fill a log with control codes,
and nothing at all leaves a long build looking hung.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_enabled = False
LINE_EVERY_S = 30.0


def enable(on: bool = True) -> None:
    """The CLI turns progress on; the Python API stays quiet unless asked."""
    global _enabled
    _enabled = on


def _now() -> float:
    return time.monotonic()


@contextmanager
def task(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar with rate and ETA when progress is enabled."""
    if not _enabled or total <= 0:
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        with _lines(description, total) as advance:
            yield advance
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


@contextmanager
def _lines(description: str, total: int) -> Iterator[Callable[[int], None]]:
    start = _now()
    state = {"done": 0, "tenth": 0, "last": start}

    def say(extra: str = "") -> None:
        done = state["done"]
        print(f"{description}: {done}/{total} ({100 * done // total}%){extra}",
              file=sys.stderr, flush=True)

    def advance(n: int = 1) -> None:
        state["done"] += n
        tenth = min(10, 10 * state["done"] // total)
        now = _now()
        if state["done"] >= total:
            return  # the closing line says it, with the time taken
        if tenth > state["tenth"] or now - state["last"] >= LINE_EVERY_S:
            state["tenth"], state["last"] = tenth, now
            say()

    yield advance
    if state["done"] >= total:
        say(f" in {_now() - start:.1f}s")


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
