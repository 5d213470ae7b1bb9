"""Warm wall time (best of 3) of datablame's if-exact vs dattri's explicit influence on the
same models (bench/tabular_influence.py setup). Needs `pip install dattri`.

    .venv/bin/python bench/timing_vs_dattri.py
"""

import contextlib
import io
import sys
import time
import warnings

import torch

sys.path.insert(0, "bench")
from dattri_side_by_side import dattri_scores  # noqa: E402
from tabular_influence import load, trainer_for  # noqa: E402

from datablame.methods.registry import get_method  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(2)


def best_of(fn, n=3):
    out = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def measure(kind: str, task: str) -> None:
    x, y, xq, yq, k = load(task)
    tr = trainer_for(kind, x.shape[1], k)
    m = tr.fit(x, y)
    ad = tr.adapter(m)
    ours = best_of(lambda: get_method("if-exact").fit(ad, x, y).scores(xq, yq))

    def theirs_call():
        with contextlib.redirect_stderr(io.StringIO()):
            dattri_scores("explicit", m, x, y, xq, yq, tr.l2 + 1e-2)

    theirs = best_of(theirs_call)
    print(f"{task:14s} {kind:4s} datablame if-exact {ours:.3f}s  dattri explicit "
          f"{theirs:.3f}s  ratio {theirs / ours:.1f}x", flush=True)


if __name__ == "__main__":
    for kind in ("lr", "mlp"):
        for task in ("breast_cancer", "digits"):
            measure(kind, task)
