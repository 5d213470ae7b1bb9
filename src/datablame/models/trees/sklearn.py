"""scikit-learn ensembles; files .skops (skops.io, only scikit-learn / numpy types trusted)
or, with --trust-pickle, .pkl / .joblib (unpickling runs arbitrary code)."""

from __future__ import annotations

import numpy as np

from datablame.errors import UserError
from datablame.models.trees.base import TreeEnsembleAdapter, to_array

MODULE = "sklearn.ensemble"
SUFFIXES = (".skops", ".pkl", ".joblib")


def read(model) -> TreeEnsembleAdapter:
    """GradientBoosting*, HistGradientBoosting* (boosted) and RandomForest* / ExtraTrees*
    (leaves only: not boosted)."""
    from sklearn import ensemble as ens

    is_clf = hasattr(model, "classes_")
    n_classes = len(model.classes_) if is_clf else 1
    if is_clf and n_classes > 2:
        objective, k = "multiclass", n_classes
    elif is_clf:
        objective, k = "binary", 1
    else:
        objective, k = "regression", 1
    if isinstance(model, (ens.GradientBoostingClassifier, ens.GradientBoostingRegressor)):
        if getattr(model, "loss", "") not in ("log_loss", "squared_error"):
            raise UserError(f"GradientBoosting loss '{model.loss}' is not supported")
        lr = model.learning_rate
        values = [[est.tree_.value[:, 0, 0] * lr for est in row] for row in model.estimators_]
        return TreeEnsembleAdapter(model, "sklearn-gb", objective, k, True, lr, 0.0, values,
                                   np.zeros(k), leaves_fn=_gb_leaves, raw_fn=_gb_raw,
                                   hessian_scale=k / (k - 1) if objective == "multiclass"
                                   else 1.0)
    if isinstance(model, (ens.HistGradientBoostingClassifier,
                          ens.HistGradientBoostingRegressor)):
        if model.loss not in ("log_loss", "squared_error"):
            raise UserError(f"HistGradientBoosting loss '{model.loss}' is not supported")
        values = [[pred.nodes["value"].astype(np.float64) for pred in row]
                  for row in model._predictors]
        bias = np.asarray(model._baseline_prediction, dtype=np.float64).reshape(-1)
        return TreeEnsembleAdapter(model, "sklearn-hgb", objective, k, True,
                                   model.learning_rate, float(model.l2_regularization), values,
                                   bias, leaves_fn=_hgb_leaves, raw_fn=_hgb_raw,
                                   empirical_bias=False)
    if isinstance(model, (ens.RandomForestClassifier, ens.RandomForestRegressor,
                          ens.ExtraTreesClassifier, ens.ExtraTreesRegressor)):
        values = []
        for est in model.estimators_:
            v = est.tree_.value[:, 0, :]
            if is_clf:
                v = v / v.sum(1, keepdims=True)
            values.append([v[:, c].astype(np.float64) for c in range(v.shape[1])])
        k_rf = n_classes if is_clf else 1
        return TreeEnsembleAdapter(model, "sklearn-rf", "multiclass" if is_clf else
                                   "regression", k_rf, False, 0.0, 0.0, values, np.zeros(k_rf),
                                   leaves_fn=_rf_leaves, raw_fn=_rf_raw, shared_outputs=True)
    raise UserError(f"unsupported scikit-learn model {type(model).__name__}")


def _gb_leaves(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    # GradientBoosting.apply validates against its inner trees, fitted without column
    # names: a DataFrame there warns "X has feature names" even when the model has them
    leaves = ad.model.apply(to_array(x) if hasattr(x, "columns") else x)
    return leaves.reshape(leaves.shape[0], leaves.shape[1], -1).astype(np.int64)


def _gb_raw(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    raw = ad.model.decision_function(x) if ad.objective != "regression" else \
        ad.model.predict(x)
    return np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)


def _rf_leaves(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    leaves = ad.model.apply(x).astype(np.int64)
    return np.repeat(leaves[:, :, None], ad.n_outputs, axis=2)


def _rf_raw(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    out = ad.model.predict_proba(x) if hasattr(ad.model, "predict_proba") else \
        ad.model.predict(x)
    return np.asarray(out, dtype=np.float64).reshape(len(out), -1)


def _bit(bitsets: np.ndarray, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Is category `codes[i]` in bitset `rows[i]` (8 x uint32 = 256 categories)?"""
    ok = (codes >= 0) & (codes < 256)
    c = np.where(ok, codes, 0)
    return ok & ((bitsets[rows, c // 32] >> (c % 32).astype(np.uint32)) & 1).astype(bool)


def _hgb_leaves(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    """scikit-learn gives no leaf ids for HistGradientBoosting: walk its predictor nodes
    the way its own Cython predictor does (same preprocessing, same rules for missing
    values, categorical bitsets and unknown categories), vectorised over rows; the result
    is checked against the library's raw prediction (tests)."""
    model = ad.model
    arr = np.asarray(model._preprocess_X(x, reset=False), dtype=np.float64)
    known, f_idx_map = model._bin_mapper.make_known_categories_bitsets()
    out = np.empty((len(arr), ad.n_trees, ad.n_outputs), dtype=np.int64)
    rows = np.arange(len(arr))
    for t, row in enumerate(model._predictors):
        for k, pred in enumerate(row):
            nodes = pred.nodes
            node = np.zeros(len(arr), dtype=np.int64)
            while True:
                active = ~nodes["is_leaf"][node].astype(bool)
                if not active.any():
                    break
                nd = node[active]
                feat = nodes["feature_idx"][nd]
                xv = arr[rows[active], feat]
                missing_left = nodes["missing_go_to_left"][nd].astype(bool)
                left = xv <= nodes["num_threshold"][nd]
                cat = nodes["is_categorical"][nd].astype(bool)
                if cat.any():
                    code = np.where(np.isnan(xv[cat]), -1, xv[cat]).astype(np.int64)
                    in_left = _bit(pred.raw_left_cat_bitsets, nodes["bitset_idx"][nd][cat], code)
                    in_known = _bit(known, f_idx_map[feat[cat]], code)
                    # known categories not sent left go right; negative or unknown ones
                    # follow the missing-value direction
                    left[cat] = np.where(in_left, True,
                                         np.where(in_known, False, missing_left[cat]))
                left = np.where(np.isnan(xv), missing_left, left)
                node[active] = np.where(left, nodes["left"][nd], nodes["right"][nd])
            out[:, t, k] = node
    return out


def _hgb_raw(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    raw = ad.model._raw_predict(x)
    return np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)


def load(path, trust_pickle: bool = False):
    """.skops with scikit-learn / numpy types only; a pickle only when trusted."""
    if str(path).lower().endswith(".skops"):
        import skops.io as sio

        untrusted = sio.get_untrusted_types(file=str(path))
        foreign = [t for t in untrusted if not _trusted(t, untrusted)]
        if foreign:
            raise UserError(f"{path} contains types outside scikit-learn/numpy's estimators "
                            f"({', '.join(foreign[:3])}); refusing to load them")
        return sio.load(str(path), trusted=untrusted)
    if not trust_pickle:
        raise UserError(f"{path} is a pickle: loading it runs arbitrary code. Pass "
                        "--trust-pickle if you trust its source, or save it with skops")
    import joblib

    return joblib.load(path)


# Functions a fitted scikit-learn model keeps and that only read their argument:
# HistGradientBoosting with categorical_features="from_dtype" keeps
# functools.partial(check_array, ...). A function is code to run, so only these are
# trusted (sklearn.utils._testing, for one, runs Python source it is given).
TRUSTED_FUNCTIONS = frozenset({"sklearn.utils.validation.check_array"})


def _trusted(name: str, listed: list[str]) -> bool:
    """A class from scikit-learn or numpy (skops rebuilds its state, it does not call it),
    a listed function, or functools.partial when every function in the file is listed."""
    if name == "functools.partial":
        return all(_trusted(t, []) for t in listed if t != name)
    if name in TRUSTED_FUNCTIONS:
        return True
    if not name.startswith(("sklearn.", "numpy.")) or "._testing" in name or \
            name.startswith("numpy.testing"):
        return False
    import importlib
    import inspect

    module, _, attr = name.rpartition(".")
    try:
        return inspect.isclass(getattr(importlib.import_module(module), attr))
    except (ImportError, AttributeError):
        return False


def retrainer(model):
    """fit(x, y) -> `clone(model)` (same hyper-parameters) fitted on (x, y)."""
    from sklearn.base import clone

    return lambda x, y: clone(model).fit(x, y)


def categories(model) -> dict[str, list]:
    return {}  # scikit-learn ensembles take the encoded table they were fitted on
