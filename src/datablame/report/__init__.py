"""One self-contained HTML page for any result datablame writes: a trace, a tabular
attribution, a verification, verbatim spans, an audit.

The page loads nothing (a Content-Security-Policy forbids every request), all row content
is escaped by Jinja's autoescape, plots are inline SVG. `render(result)` takes the same
JSON the commands write with --out, so `datablame report RESULT.json` and `--html` on each
command give the same page.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datablame.errors import UserError

KINDS = ("trace", "traces", "trace-group", "tabular", "tabular-group", "verify",
         "verify-text", "spans", "audit-labels", "audit-prune", "audit-fairness",
         "fix-text", "fix-tabular")


def kind_of(result) -> str:
    """Which command wrote `result` (by its keys: the files carry no type tag)."""
    if isinstance(result, list):
        if result and all(isinstance(r, dict) and "results" in r for r in result):
            return "traces"
        if result and all(isinstance(r, dict) and {"query", "rank", "row"} <= set(r)
                          for r in result):
            return "tabular"
    elif isinstance(result, dict):
        if result.get("kind") in KINDS:
            return result["kind"]
        keys = set(result)
        for kind, needed in (("verify-text", {"runs", "verdict", "original"}),
                             ("verify", {"method", "n_train", "query_loss"}),
                             ("spans", {"query", "spans"}),
                             ("audit-fairness", {"metric", "patterns"}),
                             ("audit-prune", {"scorer", "pruned"}),
                             ("audit-labels", {"scorer", "ranked"}),
                             ("trace", {"query", "results"})):
            if needed <= keys:
                return kind
    raise UserError("not a datablame result: expected the JSON written by trace, tabular, "
                    "verify, spans, fix or audit (--out)")


def load_result(path: str | os.PathLike):
    """A results file: JSON, or JSON lines (trace --queries --out)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    lines = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
    if not lines:
        raise UserError(f"{path}: empty")
    return lines


def render(result, *, source: str | None = None, show: int = 10, ui: dict | None = None
           ) -> str:
    """The page for `result` (what a command wrote with --out), as an HTML string; with
    `ui`, `serve`'s form above it (`result` None: the form alone)."""
    import jinja2

    from datablame import __version__
    from datablame.report.views import SIGN, build

    page = build(kind_of(result), result, show=show) if result is not None else \
        {"title": "datablame", "subtitle": "trace an output to the training rows behind it",
         "convention": SIGN, "sections": []}
    env = jinja2.Environment(loader=jinja2.PackageLoader("datablame", "report"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("page.html").render(version=__version__, source=source,
                                                fold=600, fold_preview=240, ui=ui, **page)


def is_our_report(path: Path) -> bool:
    """A page this module wrote (the generator tag), which may be overwritten."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(2048)
    except (OSError, UnicodeDecodeError):
        return False
    return '<meta name="generator" content="datablame' in head


def check_html_path(path: str | os.PathLike, option: str = "--html") -> Path:
    from datablame.outputs import check_output_file

    return check_output_file(path, option, suffix=".html", ours=is_our_report)


def write_html(path: str | os.PathLike, result, *, source: str | None = None,
               show: int = 10, option: str = "--html") -> Path:
    """Render and write atomically (a page of ours may be replaced, nothing else)."""
    from datablame.outputs import remember_written
    from datablame.store.atomic import write_text_atomic

    path = check_html_path(path, option)
    write_text_atomic(path, render(result, source=source, show=show))
    remember_written(path)
    return path


def attach_rows(result, table) -> dict:
    """An audit result with the content of the rows it lists (the first LISTED), read
    from its training table: the JSON holds only row ids."""
    from datablame.report.views import LISTED

    kind = kind_of(result)
    if not kind.startswith("audit"):
        return result
    listed = result.get("pruned") if kind == "audit-prune" else result.get("ranked")
    if result.get("n_train") is not None and len(table) != result["n_train"]:
        raise UserError(f"the table has {len(table)} rows but the audit ran on "
                        f"{result['n_train']}: give the training table it was run on")
    content = {}
    for item in (listed or [])[:LISTED]:
        record = table.iloc[int(item["row"])].to_dict()
        content[str(item["row"])] = {str(k): _plain(v) for k, v in record.items()}
    return {**result, "row_content": content}


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
