"""Tabular attribution for torch models: rows in, ranked training rows out.

    from datablame.tabular import attribute
    df = attribute(model, X_train, y_train, X_query, loss="ce", method="if-exact", l2=1e-2)

`model` is any trained `torch.nn.Module` mapping a float feature matrix to outputs
(logits for "ce", predictions for "mse"). Query targets default to the model's own
prediction (what it *said*, as in the seed); pass `y_query` to explain the true label.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from datablame.adapters.torch_module import TorchModelAdapter
from datablame.errors import UserError
from datablame.methods.registry import get_method

# Chosen by bench/tabular_influence.py (LDS against retraining): see README.
DEFAULT_METHOD = "if-exact"


def _check_rows(x, name: str) -> None:
    arr = x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)
    if arr.ndim != 2:
        raise UserError(f"{name} must be a 2-D table of features, got shape {arr.shape}")
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise UserError(f"{name} has a NaN/inf at row {r}, column {c}: a torch model "
                        "cannot take it")


def score_matrix(model: torch.nn.Module, x_train, y_train, x_query, y_query=None, *,
                 loss="ce", method: str = DEFAULT_METHOD, l2: float = 0.0,
                 **method_params) -> np.ndarray:
    """(n_query, n_train) scores; positive = the row helped produce the query's target."""
    _check_rows(x_train, "training rows")
    _check_rows(x_query, "query rows")
    if len(x_train) != len(y_train):
        raise UserError(f"{len(x_train)} training rows but {len(y_train)} targets")
    adapter = TorchModelAdapter(model, loss, l2)
    if y_query is None:
        y_query = adapter.predict_targets(x_query)
    est = get_method(method, **method_params).fit(adapter, x_train, y_train)
    return est.scores(x_query, y_query)


def attribute(model: torch.nn.Module, x_train, y_train, x_query, y_query=None, *,
              loss="ce", method: str = DEFAULT_METHOD, l2: float = 0.0, top_k: int = 10,
              **method_params) -> pd.DataFrame:
    """Top-k training rows per query: query, rank, row, score, then the row's features."""
    scores = score_matrix(model, x_train, y_train, x_query, y_query, loss=loss,
                          method=method, l2=l2, **method_params)
    features = x_train if isinstance(x_train, pd.DataFrame) else pd.DataFrame(
        np.asarray(x_train), columns=[f"x{j}" for j in range(np.asarray(x_train).shape[1])])
    target = np.asarray(y_train.to_numpy() if hasattr(y_train, "to_numpy") else y_train)
    frames = []
    k = min(top_k, scores.shape[1])
    for q, row_scores in enumerate(scores):
        top = np.argsort(-row_scores, kind="stable")[:k]
        frame = pd.DataFrame({"query": q, "rank": np.arange(1, k + 1), "row": top,
                              "score": row_scores[top], "target": target[top]})
        frames.append(pd.concat([frame, features.iloc[top].reset_index(drop=True)], axis=1))
    df = pd.concat(frames, ignore_index=True)
    df.attrs.update(method=method, loss=loss if isinstance(loss, str) else "custom")
    return df
