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
    if names and all(n.startswith(("Column_", "f")) and n[-1].isdigit() for n in names):
        return None  # generated names: only the count is meaningful
    return names


def n_features(model) -> int | None:
    for attr in ("n_features_in_",):
        if hasattr(model, attr):
            return int(getattr(model, attr))
    if hasattr(model, "num_feature"):
        return int(model.num_feature())  # LightGBM / XGBoost Booster
    names = getattr(model, "feature_names_", None)
    return len(names) if names else None


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
