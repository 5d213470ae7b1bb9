"""Tabular attribution for torch models: rows in, ranked training rows out.

    from datablame.tabular import attribute
    df = attribute(model, X_train, y_train, X_query, loss="ce", method="if-exact", l2=1e-2)

`model` is any trained `torch.nn.Module` mapping a float feature matrix to outputs
(logits for "ce", predictions for "mse"). Query targets default to the model's own
prediction (what it *said*, as in the seed); pass `y_query` to explain the true label.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from datablame.adapters.torch_module import TorchModelAdapter
from datablame.errors import UserError
from datablame.methods.registry import get_method


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
                    "ensemble (XGBoost, LightGBM, CatBoost, scikit-learn) or a scikit-learn "
                    "linear model")


def score_matrix(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
                 method: str = "auto", l2: float = 0.0, **method_params) -> np.ndarray:
    """(n_query, n_train) scores; positive = the row helped produce the query's target.

    `model`: a torch module (with `loss` and the `l2` it was trained with), a tree
    ensemble, or a scikit-learn linear model. `method="auto"` picks the measured default
    for the family (if-exact, leaf-share / knn-shapley for forests, linear-exact).
    """
    return _fit_and_score(model, x_train, y_train, x_query, y_query, loss=loss,
                          method=method, l2=l2, **method_params)[1]


def _fit_and_score(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
                   method: str = "auto", l2: float = 0.0, **method_params):
    """(fitted method, scores, query targets) for `score_matrix` and `attribute`."""
    family = _family_of(model)
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
    if y_query is None:
        y_query = model.predict(x_query) if family == "linear" else \
            adapter.predict_targets(x_query)
    est = get_method(method, **method_params).fit(adapter, x_train, y_train)
    return est, est.scores(x_query, y_query), y_query


def attribute(model, x_train, y_train, x_query, y_query=None, *, loss="ce",
              method: str = "auto", l2: float = 0.0, top_k: int = 10,
              **method_params) -> pd.DataFrame:
    """Top-k training rows per query: query, rank, row, score, target, the method's reason
    (e.g. "same leaf in 37/100 trees; removing it: query loss +0.012"), then the row's
    features."""
    est, scores, y_query = _fit_and_score(model, x_train, y_train, x_query, y_query,
                                          loss=loss, method=method, l2=l2, **method_params)
    features = x_train if isinstance(x_train, pd.DataFrame) else pd.DataFrame(
        np.asarray(x_train), columns=[f"x{j}" for j in range(np.asarray(x_train).shape[1])])
    target = y_train.to_numpy() if hasattr(y_train, "to_numpy") else np.asarray(y_train)
    return _frame(scores, features, target, top_k, est, x_query, y_query)


def load_model_file(path, trust_pickle: bool = False):
    """Dispatch on the file type; returns (family, model, config): family is "torch",
    "trees" (boosted or forest) or "linear"."""
    from pathlib import Path

    from datablame.model_files import load_torch_model
    from datablame.tree_models import load_tree_or_linear

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


def _load_all(train_file, target, model_file, query_file, trust_pickle=False):
    from datablame.rows import load_table

    family, model, config = load_model_file(model_file, trust_pickle)
    x_train, y_train = load_table(train_file, target)
    x_query, y_query = load_table(query_file)
    if target in x_query.columns:
        y_query = x_query[target]
        x_query = x_query.drop(columns=[target])
    if family == "torch":
        xt, yt, xq = prepare_torch_inputs(model, config, x_train, y_train, x_query)
        adapter = TorchModelAdapter(model, config.get("loss", "ce"),
                                    float(config.get("train", {}).get("l2", 0.0)))
    else:
        xt, yt, xq = _prepare_sklearn_like(model, family, x_train, y_train, x_query)
        adapter = _tree_or_linear_adapter(model, family, xt, yt)
    if list(x_query.columns) != list(x_train.columns):
        raise UserError("query columns do not match the training feature columns: "
                        f"{list(x_query.columns)} vs {list(x_train.columns)}")
    return family, model, config, adapter, x_train, xt, yt, xq, y_query


def _prepare_sklearn_like(model, family, x_train, y_train, x_query):
    from datablame.tree_models import feature_names, n_features

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
    features_t = x_train if family == "trees" else x_train.to_numpy(dtype=np.float64)
    features_q = x_query if family == "trees" else x_query.to_numpy(dtype=np.float64)
    return features_t, y_train.to_numpy(), features_q


def _tree_or_linear_adapter(model, family, x, y):
    from datablame.adapters.trees import TreeEnsembleAdapter

    if family == "trees":
        return TreeEnsembleAdapter.from_model(model, x, y)
    return type("LinearAdapter", (), {"model": model})()


def run_tabular(train_file, target, model_file, query_file, *, method: str = "auto",
                top_k: int = 5, true_label: bool = False, trust_pickle: bool = False):
    """The CLI's `tabular` command: (ranked rows DataFrame, full score matrix)."""
    family, model, config, adapter, x_train, xt, yt, xq, y_query = _load_all(
        train_file, target, model_file, query_file, trust_pickle)
    method = _default_method(family, adapter) if method == "auto" else method
    if true_label:
        if y_query is None:
            raise UserError(f"--true-label needs the target column '{target}' in the "
                            "query rows")
        yq = y_query.to_numpy()
        if family == "torch":
            yq = yq.astype(yt.dtype).reshape(-1, *yt.shape[1:])
    elif family == "linear":
        yq = model.predict(xq)
    else:
        yq = adapter.predict_targets(xq)
        if family == "torch" and yt.ndim == 1:
            yq = yq.long().numpy()
        elif family == "torch":
            yq = yq.numpy()
    est = get_method(method).fit(adapter, xt, yt)
    scores = est.scores(xq, yq)
    return _frame(scores, x_train, yt, top_k, est, xq, yq), scores


def _frame(scores: np.ndarray, x_train: pd.DataFrame, y_train, top_k: int, est, x_query,
           y_query):
    """query, rank, row, score, target, the method's reason, then the row's features."""
    target = np.asarray(y_train).reshape(len(x_train), -1)[:, 0]
    k = min(top_k, scores.shape[1])
    tops = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    reasons = est.reasons(x_query, y_query, tops, scores)
    frames = []
    for q, top in enumerate(tops):
        frame = pd.DataFrame({"query": q, "rank": np.arange(1, k + 1), "row": top,
                              "score": scores[q, top], "target": target[top],
                              "reason": reasons[q]})
        frames.append(pd.concat([frame, x_train.iloc[top].reset_index(drop=True)], axis=1))
    df = pd.concat(frames, ignore_index=True)
    df.attrs["method"] = est.name
    return df


def run_verify(train_file, target, model_file, query_file, *, method: str, lds_subsets: int,
               remove_k: int, loo_rows: list[int], out, cache=None,
               trust_pickle: bool = False) -> dict:
    """The CLI's `verify` command: retrain with the model's own settings and compare."""
    from pathlib import Path

    from datablame import verify

    family, model, config, adapter, _, xt, yt, xq, y_query = _load_all(
        train_file, target, model_file, query_file, trust_pickle)
    method = _default_method(family, adapter) if method == "auto" else method
    if y_query is None:
        raise UserError(f"verify needs the target column '{target}' in the query rows")
    yq = y_query.to_numpy()
    if family == "torch":
        from datablame.model_files import trainer_from_config

        yq = yq.astype(yt.dtype).reshape(-1, *yt.shape[1:])
        trainer = trainer_from_config(config)

        def retrain(rows, seed):
            return trainer.query_losses(xt, yt, xq, yq, rows=rows, seed=seed)

        base_loss = adapter.losses(xq, yq)
    else:
        from datablame.tree_models import retrainer

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
    if cache_dir:
        cache_dir.mkdir(parents=True, exist_ok=True)
    if lds_subsets > 0:
        subsets = verify.SubsetRetraining(
            retrain, len(yt), n_subsets=lds_subsets,
            cache=cache_dir / f"subsets-{lds_subsets}.json" if cache_dir else None)
        result["lds"] = verify.lds(scores, subsets)
    if remove_k > 0:
        q = int(np.argmax(result["query_loss"]))
        result["remove_top_k"] = verify.remove_top_k(retrain, len(yt), scores[q], q, remove_k)
    if loo_rows:
        bad = [r for r in loo_rows if not 0 <= r < len(yt)]
        if bad:
            raise UserError(f"leave-one-out rows out of range: {bad}")
        loo = verify.leave_one_out(retrain, len(yt), loo_rows)
        loo["predicted"] = {str(r): scores[:, r].tolist() for r in loo_rows}
        result["leave_one_out"] = loo
    verify.save(result, out)
    return result
