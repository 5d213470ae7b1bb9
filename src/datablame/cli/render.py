"""Ranked rows for people (a rich table) and for machines (JSON)."""

from __future__ import annotations

import json
import math

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

READING_STYLE = {"strong": "bold green", "related": "green", "unrelated": "dim",
                 "opposing": "red"}


def _conversation(value: list) -> str | None:
    """A chat row in a table cell: the answer it taught first, then the question."""
    from datablame.data.chat import normalize_messages
    from datablame.errors import UserError

    try:
        turns = normalize_messages(value)
    except UserError:
        return None
    asked = next((t["content"] for t in reversed(turns) if t["role"] == "user"), "")
    said = next((t["content"] for t in reversed(turns) if t["role"] == "assistant"), "")
    asked = asked if len(asked) <= 24 else asked[:23] + "…"
    return f"{said} ← {asked}" if asked else said


def _preview(value: object, width: int = 48) -> str:
    if isinstance(value, list):
        value = _conversation(value) or value
    text = "" if value is None else " ".join(str(value).split())
    # a row's own brackets ("[/b]", "arr[i]") are text, never rich markup
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def results_table(df: pd.DataFrame, show: int = 5, title: str | None = None) -> Table:
    fields = [c for c in df.columns if c.startswith("field:")]
    table = Table(title=title, show_lines=False, header_style="bold")
    # numbers never shrink; the row's text columns give way when the terminal is narrow
    table.add_column("rank", justify="right", no_wrap=True, min_width=4)
    table.add_column("row", justify="right", style="cyan", no_wrap=True, min_width=5)
    table.add_column("score", justify="right", no_wrap=True, min_width=7)
    table.add_column("reading", no_wrap=True, min_width=9)
    if "distance" in df:
        table.add_column("distance", justify="right", no_wrap=True, min_width=8)
    ranks = [c for c in ("gradient_rank", "retrieval_rank") if c in df and "fused" in df]
    for c in ranks:
        table.add_column(c.split("_")[0][:4] + " rank", justify="right", no_wrap=True,
                         min_width=9)
    if "copied" in df:
        table.add_column("copied", justify="right", no_wrap=True, min_width=6)
    group = [c for c in ("helps", "opposes", "strongest_query") if c in df]
    for c in group:  # a group question: how many of the queries each row agrees with
        table.add_column(c.replace("_", " "), justify="right", no_wrap=True, min_width=6)
    width = (36 if not ranks else 24) - (4 if "copied" in df else 0) - 8 * len(group)
    for f in fields:
        table.add_column(f.removeprefix("field:"), overflow="ellipsis", no_wrap=True,
                         max_width=width)
    for _, r in df.head(show).iterrows():
        cells = [str(r["rank"]), str(r["row"]), f"{r['score']:.4f}"]
        label = r.get("reading", "")
        style = READING_STYLE.get(label)
        cells.append(f"[{style}]{label}[/]" if style else escape(str(label or "")))
        if "distance" in df:
            d = r["distance"]
            cells.append("-" if d != d else f"{max(d, 0.0):.3f}")  # NaN: not retrieved
        cells += [str(r[c]) for c in ranks]
        if "copied" in df:
            cells.append(str(r["copied"]))
        n = len(df.attrs.get("group", ()))
        cells += [f"{r[c]}/{n}" if c != "strongest_query" else str(r[c]) for c in group]
        cells += [_preview(r[f]) for f in fields]
        table.add_row(*cells)
    return table


def _clean(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def results_json(df: pd.DataFrame) -> dict:
    """{"query": ..., "results": [{"rank", "row", "score", ..., "fields": {...}}]}."""
    fields = [c for c in df.columns if c.startswith("field:")]
    others = [c for c in df.columns if not c.startswith("field:")]
    results = []
    for rec in df.to_dict(orient="records"):
        item = {c: _clean(rec[c]) for c in others}
        item["fields"] = {f.removeprefix("field:"): _clean(rec[f]) for f in fields}
        results.append(item)
    meta = {k: v for k, v in df.attrs.items() if k != "query"}
    return {"query": df.attrs.get("query"), **meta, "results": results}


def print_results(df: pd.DataFrame, show: int, as_json: bool, console: Console) -> None:
    if as_json:
        print(json.dumps(results_json(df), indent=2, ensure_ascii=False))
    else:
        console.print(results_table(df, show, title=f"training rows behind the query "
                                                    f"({df.attrs.get('method', '')})"))
