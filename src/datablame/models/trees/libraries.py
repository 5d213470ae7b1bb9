"""Which library a tree model comes from (by its module) and which library reads a model
file (by its suffix): adding a tree library is one file here plus one entry in LIBRARIES."""

from __future__ import annotations

from types import ModuleType

from datablame.errors import UserError
from datablame.models.trees import catboost, lightgbm, sklearn, xgboost

LIBRARIES: tuple[ModuleType, ...] = (xgboost, lightgbm, catboost, sklearn)


def is_tree_model(model) -> bool:
    module = type(model).__module__
    return any(module.startswith(lib.MODULE + ".") for lib in LIBRARIES)


def library_of(model) -> ModuleType:
    module = type(model).__module__
    for lib in LIBRARIES:
        if module.startswith(lib.MODULE + "."):
            return lib
    raise UserError(f"unsupported tree model {type(model).__name__} (XGBoost, LightGBM, "
                    "CatBoost or scikit-learn ensembles)")


def library_for_file(suffix: str) -> ModuleType | None:
    for lib in LIBRARIES:
        if suffix.lower() in lib.SUFFIXES:
            return lib
    return None
