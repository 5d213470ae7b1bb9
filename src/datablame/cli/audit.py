"""`datablame audit labels`: suspected label errors in a tabular training set, ranked,
with the proof by retraining (datablame/audit.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from datablame.audit import retrain_cache
from datablame.cli.console import console, fail
from datablame.cli.report import HTML_HELP, check_html, write_report
from datablame.errors import UserError, check_at_least

app = typer.Typer(help="Audits over the whole training set: label errors, dead weight, fairness.",
                  no_args_is_help=True)


CACHE_HELP = ("Keep each retraining's numbers here, so an interrupted audit resumes and a "
              "rerun retrains nothing.")


def _retrain_cache(cache: Path | None, *files, **settings):
    """The audit's retrain cache (None: none), keyed by the files' content and the
    settings that change what is retrained or measured."""
    if cache is None:
        return None
    from datablame.audit import RetrainCache
    from datablame.store.content_digest import sha256_file

    parts = []
    for f in files:
        if f is None:
            continue
        parts.append(sha256_file(Path(f)))
        sidecar = Path(f).with_suffix(".json")  # a torch model's settings
        if sidecar != Path(f) and sidecar.is_file():
            parts.append(sha256_file(sidecar))
    key = hashlib.sha256(json.dumps([parts, sorted(settings.items())], default=str)
                         .encode()).hexdigest()
    return RetrainCache(cache, key)


def _check_files(train_file, model, eval_file) -> None:
    """The inputs exist, before a model or a row is read."""
    for what, path in (("training file", train_file), ("model file", model),
                       ("evaluation file", eval_file)):
        if path is not None and not Path(path).exists():
            fail(f"{what} not found: {path}")


def _print_loss_runs(runs: dict, names: dict[str, str]) -> None:
    """One line per retrained model: evaluation loss (± the random removals' spread) and
    accuracy; `names` maps the result's run names to the labels shown."""
    for name, label in names.items():
        r = runs[name]
        acc = f", accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
        sd = f" (± {r['spread']['loss']:.3f})" if "spread" in r else ""
        console.print(f"{label:>20}: eval loss {r['loss']:.4f}{sd}{acc}", highlight=False)


@app.command("labels")
def labels(
    train_file: Annotated[Path, typer.Argument(help="Training rows (.csv / .parquet) with "
                                                    "the labels the model was trained on.")],
    model: Annotated[Path, typer.Option(help="The trained model (as for 'tabular').")],
    target: Annotated[str, typer.Option(help="The label column.")],
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help="Held-out rows with "  # noqa: UP045
                                                      "labels: prove the suspects by "
                                                      "retraining without them.")] = None,
    scorer: Annotated[str, typer.Option(help="auto (self-influence where the model's method "
                                             "has one, else oof-loss), oof-loss, loss or "
                                             "self-influence.")] = "auto",
    top_k: Annotated[int, typer.Option(help="Suspects listed (and removed for the proof).")
                     ] = 20,
    folds: Annotated[int, typer.Option(help="Folds for the out-of-fold loss.")] = 5,
    n_random: Annotated[int, typer.Option("--random", help="Random removals of as many rows "
                                                          "to compare with.")] = 3,
    method: Annotated[str, typer.Option(help="Method whose self-influence is used.")
                      ] = "auto",
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a .pkl/.joblib "
                                               "model (unpickling runs its code).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the JSON here.")] = None,  # noqa: UP045
    html: Annotated[Optional[Path], typer.Option(help=HTML_HELP)] = None,  # noqa: UP045
    cache: Annotated[Optional[Path], typer.Option(help=CACHE_HELP)] = None,  # noqa: UP045
    relabelled: Annotated[Optional[Path], typer.Option(help="Write the training rows with "  # noqa: UP045
                                                            "the top-k suspects relabelled "
                                                            "to their suggested label (the "
                                                            "training file's format).")
                          ] = None,
) -> None:
    """Rows whose label looks wrong, most suspicious first, and the proof by retraining.

    Out-of-fold loss (confident learning's self-confidence), training loss and
    self-influence side by side; with --eval, retrain without the top-k and without k
    random rows and compare."""
    import json

    from datablame.audit import label_audit
    from datablame.cli.tabular import load_task
    from datablame.outputs import check_output_file, is_json_with, write_json_output

    _check_files(train_file, model, eval_file)
    for option, value, least in (("--top-k", top_k, 1), ("--folds", folds, 2),
                                 ("--random", n_random, 1)):
        check_at_least(option, value, least)
    if out is not None:
        check_output_file(out, "--out", ours=is_json_with("scorer", "ranked"))
    if relabelled is not None:
        check_output_file(relabelled, "--relabelled", suffix=Path(train_file).suffix.lower(),
                          ours=lambda p: False, what=" (the training file's format)")
    check_html(html)
    t, x_train, y_eval = load_task(train_file, target, model, eval_file or train_file, trust_pickle,
                             method)
    if eval_file is not None and y_eval is None:
        fail(f"{eval_file}: the evaluation rows need the label column '{target}'")
    with retrain_cache(_retrain_cache(cache, train_file, model, eval_file, target=target,
                                      method=method, folds=folds)):
        result = label_audit(t, t.x_query if eval_file is not None else None,
                             t.query_targets(y_eval) if eval_file is not None else None,
                             scorer=scorer, top_k=top_k, folds=folds, n_random=n_random,
                             method=method)
    if out is not None:
        write_json_output(out, result)
    if relabelled is not None:
        _write_relabelled(train_file, target, relabelled, result["ranked"])
    write_report(html, result, table=x_train)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    _print(result)


def _write_relabelled(train_file: Path, target: str, path: Path, ranked: list[dict]) -> None:
    """The training table with each listed suspect's label replaced by its suggestion."""
    from datablame.data.rows import load_table

    table, _ = load_table(train_file)
    column = table[target].copy()
    for r in ranked:
        column.iloc[r["row"]] = r["suggested"]
    table[target] = column
    tmp = path.with_name(f".{path.name}.partial")
    table.to_csv(tmp, index=False) if path.suffix.lower() == ".csv" else table.to_parquet(tmp)
    tmp.replace(path)


def _print(result: dict) -> None:
    from rich.table import Table

    scorers = [k for k in ("oof-loss", "loss", "self-influence") if k in result["ranked"][0]]
    table = Table(title=f"suspected label errors ({result['scorer']}, of "
                        f"{result['n_train']} rows)", header_style="bold")
    for name in ("rank", "row", "label", "suggested", *scorers):
        table.add_column(name, justify="right", no_wrap=True)
    for i, r in enumerate(result["ranked"], start=1):
        table.add_row(str(i), str(r["row"]), str(r["label"]), str(r.get("suggested", "")),
                      *[f"{r[s]:.3g}" for s in scorers])
    console.print(table)
    if "proof" not in result:
        console.print("prove them: --eval HELD_OUT.csv retrains without them and without as "
                      "many random rows", highlight=False)
        return
    p = result["proof"]
    runs = p["runs"]
    _print_loss_runs(runs, {name: name for name in
                            ("all rows", "without suspects", "suspects relabelled",
                             "without random rows") if name in runs})
    console.print(f"{p['verdict'].upper()}: retrained without the {len(p['removed'])} "
                  f"suspects, the evaluation loss is {runs['without suspects']['loss']:.4f} vs "
                  f"{runs['without random rows']['loss']:.4f} without as many random rows",
                  highlight=False)
    if "suspects relabelled" in runs:
        r = runs["suspects relabelled"]
        console.print(f"relabel {p['relabel_verdict'].upper()}: kept with their suggested "
                      f"labels ({r['relabelled']} changed), the evaluation loss is "
                      f"{r['loss']:.4f}", highlight=False)


@app.command("prune")
def prune(
    train_file: Annotated[Path, typer.Argument(help="Training rows (.csv / .parquet).")],
    model: Annotated[Path, typer.Option(help="The trained model (as for 'tabular').")],
    target: Annotated[str, typer.Option(help="The target column.")],
    eval_file: Annotated[Path, typer.Option("--eval", help="Held-out rows with targets: what "
                                                          "the rows are worth to, and the "
                                                          "judge of the proof.")],
    fraction: Annotated[float, typer.Option(help="Share of the rows to remove.")] = 0.1,
    scorer: Annotated[str, typer.Option(help="loss-easy (drop the easiest rows: measured "
                                             "best), loss-hard, or influence (the method's "
                                             "influence on half the --eval rows, judged on "
                                             "the other half).")] = "loss-easy",
    kept: Annotated[Optional[Path], typer.Option(help="Write the rows kept here, in the "  # noqa: UP045
                                                      "training file's format.")] = None,
    removed: Annotated[Optional[Path], typer.Option(help="Write the rows removed here.")  # noqa: UP045
                       ] = None,
    n_random: Annotated[int, typer.Option("--random", help="Random removals of as many rows "
                                                          "to compare with.")] = 3,
    method: Annotated[str, typer.Option(help="Method for --scorer influence.")] = "auto",
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a .pkl/.joblib "
                                               "model (unpickling runs its code).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the JSON here.")] = None,  # noqa: UP045
    html: Annotated[Optional[Path], typer.Option(help=HTML_HELP)] = None,  # noqa: UP045
    cache: Annotated[Optional[Path], typer.Option(help=CACHE_HELP)] = None,  # noqa: UP045
) -> None:
    """Dead weight: the rows the model does as well without, proven by retraining.

    Removes --fraction of the rows by --scorer, retrains, and compares the evaluation loss
    and accuracy with every row and with as many random rows removed; --kept writes the
    rows to keep in the training file's format, --removed the ones that went."""
    import json

    from datablame.audit import PRUNE_SCORERS, prune_audit
    from datablame.cli.tabular import load_task
    from datablame.data.rows import load_table
    from datablame.outputs import (
        check_output_file,
        is_json_with,
        write_json_output,
        write_training_rows,
    )

    _check_files(train_file, model, eval_file)
    if scorer not in PRUNE_SCORERS:
        fail(f"unknown scorer '{scorer}' (use {', '.join(PRUNE_SCORERS)})")
    if not 0 < fraction < 0.5:
        fail(f"--fraction must be in (0, 0.5), got {fraction}")
    check_at_least("--random", n_random, 1)
    suffix = Path(train_file).suffix.lower()
    for option, path in (("--kept", kept), ("--removed", removed)):
        if path is not None:
            check_output_file(path, option, suffix=suffix, ours=lambda p: False,
                              what=" (the training file's format)")
    if out is not None:
        check_output_file(out, "--out", ours=is_json_with("scorer", "pruned"))
    check_html(html)
    t, _, y_eval = load_task(train_file, target, model, eval_file, trust_pickle, method)
    if y_eval is None:
        fail(f"{eval_file}: the evaluation rows need the target column '{target}'")
    with retrain_cache(_retrain_cache(cache, train_file, model, eval_file, target=target,
                                      method=method, scorer=scorer, fraction=fraction)):
        result = prune_audit(t, t.x_query, t.query_targets(y_eval), fraction=fraction,
                             scorer=scorer, n_random=n_random, method=method)
    table, _ = load_table(train_file)
    gone = sorted(r["row"] for r in result["pruned"])
    staying = sorted(set(range(len(table))) - set(gone))
    for path, part in ((kept, staying), (removed, gone)):
        if path is not None:
            write_training_rows(train_file, path, part, table)
    if out is not None:
        write_json_output(out, result)
    write_report(html, result, table=table)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    runs = result["runs"]
    console.print(f"removed {len(gone)} of {result['n_train']} rows ({fraction:.0%}, "
                  f"{scorer}); the model retrained:", highlight=False)
    _print_loss_runs(runs, {"all rows": "all rows", "without suspects": "without the pruned",
                            "without random rows": "without random rows"})
    verdict = "CONFIRMED" if result["verdict"] == "confirmed" else "NOT CONFIRMED"
    console.print(f"{verdict}: the pruned rows were worth less than random ones"
                  if verdict == "CONFIRMED" else
                  f"{verdict}: removing them is no better than removing random rows",
                  highlight=False)
    for option, path in (("kept", kept), ("removed", removed)):
        if path is not None:
            console.print(f"rows {option}: {path}", highlight=False)


@app.command("fairness")
def fairness(
    train_file: Annotated[Path, typer.Argument(help="Training rows (.csv / .parquet).")],
    model: Annotated[Path, typer.Option(help="The trained classifier (as for 'tabular').")],
    target: Annotated[str, typer.Option(help="The label column.")],
    group: Annotated[str, typer.Option(help="The column naming each row's group (a model "
                                            "feature, or a protected attribute the model "
                                            "was not trained on).")],
    eval_file: Annotated[Path, typer.Option("--eval", help="Held-out rows with labels: where "
                                                          "the gap is measured.")],
    metric: Annotated[str, typer.Option(help="dp-gap (favourable-label rate) or "
                                             "eq-opportunity (among rows whose true label "
                                             "is favourable).")] = "dp-gap",
    favorable: Annotated[str, typer.Option(help="The favourable label.")] = "1",
    top_k: Annotated[int, typer.Option(help="Rows flagged (and removed for the proof).")
                     ] = 20,
    n_random: Annotated[int, typer.Option("--random", help="Random removals of as many rows "
                                                          "to compare with.")] = 3,
    method: Annotated[str, typer.Option(help="Scoring method (auto: the family's default).")
                      ] = "auto",
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a .pkl/.joblib "
                                               "model (unpickling runs its code).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the JSON here.")] = None,  # noqa: UP045
    html: Annotated[Optional[Path], typer.Option(help=HTML_HELP)] = None,  # noqa: UP045
    cache: Annotated[Optional[Path], typer.Option(help=CACHE_HELP)] = None,  # noqa: UP045
) -> None:
    """Unfair decisions: the training rows that widen the gap between groups, and the proof.

    Each row's influence on the favourable-label probability of the advantaged group's
    evaluation rows minus the disadvantaged group's; the readable patterns that describe
    the top rows; the gap after retraining without them vs without as many random rows."""
    import json

    import numpy as np

    from datablame.audit import FAIRNESS_METRICS, fairness_audit
    from datablame.cli.tabular import load_task
    from datablame.data.rows import load_table
    from datablame.outputs import check_output_file, is_json_with, write_json_output

    _check_files(train_file, model, eval_file)
    if metric not in FAIRNESS_METRICS:
        fail(f"unknown metric '{metric}' (use {', '.join(FAIRNESS_METRICS)})")
    for option, value, least in (("--top-k", top_k, 1), ("--random", n_random, 1)):
        check_at_least(option, value, least)
    if out is not None:
        check_output_file(out, "--out", ours=is_json_with("metric", "patterns"))
    check_html(html)
    train_table, _ = load_table(train_file)
    eval_table, _ = load_table(eval_file)
    for name, table in (("training", train_table), ("evaluation", eval_table)):
        if group not in table.columns:
            fail(f"the {name} rows have no group column '{group}' (columns: "
                 f"{', '.join(map(str, table.columns))})")
    try:
        t, _, y_eval = load_task(train_file, target, model, eval_file, trust_pickle, method)
    except UserError as first:
        # a protected attribute the model was not trained on: read the tables without it
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for name, table in (("train", train_table), ("eval", eval_table)):
                path = Path(tmp) / f"{name}{Path(train_file).suffix.lower()}"
                part = table.drop(columns=[group])
                (part.to_csv(path, index=False) if path.suffix == ".csv"
                 else part.to_parquet(path))
                paths.append(path)
            try:
                t, _, y_eval = load_task(paths[0], target, model, paths[1], trust_pickle,
                                         method)
            except UserError:
                raise first from None
    if y_eval is None:
        fail(f"{eval_file}: the evaluation rows need the label column '{target}'")
    labels = np.unique(t.y_train)
    chosen = next((v for v in labels if str(v) == favorable), None)
    if chosen is None:
        fail(f"--favorable {favorable} is not a label of the training rows (labels: "
             f"{', '.join(map(str, labels))})")
    with retrain_cache(_retrain_cache(cache, train_file, model, eval_file, target=target,
                                      method=method, group=group)):
        result = fairness_audit(t, t.x_query, t.query_targets(y_eval),
                                eval_table[group].to_numpy(), train_table, metric=metric,
                                favorable=chosen, top_k=top_k, n_random=n_random,
                                method=method)
    result["favorable"] = favorable
    if out is not None:
        write_json_output(out, result)
    write_report(html, result, table=train_table)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    console.print(f"{metric} between {group}={result['advantaged']} (advantaged) and "
                  f"{group}={result['disadvantaged']}, favourable label {favorable}",
                  highlight=False)
    console.print(f"the {top_k} rows that widen it most are described by:", highlight=False)
    for p in result["patterns"]:
        console.print(f"  {p['pattern']}: {p['flagged']} of its {p['rows']} rows",
                      highlight=False)
    proof = result["proof"]
    for name in ("all rows", "without flagged", "without random rows"):
        r = proof[name]
        sd = f" (± {r['gap_spread']:.3f})" if "gap_spread" in r else ""
        console.print(f"{name:>20}: gap {r['gap']:+.3f}{sd}, decisions gap "
                      f"{r['decision_gap']:+.3f}, accuracy {r['accuracy']:.3f}",
                      highlight=False)
    console.print(f"{proof['verdict'].upper()}: retrained without the {top_k} flagged rows the "
                  f"gap is {proof['without flagged']['gap']:+.3f}, without as many random rows "
                  f"{proof['without random rows']['gap']:+.3f}", highlight=False)
