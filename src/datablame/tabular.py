"""Tabular attribution: rows in, ranked training rows out.

    from datablame.tabular import attribute
    df = attribute(model, X_train, y_train, X_query, loss="ce", method="if-exact", l2=1e-2)

`model` is a trained `torch.nn.Module` mapping a float feature matrix to outputs (logits
for "ce", predictions for "mse"), a tree ensemble or a scikit-learn linear model. Without
`y_query`: a classifier's query target is its own predicted label (what it *said*, as in the
seed); a regression model's prediction is explained itself (each row's contribution to the
predicted value, positive = the row raised it), since the squared loss of a prediction
against itself is flat. Pass `y_query` to explain the loss of the true target instead.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from datablame.errors import UserError, check_at_least
from datablame.methods.registry import METHODS, check_fits, get_method
from datablame.models.torch_module import TorchModelAdapter

# A query whose every score is at most this is not ranked (ties of zeros are no answer).
ZERO = 1e-12

# df.attrs["explains"] -> the table title's wording.
EXPLAINS = {"prediction": "the prediction", "predicted label": "the predicted label",
            "target": "the given target", "prediction as target": "the predicted value "
            "as target"}


def _check_rows(x, name: str) -> None:
    arr = x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)
    if arr.ndim != 2:
        raise UserError(f"{name} must be a 2-D table of features, got shape {arr.shape}")
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise UserError(f"{name} has a NaN/inf at row {r}, column {c}: a torch model "
                        "cannot take it")


def _family_of(model) -> str:
    if isinstance(model, torch.nn.Module):
        return "torch"
    module = type(model).__module__
    if module.startswith("sklearn.linear_model"):
        return "linear"
    if module.startswith(("sklearn.ensemble", "xgboost", "lightgbm", "catboost")):
        return "trees"
    raise UserError(f"unsupported model {type(model).__name__}: a torch module, a tree "
                    "ensemble (XGBoost, LightGBM, CatBoost or scikit-learn) or a scikit-learn "
                    "linear model")


def method_family(family: str, model) -> str:
    """The FAMILY_METHODS key: trees split into boosted ensembles and forests."""
    if family == "trees":
        forest = type(model).__name__.startswith(("RandomForest", "ExtraTrees"))
        return "forest" if forest else "boosted-trees"
    return family


def _is_regression(family: str, model, adapter) -> bool:
    if family == "trees":
        return adapter.objective == "regression"
    if family == "linear":
        from sklearn.base import is_regressor

        return is_regressor(model)
    return adapter.loss == "mse"


def _predicted(family: str, model, adapter, x_query, y_train=None):
    """The model's own answer for each query, typed like the training targets."""
    if family == "linear":
        return model.predict(x_query)
    yq = adapter.predict_targets(x_query)
    if family == "torch" and y_train is not None:
        yq = yq.numpy()
        yt = np.asarray(y_train)
        if yt.ndim == 1 and np.issubdtype(yt.dtype, np.integer):
            yq = yq.astype(np.int64)
    return yq


def _query_scores(est, family: str, model, adapter, x_query, y_query, y_train=None):
    """(scores, query targets used, what was explained); see the module docstring."""
    if y_query is not None:
        return est.scores(x_query, y_query), y_query, "target"
    yq = _predicted(family, model, adapter, x_query, y_train)
    if not _is_regression(family, model, adapter):
        return est.scores(x_query, yq), yq, "predicted label"
    if est.explains_prediction:
        return est.prediction_scores(x_query), yq, "prediction"
    return est.scores(x_query, yq), yq, "prediction as target"


def score_matrix(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
                 method: str = "auto", l2: float = 0.0, **method_params) -> np.ndarray:
    """(n_query, n_train) scores; positive = the row helped produce the query's target
    (regression without `y_query`: the row raised the predicted value).

    `model`: a torch module (with `loss` and the `l2` it was trained with), a tree
    ensemble, or a scikit-learn linear model. `method="auto"` picks the measured default
    for the family (if-exact, leaf-share / knn-shapley for forests, linear-exact).
    """
    return _fit_and_score(model, x_train, y_train, x_query, y_query, loss=loss,
                          method=method, l2=l2, **method_params)[1]


def _fit_and_score(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
                   method: str = "auto", l2: float = 0.0, **method_params):
    """(fitted method, scores, query targets, explains) for `score_matrix` and
    `attribute`."""
    family = _family_of(model)
    if method != "auto":
        check_fits(method, method_family(family, model))  # before any work
    if family == "torch":
        _check_rows(x_train, "training rows")
        _check_rows(x_query, "query rows")
    if len(x_train) != len(y_train):
        raise UserError(f"{len(x_train)} training rows but {len(y_train)} targets")
    if family == "torch":
        adapter = TorchModelAdapter(model, loss, l2)
    else:
        y_arr = y_train.to_numpy() if hasattr(y_train, "to_numpy") else np.asarray(y_train)
        adapter = _tree_or_linear_adapter(model, family, x_train, y_arr)
        y_train = y_arr
    if method == "auto":
        method = _default_method(family, adapter)
    est = get_method(method, **method_params).fit(adapter, x_train, y_train)
    scores, yq, explains = _query_scores(est, family, model, adapter, x_query, y_query)
    return est, scores, yq, explains


def attribute(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
              method: str = "auto", l2: float = 0.0, top_k: int = 10,
              **method_params) -> pd.DataFrame:
    """Top-k training rows per query: query, rank, row, score, target, the method's reason
    (e.g. "same leaf in 37/100 trees; removing it: query loss +0.012"), then the row's
    features. `df.attrs["explains"]` says what the scores are of; queries whose every score
    is zero are not ranked (listed in `df.attrs["all_zero_queries"]`, with a warning)."""
    check_at_least("top_k", top_k, 1)
    est, scores, y_query, explains = _fit_and_score(
        model, x_train, y_train, x_query, y_query, loss=loss, method=method, l2=l2,
        **method_params)
    features = x_train if isinstance(x_train, pd.DataFrame) else pd.DataFrame(
        np.asarray(x_train), columns=[f"x{j}" for j in range(np.asarray(x_train).shape[1])])
    target = y_train.to_numpy() if hasattr(y_train, "to_numpy") else np.asarray(y_train)
    df = _frame(scores, features, target, top_k, est, x_query, y_query, explains)
    if df.attrs["all_zero_queries"]:
        warnings.warn(zero_message(df.attrs["all_zero_queries"]), UserWarning, stacklevel=2)
    return df


def zero_message(queries: list[int]) -> str:
    rows = ", ".join(map(str, queries))
    return (f"query row(s) {rows}: every score is zero, so no training row is ranked (nothing "
            "moves what is explained; e.g. a target equal to the prediction has a flat loss)")


def load_model_file(path, trust_pickle: bool = False):
    """Dispatch on the file type; returns (family, model, config): family is "torch",
    "trees" (boosted or forest) or "linear"."""
    from pathlib import Path

    from datablame.models.torch_files import load_torch_model
    from datablame.models.trees.files import load_tree_or_linear

    path = Path(path)
    if path.suffix == ".safetensors":
        model, config = load_torch_model(path)
        return "torch", model, config
    model = load_tree_or_linear(path, trust_pickle)
    module = type(model).__module__
    if module.startswith("sklearn.linear_model"):
        return "linear", model, None
    if module.startswith(("sklearn.ensemble", "xgboost", "lightgbm", "catboost")):
        return "trees", model, None
    raise UserError(f"{path}: a {type(model).__name__} is not a supported model")


# Chosen by measurement against retraining (bench/tabular_influence.py,
# bench/tree_influence.py): see the README's method table.
DEFAULTS = {"torch": "if-exact", "trees": "leaf-share", "linear": "linear-exact"}


def _default_method(family: str, adapter) -> str:
    """The measured default per family (bench/); forests are not boosted: knn-shapley
    (held-out LDS 0.23 vs leaf-sim 0.14, bench/tree_defaults.py)."""
    if family == "trees" and not adapter.boosted:
        return "knn-shapley"
    return DEFAULTS[family]


def _numeric(df: pd.DataFrame, name: str) -> np.ndarray:
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


def prepare_torch_inputs(model, config, x_train: pd.DataFrame, y_train, x_query: pd.DataFrame):
    """Check the tables against the model; return float features and typed targets."""
    width = int(config["layers"][0])
    if x_train.shape[1] != width:
        raise UserError(f"the model takes {width} features, the training table has "
                        f"{x_train.shape[1]} ({', '.join(map(str, x_train.columns))})")
    xt, xq = _numeric(x_train, "training rows"), _numeric(x_query, "query rows")
    if y_train.isna().any():
        raise UserError(f"target is missing at row {int(np.flatnonzero(y_train.isna())[0])}")
    yt = y_train.to_numpy()
    if config.get("loss", "ce") == "ce":
        outputs = int(config["layers"][-1])
        if not np.issubdtype(yt.dtype, np.integer) or yt.min() < 0 or yt.max() >= max(outputs,
                                                                                     2):
            raise UserError(f"classification targets must be integers 0..{max(outputs, 2) - 1}")
        yt = yt.astype(np.int64)
    else:
        yt = yt.astype(np.float32).reshape(-1, 1)
    return xt, yt, xq


def parse_rows(text: str, option: str = "--loo") -> list[int]:
    """'3,17' -> [3, 17]; anything else is one line, before any work."""
    rows = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            rows.append(int(item))
        except ValueError:
            raise UserError(f"{option} expects comma-separated row numbers, got "
                            f"'{item.strip()}'") from None
        if rows[-1] < 0:
            raise UserError(f"{option}: row numbers start at 0, got {rows[-1]}")
    return rows


def _check_inputs(train_file, model_file, query_file, method: str) -> None:
    """What can be checked without loading anything: files exist, the method is known."""
    from pathlib import Path

    for what, path in (("training file", train_file), ("model file", model_file),
                       ("query file", query_file)):
        if not Path(path).exists():
            raise UserError(f"{what} not found: {path}")
    if method != "auto" and method not in METHODS:
        raise UserError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def _match_columns(x_query: pd.DataFrame, x_train: pd.DataFrame) -> pd.DataFrame:
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


def _load_all(train_file, target, model_file, query_file, trust_pickle=False,
              method: str = "auto"):
    from datablame.data.rows import load_table

    family, model, config = load_model_file(model_file, trust_pickle)
    if method != "auto":
        check_fits(method, method_family(family, model))  # before the data are read
    x_train, y_train = load_table(train_file, target)
    x_query, y_query = load_table(query_file)
    if target in x_query.columns:
        y_query = x_query[target]
        x_query = x_query.drop(columns=[target])
    if set(x_query.columns) == set(x_train.columns):
        x_query = x_query[list(x_train.columns)]  # matched by name, not by position
    if family == "torch":
        xt, yt, xq = prepare_torch_inputs(model, config, x_train, y_train, x_query)
        adapter = TorchModelAdapter(model, config.get("loss", "ce"),
                                    float(config.get("train", {}).get("l2", 0.0)))
    else:
        xt, yt, xq = _prepare_sklearn_like(model, family, x_train, y_train, x_query)
        adapter = _tree_or_linear_adapter(model, family, xt, yt)
    _match_columns(x_query, x_train)  # after the training table is checked against the model
    return family, model, config, adapter, x_train, xt, yt, xq, y_query


def _prepare_sklearn_like(model, family, x_train, y_train, x_query):
    from datablame.models.trees.files import encode_categories, feature_names, n_features

    names, width = feature_names(model), n_features(model)
    if names is not None and list(names) != list(map(str, x_train.columns)):
        raise UserError(f"feature columns do not match the model: the model was trained on "
                        f"{names}, the table has {list(map(str, x_train.columns))}")
    if width is not None and width != x_train.shape[1]:
        raise UserError(f"the model takes {width} features, the training table has "
                        f"{x_train.shape[1]} ({', '.join(map(str, x_train.columns))})")
    if y_train.isna().any():
        raise UserError(f"target is missing at row {int(np.flatnonzero(y_train.isna())[0])}")
    takes_nan = type(model).__module__.startswith(("xgboost", "lightgbm", "catboost")) or \
        type(model).__name__.startswith(("HistGradientBoosting", "RandomForest", "ExtraTrees",
                                          "DecisionTree"))
    for name, frame in (("training rows", x_train), ("query rows", x_query)):
        numeric = frame.select_dtypes(include="number")
        if not takes_nan and numeric.isna().to_numpy().any():
            r, c = np.argwhere(numeric.isna().to_numpy())[0]
            raise UserError(f"{name}: row {r}, column '{numeric.columns[c]}' is NaN, and a "
                            f"{type(model).__name__} cannot take missing values")
    if family == "trees":
        x_train = encode_categories(model, x_train, "training rows")
        x_query = encode_categories(model, x_query, "query rows")
    # scikit-learn warns when a table's column names and its fit disagree: give it what it
    # was fitted on (names -> DataFrame, none -> array), so no warning reaches the output
    if type(model).__module__.startswith("sklearn") and \
            not hasattr(model, "feature_names_in_"):
        x_train, x_query = (f.to_numpy(dtype=np.float64) for f in (x_train, x_query))
    return x_train, y_train.to_numpy(), x_query


def _tree_or_linear_adapter(model, family, x, y):
    from datablame.models.trees.base import TreeEnsembleAdapter

    if family == "trees":
        return TreeEnsembleAdapter.from_model(model, x, y)
    return type("LinearAdapter", (), {"model": model})()


def check_tabular_options(train_file, model_file, query_file, *, method: str, top_k: int,
                          out=None) -> None:
    """Everything `tabular` can refuse before loading a model or a row."""
    from datablame.outputs import check_output_file, is_npy

    _check_inputs(train_file, model_file, query_file, method)
    check_at_least("--top-k", top_k, 1)
    if out is not None:
        check_output_file(out, "--out", suffix=".npy", ours=is_npy,
                          what=" (the score matrix is written as a NumPy array)")


def run_tabular(train_file, target, model_file, query_file, *, method: str = "auto",
                top_k: int = 5, true_label: bool = False, trust_pickle: bool = False,
                out=None):
    """The CLI's `tabular` command: (ranked rows DataFrame, full score matrix); `out`
    (.npy) gets the score matrix, at exactly that path."""
    check_tabular_options(train_file, model_file, query_file, method=method, top_k=top_k,
                          out=out)
    family, model, config, adapter, x_train, xt, yt, xq, y_query = _load_all(
        train_file, target, model_file, query_file, trust_pickle, method)
    method = _default_method(family, adapter) if method == "auto" else method
    check_fits(method, method_family(family, model))
    yq = None
    if true_label:
        if y_query is None:
            raise UserError(f"--true-label needs the target column '{target}' in the "
                            "query rows")
        yq = y_query.to_numpy()
        if family == "torch":
            yq = yq.astype(yt.dtype).reshape(-1, *yt.shape[1:])
    est = get_method(method).fit(adapter, xt, yt)
    scores, yq, explains = _query_scores(est, family, model, adapter, xq, yq, yt)
    if out is not None:
        from pathlib import Path

        from datablame.outputs import save_npy

        save_npy(Path(out), scores)
    return _frame(scores, x_train, yt, top_k, est, xq, yq, explains), scores


def _frame(scores: np.ndarray, x_train: pd.DataFrame, y_train, top_k: int, est, x_query,
           y_query, explains: str = "target"):
    """query, rank, row, score, target, the method's reason, then the row's features.

    A query whose scores are all (numerically) zero has no ranking: its rows are left out
    and it is listed in attrs["all_zero_queries"] (ties of zeros would list rows 0, 1, 2)."""
    target = np.asarray(y_train).reshape(len(x_train), -1)[:, 0]
    k = min(top_k, scores.shape[1])
    tops = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    reasons = est.reasons(x_query, y_query, tops, scores)
    zero = [q for q in range(len(scores)) if np.abs(scores[q]).max(initial=0.0) <= ZERO]
    frames = []
    for q, top in enumerate(tops):
        if q in zero:
            continue
        frame = pd.DataFrame({"query": q, "rank": np.arange(1, k + 1), "row": top,
                              "score": scores[q, top], "target": target[top],
                              "reason": reasons[q]})
        frames.append(pd.concat([frame, x_train.iloc[top].reset_index(drop=True)], axis=1))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["query", "rank", "row", "score", "target", "reason", *x_train.columns])
    df.attrs.update(method=est.name, explains=explains, all_zero_queries=zero,
                    n_queries=len(scores))
    return df


def check_verify_options(train_file, model_file, query_file, *, method: str,
                         lds_subsets: int, remove_k: int, out, cache=None) -> None:
    """Everything `verify` can refuse before loading a model or retraining anything."""
    from datablame.outputs import check_output_dir, check_output_file, is_json_with

    _check_inputs(train_file, model_file, query_file, method)
    for option, value in (("--lds-subsets", lds_subsets), ("--remove-top-k", remove_k)):
        check_at_least(option, value, 0)
    if lds_subsets == 1:
        raise UserError("--lds-subsets needs at least 2 subsets (a correlation), got 1")
    check_output_file(out, "--out", ours=is_json_with("method", "n_train", "query_loss"))
    if cache:
        check_output_dir(cache, "--cache")


def run_verify(train_file, target, model_file, query_file, *, method: str, lds_subsets: int,
               remove_k: int, loo_rows: list[int], out, cache=None,
               trust_pickle: bool = False) -> dict:
    """The CLI's `verify` command: retrain with the model's own settings and compare; the
    JSON at `out` holds the numbers and their verdicts."""
    from pathlib import Path

    from datablame import verify

    check_verify_options(train_file, model_file, query_file, method=method,
                         lds_subsets=lds_subsets, remove_k=remove_k, out=out, cache=cache)
    family, model, config, adapter, _, xt, yt, xq, y_query = _load_all(
        train_file, target, model_file, query_file, trust_pickle, method)
    method = _default_method(family, adapter) if method == "auto" else method
    check_fits(method, method_family(family, model))
    if y_query is None:
        raise UserError(f"verify needs the target column '{target}' in the query rows")
    bad = [r for r in loo_rows if not 0 <= r < len(yt)]
    if bad:
        raise UserError(f"leave-one-out rows out of range (0..{len(yt) - 1}): {bad}")
    if remove_k >= len(yt):
        raise UserError(f"--remove-top-k {remove_k} would remove every training row "
                        f"({len(yt)})")
    yq = y_query.to_numpy()
    if family == "torch":
        from datablame.models.torch_files import trainer_from_config

        yq = yq.astype(yt.dtype).reshape(-1, *yt.shape[1:])
        trainer = trainer_from_config(config)

        def retrain(rows, seed):
            return trainer.query_losses(xt, yt, xq, yq, rows=rows, seed=seed)

        base_loss = adapter.losses(xq, yq)
    else:
        from datablame.models.trees.files import retrainer

        fit = retrainer(model)

        def take(a, rows):
            return a.iloc[rows] if hasattr(a, "iloc") else a[rows]

        def loss_of(m, rows):
            if family == "linear":
                pred = m.predict_proba(xq)[:, 1] if hasattr(m, "predict_proba") else \
                    m.predict(xq)
                if hasattr(m, "predict_proba"):
                    p = np.clip(np.where(yq == m.classes_[1], pred, 1 - pred), 1e-12, 1)
                    return -np.log(p)
                return (pred - yq) ** 2
            ad = _tree_or_linear_adapter(m, family, take(xt, rows), take(yt, rows))
            return ad.losses(ad.library_raw(xq), yq)

        def retrain(rows, seed):
            return loss_of(fit(take(xt, rows), take(yt, rows)), rows)

        base_loss = loss_of(model, np.arange(len(yt)))
    scores = get_method(method).fit(adapter, xt, yt).scores(xq, yq)
    result: dict = {"method": method, "n_train": len(yt), "n_query": len(yq),
                    "query_loss": np.asarray(base_loss).tolist()}
    cache_dir = Path(cache) if cache else None
    if lds_subsets > 0:
        subsets = verify.SubsetRetraining(
            retrain, len(yt), n_subsets=lds_subsets,
            cache=cache_dir / f"subsets-{lds_subsets}.json" if cache_dir else None)
        result["lds"] = verify.lds(scores, subsets)
        result["lds"]["reading"] = verify.lds_reading(result["lds"]["lds"],
                                                      result["lds"]["ci95"])
    if remove_k > 0:
        q = int(np.argmax(result["query_loss"]))
        r = verify.remove_top_k(retrain, len(yt), scores[q], q, remove_k)
        r["verdict"], r["summary"] = verify.remove_top_k_verdict(r)
        result["remove_top_k"] = r
    if loo_rows:
        loo = verify.leave_one_out(retrain, len(yt), loo_rows)
        loo["predicted"] = {str(r): scores[:, r].tolist() for r in loo_rows}
        result["leave_one_out"] = loo
    verify.save(result, out)
    return result
