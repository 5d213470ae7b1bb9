"""dattri's influence attributors on the *same* models, data and retrained subsets as
bench/tabular_influence.py, for a side-by-side LDS and wall time. dattri is a bench-only
dependency: `.venv/bin/pip install dattri`.

    .venv/bin/python bench/dattri_side_by_side.py [--subsets 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from provenance import with_provenance
from tabular_influence import load, trainer_for

from datablame.verify import SubsetRetraining, lds


def dattri_scores(kind_name: str, model, x, y, xq, yq, regularization: float) -> np.ndarray:
    from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit
    from dattri.task import AttributionTask

    def loss_func(params, data):
        xb, yb = data
        out = torch.func.functional_call(model, params, (xb,))
        return torch.nn.functional.cross_entropy(out, yb)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    cls = {"explicit": IFAttributorExplicit, "cg": IFAttributorCG}[kind_name]
    attributor = cls(task=task, device="cpu", regularization=regularization)
    train = torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y))
    test = torch.utils.data.TensorDataset(torch.tensor(xq), torch.tensor(yq))
    full = torch.utils.data.DataLoader(train, batch_size=len(train))
    attributor.cache(full)
    out = attributor.attribute(torch.utils.data.DataLoader(train, batch_size=64),
                               torch.utils.data.DataLoader(test, batch_size=64))
    return out.T.detach().double().numpy()  # (n_query, n_train)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--tasks", default="breast_cancer,digits")
    ap.add_argument("--models", default="lr,mlp")
    ap.add_argument("--out", default="bench/results/dattri_side_by_side.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for kind in args.models.split(","):
        for task in args.tasks.split(","):
            x, y, xq, yq, k = load(task)
            trainer = trainer_for(kind, x.shape[1], k)
            model = trainer.fit(x, y)

            def retrain(rows_, seed, trainer=trainer, x=x, y=y, xq=xq, yq=yq):
                return trainer.query_losses(x, y, xq, yq, rows=rows_, seed=seed)

            subsets = SubsetRetraining(retrain, len(x), n_subsets=args.subsets, seed=0,
                                       cache=f"bench/results/.lds-{task}-{kind}-"
                                             f"{args.subsets}.json")
            for name in ("explicit", "cg"):
                elapsed = float("inf")
                try:
                    for _ in range(2):  # best of two, as for datablame's methods
                        t = time.perf_counter()
                        scores = dattri_scores(name, model, x, y, xq, yq, trainer.l2 + 1e-2)
                        elapsed = min(elapsed, time.perf_counter() - t)
                except Exception as exc:  # report, keep going
                    print(f"  {task} {kind} dattri {name}: failed ({exc})")
                    continue
                # dattri's sign: larger = more helpful, as ours; check both and report
                res = lds(scores, subsets)
                rows.append({"task": task, "model": kind, "method": f"dattri-if-{name}",
                             "lds": res["lds"], "ci95": res["ci95"], "seconds": elapsed})
                print(f"  {task:14s} {kind:4s} dattri-if-{name:9s} LDS {res['lds']:.3f}  "
                      f"{elapsed:7.2f}s", flush=True)
    Path(args.out).write_text(json.dumps(with_provenance(rows), indent=2))


if __name__ == "__main__":
    main()
