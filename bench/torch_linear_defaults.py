"""Held-out check of the torch (if-exact) and linear (linear-exact) defaults (issue 9, 14).

    PYTHONPATH=src:bench OMP_NUM_THREADS=1 .venv/bin/python bench/torch_linear_defaults.py

PROTOCOL (fixed and committed before any LDS of it was computed)

Why held out: the torch methods were compared on bench/tabular_influence.py (split seed 0,
subset mask seed 0, model init seed 0); linear-exact was tested for exactness (tests/) but
never scored by LDS. Here every seed is new.

Torch cells (bench/tabular_influence.py's data loader, trainers and method list, unchanged:
standardised features, 500 train rows, 50 queries; LR = linear layer, L-BFGS 20 epochs, l2
1e-2; MLP = 32 tanh, Adam 300 epochs, l2 1e-3):
- 1 LR / breast_cancer split seed 11   - 2 LR / digits split seed 12
- 3 MLP / breast_cancer split seed 11  - 4 MLP / digits split seed 12
Full model and every retraining start from init seed 7 (tuning: 0). Methods: grad-cos,
grad-dot, if-exact, if-cg, if-arnoldi (rank 100), datainf, if-lissa (LR only), tracin,
trak (5 models), as in bench/tabular_influence.py. torch uses 1 thread.

Linear cells (scikit-learn, features standardised on the training rows):
- 5 LogisticRegression (C=1) / breast_cancer split seed 11: 500 / 50
- 6 LogisticRegression (C=1) / synth (bench/tree_defaults.py's table) split 15: 950 / 50
- 7 Ridge (alpha=1) / diabetes split seed 14: 392 / 50
(linear-exact supports binary LogisticRegression only, so no multiclass cell.)
Methods: FAMILY_METHODS["linear"] = linear-exact, knn-shapley, shap-neighbors.

Loss of the true target: cross-entropy (torch, LogisticRegression), squared error (Ridge).
LDS: verify.lds over 100 SubsetRetraining masks of 50% of the rows, mask seed 2000 + cell.
Time: fit + scores of 50 queries after one warm-up call (fit + one query), same rows.

DECISION RULE: bench/tree_defaults.py's, applied to the torch cells and to the linear cells
separately (best mean LDS B; h = mean of B's CI half-widths; a method >= 5x faster in
total and within h of B's mean wins instead; a method that raises is not eligible).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import tabular_influence as ti
import torch
import tree_defaults as td
from provenance import provenance

from datablame.methods.registry import FAMILY_METHODS, get_method
from datablame.models.linear import LinearModelAdapter
from datablame.verify import SubsetRetraining, lds

INIT_SEED = 7
TORCH_CELLS = [(1, "lr", "breast_cancer", 11), (2, "lr", "digits", 12),
               (3, "mlp", "breast_cancer", 11), (4, "mlp", "digits", 12)]
LINEAR_CELLS = [(5, "logreg", "breast_cancer"), (6, "logreg", "synth"),
                (7, "ridge", "diabetes")]


def timed(make, fit_args, xq, yq):
    make().fit(*fit_args).scores(xq[:1], yq[:1])  # warm-up, same rows
    t = time.perf_counter()
    scores = make().fit(*fit_args).scores(xq, yq)
    return scores, time.perf_counter() - t


def record(rows, base, make, fit_args, xq, yq, subsets):
    try:
        scores, elapsed = timed(make, fit_args, xq, yq)
    except Exception as exc:  # noqa: BLE001 - reported, not fixed here
        rows.append({**base, "error": f"{type(exc).__name__}: {exc}"})
        print(f"  {base['method']:16s} FAILED {rows[-1]['error']}", flush=True)
        return
    res = lds(scores, subsets)
    rows.append({**base, "lds": res["lds"], "ci95": res["ci95"], "seconds": elapsed})
    print(f"  {base['method']:16s} LDS {res['lds']:.3f} [{res['ci95'][0]:.2f}, "
          f"{res['ci95'][1]:.2f}]  {elapsed:7.3f}s", flush=True)


def torch_cell(number, kind, task, split_seed, n_subsets) -> list[dict]:
    x, y, xq, yq, k = ti.load(task, seed=split_seed)
    trainer = ti.trainer_for(kind, x.shape[1], k)
    trainer.seed = INIT_SEED
    adapter = trainer.adapter(trainer.fit(x, y))

    def retrain(rows, seed):
        return trainer.query_losses(x, y, xq, yq, rows=rows, seed=INIT_SEED)

    subsets = SubsetRetraining(retrain, len(x), n_subsets=n_subsets, seed=2000 + number,
                               cache=f"bench/results/.lds-torchdef-{number}-{kind}-{task}-"
                                     f"{n_subsets}.json")
    t = time.perf_counter()
    subsets.run()
    print(f"{kind}/{task} (split {split_seed}) {n_subsets} retrainings "
          f"{time.perf_counter() - t:.1f}s", flush=True)
    rows = []
    for name, make in ti.methods_for(kind, trainer, x, y).items():
        base = {"cell": number, "config": kind, "data": task, "method": name}
        record(rows, base, make, (adapter, x, y), xq, yq, subsets)
    return rows


def linear_cell(number, kind, data, n_subsets) -> list[dict]:
    from sklearn.linear_model import LogisticRegression, Ridge

    x, y, xq, yq = td.load(data)
    mu, sd = x.mean(0), x.std(0) + 1e-12
    x, xq = (x - mu) / sd, (xq - mu) / sd

    def factory():
        return LogisticRegression(C=1.0, max_iter=5000) if kind == "logreg" else \
            Ridge(alpha=1.0)

    model = factory().fit(x, y)
    adapter = LinearModelAdapter(model)
    subsets = SubsetRetraining(lambda rows, seed: LinearModelAdapter(
                                   factory().fit(x[rows], y[rows])).query_losses(xq, yq),
                               len(x), n_subsets=n_subsets, seed=2000 + number,
                               cache=f"bench/results/.lds-lineardef-{number}-{kind}-{data}-"
                                     f"{n_subsets}.json")
    subsets.run()
    print(f"{kind}/{data} {n_subsets} retrainings", flush=True)
    rows = []
    for name in FAMILY_METHODS["linear"]:
        base = {"cell": number, "config": kind, "data": data, "method": name}
        record(rows, base, lambda name=name: get_method(name), (adapter, x, y), xq, yq,
               subsets)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--out", default="bench/results/torch_linear_defaults.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    groups = {"torch": [], "linear": []}
    for number, kind, task, split_seed in TORCH_CELLS:
        groups["torch"] += torch_cell(number, kind, task, split_seed, args.subsets)
    for number, kind, data in LINEAR_CELLS:
        groups["linear"] += linear_cell(number, kind, data, args.subsets)
    decisions = {}
    for group, part in groups.items():
        print(f"\n{group}: LDS ± 95% CI half-width per cell")
        decisions[group] = td.decide(part, group)
        td.table(part, decisions[group])
    Path(args.out).write_text(json.dumps({
        **provenance(), "protocol": __doc__,
        "subsets": args.subsets, "rows": groups["torch"] + groups["linear"],
        "decisions": decisions}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
