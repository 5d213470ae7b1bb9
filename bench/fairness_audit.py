"""Does `audit fairness` find the rows that encode a bias, and does removing them close the
gap? (issue 13). Prints a table, writes JSON.

    .venv/bin/python bench/fairness_audit.py [--seeds 3] [--out bench/results/fairness_audit.json]

Generated loan tables (income, debt, age, a region, a protected group A/B; approval drawn
from a noisy score that ignores the group), with a planted subgroup of group-B rows whose
label was set to "deny": three plantings (high income; young applicants; low debt, the
group seen only through a 90%-agreeing region proxy), three model families (LightGBM,
XGBoost, logistic regression), `--seeds` seeds each. Nothing here was tuned: the audit has
no knob but k, set to the planted count, so every number is held out.

For the audit and for retraining-free baselines, each choosing k rows:
- `audit`: datablame's fairness influence (what `audit fairness` ranks by);
- `denied-B by p(approve)`: the disadvantaged group's denied rows the model would most
  approve (a strong, bias-specific heuristic: the planting is exactly such rows);
- `training loss`: the k rows with the highest training loss (a label-noise detector);
- `random`.
Reported: recall of the planted rows among the k chosen, and the demographic-parity gap
(mean approval probability, group A minus group B, on a clean evaluation set) after
retraining without them, next to the gap with every row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from provenance import with_provenance

from datablame.audit import fairness_audit, fitted_adapter, group_gap
from datablame.tabular import task

PLANTINGS = {
    "high income": lambda df: (df["group"] == "B") & (df["income"] > 55),
    "young": lambda df: (df["group"] == "B") & (df["age"] < 32),
    "low debt, proxy only": lambda df: (df["group"] == "B") & (df["debt"] < 8),
}


def table(n: int, rng, planting: str | None, plant: int = 60) -> tuple[pd.DataFrame, np.ndarray]:
    group = rng.choice(["A", "B"], n)
    region = np.where(rng.random(n) < 0.9, np.where(group == "A", 0, 1), rng.integers(0, 2, n))
    df = pd.DataFrame({"income": rng.normal(50, 12, n).round(1),
                       "debt": rng.gamma(3.0, 4.0, n).round(1),
                       "age": rng.integers(20, 70, n).astype(float),
                       "region": region.astype(float), "group": group})
    score = 0.08 * (df["income"] - 50) - 0.1 * (df["debt"] - 12) + 0.01 * (df["age"] - 45)
    df["approved"] = (score + rng.normal(0, 0.6, n) > 0).astype(int)
    planted = np.array([], dtype=int)
    if planting is not None:
        candidates = np.flatnonzero(PLANTINGS[planting](df) & (df["approved"] == 1))
        planted = candidates[:plant]
        df.loc[planted, "approved"] = 0
    return df, planted


def features(df: pd.DataFrame, sees_group: bool) -> pd.DataFrame:
    x = df.drop(columns=["approved", "group"])
    if sees_group:
        x = x.assign(group_b=(df["group"] == "B").astype(float))
    return x


def models():
    import lightgbm as lgb
    import xgboost
    from sklearn.linear_model import LogisticRegression

    return {"lightgbm": lambda: lgb.LGBMClassifier(n_estimators=60, num_leaves=7, verbose=-1),
            "xgboost": lambda: xgboost.XGBClassifier(n_estimators=60, max_depth=3,
                                                     learning_rate=0.3),
            "logistic": lambda: LogisticRegression(max_iter=5000, C=1.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/fairness_audit.json")
    args = ap.parse_args()
    rows = []
    for planting in PLANTINGS:
        sees_group = planting != "low debt, proxy only"
        for model_name, make in models().items():
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                train, planted = table(800, rng, planting)
                held, _ = table(600, rng, None)
                x, y = features(train, sees_group), train["approved"].to_numpy()
                xe, ye = features(held, sees_group), held["approved"].to_numpy()
                if model_name == "logistic":  # a linear model wants scaled columns
                    mu, sd = x.mean(), x.std() + 1e-9
                    x, xe = (x - mu) / sd, (xe - mu) / sd
                model = make().fit(x, y)
                t = task(model, x, y, xe)
                k = len(planted)
                audit = fairness_audit(t, xe, ye, held["group"].to_numpy(), train, top_k=k,
                                       n_random=3, seed=seed)
                adv, dis = audit["advantaged"], audit["disadvantaged"]
                gap_args = dict(metric="dp-gap", favorable=1, advantaged=adv,
                                disadvantaged=dis)
                groups = held["group"].to_numpy().astype(str)
                p_approve = np.exp(-np.asarray(t.adapter.query_losses(x, np.ones(len(y),
                                                                                  dtype=int))))
                denied_b = np.flatnonzero((train["group"] == dis).to_numpy() & (y == 0))
                loss = np.asarray(t.adapter.query_losses(x, y), dtype=float)
                chosen = {
                    "audit": np.array([r["row"] for r in audit["ranked"]]),
                    "denied-B by p(approve)": denied_b[np.argsort(-p_approve[denied_b],
                                                                  kind="stable")][:k],
                    "training loss": np.argsort(-loss, kind="stable")[:k],
                    "random": rng.choice(len(y), k, replace=False),
                }
                everything = np.arange(len(y))
                base = group_gap(fitted_adapter(t, everything, seed), xe, ye, groups,
                                 **gap_args)["gap"]
                row = {"planting": planting, "model": model_name, "seed": seed,
                       "planted": k, "gap all rows": base,
                       "top pattern": audit["patterns"][0]["pattern"]
                       if audit["patterns"] else ""}
                for name, rows_chosen in chosen.items():
                    row[f"{name} recall"] = float(len(set(rows_chosen.tolist())
                                                      & set(planted.tolist())) / k)
                    row[f"{name} gap"] = group_gap(fitted_adapter(
                        t, np.setdiff1d(everything, rows_chosen), seed), xe, ye, groups,
                        **gap_args)["gap"]
                row["audit verdict"] = audit["proof"]["verdict"]
                rows.append(row)
                heuristic = "denied-B by p(approve)"
                print(f"{planting:22s} {model_name:9s} seed {seed}  recall audit "
                      f"{row['audit recall']:.2f} denied-B {row[heuristic + ' recall']:.2f} "
                      f"loss {row['training loss recall']:.2f}  gap all {base:+.3f} audit "
                      f"{row['audit gap']:+.3f} denied-B {row[heuristic + ' gap']:+.3f} "
                      f"loss {row['training loss gap']:+.3f} random {row['random gap']:+.3f}"
                      f"  {row['audit verdict']}  [{row['top pattern']}]", flush=True)
    names = ("audit", "denied-B by p(approve)", "training loss", "random")
    summary = {name: {"recall": float(np.mean([r[f"{name} recall"] for r in rows])),
                      "gap": float(np.mean([r[f"{name} gap"] for r in rows])),
                      "closes more than random": int(sum(
                          abs(r[f"{name} gap"]) < abs(r["random gap"]) for r in rows))}
               for name in names}
    summary["all rows"] = {"gap": float(np.mean([r["gap all rows"] for r in rows]))}
    summary["audit confirmed"] = int(sum(r["audit verdict"] == "confirmed" for r in rows))
    summary["runs"] = len(rows)
    print(f"\n{'chooser':26s} {'planted recall':>15s} {'gap after':>10s} "
          f"{'|gap| < random':>15s}")
    for name in names:
        s = summary[name]
        print(f"{name:26s} {s['recall']:>15.2f} {s['gap']:>+10.3f} "
              f"{s['closes more than random']:>10d}/{len(rows)}")
    print(f"{'(every row)':26s} {'':>15s} {summary['all rows']['gap']:>+10.3f}")
    print(f"audit says CONFIRMED in {summary['audit confirmed']}/{len(rows)} runs")
    Path(args.out).write_text(json.dumps(with_provenance({"summary": summary, "runs": rows}),
                                         indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
