"""`datablame audit labels`: suspected label errors in a tabular training set, ranked,
with the proof by retraining (datablame/audit.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datablame.cli.console import console, fail
from datablame.errors import check_at_least

app = typer.Typer(help="Audits over the whole training set: label errors.",
                  no_args_is_help=True)


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
) -> None:
    """Rows whose label looks wrong, most suspicious first, and the proof by retraining.

    Out-of-fold loss (confident learning's self-confidence), training loss and
    self-influence side by side; with --eval, retrain without the top-k and without k
    random rows and compare."""
    import json

    from datablame.audit import label_audit
    from datablame.cli.tabular import load_task
    from datablame.outputs import check_output_file, is_json_with
    from datablame.store.atomic import write_json_atomic

    for what, path in (("training file", train_file), ("model file", model),
                       ("evaluation file", eval_file)):
        if path is not None and not Path(path).exists():
            fail(f"{what} not found: {path}")
    for option, value, least in (("--top-k", top_k, 1), ("--folds", folds, 2),
                                 ("--random", n_random, 1)):
        check_at_least(option, value, least)
    if out is not None:
        check_output_file(out, "--out", ours=is_json_with("scorer", "ranked"))
    t, _, y_eval = load_task(train_file, target, model, eval_file or train_file, trust_pickle,
                             method)
    if eval_file is not None and y_eval is None:
        fail(f"{eval_file}: the evaluation rows need the label column '{target}'")
    result = label_audit(t, t.x_query if eval_file is not None else None,
                         t.query_targets(y_eval) if eval_file is not None else None,
                         scorer=scorer, top_k=top_k, folds=folds, n_random=n_random,
                         method=method)
    if out is not None:
        write_json_atomic(out, result)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print(result)


def _print(result: dict) -> None:
    from rich.table import Table

    scorers = [k for k in ("oof-loss", "loss", "self-influence") if k in result["ranked"][0]]
    table = Table(title=f"suspected label errors ({result['scorer']}, of "
                        f"{result['n_train']} rows)", header_style="bold")
    for name in ("rank", "row", "label", *scorers):
        table.add_column(name, justify="right", no_wrap=True)
    for i, r in enumerate(result["ranked"], start=1):
        table.add_row(str(i), str(r["row"]), str(r["label"]),
                      *[f"{r[s]:.3g}" for s in scorers])
    console.print(table)
    if "proof" not in result:
        console.print("prove them: --eval HELD_OUT.csv retrains without them and without as "
                      "many random rows", highlight=False)
        return
    p = result["proof"]
    runs = p["runs"]
    for name in ("all rows", "without suspects", "without random rows"):
        r = runs[name]
        acc = f", accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
        spread = r.get("spread")
        sd = f" (± {spread['loss']:.3f})" if spread else ""
        console.print(f"{name:>20}: eval loss {r['loss']:.4f}{sd}{acc}", highlight=False)
    console.print(f"{p['verdict'].upper()}: retrained without the {len(p['removed'])} "
                  f"suspects, the evaluation loss is {runs['without suspects']['loss']:.4f} vs "
                  f"{runs['without random rows']['loss']:.4f} without as many random rows",
                  highlight=False)
