"""Every tree method vs retraining, and how the fast ones scale (issue 5). Table + JSON.

    .venv/bin/python bench/tree_influence.py [--subsets 100] [--scale]

Protocol (as measured for tree-influence in the issue): LightGBM with 100 trees, 15 leaves,
learning rate 0.1; breast_cancer / digits; 500 training rows, 50 queries; loss of the true
class; LDS over `--subsets` models retrained on random 50% subsets with the same settings.
`--scale`: one query over 10k-100k rows x 100-500 trees (leaf-sim, boostin), and
KNN-Shapley for 1,000 queries over 10,000 rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from provenance import with_provenance

from datablame.methods.registry import get_method
from datablame.models.trees.base import TreeEnsembleAdapter
from datablame.verify import SubsetRetraining, lds


def load(task: str, n_train=500, n_query=50, seed=0):
    from sklearn import datasets

    data = {"breast_cancer": datasets.load_breast_cancer,
            "digits": datasets.load_digits}[task]()
    idx = np.random.default_rng(seed).permutation(len(data.target))[: n_train + n_query]
    x, y = data.data[idx].astype(np.float64), data.target[idx]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def factory(n_estimators=100):
    import lightgbm as lgb

    return lgb.LGBMClassifier(n_estimators=n_estimators, num_leaves=15, learning_rate=0.1,
                              verbose=-1, deterministic=True, force_row_wise=True,
                              n_jobs=2)


def boostin_as_tree_influence(ad, x, y, xq, yq) -> np.ndarray:
    """BoostIn with tree-influence's leaf derivative, lr * (g_i + v_shrunk h_i) / (H + l2)
    (its leaf values carry the learning rate), to check our protocol against its numbers."""
    from datablame.models.trees.base import leaf_sums, round_stats

    leaves, g, h, _ = round_stats(ad, x, y)
    n, t_count, k_count = leaves.shape
    dv = np.zeros((n, t_count, k_count))
    for t in range(t_count):
        for k in range(k_count):
            lt = leaves[:, t, k]
            hess = leaf_sums(lt, h[:, t, k], len(ad.values[t][k]))
            dv[:, t, k] = ad.learning_rate * (g[:, t, k] + ad.values[t][k][lt] * h[:, t, k]) \
                / (hess[lt] + ad.l2)
    q_leaves, gq, _, _ = round_stats(ad, xq, yq)
    return np.stack([((leaves == q_leaves[q][None]) * dv * gq[q][None]).sum((1, 2))
                     for q in range(len(xq))])


def run_task(task: str, n_subsets: int, split_seed: int = 0) -> list[dict]:
    x, y, xq, yq = load(task, seed=split_seed)
    ad = TreeEnsembleAdapter.from_model(factory().fit(x, y), x, y)

    def retrain(rows, seed):
        m = factory().fit(x[rows], y[rows])
        sub = TreeEnsembleAdapter.from_model(m, x[rows], y[rows])
        return sub.losses(sub.library_raw(xq), yq)

    subsets = SubsetRetraining(retrain, len(x), n_subsets=n_subsets,
                               cache=f"bench/results/.lds-trees-{task}-{n_subsets}"
                                     + (f"-split{split_seed}" if split_seed else "") + ".json")
    subsets.run()
    rows = []
    for name in ("leaf-share", "boostin", "boostin (tree-influence's)", "leaf-influence",
                 "leaf-sim", "simplex", "knn-shapley", "shap-neighbors"):
        t = time.perf_counter()
        if name.startswith("boostin ("):
            scores = boostin_as_tree_influence(ad, x, y, xq, yq)
        else:
            scores = get_method(name).fit(ad, x, y).scores(xq, yq)
        elapsed = time.perf_counter() - t
        res = lds(scores, subsets)
        rows.append({"task": task, "split_seed": split_seed, "method": name,
                     "lds": res["lds"], "ci95": res["ci95"], "seconds": elapsed})
        print(f"  {task:14s} {name:27s} LDS {res['lds']:.3f} [{res['ci95'][0]:.2f}, "
              f"{res['ci95'][1]:.2f}]  {elapsed:7.2f}s", flush=True)
    return rows


def scale() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for n, trees in ((10_000, 100), (100_000, 100), (100_000, 500)):
        x = rng.standard_normal((n, 10))
        y = (x[:, 0] + x[:, 1] * x[:, 2] + 0.5 * rng.standard_normal(n) > 0).astype(int)
        model = factory(trees).fit(x, y)
        ad = TreeEnsembleAdapter.from_model(model, x, y)
        for name in ("leaf-sim", "boostin", "leaf-share"):
            t = time.perf_counter()
            method = get_method(name).fit(ad, x, y)
            fit_s = time.perf_counter() - t
            method.scores(x[:1], y[:1])  # warm
            t = time.perf_counter()
            method.scores(x[1:11], y[1:11])
            per_query = (time.perf_counter() - t) / 10
            out.append({"rows": n, "trees": trees, "method": name, "fit_s": fit_s,
                        "query_s": per_query})
            print(f"  rows={n:7d} trees={trees:4d} {name:9s} fit {fit_s:6.2f}s  "
                  f"per query {per_query:.3f}s", flush=True)
    x = rng.standard_normal((11_000, 10))
    y = (x[:, 0] > 0).astype(int)
    t = time.perf_counter()
    get_method("knn-shapley", space="features").fit(None, x[:10_000], y[:10_000]) \
        .scores(x[10_000:], y[10_000:])
    knn = time.perf_counter() - t
    out.append({"rows": 10_000, "queries": 1000, "method": "knn-shapley", "seconds": knn})
    print(f"  knn-shapley: 1,000 queries x 10,000 rows in {knn:.2f}s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--tasks", default="breast_cancer,digits")
    ap.add_argument("--scale", action="store_true")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="another train/query split (held-out check of chosen defaults)")
    ap.add_argument("--out", default="bench/results/tree_influence.json")
    args = ap.parse_args()
    print("LDS vs retraining (LightGBM 100 trees, 15 leaves), time for 50 queries x 500 rows")
    rows = [r for task in args.tasks.split(",") if task
            for r in run_task(task, args.subsets, args.split_seed)]
    result = {"lds": rows}
    if args.scale:
        print("\nscale")
        result["scale"] = scale()
    out = Path(args.out)
    if args.split_seed:
        out = out.with_name(f"{out.stem}-split{args.split_seed}{out.suffix}")
    out.write_text(json.dumps(with_provenance(result), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
