"""Re-decide the tree defaults on a protocol held out from all tuning (issue 9, item 14).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python bench/tree_defaults.py [--probe]

`--probe` only measures cost (one retraining and one scoring per cell, no LDS) so the
number of subsets could be fixed before any LDS was seen.

PROTOCOL (fixed and committed before any LDS of it was computed)

Why held out: every tree method and the `leaf-share` default were designed and chosen on
bench/tree_influence.py: LightGBM (100 trees, 15 leaves, lr 0.1), breast_cancer / digits,
500 train rows + 50 queries from split seeds 0 and 1, 100 subset masks from seed 0.
Nothing here reuses a split seed, a subset seed, a data set other than breast_cancer /
digits, or (except cells A*) that model setting.

Data (train rows / queries; the split is a permutation from `split_seed`):
- breast_cancer, split seed 11: 500 / 50 (binary)
- digits,        split seed 12: 500 / 50 (10 classes)
- wine,          split seed 13: 128 / 50 (3 classes; all 178 rows)
- diabetes,      split seed 14: 392 / 50 (regression, all 442 rows)
- synth: make_classification(n_samples=1000, n_features=20, n_informative=6,
  n_redundant=4, flip_y=0.05, random_state=15), split seed 15: 950 / 50 (binary)
No scaling (trees do not need it).

Models (all single-threaded, fixed library seeds; each retraining uses the same settings):
- A  LightGBM 100 rounds, 15 leaves, lr 0.1 (the tuning setting, NEW splits and subsets):
     breast_cancer, digits
- B  LightGBM 200 rounds, 31 leaves, lr 0.05: breast_cancer, digits, wine, diabetes, synth
- C  XGBoost 100 rounds, max_depth 4, library defaults otherwise (eta 0.3, lambda 1):
     breast_cancer, digits, wine, diabetes, synth
- D  scikit-learn GradientBoosting 100 rounds, depth 3, lr 0.1: breast_cancer, wine,
     diabetes, synth
- E  CatBoost 100 iterations, depth 6, lr 0.1: breast_cancer, diabetes
Forests (default leaf-sim): scikit-learn RandomForest, 100 trees, library defaults:
- F  classifier on breast_cancer and wine; regressor on diabetes.

Loss (query loss after retraining = "actual"): the loss of the true target: log loss /
softmax cross-entropy on the library's raw score, squared error for regression; forests:
1 - p(true class) for classifiers (a monotone function of -log p, so the Spearman
correlation per query, hence LDS, is the same, without clipping p = 0), squared error for
regressors.

LDS: datablame.verify.lds over SubsetRetraining masks of 50% of the training rows,
100 subsets per cell (fixed after the `--probe` cost run), mask seed 1000 + cell number
(1001..1020; the tuning protocol used seed 0). 95% CI = verify.lds's bootstrap over queries.

Methods: every registry method for the family (FAMILY_METHODS): boosted - leaf-share,
boostin, leaf-influence, leaf-sim, knn-shapley, simplex, shap-neighbors (all with their
default options); forest - leaf-sim, simplex, knn-shapley, shap-neighbors. Time = fit +
scores of all 50 queries x all training rows, after one warm-up call (fit + score of one
query) on the same rows; the scores timed are the scores used.

DECISION RULE (pre-registered; applied separately to boosted cells A-E and forest cells F)
1. A method that raises on any cell of the group is not eligible (reported, not fixed);
   nor is one not run on every cell (added after the torch run, where if-lissa is run on
   LR cells only, as in bench/tabular_influence.py; no tree or forest method is affected).
2. Mean LDS = the unweighted mean over the group's cells. B = the eligible method with the
   best mean LDS.
3. h = the mean over cells of B's 95% CI half-width ((hi - lo) / 2).
4. If some eligible method has total time over the group's cells <= 1/5 of B's and mean LDS
   >= mean(B) - h, the default is the best-mean such method; otherwise it is B.
Everything else printed (per-library means, win counts) is description, not decision.

Cost probe (`--probe`, run before any LDS): one retraining 0.01-0.5 s, all 21 cells x 100
retrainings about 4 minutes; slowest scoring simplex (22 s, B/digits) and leaf-influence
(12 s). shap-neighbors raised on D/wine (shap's TreeExplainer supports scikit-learn
GradientBoostingClassifier for binary only), so by rule 1 it is not eligible for boosted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from provenance import provenance

from datablame.methods.registry import FAMILY_METHODS, get_method
from datablame.models.trees.base import TreeEnsembleAdapter
from datablame.verify import SubsetRetraining, lds

N_QUERY = 50
N_SUBSETS = 100

# (cell number, model config, data set). Cell numbers fix the subset seeds (1000 + number).
CELLS = [
    (1, "A-lgb-100x15", "breast_cancer"), (2, "A-lgb-100x15", "digits"),
    (3, "B-lgb-200x31", "breast_cancer"), (4, "B-lgb-200x31", "digits"),
    (5, "B-lgb-200x31", "wine"), (6, "B-lgb-200x31", "diabetes"),
    (7, "B-lgb-200x31", "synth"),
    (8, "C-xgb-100xd4", "breast_cancer"), (9, "C-xgb-100xd4", "digits"),
    (10, "C-xgb-100xd4", "wine"), (11, "C-xgb-100xd4", "diabetes"),
    (12, "C-xgb-100xd4", "synth"),
    (13, "D-skgb-100xd3", "breast_cancer"), (14, "D-skgb-100xd3", "wine"),
    (15, "D-skgb-100xd3", "diabetes"), (16, "D-skgb-100xd3", "synth"),
    (17, "E-cat-100xd6", "breast_cancer"), (18, "E-cat-100xd6", "diabetes"),
    (19, "F-rf-100", "breast_cancer"), (20, "F-rf-100", "wine"),
    (21, "F-rf-100", "diabetes"),
]
SPLIT_SEED = {"breast_cancer": 11, "digits": 12, "wine": 13, "diabetes": 14, "synth": 15}
N_TRAIN = {"breast_cancer": 500, "digits": 500, "wine": 128, "diabetes": 392, "synth": 950}
REGRESSION = {"diabetes"}


def load(name: str):
    from sklearn import datasets

    if name == "synth":
        x, y = datasets.make_classification(n_samples=1000, n_features=20, n_informative=6,
                                            n_redundant=4, flip_y=0.05, random_state=15)
    else:
        data = getattr(datasets, f"load_{name}")()
        x, y = data.data, data.target
    idx = np.random.default_rng(SPLIT_SEED[name]).permutation(len(y))
    x = x[idx].astype(np.float64)
    y = y[idx].astype(np.float64 if name in REGRESSION else np.int64)
    n_train = N_TRAIN[name]
    return (x[:n_train], y[:n_train], x[n_train:n_train + N_QUERY],
            y[n_train:n_train + N_QUERY])


def factory(config: str, regression: bool):
    """A fresh, unfitted model for a cell (the same call for the full model and every
    retraining)."""
    if config.startswith(("A-lgb", "B-lgb")):
        import lightgbm as lgb

        rounds, leaves, lr = (100, 15, 0.1) if config.startswith("A") else (200, 31, 0.05)
        cls = lgb.LGBMRegressor if regression else lgb.LGBMClassifier
        return cls(n_estimators=rounds, num_leaves=leaves, learning_rate=lr, verbose=-1,
                   deterministic=True, force_row_wise=True, n_jobs=1)
    if config.startswith("C-xgb"):
        import xgboost as xgb

        cls = xgb.XGBRegressor if regression else xgb.XGBClassifier
        return cls(n_estimators=100, max_depth=4, n_jobs=1, random_state=0,
                   tree_method="hist")
    if config.startswith("D-skgb"):
        from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

        cls = GradientBoostingRegressor if regression else GradientBoostingClassifier
        return cls(n_estimators=100, max_depth=3, learning_rate=0.1, random_state=0)
    if config.startswith("E-cat"):
        import catboost as cb

        cls = cb.CatBoostRegressor if regression else cb.CatBoostClassifier
        return cls(iterations=100, depth=6, learning_rate=0.1, thread_count=1,
                   random_seed=0, verbose=False, allow_writing_files=False)
    if config.startswith("F-rf"):
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        cls = RandomForestRegressor if regression else RandomForestClassifier
        return cls(n_estimators=100, random_state=0, n_jobs=1)
    raise ValueError(config)


def query_losses(config: str, model, ad: TreeEnsembleAdapter, xq, yq) -> np.ndarray:
    """Loss of the true target for a (re)trained model, from the library's own output."""
    if config.startswith("F-rf"):
        if ad.objective == "regression":
            return (model.predict(xq) - yq) ** 2
        p = model.predict_proba(xq)
        col = np.searchsorted(model.classes_, yq)
        return 1.0 - p[np.arange(len(yq)), col]
    if config.startswith(("A-lgb", "B-lgb")):
        raw = model.predict(xq, raw_score=True)
    elif config.startswith("C-xgb"):
        raw = model.predict(xq, output_margin=True)
    elif config.startswith("D-skgb"):
        raw = model.predict(xq) if ad.objective == "regression" else \
            model.decision_function(xq)
    else:
        raw = model.predict(xq, prediction_type="RawFormulaVal")
    raw = np.asarray(raw, dtype=np.float64).reshape(len(xq), -1)
    return ad.losses(raw, yq)


def methods_for(config: str) -> list[str]:
    return FAMILY_METHODS["forest" if config.startswith("F-rf") else "boosted-trees"]


def score(name: str, ad, x, y, xq, yq):
    get_method(name).fit(ad, x, y).scores(xq[:1], yq[:1])  # warm-up, same rows
    t = time.perf_counter()
    scores = get_method(name).fit(ad, x, y).scores(xq, yq)
    return scores, time.perf_counter() - t


def run_cell(number: int, config: str, data: str, n_subsets: int, probe: bool) -> list[dict]:
    x, y, xq, yq = load(data)
    regression = data in REGRESSION
    model = factory(config, regression).fit(x, y)
    ad = TreeEnsembleAdapter.from_model(model, x, y)
    cell = f"{config}/{data}"

    def retrain(rows, seed):
        m = factory(config, regression).fit(x[rows], y[rows])
        return query_losses(config, m, ad, xq, yq)

    if probe:
        rows = np.random.default_rng(0).choice(len(x), len(x) // 2, replace=False)
        t = time.perf_counter()
        retrain(rows, 0)
        print(f"{cell:30s} n={len(x)} retrain {time.perf_counter() - t:.3f}s", flush=True)
    else:
        subsets = SubsetRetraining(retrain, len(x), n_subsets=n_subsets, seed=1000 + number,
                                   cache=f"bench/results/.lds-treedef-{number}-{config}-"
                                         f"{data}-{n_subsets}.json")
        t = time.perf_counter()
        subsets.run()
        print(f"{cell:30s} n={len(x)} {n_subsets} retrainings "
              f"{time.perf_counter() - t:.1f}s", flush=True)
    out = []
    for name in methods_for(config):
        rec = {"cell": number, "config": config, "data": data, "n_train": len(x),
               "method": name}
        try:
            scores, elapsed = score(name, ad, x, y, xq, yq)
        except Exception as exc:  # noqa: BLE001 - reported, not fixed here
            rec["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  {name:15s} FAILED {rec['error']}", flush=True)
            out.append(rec)
            continue
        rec["seconds"] = elapsed
        if not probe:
            res = lds(scores, subsets)
            rec.update(lds=res["lds"], ci95=res["ci95"], subsets=res["subsets"])
            print(f"  {name:15s} LDS {res['lds']:.3f} [{res['ci95'][0]:.2f}, "
                  f"{res['ci95'][1]:.2f}]  {elapsed:7.3f}s", flush=True)
        else:
            print(f"  {name:15s} {elapsed:7.3f}s", flush=True)
        out.append(rec)
    return out


def decide(rows: list[dict], group: str) -> dict:
    """The pre-registered rule of the docstring, on one group of cells."""
    cells = sorted({r["cell"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    failed = sorted({r["method"] for r in rows if "error" in r})
    summary = {}
    for name in names:
        mine = [r for r in rows if r["method"] == name and "error" not in r]
        summary[name] = {"mean_lds": float(np.mean([r["lds"] for r in mine])),
                         "total_seconds": float(sum(r["seconds"] for r in mine)),
                         "cells_run": len(mine),
                         "eligible": name not in failed and len(mine) == len(cells),
                         "mean_half_width": float(np.mean([(r["ci95"][1] - r["ci95"][0]) / 2
                                                           for r in mine]))}
    eligible = [n for n in names if summary[n]["eligible"]]
    best = max(eligible, key=lambda n: summary[n]["mean_lds"])
    h = summary[best]["mean_half_width"]
    faster = [n for n in eligible if n != best
              and summary[n]["total_seconds"] <= summary[best]["total_seconds"] / 5
              and summary[n]["mean_lds"] >= summary[best]["mean_lds"] - h]
    default = max(faster, key=lambda n: summary[n]["mean_lds"]) if faster else best
    return {"group": group, "cells": cells, "summary": summary, "failed": failed,
            "best_mean": best, "half_width_h": h, "faster_within_h": faster,
            "default": default}


def table(rows: list[dict], decision: dict) -> None:
    names = list(decision["summary"])
    cells = list(dict.fromkeys((r["cell"], r["config"], r["data"]) for r in rows))
    head = f"{'cell':28s}" + "".join(f"{n:>15s}" for n in names)
    print(head)
    for number, config, data in cells:
        line = f"{config + '/' + data:28s}"
        for n in names:
            r = next((r for r in rows if r["cell"] == number and r["method"] == n), None)
            line += f"{'-':>15s}" if r is None else f"{'failed':>15s}" if "error" in r else \
                f"{r['lds']:9.3f}±{(r['ci95'][1] - r['ci95'][0]) / 2:.2f}"
        print(line)
    s = decision["summary"]
    print(f"{'mean LDS':28s}" + "".join(f"{s[n]['mean_lds']:15.3f}" for n in names))
    print(f"{'total seconds':28s}" + "".join(f"{s[n]['total_seconds']:15.2f}" for n in names))
    wins = {n: 0 for n in names}
    for number, _, _ in cells:
        ok = [r for r in rows if r["cell"] == number and "error" not in r]
        wins[max(ok, key=lambda r: r["lds"])["method"]] += 1
    print(f"{'cells won':28s}" + "".join(f"{wins[n]:15d}" for n in names))
    print(f"best mean: {decision['best_mean']}; h = {decision['half_width_h']:.3f}; "
          f">=5x faster within h: {decision['faster_within_h'] or 'none'}; "
          f"failed: {decision['failed'] or 'none'}  ->  DEFAULT: {decision['default']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", action="store_true", help="cost only, no LDS")
    ap.add_argument("--subsets", type=int, default=N_SUBSETS)
    ap.add_argument("--out", default="bench/results/tree_defaults.json")
    args = ap.parse_args()
    rows = []
    for number, config, data in CELLS:
        rows += run_cell(number, config, data, args.subsets, args.probe)
    if args.probe:
        return
    boosted = [r for r in rows if not r["config"].startswith("F-rf")]
    forest = [r for r in rows if r["config"].startswith("F-rf")]
    decisions = {}
    for group, part in (("boosted", boosted), ("forest", forest)):
        print(f"\n{group}: LDS ± 95% CI half-width per cell")
        decisions[group] = decide(part, group)
        table(part, decisions[group])
    result = {**provenance(), "protocol": __doc__, "n_query": N_QUERY, "subsets": args.subsets,
              "split_seeds": SPLIT_SEED, "subset_seeds": {c: 1000 + c for c, _, _ in CELLS},
              "rows": rows, "decisions": decisions}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
