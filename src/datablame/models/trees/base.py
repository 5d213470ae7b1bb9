"""Tree ensembles read through each library's own API.

Every supported model becomes the same description: for any rows, the leaf each row
reaches in every tree, `leaves(X) -> (n, T, K)` (T boosting rounds or trees, K outputs
per round), the value of every leaf, the additive bias, and for boosted models the
objective, learning rate and L2 penalty. Leaf ids come from the libraries themselves
(`pred_leaf`, `calc_leaf_indexes`, `apply`); leaf values from their dumps. The round trip
`bias + sum of leaf values == the library's raw prediction` is checked in the tests for
every library, so a parser that drifts from a library's semantics fails loudly.

One file per library in this package (`xgboost.py`, `lightgbm.py`, `catboost.py`,
`sklearn.py`), each with the same functions: `read(model)` -> TreeEnsembleAdapter,
`load(path)`, `retrainer(model)`, `categories(model)`; `libraries.py` dispatches. The
Newton statistics every boosted-tree method needs (staged raw scores, per-round gradients
and hessians, leaf hessian sums) live here, next to the description they are computed from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from datablame.errors import UserError
from datablame.models.base import LEAVES, NEWTON, TABULAR

OBJECTIVES = ("binary", "multiclass", "regression")


@dataclass
class TreeEnsembleAdapter:
    model: object
    family: str  # the library and kind: xgboost, lightgbm, catboost, sklearn-gb/-hgb/-rf
    objective: str  # binary | multiclass | regression
    n_outputs: int  # K: 1 for binary/regression, classes for multiclass (and RF classes)
    boosted: bool
    learning_rate: float
    l2: float
    values: list[list[np.ndarray]]  # values[t][k][leaf id] -> leaf value
    bias: np.ndarray  # (K,)
    leaves_fn: Callable = field(default=None, repr=False)  # (adapter, x) -> (n, T, K) ids
    raw_fn: Callable = field(default=None, repr=False)  # (adapter, x) -> (n, K) raw score
    # the bias is read off the library's prediction (False where the model stores it)
    empirical_bias: bool = True
    # Multiclass boosters scale the softmax hessian p(1-p) in their Newton steps:
    # LightGBM and scikit-learn GradientBoosting by K/(K-1), XGBoost by 2. Using the same
    # scale makes our leaf statistics sum to the library's own leaf values (tested).
    hessian_scale: float = 1.0
    # One tree gives all K outputs (forests' per-class values, CatBoost's multiclass
    # leaves), so `leaves` repeats its id K times: count such a tree once.
    shared_outputs: bool = False
    # the library added its starting score to the first tree's leaves (LightGBM)
    start_in_first_tree: bool = False
    # a classifier's labels in output order (the model's classes_, else 0..K-1): targets
    # are given as labels and read as their positions
    classes: list | None = None

    @classmethod
    def from_model(cls, model, x_reference, y_reference=None) -> TreeEnsembleAdapter:
        """Read `model`; `x_reference` (e.g. the training rows) fixes the additive bias as
        library prediction minus summed leaf values, which is the same for every row.
        With the training targets, a library that folds its starting score into the first
        tree (LightGBM's boost_from_average) has it moved back out into the bias."""
        from datablame.models.trees.libraries import library_of

        library = library_of(model)
        ad = library.read(model)
        if not ad.is_regression:
            labels = getattr(model, "classes_", None)
            ad.classes = list(labels) if labels is not None else \
                [0, 1] if ad.objective == "binary" else list(range(ad.n_outputs))
        if ad.boosted and ad.empirical_bias:
            ad.bias = _empirical_bias(ad, x_reference)
        if y_reference is not None and hasattr(library, "unfold_start"):
            library.unfold_start(ad, ad.positions(y_reference).astype(np.float64))
        return ad

    def positions(self, y, unknown_ok: bool = False) -> np.ndarray:
        """Targets as the model's outputs count them: a classifier's labels ("yes", 3)
        as their positions among its classes (-1 for a label it lacks, with
        `unknown_ok`); a regression target, or a binary model's probabilities, as they
        are."""
        from datablame.data.tables import class_positions, soft_binary_targets

        if self.classes is None:
            return np.asarray(y)
        if self.objective == "binary" and soft_binary_targets(y, self.classes):
            return np.asarray(y, dtype=np.float64)
        return class_positions(y, self.classes, unknown_ok=unknown_ok)

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset({LEAVES, NEWTON, TABULAR} if self.boosted else {LEAVES, TABULAR})

    @property
    def is_regression(self) -> bool:
        return self.objective == "regression"

    @property
    def n_trees(self) -> int:
        return len(self.values)

    def leaves(self, x) -> np.ndarray:
        """(n, T, K) leaf ids, from the library."""
        return self.leaves_fn(self, x)

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
        return self.raw_fn(self, x)

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
        return self.grad_hess_at(raw, self.positions(y))

    def grad_hess_at(self, raw: np.ndarray, y: np.ndarray):
        """`grad_hess` of targets already given as `positions` (converted once, e.g.
        before repeating them for every round)."""
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
        """Each row's loss; a label the model lacks (retrained on rows without its class)
        costs what a probability of 1e-12 does, as for scikit-learn's linear models."""
        y = self.positions(y, unknown_ok=True)
        lacking = (y < 0) if self.classes is not None and y.dtype.kind in "iu" else \
            np.zeros(len(y), dtype=bool)
        y = np.where(lacking, 0, y)
        if self.objective == "binary":
            z = raw[:, 0]
            return np.where(lacking, -np.log(1e-12), np.logaddexp(0, z) - y.astype(float) * z)
        if self.objective == "multiclass":
            z = raw - raw.max(1, keepdims=True)
            lse = np.log(np.exp(z).sum(1))
            return np.where(lacking, -np.log(1e-12), lse - z[np.arange(len(y)), y.astype(int)])
        return 0.5 * (raw[:, 0] - y.astype(float)) ** 2

    def query_losses(self, x, y) -> np.ndarray:
        """The loss of target `y` at rows `x`, from the library's own prediction."""
        return self.losses(self.library_raw(x), y)

    def predict_targets(self, x) -> np.ndarray:
        raw = self.library_raw(x)
        if self.objective == "binary":
            picked = (raw[:, 0] > 0).astype(int)
        elif self.objective == "multiclass":
            picked = raw.argmax(1)
        else:
            return raw[:, 0]
        labels = np.asarray(self.classes)  # the labels the targets are given in
        return picked if np.array_equal(labels, np.arange(len(labels))) else labels[picked]


def to_array(x) -> np.ndarray:
    return x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)


def dense_table(pairs: dict[int, float]) -> np.ndarray:
    """{leaf id: value} -> an array indexed by leaf id (NaN where no leaf has that id)."""
    table = np.full(max(pairs) + 1, np.nan)
    for leaf, value in pairs.items():
        table[leaf] = value
    return table


def _empirical_bias(ad: TreeEnsembleAdapter, x) -> np.ndarray:
    """Bias = library raw prediction - sum of leaf values (constant; tests check it is)."""
    raw = ad.library_raw(x)
    return (raw - ad.leaf_values(ad.leaves(x)).sum(1)).mean(0)


# -- Newton statistics of a boosted ensemble --------------------------------------------
def staged_raw(adapter: TreeEnsembleAdapter, leaves: np.ndarray) -> np.ndarray:
    """(n, T, K) raw score *before* each round: bias + cumulative leaf values."""
    vals = adapter.leaf_values(leaves)
    before = np.cumsum(vals, axis=1) - vals
    return adapter.bias[None, None, :] + before


def round_stats(adapter: TreeEnsembleAdapter, x, y):
    """Per row and round: leaves, gradient, hessian, third derivative, staged raw."""
    leaves = adapter.leaves(x)
    raw = staged_raw(adapter, leaves)
    n, t, k = raw.shape
    g, h, third = adapter.grad_hess_at(raw.reshape(n * t, k), np.repeat(adapter.positions(y), t))
    return leaves, g.reshape(n, t, k), h.reshape(n, t, k), third.reshape(n, t, k)


def leaf_sums(leaves_tk: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(leaves_tk, weights=values, minlength=size)


def newton_stats(method_name: str, adapter: TreeEnsembleAdapter, x, y):
    """For a boosted model's training rows: leaves, g, h (n, T, K) and each row's leaf
    denominator H + l2 (the hessian sum of the leaf it falls in, plus the L2 penalty)."""
    if not adapter.boosted:
        raise UserError(f"{method_name} needs a gradient-boosted model; for random forests "
                        "use leaf-sim, simplex or knn-shapley")
    leaves, g, h, _ = round_stats(adapter, x, y)
    denom = np.empty(leaves.shape)
    for t in range(leaves.shape[1]):
        for k in range(leaves.shape[2]):
            lt = leaves[:, t, k]
            denom[:, t, k] = leaf_sums(lt, h[:, t, k], len(adapter.values[t][k]))[lt]
    return leaves, g, h, denom + adapter.l2
