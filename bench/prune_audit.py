"""Dead weight (issue 13, `audit prune`): which rows can go? Prints a table, writes JSON.

    .venv/bin/python bench/prune_audit.py [--seeds 2] [--out bench/results/prune_audit.json]

Real data shipped with scikit-learn (breast cancer: the tuning set; wine and digits: held
out), a model of each family (logistic regression, scikit-learn gradient boosting,
XGBoost, a torch MLP), 10% and 30% (`--fractions`) of the training rows removed by each scorer
(influence on a validation split, loss-easy, loss-hard) or at random (3 seeds), the model
retrained, and its accuracy and loss on a *test* split that no scorer saw (the validation
split chooses the rows, the test split judges them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from label_audit import datasets, models
from provenance import with_provenance

from datablame.audit import PRUNE_SCORERS, contribution_scores, evaluate, fitted_adapter
from datablame.errors import UserError
from datablame.tabular import task


def torch_task(xt, yt, xv):
    """A torch MLP (one hidden layer of 32) trained with its own settings, which the audit
    retrains with (`fitted_adapter` reads the config's 'train' entry)."""
    from datablame.models.torch_files import trainer_from_config

    config = {"type": "mlp", "layers": [xt.shape[1], 32, int(yt.max()) + 1], "loss": "ce",
              "train": {"optimizer": "lbfgs", "epochs": 30, "l2": 0.01}}
    xt, xv = xt.astype(np.float32), xv.astype(np.float32)
    model = trainer_from_config(config).fit(xt, yt.astype(np.int64))
    return task(model, xt, yt.astype(np.int64), xv, loss="ce", l2=0.01, config=config)


def main() -> None:
    from sklearn.model_selection import train_test_split

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="bench/results/prune_audit.json")
    ap.add_argument("--fractions", default="0.1,0.3")
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    table = []
    for data_name, (x, y) in datasets().items():
        x = (x - x.mean(0)) / (x.std(0) + 1e-9)
        for model_name, make in {**models(), "torch mlp": None}.items():
            for seed in range(args.seeds):
                xt, xrest, yt, yrest = train_test_split(x, y, test_size=0.4, random_state=seed,
                                                        stratify=y)
                xv, xs, yv, ys = train_test_split(xrest, yrest, test_size=0.5,
                                                  random_state=seed, stratify=yrest)
                if make is None:  # torch: float32 features, int64 labels
                    xt, xv, xs = (a.astype(np.float32) for a in (xt, xv, xs))
                    yt, yv, ys = (a.astype(np.int64) for a in (yt, yv, ys))
                t = torch_task(xt, yt, xv) if make is None else \
                    task(make().fit(xt, yt), xt, yt, xv)
                n = len(yt)
                everything = np.arange(n)
                base = evaluate(fitted_adapter(t, everything, seed), xs, ys)
                for fraction in fractions:
                    k = round(fraction * n)
                    row = {"data": data_name, "model": model_name, "seed": seed,
                           "fraction": fraction, "all rows": base["accuracy"]}
                    for scorer in PRUNE_SCORERS:
                        try:
                            value = contribution_scores(t, xv, yv, scorer=scorer)
                        except UserError:  # e.g. linear-exact on a multi-class model
                            row[scorer] = float("nan")
                            continue
                        drop = np.argsort(value, kind="stable")[:k]
                        kept = np.setdiff1d(everything, drop)
                        row[scorer] = evaluate(fitted_adapter(t, kept, seed), xs, ys)["accuracy"]
                    rng = np.random.default_rng(seed)
                    row["random"] = float(np.mean([
                        evaluate(fitted_adapter(t, np.setdiff1d(everything, rng.choice(
                            n, k, replace=False)), seed), xs, ys)["accuracy"]
                        for _ in range(3)]))
                    table.append(row)
                    print(f"{data_name:24s} {model_name:20s} seed {seed} drop {fraction:.0%}: "
                          + "  ".join(f"{c} {row[c]:.3f}" for c in
                                      ("all rows", *PRUNE_SCORERS, "random")), flush=True)
    summary = {}
    for part in ("tuning", "held out"):
        rows = [r for r in table if ("tuning" in r["data"]) == (part == "tuning")]
        summary[part] = {c: float(np.nanmean([r[c] for r in rows]))
                         for c in ("all rows", *PRUNE_SCORERS, "random")}
        print(part, {k: round(v, 4) for k, v in summary[part].items()})
    out = {"seeds": args.seeds, "table": table, "summary": summary}
    Path(args.out).write_text(json.dumps(with_provenance(out), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
