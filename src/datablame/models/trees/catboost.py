"""CatBoost: CatBoost / CatBoostClassifier / CatBoostRegressor; files .cbm (save_model)."""

from __future__ import annotations

import numpy as np

from datablame.errors import UserError
from datablame.models.trees.base import TreeEnsembleAdapter

MODULE = "catboost"
SUFFIXES = (".cbm",)


def read(model) -> TreeEnsembleAdapter:
    params = model.get_all_params()
    loss = params.get("loss_function", "")
    if loss in ("Logloss", "CrossEntropy"):
        objective, k = "binary", 1
    elif loss == "MultiClass":
        objective, k = "multiclass", int(model.get_params().get("classes_count") or
                                         len(model.classes_))
    elif loss == "RMSE":
        objective, k = "regression", 1
    else:
        raise UserError(f"CatBoost loss '{loss}' is not supported (Logloss, MultiClass, RMSE)")
    if not model.is_fitted():
        raise UserError("the CatBoost model is not fitted")
    counts = model.get_tree_leaf_counts()
    flat = model.get_leaf_values()
    scale, _ = model.get_scale_and_bias()
    values, pos = [], 0
    for count in counts:
        block = flat[pos:pos + count * k].reshape(count, k) * scale
        pos += count * k
        values.append([block[:, c].astype(np.float64) for c in range(k)])
    return TreeEnsembleAdapter(model, "catboost", objective, k, True,
                               float(params.get("learning_rate", 0.03)),
                               float(params.get("l2_leaf_reg", 3.0)), values, np.zeros(k),
                               leaves_fn=_leaves, raw_fn=_raw, shared_outputs=True)


def _pool(ad: TreeEnsembleAdapter, x):
    from catboost import Pool

    cats = ad.model.get_cat_feature_indices()
    return Pool(x, cat_features=cats or None)


def _leaves(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    leaves = ad.model.calc_leaf_indexes(_pool(ad, x)).astype(np.int64)
    return np.repeat(leaves[:, :, None], ad.n_outputs, axis=2)


def _raw(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    raw = ad.model.predict(_pool(ad, x), prediction_type="RawFormulaVal")
    return np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)


def load(path):
    import catboost as cb

    return cb.CatBoost().load_model(str(path))


def retrainer(model):
    """fit(x, y) -> a copy of the model (same parameters) trained on (x, y), silently."""
    import catboost as cb

    # a fitted model's parameters cannot be changed (CatBoostError), so a new model is
    # built from them; cb.CatBoost (a loaded .cbm) takes them as one dict
    params = {**model.get_params(), "verbose": 0, "allow_writing_files": False}

    def fit(x, y):
        fresh = cb.CatBoost(params) if type(model) is cb.CatBoost else type(model)(**params)
        return fresh.fit(x, y)
    return fit


def categories(model) -> dict[str, list]:
    return {}  # CatBoost takes string categories as they are
