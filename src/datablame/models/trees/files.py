"""Tree and linear model files in their native safe formats, and retraining them.

  XGBoost   .json / .ubj        (Booster.save_model)
  LightGBM  .txt                (Booster.save_model)
  CatBoost  .cbm                (save_model)
  sklearn   .skops              (skops.io.dump; only scikit-learn / numpy types are trusted)
            .pkl / .joblib      only with --trust-pickle: unpickling runs arbitrary code

Retraining (for verification) reuses the model's own hyper-parameters: scikit-learn
`clone`, the boosters' stored parameters and number of rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

from datablame.errors import UserError

TREE_SUFFIXES = {".json": "xgboost", ".ubj": "xgboost", ".txt": "lightgbm",
                 ".cbm": "catboost", ".skops": "sklearn", ".pkl": "pickle",
                 ".joblib": "pickle"}


def load_tree_or_linear(path: str | Path, trust_pickle: bool = False):
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    kind = TREE_SUFFIXES.get(path.suffix.lower())
    try:
        if kind == "xgboost":
            import xgboost as xgb

            return xgb.Booster(model_file=str(path))
        if kind == "lightgbm":
            import lightgbm as lgb

            return lgb.Booster(model_file=str(path))
        if kind == "catboost":
            import catboost as cb

            return cb.CatBoost().load_model(str(path))
        if kind == "sklearn":
            import skops.io as sio

            untrusted = sio.get_untrusted_types(file=str(path))
            foreign = [t for t in untrusted if not t.startswith(("sklearn.", "numpy."))]
            if foreign:
                raise UserError(f"{path} contains types outside scikit-learn/numpy "
                                f"({', '.join(foreign[:3])}); refusing to load them")
            return sio.load(str(path), trusted=untrusted)
        if kind == "pickle":
            if not trust_pickle:
                raise UserError(f"{path} is a pickle: loading it runs arbitrary code. Pass "
                                "--trust-pickle if you trust its source, or save it with skops")
            import joblib

            return joblib.load(path)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: could not be loaded as a {kind} model "
                        f"({str(exc).strip().splitlines()[0][:160]})") from None
    raise UserError(f"{path}: unknown model format '{path.suffix}' (torch .safetensors, "
                    "XGBoost .json/.ubj, LightGBM .txt, CatBoost .cbm, scikit-learn .skops)")


def feature_names(model) -> list[str] | None:
    """The feature names the model was trained with, when the library kept them."""
    names = None
    for attr in ("feature_names_in_", "feature_names_"):
        if getattr(model, attr, None) is not None:
            names = list(getattr(model, attr))
    if names is None and hasattr(model, "feature_name") and callable(model.feature_name):
        names = list(model.feature_name())  # LightGBM
    if names is None and getattr(model, "feature_names", None):
        names = list(model.feature_names)  # XGBoost Booster
    if names and all(n.isdigit() or n.startswith(("Column_", "f")) and n[-1].isdigit()
                     for n in names):
        return None  # generated names (CatBoost's "0", "1", ...): only the count matters
    return names


def n_features(model) -> int | None:
    """How many feature columns the model takes. A CatBoost model loaded from .cbm reports
    n_features_in_ == 0, so CatBoost is asked for its feature names instead."""
    if type(model).__module__.startswith("catboost"):
        names = getattr(model, "feature_names_", None)
        return len(names) if names else None
    for attr in ("n_features_in_",):
        if hasattr(model, attr):
            return int(getattr(model, attr))
    if hasattr(model, "num_feature"):
        return int(model.num_feature())  # LightGBM / XGBoost Booster
    names = getattr(model, "feature_names_", None)
    return len(names) if names else None


def trained_categories(model) -> dict[str, list]:
    """{column: categories in training order} for a LightGBM / XGBoost model trained on
    pandas `category` columns, read from the model itself (LightGBM's
    `pandas_categorical` and its categorical feature indices; XGBoost's stored
    categories). A CSV has strings: they are encoded exactly like this before predicting."""
    mod = type(model).__module__
    if mod.startswith("lightgbm"):
        booster = model.booster_ if hasattr(model, "booster_") else model
        cats = getattr(booster, "pandas_categorical", None) or []
        if not cats:
            return {}
        names = booster.feature_name()
        index = _lgb_categorical_indices(booster)
        if len(index) != len(cats):
            raise UserError(f"the LightGBM model lists {len(cats)} category sets for "
                            f"{len(index)} categorical features; cannot encode the table")
        return {names[i]: list(c) for i, c in zip(index, cats, strict=True)}
    if mod.startswith("xgboost"):
        booster = model.get_booster() if hasattr(model, "get_booster") else model
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
        return {name: arr.to_pylist() for name, arr in stored if arr is not None}
    return {}


def _lgb_categorical_indices(booster) -> list[int]:
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


def encode_categories(model, frame, name: str):
    """`frame` with the model's categorical columns as pandas categories of training: blank
    cells are missing, and values never seen in training become missing too (as LightGBM and
    XGBoost treat them in memory), with a warning that names them."""
    import warnings

    import pandas as pd

    cats = trained_categories(model)
    if not cats:
        return frame
    missing = [c for c in cats if c not in frame.columns]
    if missing:
        raise UserError(f"{name}: categorical column(s) {', '.join(missing)} are missing")
    frame = frame.copy()
    for col, categories in cats.items():
        values = frame[col]
        if categories and isinstance(categories[0], str) and values.dtype.kind != "O":
            values = values.astype(object).where(values.isna(), values.astype(str))
        unseen = values.notna() & ~values.isin(categories)
        if unseen.any():
            shown = ", ".join(repr(v) for v in pd.unique(values[unseen])[:3])
            warnings.warn(f"{name}: column '{col}' has {int(unseen.sum())} value(s) never "
                          f"seen in training ({shown}); treated as missing, as the model "
                          "does", UserWarning, stacklevel=2)
        frame[col] = pd.Categorical(values.where(~unseen), categories=categories)
    return frame


def retrainer(model):
    """fit(x, y) -> a new model with the same hyper-parameters, trained on (x, y)."""
    mod = type(model).__module__
    if mod.startswith("sklearn"):
        from sklearn.base import clone

        return lambda x, y: clone(model).fit(x, y)
    if mod.startswith("xgboost"):
        import xgboost as xgb

        if hasattr(model, "get_params"):
            return lambda x, y: type(model)(**model.get_params()).fit(x, y)
        config = json.loads(model.save_config())
        learner = config["learner"]
        params = {"objective": learner["objective"]["name"],
                  **{k: v for k, v in learner["gradient_booster"].get(
                      "tree_train_param", {}).items()}}
        if "num_class" in learner["learner_model_param"] and \
                params["objective"].startswith("multi"):
            params["num_class"] = int(learner["learner_model_param"]["num_class"])
        rounds = model.num_boosted_rounds()
        return lambda x, y: xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=rounds)
    if mod.startswith("lightgbm"):
        import lightgbm as lgb

        if hasattr(model, "get_params"):
            return lambda x, y: type(model)(**model.get_params()).fit(x, y)
        params = {k: v for k, v in model.params.items()} if model.params else \
            _lgb_params_from_text(model.model_to_string())
        params["verbose"] = -1
        rounds = model.current_iteration()
        return lambda x, y: lgb.train(params, lgb.Dataset(x, label=y),
                                      num_boost_round=rounds)
    if mod.startswith("catboost"):
        def fit(x, y):
            fresh = model.copy()
            fresh.set_params(verbose=0, allow_writing_files=False)
            return fresh.fit(x, y)
        return fit
    raise UserError(f"don't know how to retrain a {type(model).__name__}")


def _lgb_params_from_text(text: str) -> dict:
    params, inside = {}, False
    for line in text.splitlines():
        if line.strip() == "parameters:":
            inside = True
            continue
        if line.strip() == "end of parameters":
            break
        if inside and line.startswith("[") and ": " in line:
            key, value = line[1:-1].split(": ", 1)
            if key in ("objective", "num_class", "learning_rate", "num_leaves", "max_depth",
                       "min_data_in_leaf", "lambda_l2", "lambda_l1", "feature_fraction",
                       "bagging_fraction", "bagging_freq", "min_sum_hessian_in_leaf",
                       "seed", "deterministic"):
                params[key] = value.split(" ")[0]
    return params
