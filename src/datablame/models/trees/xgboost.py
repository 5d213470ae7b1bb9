"""XGBoost: Booster or the scikit-learn wrappers; files .json / .ubj (Booster.save_model)."""

from __future__ import annotations

import functools
import json

import numpy as np

from datablame.errors import UserError
from datablame.models.trees.base import TreeEnsembleAdapter, dense_table

MODULE = "xgboost"
SUFFIXES = (".json", ".ubj")


def _booster(model):
    return model.get_booster() if hasattr(model, "get_booster") else model


def read(model) -> TreeEnsembleAdapter:
    booster = _booster(model)
    learner = json.loads(booster.save_config())["learner"]
    obj = learner["objective"]["name"]
    if obj.startswith("binary:"):
        objective, k = "binary", 1
    elif obj.startswith("multi:"):
        objective, k = "multiclass", int(learner["learner_model_param"]["num_class"])
    elif obj.startswith("reg:squarederror") or obj == "reg:linear":
        objective, k = "regression", 1
    else:
        raise UserError(f"XGBoost objective '{obj}' is not supported (binary:*, multi:*, "
                        "reg:squarederror)")
    train = learner["gradient_booster"].get("tree_train_param", {})
    if learner["gradient_booster"]["name"] != "gbtree":
        raise UserError("only XGBoost's gbtree booster has trees to attribute through")
    dumps = [json.loads(d) for d in booster.get_dump(dump_format="json")]
    values = []
    for r in range(len(dumps) // k):
        per_class = []
        for c in range(k):
            pairs: dict[int, float] = {}
            stack = [dumps[r * k + c]]
            while stack:
                node = stack.pop()
                if "leaf" in node:
                    pairs[int(node["nodeid"])] = float(node["leaf"])
                else:
                    stack.extend(node.get("children", []))
            per_class.append(dense_table(pairs))
        values.append(per_class)
    return TreeEnsembleAdapter(
        booster, "xgboost", objective, k, True,
        float(train.get("learning_rate", train.get("eta", 0.3))),
        float(train.get("reg_lambda", train.get("lambda", 1.0))), values, np.zeros(k),
        leaves_fn=_leaves, raw_fn=_raw, hessian_scale=2.0 if objective == "multiclass" else 1.0)


def _dmatrix(x):
    import xgboost as xgb

    if hasattr(x, "dtypes") and any(str(t) == "category" for t in x.dtypes):
        return xgb.DMatrix(x, enable_categorical=True)
    return xgb.DMatrix(x)


def _leaves(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    leaves = ad.model.predict(_dmatrix(x), pred_leaf=True).astype(np.int64)
    return leaves.reshape(leaves.shape[0], -1, ad.n_outputs)


def _raw(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    raw = ad.model.predict(_dmatrix(x), output_margin=True)
    return raw.reshape(raw.shape[0], -1).astype(np.float64)


def load(path):
    import xgboost as xgb

    return xgb.Booster(model_file=str(path))


def retrainer(model):
    """fit(x, y) -> a booster trained with the model's own parameters and round count."""
    import xgboost as xgb

    if hasattr(model, "get_params"):
        return lambda x, y: type(model)(**model.get_params()).fit(x, y)
    learner = json.loads(model.save_config())["learner"]
    params = {"objective": learner["objective"]["name"],
              **learner["gradient_booster"].get("tree_train_param", {})}
    if "num_class" in learner["learner_model_param"] and \
            params["objective"].startswith("multi"):
        params["num_class"] = int(learner["learner_model_param"]["num_class"])
    rounds = model.num_boosted_rounds()
    return lambda x, y: xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=rounds)


def categories(model) -> dict[str, list]:
    """{column: categories in training order} as XGBoost stored them (>= 3.1)."""
    booster = _booster(model)
    types = booster.feature_types or []
    if "c" not in types:
        return {}
    try:
        stored = booster.get_categories(export_to_arrow=True).to_arrow()
    except (AttributeError, TypeError, ValueError):
        stored = None
    if not stored:
        cat_names = [n for n, t in zip(booster.feature_names or [], types, strict=False)
                     if t == "c"]
        raise UserError(f"the XGBoost model has categorical features ({', '.join(cat_names)})"
                        " but stores no categories (saved by XGBoost < 3.1): use the "
                        "Python API with the pandas categories it was trained on")
    found = {}
    for name, arr in stored:
        if arr is None:
            continue
        if _non_ascii(arr) and not _reads_back_non_ascii_categories():
            raise UserError(
                f"column '{name}': XGBoost {xgb_version()} stores categories with non-ASCII "
                "characters in a form it does not read back (its own export turned 'São "
                "Paulo' into 'São Paul'), so datablame cannot encode this column as the "
                "model does; give the categories ASCII names (or integer codes) and retrain")
        found[name] = arr.to_pylist()
    return found


def _non_ascii(arr) -> bool:
    """A string column whose stored bytes hold any non-ASCII character (its offsets then
    count characters, not bytes, in XGBoost 3.2, the version seen: the export slices the
    wrong bytes)."""
    buffers = arr.buffers()
    data = buffers[2] if len(buffers) > 2 else None
    return data is not None and any(b >= 0x80 for b in bytes(data))


@functools.cache
def _reads_back_non_ascii_categories() -> bool:
    """Whether this XGBoost exports 'é' as 'é': tried on a one-round model (milliseconds)
    rather than assumed from a version number, so a release that fixes it is used."""
    import pandas as pd
    import xgboost as xgb

    frame = pd.DataFrame({"c": pd.Categorical(["é", "São Paulo", "a", "é"])})
    try:
        booster = xgb.train({"tree_method": "hist", "max_depth": 1, "verbosity": 0},
                            xgb.DMatrix(frame, label=[0, 1, 0, 1], enable_categorical=True),
                            num_boost_round=1)
        stored = dict(booster.get_categories(export_to_arrow=True).to_arrow())
        return stored["c"].to_pylist() == list(frame["c"].cat.categories)
    except Exception:  # an XGBoost that cannot say: treat it as one that mangles them
        return False


def xgb_version() -> str:
    import xgboost as xgb

    return xgb.__version__
