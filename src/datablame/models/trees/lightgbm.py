"""LightGBM: Booster or the scikit-learn wrappers; files .txt (Booster.save_model)."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from datablame.errors import UserError
from datablame.models.trees.base import TreeEnsembleAdapter, dense_table

MODULE = "lightgbm"
SUFFIXES = (".txt",)


def _booster(model):
    return model.booster_ if hasattr(model, "booster_") else model


def _param(text: str, key: str, default: float) -> float:
    for line in text.splitlines():
        if line.startswith(f"[{key}: "):
            return float(line.split(": ", 1)[1].rstrip("]"))
    return default


def read(model) -> TreeEnsembleAdapter:
    booster = _booster(model)
    dump = booster.dump_model()
    obj = dump.get("objective", "")
    k = int(dump.get("num_tree_per_iteration", 1))
    if obj.startswith("binary"):
        objective = "binary"
    elif obj.startswith("multiclass"):
        objective = "multiclass"
        if obj.startswith("multiclassova"):
            raise UserError("LightGBM multiclassova is not supported (use multiclass)")
    elif obj.startswith("regression") and "l1" not in obj:
        objective = "regression"
    else:
        raise UserError(f"LightGBM objective '{obj}' is not supported (binary, multiclass, "
                        "regression)")
    values = []
    trees = dump["tree_info"]
    for r in range(len(trees) // k):
        per_class = []
        for c in range(k):
            pairs: dict[int, float] = {}
            stack = [trees[r * k + c]["tree_structure"]]
            while stack:
                node = stack.pop()
                if "leaf_value" in node:
                    pairs[int(node.get("leaf_index", 0))] = float(node["leaf_value"])
                else:
                    stack += [node["left_child"], node["right_child"]]
            per_class.append(dense_table(pairs))
        values.append(per_class)
    text = booster.model_to_string()
    return TreeEnsembleAdapter(
        booster, "lightgbm", objective, k, True, _param(text, "learning_rate", 0.1),
        _param(text, "lambda_l2", 0.0), values, np.zeros(k), leaves_fn=_leaves, raw_fn=_raw,
        hessian_scale=k / (k - 1) if objective == "multiclass" else 1.0,
        start_in_first_tree=_param(text, "boost_from_average", 1.0) > 0)


def unfold_start(ad: TreeEnsembleAdapter, y: np.ndarray) -> None:
    """LightGBM adds its starting score (log-odds of the mean label, or the mean target) to
    every leaf of the first tree; gradients and Newton steps need it as the bias instead."""
    if not ad.start_in_first_tree:
        return
    if ad.objective == "binary":
        p = float(np.clip(y.mean(), 1e-12, 1 - 1e-12))
        init = np.log(p / (1 - p))
    elif ad.objective == "regression":
        init = float(y.mean())
    else:  # multiclass: log of each class's share (LightGBM's MulticlassSoftmax)
        for k in range(ad.n_outputs):
            init_k = float(np.log(max(1e-15, float(np.mean(y == k)))))
            ad.values[0][k] = ad.values[0][k] - init_k
            ad.bias = ad.bias + init_k * (np.arange(ad.n_outputs) == k)
        return
    ad.values[0][0] = ad.values[0][0] - init
    ad.bias = ad.bias + init


def _leaves(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    leaves = ad.model.predict(x, pred_leaf=True).astype(np.int64)
    return leaves.reshape(leaves.shape[0], -1, ad.n_outputs)


def _raw(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    raw = ad.model.predict(x, raw_score=True)
    return np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)


def load(path):
    """The booster; a file LightGBM cannot read raises its error (which the caller makes
    one line) without LightGBM's C++ "[Fatal]" line printed to stderr first."""
    import lightgbm as lgb

    with _native_stderr_silenced():
        return lgb.Booster(model_file=str(path))


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null for a moment: LightGBM's C++ logs its fatal
    errors there directly, not through Python, and raises them as an exception too."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# Training parameters read back from a saved model's text when the Booster has none.
_TRAIN_KEYS = ("objective", "num_class", "learning_rate", "num_leaves", "max_depth",
               "min_data_in_leaf", "lambda_l2", "lambda_l1", "feature_fraction",
               "bagging_fraction", "bagging_freq", "min_sum_hessian_in_leaf", "seed",
               "deterministic")


def _params_from_text(text: str) -> dict:
    params, inside = {}, False
    for line in text.splitlines():
        if line.strip() == "parameters:":
            inside = True
            continue
        if line.strip() == "end of parameters":
            break
        if inside and line.startswith("[") and ": " in line:
            key, value = line[1:-1].split(": ", 1)
            if key in _TRAIN_KEYS:
                params[key] = value.split(" ")[0]
    return params


def retrainer(model):
    """fit(x, y) -> a booster trained with the model's own parameters and round count."""
    import lightgbm as lgb

    if hasattr(model, "get_params"):
        return lambda x, y: type(model)(**model.get_params()).fit(x, y)
    params = dict(model.params) if model.params else _params_from_text(model.model_to_string())
    params["verbose"] = -1
    # LightGBM warns on every retraining when the categorical columns come in the params
    # (as a saved model lists them): they go to the Dataset, where it wants them
    categorical = None
    for alias in ("categorical_feature", "cat_feature", "categorical_column", "cat_column",
                  "categorical_features"):
        categorical = params.pop(alias, None) or categorical
    if isinstance(categorical, str):  # "0,3" or "name:city,plan"
        parts = [v.strip() for v in categorical.removeprefix("name:").split(",") if v.strip()]
        categorical = [int(v) if v.isdigit() else v for v in parts]
    rounds = model.current_iteration()
    return lambda x, y: lgb.train(params, lgb.Dataset(
        x, label=y, categorical_feature=categorical if categorical else "auto"),
        num_boost_round=rounds)


def categories(model) -> dict[str, list]:
    """{column: categories in training order}, from the model's `pandas_categorical` and
    its categorical feature indices."""
    booster = _booster(model)
    cats = getattr(booster, "pandas_categorical", None) or []
    if not cats:
        return {}
    names = booster.feature_name()
    index = _categorical_indices(booster)
    if len(index) != len(cats):
        raise UserError(f"the LightGBM model lists {len(cats)} category sets for "
                        f"{len(index)} categorical features; cannot encode the table")
    return {names[i]: list(c) for i, c in zip(index, cats, strict=True)}


def _categorical_indices(booster) -> list[int]:
    text = booster.model_to_string()
    for line in text.splitlines():
        if line.startswith("[categorical_feature: "):
            value = line.split(": ", 1)[1].rstrip("]").strip()
            return [int(v) for v in value.split(",") if v.strip()]
        if line == "end of parameters":
            break
    infos = booster.dump_model().get("feature_infos", {})
    return [i for i, name in enumerate(booster.feature_name())
            if infos.get(name, {}).get("values")]
