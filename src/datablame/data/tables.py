"""Tabular inputs checked against the model, the same way for the Python API and the CLI:
what a table must be for a model family, and the typed arrays the methods get.

Every refusal is one line naming the row and column (a NaN for a torch model, a column the
model was not trained on, a target outside the classes), before any method runs.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from datablame.errors import UserError


def as_array(x) -> np.ndarray:
    return x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)


def check_feature_matrix(x, name: str) -> None:
    """2-D and finite: what a torch model can take (it has no missing-value rule)."""
    arr = as_array(x)
    if arr.ndim != 2:
        raise UserError(f"{name} must be a 2-D table of features, got shape {arr.shape}")
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise UserError(f"{name} has a NaN/inf at row {r}, column {c}: a torch model "
                        "cannot take it")


def check_targets(x_train, y_train) -> None:
    if len(x_train) != len(y_train):
        raise UserError(f"{len(x_train)} training rows but {len(y_train)} targets")
    missing = pd.isna(pd.Series(np.asarray(y_train).reshape(len(y_train), -1)[:, 0]))
    if missing.any():
        raise UserError(f"target is missing at row {int(np.flatnonzero(missing)[0])}")


def class_positions(y, classes, what: str = "the training targets", *,
                    unknown_ok: bool = False) -> np.ndarray:
    """Each target's position among the model's `classes` (the outputs a classifier's
    losses are read from); a target that is none of them is one line, not a silent
    miscount (a "yes"/"no" column for a model trained on 1/0 would otherwise read as all
    class 0), or with `unknown_ok` position -1 (a model retrained on rows without that
    class). Labels compare as Python values: 1, 1.0 and True are one class, "1" another."""
    y = np.asarray(y).reshape(-1)
    labels = [_plain(c) for c in classes]
    if y.dtype.kind in "iufb" and all(isinstance(c, (int, float)) for c in labels):
        index = pd.Index(np.asarray(labels, dtype=np.float64))  # numbers: no object arrays
        positions = index.get_indexer(y.astype(np.float64))
    else:
        positions = pd.Index(labels, dtype=object).get_indexer(
            pd.Index(y.astype(object), dtype=object))
    if (positions < 0).any() and not unknown_ok:
        unknown = list(dict.fromkeys(_plain(v) for v in y[positions < 0]))
        shown = ", ".join(map(repr, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise UserError(f"{what} hold {shown}, which the model does not know: its classes are "
                        f"{', '.join(map(repr, labels))}; give the target as the model was "
                        "trained on it (e.g. yes/no mapped to 1/0 the same way)")
    return positions.astype(np.int64)


def soft_binary_targets(y, classes) -> bool:
    """Probabilities in [0, 1] as the targets of a binary model whose classes are 0 and 1
    (XGBoost's binary:logistic and CatBoost's CrossEntropy train on them): taken as they
    are, not as labels."""
    y = np.asarray(y)
    if y.dtype.kind != "f" or [_plain(c) for c in classes] != [0, 1]:
        return False
    finite = y[np.isfinite(y)]
    return bool(len(finite)) and finite.min() >= 0 and finite.max() <= 1 and \
        not np.isin(finite, (0.0, 1.0)).all()


def _plain(v) -> object:
    return v.item() if hasattr(v, "item") else v


def numeric(df: pd.DataFrame, name: str) -> np.ndarray:
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise UserError(f"{name}: column(s) {', '.join(map(str, bad))} are not numeric; a "
                        "torch model takes numbers only (encode them first)")
    arr = df.to_numpy(dtype=np.float32)
    if not np.isfinite(arr).all():
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise UserError(f"{name}: row {r}, column '{df.columns[c]}' is NaN/inf; a torch model "
                        "cannot take it")
    return arr


def torch_tables(config: dict, x_train: pd.DataFrame, y_train: pd.Series,
                 x_query: pd.DataFrame):
    """A torch model file's tables: float features and typed targets (class ids / floats)."""
    width = int(config["layers"][0])
    if x_train.shape[1] != width:
        raise UserError(f"the model takes {width} features, the training table has "
                        f"{x_train.shape[1]} ({', '.join(map(str, x_train.columns))})")
    xt, xq = numeric(x_train, "training rows"), numeric(x_query, "query rows")
    check_targets(x_train, y_train)
    yt = y_train.to_numpy()
    if config.get("loss", "ce") == "ce":
        outputs = max(int(config["layers"][-1]), 2)
        if not np.issubdtype(yt.dtype, np.integer) or yt.min() < 0 or yt.max() >= outputs:
            raise UserError(f"classification targets must be integers 0..{outputs - 1}")
        yt = yt.astype(np.int64)
    else:
        yt = yt.astype(np.float32).reshape(-1, 1)
    return xt, yt, xq


def _takes_missing(model) -> bool:
    return type(model).__module__.startswith(("xgboost", "lightgbm", "catboost")) or \
        type(model).__name__.startswith(("HistGradientBoosting", "RandomForest", "ExtraTrees",
                                          "DecisionTree"))


def library_tables(model, family: str, x_train: pd.DataFrame, y_train: pd.Series,
                   x_query: pd.DataFrame):
    """A tree or scikit-learn model's tables: columns checked against what it was trained
    on, missing values only where the library takes them, categories encoded as trained."""
    from datablame.models.loading import feature_names, n_features

    names, width = feature_names(model), n_features(model)
    if names is not None:
        x_train, x_query = model_columns(model, list(names), x_train, x_query)
    match_columns(x_query, x_train)
    if width is not None and width != x_train.shape[1]:
        raise UserError(f"the model takes {width} features, the training table has "
                        f"{x_train.shape[1]} ({', '.join(map(str, x_train.columns))})")
    check_targets(x_train, y_train)
    for name, frame in (("training rows", x_train), ("query rows", x_query)):
        values = frame.select_dtypes(include="number")
        if not _takes_missing(model) and values.isna().to_numpy().any():
            r, c = np.argwhere(values.isna().to_numpy())[0]
            raise UserError(f"{name}: row {r}, column '{values.columns[c]}' is NaN, and a "
                            f"{type(model).__name__} cannot take missing values")
    if type(model).__module__.startswith("catboost"):
        _check_catboost_categories(model, x_train, x_query)
    if family == "trees":
        x_train = encode_categories(model, x_train, "training rows")
        x_query = encode_categories(model, x_query, "query rows")
    # scikit-learn warns when a table's column names and its fit disagree: give it what it
    # was fitted on (names -> DataFrame, none -> array), so no warning reaches the output
    if type(model).__module__.startswith("sklearn") and \
            not hasattr(model, "feature_names_in_"):
        x_train, x_query = (f.to_numpy(dtype=np.float64) for f in (x_train, x_query))
    return x_train, y_train.to_numpy(), x_query


def model_columns(model, names: list[str], x_train: pd.DataFrame, x_query: pd.DataFrame
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tables' columns the model was trained on, in its order and under its names: a
    column it does not use (an id, another target) is left out with a note; LightGBM's
    renaming of blanks in a name to "_" ("monthly income" -> "monthly_income") is
    matched; a feature the table lacks is one line."""
    lightgbm = type(model).__module__.startswith("lightgbm")

    def named_as_the_model_names_it(column) -> str:
        return re.sub(r"\s", "_", str(column)) if lightgbm else str(column)

    picked = {}
    for frame_name, frame in (("training rows", x_train), ("query rows", x_query)):
        by_name = {str(c): c for c in frame.columns}  # an exact name wins over a renamed one
        for c in frame.columns:
            by_name.setdefault(named_as_the_model_names_it(c), c)
        missing = [n for n in names if n not in by_name]
        if missing:
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)"
                                               if len(missing) > 10 else "")
            raise UserError(f"{frame_name}: missing column(s) {shown}, which the model was "
                            f"trained on (feature columns must match the model)")
        source = [by_name[n] for n in names]
        picked[frame_name] = frame[source].set_axis(names, axis=1)
        left = [str(c) for c in frame.columns if c not in source]
        if left and frame_name == "training rows":
            from datablame import progress

            progress.note(f"using the model's {len(names)} feature columns; left out "
                          f"{', '.join(left)} (not features of the model)")
    return picked["training rows"], picked["query rows"]


def _check_catboost_categories(model, x_train: pd.DataFrame, x_query: pd.DataFrame) -> None:
    """CatBoost takes no missing value in a categorical column (its training could not
    have either: the blanks were filled with something, which only the user knows)."""
    for index in model.get_cat_feature_indices():
        for name, frame in (("training rows", x_train), ("query rows", x_query)):
            blank = frame.iloc[:, index].isna().to_numpy()
            if blank.any():
                raise UserError(f"{name}: row {int(np.flatnonzero(blank)[0])}, categorical "
                                f"column '{frame.columns[index]}' is blank ({int(blank.sum())}"
                                " blank in all), and CatBoost takes no missing category: "
                                "fill the blanks as they were filled for training (a "
                                "placeholder such as 'unknown'; note 'NA' reads as blank)")


def encode_categories(model, frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """`frame` with the model's categorical columns as pandas categories of training: blank
    cells are missing, and values never seen in training become missing too (as LightGBM and
    XGBoost treat them in memory), with a warning that names them."""
    from datablame.models.loading import trained_categories

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


def match_columns(x_query: pd.DataFrame, x_train: pd.DataFrame) -> pd.DataFrame:
    """The query's columns in the training order, matched by name; only missing or extra
    columns are refused (named)."""
    train_cols = list(x_train.columns)
    missing = [str(c) for c in train_cols if c not in x_query.columns]
    extra = [str(c) for c in x_query.columns if c not in train_cols]
    if missing or extra:
        parts = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + \
            ([f"extra column(s) {', '.join(extra)}"] if extra else [])
        raise UserError(f"query rows: {'; '.join(parts)} (the training rows have "
                        f"{', '.join(map(str, train_cols))})")
    return x_query[train_cols]


def split_query_target(x_query: pd.DataFrame, target: str, x_train: pd.DataFrame):
    """(query features, query target or None): a query table may carry the target column;
    its feature columns are put in the training order, matched by name."""
    y_query = None
    if target in x_query.columns:
        y_query = x_query[target]
        x_query = x_query.drop(columns=[target])
    if set(x_query.columns) == set(x_train.columns):
        x_query = x_query[list(x_train.columns)]
    return x_query, y_query
