"""`datablame report` (a page from a saved result) and the `--html` option every result
command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datablame.cli.console import console, fail

HTML_HELP = "Also write a self-contained HTML report here (opens in any browser, offline)."


def check_html(html: Path | None, option: str = "--html") -> None:
    """Refuse a bad report path before the work, not after it."""
    if html is not None:
        from datablame.report import check_html_path

        check_html_path(html, option)


def write_report(html: Path | None, result, *, table=None, show: int = 10,
                 option: str = "--html") -> None:
    """Write the page (with the listed rows' content from `table` for an audit) and say
    where it went."""
    if html is None:
        return
    from datablame.report import attach_rows, write_html

    if table is not None:
        result = attach_rows(result, table)
    write_html(html, result, show=show, option=option)
    console.print(f"report written to {html}", highlight=False)


def report(
    result_file: Annotated[Path, typer.Argument(help="A result saved with --out: trace "
                                                     "(.json, or .jsonl from --queries), "
                                                     "verify, spans, audit; tabular "
                                                     "--json; fix --result.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The .html file to "  # noqa: UP045
                                                "write (default: beside the result).")
                   ] = None,
    data: Annotated[Optional[Path], typer.Option(help="An audit's training table (.csv / "  # noqa: UP045
                                                      ".parquet): show the listed rows' "
                                                      "content.")] = None,
    show: Annotated[int, typer.Option(help="Rows opened (and shaded) at the top.")] = 10,
) -> None:
    """A self-contained HTML page from a result saved with --out.

    The query, the ranked rows with their full content, the score distribution, the
    retraining curves, the audit's groups and patterns."""
    from datablame.errors import check_at_least
    from datablame.report import kind_of, load_result

    check_at_least("--show", show, 1)
    out = out or result_file.with_suffix(".html")
    if out.resolve() == result_file.resolve():
        fail(f"--out {out} is the result file itself; give another name")
    check_html(out, "--out")
    result = load_result(result_file)
    kind = kind_of(result)
    table = None
    if data is not None:
        if not kind.startswith("audit"):
            fail("--data shows an audit's rows; a trace or tabular result holds its rows")
        from datablame.data.rows import load_table

        table = load_table(data)[0]
    write_report(out, result, table=table, show=show, option="--out")


def serve(
    index_dir: Annotated[Path, typer.Argument(help="Index directory built by 'index'.")],
    model: Annotated[Path, typer.Option(help="Base model directory (Hugging Face).")],
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT LoRA adapter directory.")  # noqa: UP045
                       ] = None,
    queries: Annotated[Optional[Path], typer.Option(help="A queries file (JSONL, as trace "  # noqa: UP045
                                                         "--queries) to pick from.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Training file (default: the one "  # noqa: UP045
                                                      "recorded in the index).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind: loopback only unless "
                                           "--allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one, printed).")] = 0,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Bind an address "
                                               "other machines can reach (they will see "
                                               "your training rows).")] = False,
    top_k: Annotated[int, typer.Option(help="Candidates retrieved per trace.")] = 50,
    show: Annotated[int, typer.Option(help="Rows opened and shaded per word.")] = 10,
    params: Annotated[str, typer.Option(help="Parameters to differentiate (as trace).")
                      ] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """A local web UI to trace outputs, compare methods and download the page.

    Type or pick an output, trace it, click through the rows, flip methods, download the
    report. Binds 127.0.0.1; reads no file but the index, the model and the paths given
    here."""
    from datablame.errors import check_at_least
    from datablame.report.server import TraceSession, check_bind, index_has_gradients, make_server
    from datablame.store.retrieval_index import read_manifest
    from datablame.text import LM_METHODS, Tracer

    check_bind(host, allow_remote)
    check_at_least("--top-k", top_k, 1)
    check_at_least("--show", show, 1)
    if not 0 <= port <= 65535:
        fail(f"--port must be 0 to 65535, got {port}")
    lines = None
    if queries is not None:
        from datablame.data.queries import read_queries
        from datablame.data.template import template_from_json

        lines = read_queries(queries, template_from_json(read_manifest(index_dir)["template"]),
                             generate=None)  # a line without an answer: the model's own
    methods = ["grad", *[m for m in LM_METHODS if m != "tracin"]]  # tracin: checkpoints
    from datablame.models.lora_finetune import RECIPE_FILE

    if adapter is not None and (adapter / RECIPE_FILE).is_file():
        methods.append("magic")  # replays a datablame fine-tune: needs its recipe
    tracer = Tracer(index_dir, model, adapter, data=data, params=params, dtype=dtype,
                    device=device)
    session = TraceSession(tracer, methods=methods, queries=lines, top_k=top_k, show=show,
                           all_rows_available=index_has_gradients(index_dir))
    try:
        server = make_server(session, host, port, allow_remote)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    shown_host = f"[{host}]" if ":" in host else host
    console.print(f"serving http://{shown_host}:{server.server_address[1]}/ "
                  "(Ctrl-C stops)", highlight=False, soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
