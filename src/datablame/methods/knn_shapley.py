"""knn-shapley (Jia et al. 2019): exact data Shapley values of a K-nearest-neighbour
classifier, per query, in closed form (O(n log n) per query: one sort).

With the training rows sorted by distance to the query (nearest first, a_1..a_n):
    s(a_n) = [y(a_n) == y_q] / n
    s(a_j) = s(a_{j+1}) + ([y(a_j) == y_q] - [y(a_{j+1}) == y_q]) / K * min(K, j) / j
Positive = the row raises the KNN's chance of answering y_q (it helped).

The utility is linear in the K nearest rows' "agreement" with the query (classification:
[y == y_q]), which is what makes the closed form exact. Regression uses the same form with
agreement 1 - (y - y_q)^2 / Var(y): a neighbour helps when its label is closer to the
query's target than a typical training label is (Jia et al.'s regression utility, the
squared error of the neighbours' *mean*, is quadratic in the neighbours and has no such
recursion; it is not what this computes).

Space: "leaves" (distance = 1 - fraction of shared leaves, the tree model's own view of
similarity) for tree models, or "features" (standardised Euclidean distance on raw
features) for any model.
"""

from __future__ import annotations

import numpy as np

from datablame.methods.base import Method
from datablame.models.base import LEAVES, TABULAR, has


def knn_shapley_values(order: np.ndarray, match: np.ndarray, k: int) -> np.ndarray:
    """order: rows nearest first; match: each row's agreement with the query (by row id),
    [y(row) == y_q] for classification; any real value is exact for the linear utility
    U(S) = sum over the K nearest rows of S of match / K."""
    n = len(order)
    m = match[order].astype(np.float64)
    s = np.empty(n)
    s[-1] = m[-1] / n
    j = np.arange(1, n)  # 1-based positions of a_1..a_{n-1}
    steps = (m[:-1] - m[1:]) / k * np.minimum(k, j) / j
    # s_j = s_n + sum_{t >= j} steps_t  (suffix sums)
    s[:-1] = s[-1] + np.cumsum(steps[::-1])[::-1]
    out = np.empty(n)
    out[order] = s
    return out


class KnnShapley(Method):
    name = "knn-shapley"
    requires = (TABULAR,)  # feature rows and a target: not a language model's text

    def __init__(self, k: int = 10, space: str = "auto", task: str = "auto"):
        if space not in ("auto", "leaves", "features"):
            raise ValueError("space must be auto, leaves or features")
        if task not in ("auto", "classification", "regression"):
            raise ValueError("task must be auto, classification or regression")
        self.k, self.space, self.task = k, space, task

    def _is_regression(self, adapter, y: np.ndarray) -> bool:
        """The model says what it is when it can; otherwise non-integer targets regress."""
        if self.task != "auto":
            return self.task == "regression"
        return adapter.is_regression

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self.regression = self._is_regression(adapter, np.asarray(y_train).reshape(-1))
        self._space = self.space
        if self._space == "auto":
            self._space = "leaves" if has(adapter, LEAVES) else "features"
        self.y = np.asarray(y_train).reshape(-1)
        if self.regression:
            self.y = self.y.astype(np.float64)
            self.var = float(self.y.var()) or 1.0
        if self._space == "leaves":
            self.train_repr = adapter.leaves(x_train).reshape(self.n_train, -1)
        else:
            x = np.asarray(x_train, dtype=np.float64)
            self.mu, self.sd = x.mean(0), x.std(0) + 1e-12
            self.train_repr = (x - self.mu) / self.sd
        return self

    def _distances(self, x_query) -> np.ndarray:
        if self._space == "leaves":
            q = self.adapter.leaves(x_query).reshape(len(x_query), -1)
            return np.stack([1 - (self.train_repr == row).mean(1) for row in q])
        q = (np.asarray(x_query, dtype=np.float64) - self.mu) / self.sd
        sq = (q * q).sum(1)[:, None] + (self.train_repr ** 2).sum(1)[None] - \
            2 * q @ self.train_repr.T
        return np.sqrt(np.maximum(sq, 0))

    def scores(self, x_query, y_query) -> np.ndarray:
        dist = self._distances(x_query)
        yq = np.asarray(y_query).reshape(-1)
        out = np.empty_like(dist)
        for q in range(len(dist)):
            order = np.argsort(dist[q], kind="stable")
            agree = 1 - (self.y - float(yq[q])) ** 2 / self.var if self.regression else \
                self.y == yq[q]
            out[q] = knn_shapley_values(order, agree, self.k)
        return out

    def reasons(self, x_query, y_query, top, scores):
        dist = self._distances(x_query)
        yq = np.asarray(y_query).reshape(-1)
        out = []
        for q in range(len(top)):
            nearer = [int((dist[q] < dist[q, r]).sum()) + 1 for r in top[q]]
            if self.regression:
                label = [f"label {self.y[r]:.3g} vs {float(yq[q]):.3g}" for r in top[q]]
            else:
                label = ["same label" if self.y[r] == yq[q] else f"label {self.y[r]}"
                         for r in top[q]]
            out.append([f"neighbour #{k} ({self._space}), {lab}"
                        for k, lab in zip(nearer, label, strict=True)])
        return out
