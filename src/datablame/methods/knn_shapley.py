"""knn-shapley (Jia et al. 2019): exact data Shapley values of a K-nearest-neighbour
classifier, per query, in closed form (O(n log n) per query: one sort).

With the training rows sorted by distance to the query (nearest first, a_1..a_n):
    s(a_n) = [y(a_n) == y_q] / n
    s(a_j) = s(a_{j+1}) + ([y(a_j) == y_q] - [y(a_{j+1}) == y_q]) / K * min(K, j) / j
Positive = the row raises the KNN's chance of answering y_q (it helped).

Space: "leaves" (distance = 1 - fraction of shared leaves, the tree model's own view of
similarity) for tree models, or "features" (standardised Euclidean distance on raw
features) for any model. Classification only.
"""

from __future__ import annotations

import numpy as np

from datablame.errors import UserError
from datablame.methods.base import Method


def knn_shapley_values(order: np.ndarray, match: np.ndarray, k: int) -> np.ndarray:
    """order: rows nearest first; match: [y(row) == y_q] per row (by row id)."""
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

    def __init__(self, k: int = 10, space: str = "auto"):
        if space not in ("auto", "leaves", "features"):
            raise ValueError("space must be auto, leaves or features")
        self.k, self.space = k, space

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        if getattr(adapter, "objective", "binary") == "regression":
            raise UserError("knn-shapley is defined for classification targets")
        self._space = self.space
        if self._space == "auto":
            self._space = "leaves" if hasattr(adapter, "leaves") else "features"
        self.y = np.asarray(y_train).reshape(-1)
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
            out[q] = knn_shapley_values(order, self.y == yq[q], self.k)
        return out
