"""The one place that says which family a model is, loads a model file, builds its
adapter, picks its measured default method and retrains it.

Families: "torch" (a torch.nn.Module), "trees" (XGBoost, LightGBM, CatBoost, scikit-learn
ensembles), "linear" (scikit-learn linear models), and for methods the trees split into
"boosted-trees" and "forest" (methods/families.py says which methods fit which).
Model files in safe formats only (no pickle unless trusted):

  torch     .safetensors + .json    (models/torch_files.py)
  XGBoost   .json / .ubj            LightGBM  .txt          CatBoost  .cbm
  sklearn   .skops                  .pkl / .joblib only with trust_pickle
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datablame.errors import UserError

# Chosen by measurement against retraining (bench/): see the README's method table.
DEFAULT_METHODS = {"torch": "if-exact", "boosted-trees": "leaf-share",
                   "forest": "knn-shapley", "linear": "linear-exact"}


def family_of(model) -> str:
    """"torch", "trees" or "linear"; anything else is refused in one line."""
    import torch

    from datablame.models.trees.libraries import is_tree_model

    if isinstance(model, torch.nn.Module):
        return "torch"
    if type(model).__module__.startswith("sklearn.linear_model"):
        return "linear"
    if is_tree_model(model):
        return "trees"
    raise UserError(f"unsupported model {type(model).__name__}: a torch module, a tree "
                    "ensemble (XGBoost, LightGBM, CatBoost or scikit-learn) or a scikit-learn "
                    "linear model")


def method_family(model) -> str:
    """The FAMILY_METHODS key: trees split into boosted ensembles and forests."""
    family = family_of(model)
    if family == "trees":
        forest = type(model).__name__.startswith(("RandomForest", "ExtraTrees"))
        return "forest" if forest else "boosted-trees"
    return family


def default_method(model) -> str:
    return DEFAULT_METHODS[method_family(model)]


@dataclass
class LoadedModel:
    family: str  # torch | trees | linear
    model: object
    config: dict | None = None  # torch: the architecture and training settings (.json)


def load_model_file(path, trust_pickle: bool = False) -> LoadedModel:
    """Dispatch on the file's suffix; refuse unknown formats and untrusted pickles."""
    from datablame.models.trees.libraries import library_for_file

    path = Path(path)
    if path.suffix == ".safetensors":
        from datablame.models.torch_files import load_torch_model

        model, config = load_torch_model(path)
        return LoadedModel("torch", model, config)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    library = library_for_file(path.suffix)
    if library is None:
        raise UserError(f"{path}: unknown model format '{path.suffix}' (torch .safetensors, "
                        "XGBoost .json/.ubj, LightGBM .txt, CatBoost .cbm, scikit-learn "
                        ".skops)")
    kind = library.__name__.rsplit(".", 1)[-1]
    weights = path.with_suffix(".safetensors")
    if path.suffix.lower() == ".json" and weights.exists():  # a torch model's settings file
        raise UserError(f"{path} describes the torch model in {weights.name}: pass "
                        f"--model {weights}")
    try:
        model = library.load(path, trust_pickle) if kind == "sklearn" else library.load(path)
    except UserError:
        raise
    except Exception as exc:
        kind = "pickle" if path.suffix.lower() in (".pkl", ".joblib") else kind
        raise UserError(f"{path}: could not be loaded as a {kind} model "
                        f"({str(exc).strip().splitlines()[0][:160]})") from None
    try:
        family = family_of(model)
    except UserError:
        raise UserError(f"{path}: a {type(model).__name__} is not a supported model") from None
    return LoadedModel(family, model)


def adapter_for(model, x_train, y_train, *, loss: str = "ce", l2: float = 0.0):
    """The model's adapter (what methods read it through); trees need the training rows
    to place their bias."""
    family = family_of(model)
    if family == "torch":
        from datablame.models.torch_module import TorchModelAdapter

        return TorchModelAdapter(model, loss, l2)
    if family == "trees":
        from datablame.models.trees.base import TreeEnsembleAdapter

        return TreeEnsembleAdapter.from_model(model, x_train, y_train)
    from datablame.models.linear import LinearModelAdapter

    return LinearModelAdapter(model)


def class_labels(model, adapter) -> list | None:
    """A classifier's class labels, in the order of its outputs (None: a regression model,
    or a torch model, whose targets are its output indices already)."""
    if family_of(model) == "torch" or adapter.is_regression:
        return None
    classes = getattr(model, "classes_", None)
    if classes is not None:
        return list(classes)
    if family_of(model) == "trees":  # a booster without labels: its outputs' positions
        return [0, 1] if adapter.objective == "binary" else list(range(adapter.n_outputs))
    return None


def retrainer(model):
    """fit(x, y) -> a new model with the same hyper-parameters, trained on (x, y)
    (trees and scikit-learn; torch retrains with its trainer, models/torch_train.py)."""
    from datablame.models.trees.libraries import is_tree_model, library_of

    if is_tree_model(model):
        return library_of(model).retrainer(model)
    if type(model).__module__.startswith("sklearn"):
        from sklearn.base import clone

        return lambda x, y: clone(model).fit(x, y)
    raise UserError(f"don't know how to retrain a {type(model).__name__}")


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
    if hasattr(model, "n_features_in_"):
        return int(model.n_features_in_)
    if hasattr(model, "num_feature"):
        return int(model.num_feature())  # LightGBM / XGBoost Booster
    names = getattr(model, "feature_names_", None)
    return len(names) if names else None


def trained_categories(model) -> dict[str, list]:
    """{column: categories in training order} for a model trained on pandas `category`
    columns, read from the model itself (LightGBM, XGBoost; others: none)."""
    from datablame.models.trees.libraries import is_tree_model, library_of

    return library_of(model).categories(model) if is_tree_model(model) else {}


def is_regression_target(y) -> bool:
    """Non-integer float targets regress (used only where the model cannot say)."""
    y = np.asarray(y)
    return y.dtype.kind == "f" and not np.all(np.equal(np.mod(y, 1), 0))
