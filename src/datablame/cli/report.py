"""`datablame report` (a page from a saved result) and the `--html` option every result
command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datablame.cli.console import console, fail

HTML_HELP = "Also write a self-contained HTML report here (opens in any browser, offline)."


def check_html(html: Path | None) -> None:
    """Refuse a bad report path before the work, not after it."""
    if html is not None:
        from datablame.report import check_html_path

        check_html_path(html)


def write_report(html: Path | None, result, *, table=None, show: int = 10) -> None:
    """Write the page (with the listed rows' content from `table` for an audit) and say
    where it went."""
    if html is None:
        return
    from datablame.report import attach_rows, write_html

    if table is not None:
        result = attach_rows(result, table)
    write_html(html, result, show=show)
    console.print(f"report written to {html}", highlight=False)


def report(
    result_file: Annotated[Path, typer.Argument(help="A result saved with --out: trace "
                                                     "(.json, or .jsonl from --queries), "
                                                     "verify, spans or audit.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The .html file to "  # noqa: UP045
                                                "write (default: beside the result).")
                   ] = None,
    data: Annotated[Optional[Path], typer.Option(help="An audit's training table (.csv / "  # noqa: UP045
                                                      ".parquet): show the listed rows' "
                                                      "content.")] = None,
    show: Annotated[int, typer.Option(help="Rows opened (and shaded) at the top.")] = 10,
) -> None:
    """A self-contained HTML page from a saved result: the query, the ranked rows with
    their full content, the score distribution, the retraining curves, the audit's
    groups and patterns."""
    from datablame.errors import check_at_least
    from datablame.report import kind_of, load_result

    check_at_least("--show", show, 1)
    out = out or result_file.with_suffix(".html")
    if out.resolve() == result_file.resolve():
        fail(f"--out {out} is the result file itself; give another name")
    check_html(out)
    result = load_result(result_file)
    kind = kind_of(result)
    table = None
    if data is not None:
        if not kind.startswith("audit"):
            fail("--data shows an audit's rows; a trace or tabular result holds its rows")
        from datablame.data.rows import load_table

        table = load_table(data)[0]
    write_report(out, result, table=table, show=show)
