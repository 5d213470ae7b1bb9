"""`datablame tabular` and `datablame verify`: files in, the library's calls
(`datablame.tabular`), a table or JSON out.

Everything that can be refused without loading a model is refused first (files exist,
the method is known and fits the model's family, options in range, outputs are new or
ours); then the tables are checked against the model the same way the Python API checks
them (`data/tables.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from datablame.cli.console import console
from datablame.cli.report import HTML_HELP
from datablame.errors import UserError, check_at_least
from datablame.methods.families import methods_help
from datablame.methods.registry import METHODS, check_fits
from datablame.tabular import (
    EXPLAINS,
    TabularTask,
    check_removals,
    ranked_rows,
    ranking,
    resolve_order,
    verify_scores,
    zero_message,
)


def parse_rows(text: str, option: str = "--loo") -> list[int]:
    """'3,17' -> [3, 17]; anything else is one line, before any work."""
    rows = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            rows.append(int(item))
        except ValueError:
            raise UserError(f"{option} expects comma-separated row numbers, got "
                            f"'{item.strip()}'") from None
        if rows[-1] < 0:
            raise UserError(f"{option}: row numbers start at 0, got {rows[-1]}")
    return rows


def _check_inputs(train_file, model_file, query_file, method: str) -> None:
    """What can be checked without loading anything: files exist, the method is known."""
    for what, path in (("training file", train_file), ("model file", model_file),
                       ("query file", query_file)):
        if not Path(path).exists():
            raise UserError(f"{what} not found: {path}")
    if method != "auto" and method not in METHODS:
        raise UserError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def check_tabular_options(train_file, model_file, query_file, *, method: str, top_k: int,
                          out=None) -> None:
    """Everything `tabular` can refuse before loading a model or a row."""
    from datablame.outputs import check_output_file, is_npy

    _check_inputs(train_file, model_file, query_file, method)
    check_at_least("--top-k", top_k, 1)
    if out is not None:
        check_output_file(out, "--out", suffix=".npy", ours=is_npy,
                          what=" (the score matrix is written as a NumPy array)")


def check_verify_options(train_file, model_file, query_file, *, method: str,
                         lds_subsets: int, remove_k: int, out, cache=None) -> None:
    """Everything `verify` can refuse before loading a model or retraining anything."""
    from datablame.outputs import check_output_dir, check_output_file, is_json_with

    _check_inputs(train_file, model_file, query_file, method)
    for option, value in (("--lds-subsets", lds_subsets), ("--remove-top-k", remove_k)):
        check_at_least(option, value, 0)
    if lds_subsets == 1:
        raise UserError("--lds-subsets needs at least 2 subsets (a correlation), got 1")
    check_output_file(out, "--out", ours=is_json_with("method", "n_train", "query_loss"))
    if cache:
        check_output_dir(cache, "--cache")


def load_task(train_file, target, model_file, query_file, trust_pickle=False,
              method: str = "auto"):
    """(task, training features as read, query target column or None)."""
    from datablame.data.rows import load_table
    from datablame.data.tables import (
        library_tables,
        match_columns,
        split_query_target,
        torch_tables,
    )
    from datablame.models.loading import adapter_for, load_model_file, method_family

    loaded = load_model_file(model_file, trust_pickle)
    if method != "auto":
        check_fits(method, method_family(loaded.model))  # before the data are read
    x_train, y_train = load_table(train_file, target)
    x_query, y_query = split_query_target(load_table(query_file)[0], target, x_train)
    if loaded.family == "torch":
        xt, yt, xq = torch_tables(loaded.config, x_train, y_train, x_query)
        adapter = adapter_for(loaded.model, xt, yt, loss=loaded.config.get("loss", "ce"),
                              l2=float(loaded.config.get("train", {}).get("l2", 0.0)))
        match_columns(x_query, x_train)  # after the training table is checked
    else:  # the query's columns are matched to the model's there
        xt, yt, xq = library_tables(loaded.model, loaded.family, x_train, y_train, x_query)
        adapter = adapter_for(loaded.model, xt, yt)
    return TabularTask(loaded.model, adapter, xt, yt, xq, loaded.config), x_train, y_query


def run_tabular(train_file, target, model_file, query_file, *, method: str = "auto",
                top_k: int = 5, true_label: bool = False, trust_pickle: bool = False,
                out=None, aggregate: bool = False, only_wrong: bool = False,
                order: str = "auto"):
    """(ranked rows DataFrame, full score matrix); `out` (.npy) gets the score matrix, at
    exactly that path. `aggregate`: one ranking for the query rows together;
    `only_wrong`: only the query rows the model gets wrong."""
    check_tabular_options(train_file, model_file, query_file, method=method, top_k=top_k,
                          out=out)
    resolve_order(order, "")  # a bad --order before any work
    task, x_train, y_query = load_task(train_file, target, model_file, query_file,
                                       trust_pickle, method)
    if true_label and y_query is None:
        raise UserError(f"--true-label needs the target column '{target}' in the query rows")
    chosen = None
    if only_wrong:
        from datablame.tabular import wrong_queries

        chosen = wrong_queries(task, y_query)
        if len(chosen) == 0:
            raise UserError("the model gets every query row right: nothing for --only-wrong")
    est = task.fit(method)
    scores, yq, explains = task.scores(est, y_query if true_label else None)
    if out is not None:
        from datablame.outputs import save_npy

        save_npy(Path(out), scores)
    if aggregate:
        from datablame.tabular import group_rows

        df = group_rows(scores, x_train, task.y_train, top_k, chosen,
                        resolve_order(order, explains))
        df.attrs.update(method=est.name, explains=explains)
        return df, scores
    df = ranked_rows(scores, x_train, task.y_train, top_k, est, task.x_query, yq, explains,
                     order)
    if chosen is not None:
        df = df[df["query"].isin(chosen)].reset_index(drop=True)
    return df, scores


def run_verify(train_file, target, model_file, query_file, *, method: str, lds_subsets: int,
               remove_k: int, loo_rows: list[int], out, cache=None,
               trust_pickle: bool = False) -> dict:
    """Retrain with the model's own settings and compare; the JSON at `out` holds the
    numbers and their verdicts."""
    from datablame import verify as verification

    check_verify_options(train_file, model_file, query_file, method=method,
                         lds_subsets=lds_subsets, remove_k=remove_k, out=out, cache=cache)
    task, _, y_query = load_task(train_file, target, model_file, query_file, trust_pickle,
                                 method)
    if y_query is None:
        raise UserError(f"verify needs the target column '{target}' in the query rows")
    method = task.method(method)
    check_removals(len(task.y_train), loo_rows, remove_k, "--remove-top-k")  # before fitting
    scores = task.fit(method).scores(task.x_query, task.query_targets(y_query))
    result = verify_scores(task, scores, y_query, method=method, lds_subsets=lds_subsets,
                           remove_k=remove_k, loo_rows=loo_rows, cache=cache)
    verification.save(result, out)
    return result


def tabular(
    train_file: Annotated[Path, typer.Argument(help="Training rows: .csv or .parquet.")],
    target: Annotated[str, typer.Option(help="Target column of the training rows.")],
    model: Annotated[Path, typer.Option(help="Model file: torch .safetensors (+ .json), "
                                             "XGBoost .json/.ubj, LightGBM .txt, CatBoost "
                                             ".cbm, scikit-learn .skops.")],
    query: Annotated[Path, typer.Option(help="Query rows (.csv / .parquet).")],
    method: Annotated[str, typer.Option(help="Scoring method; auto = the measured default "
                                             "for the model family (see README). Fits: "
                                             + methods_help() + ".")
                      ] = "auto",
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a .pkl/.joblib "
                                               "model (unpickling runs its code).")] = False,
    top_k: Annotated[int, typer.Option(help="Rows shown per query.")] = 5,
    true_label: Annotated[bool, typer.Option("--true-label", help="Explain the loss of the "
                                             "query's target column instead of the model's "
                                             "own prediction (a regression prediction is "
                                             "otherwise explained itself).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the full (n_query x n_train) "  # noqa: UP045
                                                     "score matrix to this .npy file.")
                   ] = None,
    html: Annotated[Optional[Path], typer.Option(help=HTML_HELP)] = None,  # noqa: UP045
    aggregate: Annotated[bool, typer.Option("--aggregate", help="One ranking for the query "
                                            "rows together (mean score over them): the "
                                            "rows behind a group of outputs.")] = False,
    only_wrong: Annotated[bool, typer.Option("--only-wrong", help="Only the query rows the "
                                             "model gets wrong (needs their target "
                                             "column); with --aggregate: the rows behind "
                                             "its errors.")] = False,
    order: Annotated[str, typer.Option(help="Which rows come first: highest score (helped "
                                            "most), lowest (opposed most), magnitude "
                                            "(largest |score|); auto = magnitude for a "
                                            "regression's prediction (rows that lowered it "
                                            "count too), else highest.")] = "auto",
) -> None:
    """Rank the training rows behind each query row of a tabular model.

    --aggregate ranks them for the query rows together (--only-wrong: the wrong ones)."""
    from datablame.cli.report import check_html, write_report

    check_html(html)
    df, scores = run_tabular(train_file, target, model, query, method=method, top_k=top_k,
                             true_label=true_label, trust_pickle=trust_pickle, out=out,
                             aggregate=aggregate, only_wrong=only_wrong, order=order)
    if aggregate:
        _print_group(df, as_json)
        if html is not None:
            write_report(html, group_result(df), show=top_k)
        return
    _print_tabular(df, as_json)
    if html is not None:
        write_report(html, tabular_result(df, scores, query, target, train_file), show=top_k)


def tabular_result(df, scores, query_file, target: str, train_file) -> dict:
    """What a tabular page shows: the ranked rows, each query row's own features (to set
    the rows' beside), and the distribution of its scores over the training rows."""
    import numpy as np
    import pandas as pd

    from datablame.data.rows import load_table

    queries, _ = load_table(query_file)
    train, _ = load_table(train_file, target)
    spread = {str(c): float(train[c].std()) for c in train.columns
              if pd.api.types.is_numeric_dtype(train[c])}
    info = {}
    for q in sorted(set(df["query"])):
        record = json.loads(queries.iloc[int(q)].to_json())
        info[str(q)] = {"features": {k: v for k, v in record.items() if k != target},
                        "target": record.get(target),
                        # in the ranking's order: the first `show` are the rows listed
                        "distribution": np.asarray(scores[int(q)])[ranking(
                            np.asarray(scores[int(q)]), df.attrs.get("order", "highest"))]
                        [:200].tolist()}
    return {"kind": "tabular", "method": df.attrs.get("method"),
            "explains": EXPLAINS.get(df.attrs.get("explains"), df.attrs.get("explains")),
            "order": df.attrs.get("order"), "queries": info, "spread": spread,
            "results": json.loads(df.to_json(orient="records"))}


def group_result(df) -> dict:
    """What a group page shows: the rows behind the query rows together."""
    return {"kind": "tabular-group", "method": df.attrs.get("method"),
            "explains": EXPLAINS.get(df.attrs.get("explains"), df.attrs.get("explains")),
            "order": df.attrs.get("order"),
            "group": df.attrs["group"], "n_queries": df.attrs["n_queries"],
            "results": json.loads(df.to_json(orient="records"))}


def _print_group(df, as_json: bool) -> None:
    """One table: the rows behind the group of query rows, with how many each helps."""
    from rich.table import Table

    from datablame.cli.console import wide_console

    if as_json:
        print(json.dumps(group_result(df), indent=2))
        return
    table_console = wide_console()
    group = df.attrs["group"]
    which = "every query row" if len(group) == df.attrs["n_queries"] else \
        f"query rows {_rows_text(group)}"
    fixed = ["rank", "row", "score", "helps", "opposes", "strongest_query", "target"]
    features = [c for c in df.columns if c not in fixed]
    shown = features[: max(0, (table_console.width - 10 * len(fixed)) // 13)]
    table = Table(title=f"rows behind {which} together ({df.attrs.get('method', '')}; "
                        f"explains {EXPLAINS.get(df.attrs.get('explains'), '')}; mean score "
                        f"over {len(group)})")
    for c in [*fixed, *shown]:
        table.add_column(c.replace("_", " "), justify="right" if c not in shown else "left")
    n = len(group)
    for rec in df.to_dict(orient="records"):
        table.add_row(*[f"{rec['score']:.4g}" if c == "score" else
                        f"{rec[c]}/{n}" if c in ("helps", "opposes") else
                        f"{rec[c]:.6g}" if isinstance(rec[c], float) else str(rec[c])
                        for c in [*fixed, *shown]])
    table_console.print(table)
    if len(shown) < len(features):
        console.print(f"{len(features) - len(shown)} more feature columns: --json or --html",
                      highlight=False)


def _rows_text(rows: list[int], most: int = 12) -> str:
    text = ", ".join(map(str, rows[:most]))
    return text + (f" … ({len(rows)})" if len(rows) > most else "")


def _print_tabular(df, as_json: bool) -> None:
    """One table per query: rank, row, score, target and the method's reason always; then
    as many feature columns as the terminal fits (--json has them all)."""
    from rich.table import Table

    from datablame.cli.console import wide_console

    zero = df.attrs.get("all_zero_queries", [])
    if as_json:
        if zero:
            console.print(f"[yellow]warning:[/] {zero_message(zero)}", highlight=False,
                          soft_wrap=True)
        print(df.to_json(orient="records", indent=2))
        return
    table_console = wide_console()
    heading = f"{df.attrs.get('method', '')}; explains {EXPLAINS[df.attrs['explains']]}" \
        if "explains" in df.attrs else df.attrs.get("method", "")
    heading += {"magnitude": "; largest |score| first (a row that lowered it is negative)",
                "lowest": "; lowest score first"}.get(df.attrs.get("order", ""), "")
    for q in zero:
        table_console.print(f"query row {q} ({heading}): every score is zero, so no training row "
                      "is ranked (nothing moves what is explained; e.g. a target equal to "
                      "the prediction has a flat loss)", highlight=False, soft_wrap=True)
    if df.empty:
        return
    fixed = [c for c in ("rank", "row", "score", "target", "reason") if c in df.columns]
    features = [c for c in df.columns if c not in fixed and c != "query"]
    reason_width = int(df["reason"].str.len().max()) if "reason" in df else 0
    room = table_console.width - 8 * len(fixed) - reason_width - 4
    shown = features[: max(0, room // 13)]
    for q, part in df.groupby("query", sort=True):
        hidden = len(features) - len(shown)
        table = Table(title=f"query row {q} ({heading})",
                      header_style="bold",
                      caption=f"{hidden} more feature columns: --json or --out" if hidden
                      else None)
        for c in fixed + shown:
            table.add_column(str(c), justify="left" if c == "reason" else "right",
                             no_wrap=True, min_width=reason_width if c == "reason" else
                             min(len(str(c)), 12) if c in shown else len(str(c)),
                             max_width=12 if c in shown else None)
        for _, r in part.iterrows():
            table.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                            for c in fixed + shown])
        table_console.print(table)


def print_verify(result: dict, out) -> None:
    """The numbers and verdicts of a tabular `verify`, one line each."""
    if "lds" in result:
        r = result["lds"]
        low, high = r["ci95"]
        note = "; the interval reaches 0" if low <= 0 else ""
        console.print(f"LDS ({result['method']}, {r['subsets']} subsets): {r['lds']:.3f} "
                      f"[95% CI {low:.3f}, {high:.3f}]: {r['reading']} agreement with "
                      f"retraining (1 = perfect{note})", highlight=False, soft_wrap=True)
    if "remove_top_k" in result:
        r = result["remove_top_k"]
        console.print(f"remove top-{r['k']} vs random-{r['k']} (query {r['query']}): loss change "
                      f"{r['top_k_mean']:+.4f} ± {r['top_k_std']:.4f} vs "
                      f"{r['random_k_mean']:+.4f} ± {r['random_k_std']:.4f}", highlight=False)
        if "removed" in r:
            console.print(f"  the top-{r['k']} removed: rows {', '.join(map(str, r['removed']))}"
                          " (scored against the query's target column; `tabular` explains "
                          "the predicted label unless --true-label)", highlight=False,
                          soft_wrap=True)
        console.print(r["summary"], highlight=False, soft_wrap=True)
    console.print(f"results written to {out}", highlight=False)
