"""Tree ensembles read through each library's own API.

Every supported model becomes the same description: for any rows, the leaf each row
reaches in every tree, `leaves(X) -> (n, T, K)` (T boosting rounds or trees, K outputs
per round), the value of every leaf, the additive bias, and for boosted models the
objective, learning rate and L2 penalty. Leaf ids come from the libraries themselves
(`pred_leaf`, `calc_leaf_indexes`, `apply`); leaf values from their dumps. The round trip
`bias + sum of leaf values == the library's raw prediction` is checked in the tests for
every library, so a parser that drifts from a library's semantics fails loudly.

Supported: XGBoost, LightGBM, CatBoost, scikit-learn GradientBoosting*,
HistGradientBoosting* (numeric and categorical splits, walked like its own predictor) and
RandomForest* / ExtraTrees* (leaves only: not boosted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from datablame.errors import UserError

OBJECTIVES = ("binary", "multiclass", "regression")


@dataclass
class TreeEnsembleAdapter:
    model: object
    family: str
    objective: str  # binary | multiclass | regression
    n_outputs: int  # K: 1 for binary/regression, classes for multiclass (and RF classes)
    boosted: bool
    learning_rate: float
    l2: float
    values: list[list[np.ndarray]]  # values[t][k][leaf id] -> leaf value
    bias: np.ndarray  # (K,)
    _boost_from_average: bool = False
    # Multiclass boosters scale the softmax hessian p(1-p) in their Newton steps:
    # LightGBM and scikit-learn GradientBoosting by K/(K-1), XGBoost by 2. Using the same
    # scale makes our leaf statistics sum to the library's own leaf values (tested).
    hessian_scale: float = 1.0

    # -- library dispatch --------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, x_reference, y_reference=None) -> TreeEnsembleAdapter:
        """Read `model`; `x_reference` (e.g. the training rows) fixes the additive bias as
        library prediction minus summed leaf values, which is the same for every row.
        With the training targets, LightGBM's starting score (folded into its first tree by
        boost_from_average) is moved back out into the bias."""
        name = type(model).__module__ + "." + type(model).__name__
        if name.startswith("xgboost."):
            ad = _from_xgboost(model)
        elif name.startswith("lightgbm."):
            ad = _from_lightgbm(model)
        elif name.startswith("catboost."):
            ad = _from_catboost(model)
        elif name.startswith("sklearn.ensemble"):
            ad = _from_sklearn(model)
        else:
            raise UserError(f"unsupported tree model {type(model).__name__} (XGBoost, "
                            "LightGBM, CatBoost or scikit-learn ensembles)")
        if ad.objective == "multiclass" and ad.boosted:
            k = ad.n_outputs
            ad.hessian_scale = {"lightgbm": k / (k - 1), "sklearn-gb": k / (k - 1),
                                "xgboost": 2.0}.get(ad.family, 1.0)
        if ad.boosted and ad.family != "sklearn-hgb":
            ad.bias = _empirical_bias(ad, x_reference)
        if ad.family == "lightgbm" and y_reference is not None and ad._boost_from_average:
            _unfold_lightgbm_init(ad, np.asarray(y_reference, dtype=np.float64))
        return ad

    @property
    def n_trees(self) -> int:
        return len(self.values)

    @property
    def shared_outputs(self) -> bool:
        """One tree gives all K outputs (forests' per-class values, CatBoost's multiclass
        leaves), so `leaves` repeats its id K times: count such a tree once."""
        return self.family in ("sklearn-rf", "catboost")

    def leaves(self, x) -> np.ndarray:
        """(n, T, K) leaf ids, from the library."""
        return _LEAVES[self.family](self, x)

    def leaf_values(self, leaves: np.ndarray) -> np.ndarray:
        """(n, T, K) the value each row receives from each tree."""
        out = np.empty(leaves.shape, dtype=np.float64)
        for t in range(leaves.shape[1]):
            for k in range(leaves.shape[2]):
                out[:, t, k] = self.values[t][k][leaves[:, t, k]]
        return out

    def raw_from_leaves(self, leaves: np.ndarray) -> np.ndarray:
        """(n, K) raw score rebuilt from leaves (RF: the mean of the trees' outputs)."""
        v = self.leaf_values(leaves)
        return v.mean(1) if not self.boosted else self.bias + v.sum(1)

    def library_raw(self, x) -> np.ndarray:
        """(n, K) the library's own raw prediction (margin / log-odds / value)."""
        return _RAW[self.family](self, x)

    # -- losses on the raw score ---------------------------------------------------------
    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        if self.objective == "binary":
            return 1 / (1 + np.exp(-raw))
        if self.objective == "multiclass":
            z = raw - raw.max(1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(1, keepdims=True)
        return raw

    def grad_hess(self, raw: np.ndarray, y: np.ndarray):
        """Per-row (n, K) gradient, hessian and third derivative of the loss w.r.t. raw."""
        y = np.asarray(y)
        if self.objective == "binary":
            p = self.probabilities(raw)
            yy = y.reshape(-1, 1).astype(float)
            h = p * (1 - p)
            return p - yy, h, h * (1 - 2 * p)
        if self.objective == "multiclass":
            p = self.probabilities(raw)
            onehot = np.eye(self.n_outputs)[y.astype(int)]
            h = self.hessian_scale * p * (1 - p)  # (scaled) diagonal of the softmax Hessian
            return p - onehot, h, h * (1 - 2 * p)
        r = raw - y.reshape(-1, 1)
        return r, np.ones_like(r), np.zeros_like(r)

    def losses(self, raw: np.ndarray, y) -> np.ndarray:
        y = np.asarray(y)
        if self.objective == "binary":
            z = raw[:, 0]
            return np.logaddexp(0, z) - y.astype(float) * z
        if self.objective == "multiclass":
            z = raw - raw.max(1, keepdims=True)
            lse = np.log(np.exp(z).sum(1))
            return lse - z[np.arange(len(y)), y.astype(int)]
        return 0.5 * (raw[:, 0] - y.astype(float)) ** 2

    def predict_targets(self, x) -> np.ndarray:
        raw = self.library_raw(x)
        if self.objective == "binary":
            return (raw[:, 0] > 0).astype(int)
        if self.objective == "multiclass":
            return raw.argmax(1)
        return raw[:, 0]


def _to_array(x) -> np.ndarray:
    return x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)


def _dense_table(pairs: dict[int, float]) -> np.ndarray:
    table = np.full(max(pairs) + 1, np.nan)
    for leaf, value in pairs.items():
        table[leaf] = value
    return table


def _empirical_bias(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    """Bias = library raw prediction - sum of leaf values (constant; tests check it is)."""
    raw = ad.library_raw(x)
    return (raw - ad.leaf_values(ad.leaves(x)).sum(1)).mean(0)


# -- XGBoost --------------------------------------------------------------------------------
def _from_xgboost(model) -> TreeEnsembleAdapter:
    booster = model.get_booster() if hasattr(model, "get_booster") else model
    config = json.loads(booster.save_config())
    learner = config["learner"]
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
    rounds = len(dumps) // k
    values = []
    for r in range(rounds):
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
            per_class.append(_dense_table(pairs))
        values.append(per_class)
    ad = TreeEnsembleAdapter(booster, "xgboost", objective, k, True,
                             float(train.get("learning_rate", train.get("eta", 0.3))),
                             float(train.get("reg_lambda", train.get("lambda", 1.0))),
                             values, np.zeros(k))
    return ad


def _xgb_dmatrix(x):
    import xgboost as xgb

    if hasattr(x, "dtypes") and any(str(t) == "category" for t in x.dtypes):
        return xgb.DMatrix(x, enable_categorical=True)
    return xgb.DMatrix(x)


def _xgb_leaves(ad, x):
    leaves = ad.model.predict(_xgb_dmatrix(x), pred_leaf=True).astype(np.int64)
    return leaves.reshape(leaves.shape[0], -1, ad.n_outputs)


def _xgb_raw(ad, x):
    raw = ad.model.predict(_xgb_dmatrix(x), output_margin=True)
    return raw.reshape(raw.shape[0], -1).astype(np.float64)


# -- LightGBM -------------------------------------------------------------------------------
def _lgb_param(text: str, key: str, default: float) -> float:
    for line in text.splitlines():
        if line.startswith(f"[{key}: "):
            return float(line.split(": ", 1)[1].rstrip("]"))
    return default


def _from_lightgbm(model) -> TreeEnsembleAdapter:
    booster = model.booster_ if hasattr(model, "booster_") else model
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
            per_class.append(_dense_table(pairs))
        values.append(per_class)
    text = booster.model_to_string()
    return TreeEnsembleAdapter(booster, "lightgbm", objective, k, True,
                               _lgb_param(text, "learning_rate", 0.1),
                               _lgb_param(text, "lambda_l2", 0.0), values, np.zeros(k),
                               _lgb_param(text, "boost_from_average", 1.0) > 0)


def _unfold_lightgbm_init(ad: TreeEnsembleAdapter, y: np.ndarray) -> None:
    """LightGBM adds its starting score (log-odds of the mean label, or the mean target) to
    every leaf of the first tree; gradients and Newton steps need it as the bias instead."""
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


def _lgb_leaves(ad, x):
    leaves = ad.model.predict(x, pred_leaf=True).astype(np.int64)
    return leaves.reshape(leaves.shape[0], -1, ad.n_outputs)


def _lgb_raw(ad, x):
    raw = ad.model.predict(x, raw_score=True)
    return np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)


# -- CatBoost -------------------------------------------------------------------------------
def _from_catboost(model) -> TreeEnsembleAdapter:
    params = model.get_all_params()
    loss = params.get("loss_function", "")
    if loss in ("Logloss", "CrossEntropy"):
        objective, k = "binary", 1
    elif loss == "MultiClass":
        objective, k = "multiclass", int(model.get_params().get("classes_count") or
                                         len(model.classes_))
    elif loss == "RMSE":
        objective, k = "regression", 1
    else:
        raise UserError(f"CatBoost loss '{loss}' is not supported (Logloss, MultiClass, RMSE)")
    if not model.is_fitted():
        raise UserError("the CatBoost model is not fitted")
    counts = model.get_tree_leaf_counts()
    flat = model.get_leaf_values()
    scale, _ = model.get_scale_and_bias()
    values, pos = [], 0
    for count in counts:
        block = flat[pos:pos + count * k].reshape(count, k) * scale
        pos += count * k
        values.append([block[:, c].astype(np.float64) for c in range(k)])
    return TreeEnsembleAdapter(model, "catboost", objective, k, True,
                               float(params.get("learning_rate", 0.03)),
                               float(params.get("l2_leaf_reg", 3.0)), values, np.zeros(k))


def _cb_pool(ad, x):
    from catboost import Pool

    cats = ad.model.get_cat_feature_indices()
    return Pool(x, cat_features=cats or None)


def _cb_leaves(ad, x):
    leaves = ad.model.calc_leaf_indexes(_cb_pool(ad, x)).astype(np.int64)
    return np.repeat(leaves[:, :, None], ad.n_outputs, axis=2)


def _cb_raw(ad, x):
    raw = ad.model.predict(_cb_pool(ad, x), prediction_type="RawFormulaVal")
    return np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)


# -- scikit-learn ---------------------------------------------------------------------------
def _from_sklearn(model) -> TreeEnsembleAdapter:
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
                                   np.zeros(k))
    if isinstance(model, (ens.HistGradientBoostingClassifier,
                          ens.HistGradientBoostingRegressor)):
        if model.loss not in ("log_loss", "squared_error"):
            raise UserError(f"HistGradientBoosting loss '{model.loss}' is not supported")
        values = [[pred.nodes["value"].astype(np.float64) for pred in row]
                  for row in model._predictors]
        bias = np.asarray(model._baseline_prediction, dtype=np.float64).reshape(-1)
        return TreeEnsembleAdapter(model, "sklearn-hgb", objective, k, True,
                                   model.learning_rate, float(model.l2_regularization), values,
                                   bias)
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
                                   "regression", k_rf, False, 0.0, 0.0, values, np.zeros(k_rf))
    raise UserError(f"unsupported scikit-learn model {type(model).__name__}")


def _sk_gb_leaves(ad, x):
    # GradientBoosting.apply validates against its inner trees, fitted without column
    # names: a DataFrame there warns "X has feature names" even when the model has them
    leaves = ad.model.apply(_to_array(x) if hasattr(x, "columns") else x)
    return leaves.reshape(leaves.shape[0], leaves.shape[1], -1).astype(np.int64)


def _sk_gb_raw(ad, x):
    raw = ad.model.decision_function(x) if ad.objective != "regression" else \
        ad.model.predict(x)
    return np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)


def _sk_rf_leaves(ad, x):
    leaves = ad.model.apply(x).astype(np.int64)
    return np.repeat(leaves[:, :, None], ad.n_outputs, axis=2)


def _sk_rf_raw(ad, x):
    out = ad.model.predict_proba(x) if hasattr(ad.model, "predict_proba") else \
        ad.model.predict(x)
    return np.asarray(out, dtype=np.float64).reshape(len(out), -1)


def _bit(bitsets: np.ndarray, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Is category `codes[i]` in bitset `rows[i]` (8 x uint32 = 256 categories)?"""
    ok = (codes >= 0) & (codes < 256)
    c = np.where(ok, codes, 0)
    return ok & ((bitsets[rows, c // 32] >> (c % 32).astype(np.uint32)) & 1).astype(bool)


def _sk_hgb_leaves(ad, x):
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


def _sk_hgb_raw(ad, x):
    raw = ad.model._raw_predict(x)
    return np.asarray(raw, dtype=np.float64).reshape(len(raw), -1)


_LEAVES = {"xgboost": _xgb_leaves, "lightgbm": _lgb_leaves, "catboost": _cb_leaves,
           "sklearn-gb": _sk_gb_leaves, "sklearn-hgb": _sk_hgb_leaves,
           "sklearn-rf": _sk_rf_leaves}
_RAW = {"xgboost": _xgb_raw, "lightgbm": _lgb_raw, "catboost": _cb_raw,
        "sklearn-gb": _sk_gb_raw, "sklearn-hgb": _sk_hgb_raw, "sklearn-rf": _sk_rf_raw}
