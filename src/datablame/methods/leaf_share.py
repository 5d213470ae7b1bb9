"""leaf-share: each training row's share of the leaves it has in common with the query.

A Newton leaf value is a sum of per-row shares, v = sum_i -lr * g_i / (H + l2) (g_i, H =
the row's loss gradient and the leaf's hessian sum in that boosting round). Taking row i's
share out of every leaf it shares with the query moves the query's final raw score by
sum_t [leaf_t(q) == leaf_t(i)] lr * g_t(i) / (H_t + l2), and its loss, to first order, by
that times the query's loss gradient g(q) at the *final* model:

    score(q, i) = g(q) . sum_t [leaf_t(q) == leaf_t(i)] lr * g_t(i) / (H_t + l2)

Positive = removing the row raises the query's loss (it helped).

Why this and not BoostIn or the full leaf-influence (measured against retraining on 50%
subsets in bench/tree_influence.py; the numbers are in the README's method table):
- BoostIn weighs each round by the query's gradient *at that round* (TracIn); the quantity
  retraining changes is the final loss, so the final gradient is the right weight;
- the exact fixed-structure derivative of the leaf value also counts the row's hessian in
  the denominator (g_i + v h_i instead of g_i); for removals as large as LDS's, that term
  is shared by every row of the leaf and measured worse;
- following a row's effect through every later round (leaf-influence) is exact for a
  fixed structure, but trees re-grow when data change, and it measured worst of the three.
Cost: BoostIn's (one vectorised leaf match per query).
"""

from __future__ import annotations

import numpy as np

from datablame.features.leaf_index import LeafIndex
from datablame.methods.base import Method, shared_leaf_reasons
from datablame.models.base import NEWTON
from datablame.models.trees.base import newton_stats


class LeafShare(Method):
    name = "leaf-share"
    requires = (NEWTON,)
    units = "loss"

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        leaves, g, _, denom = newton_stats(self.name, adapter, x_train, y_train)
        n, _, k_count = leaves.shape
        share = np.where(denom > 0, adapter.learning_rate * g / np.where(denom > 0, denom, 1.0),
                         0.0)
        self.k_count = k_count
        self.share = share.reshape(n, -1)
        self.share_by_tree = np.ascontiguousarray(self.share.T)
        self.index_leaves = leaves.reshape(n, -1)
        self.index = LeafIndex(self.index_leaves)
        return self

    def _final_gradient(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        leaves = self.adapter.leaves(x)
        g, _, _ = self.adapter.grad_hess(self.adapter.raw_from_leaves(leaves), y)
        return leaves.reshape(len(leaves), -1), g  # g: (m, K)

    def scores(self, x_query, y_query) -> np.ndarray:
        self.explaining = "loss"
        q_leaves, gq = self._final_gradient(x_query, y_query)
        rounds = q_leaves.shape[1] // self.k_count
        out = np.empty((len(q_leaves), self.n_train))
        for q in range(len(q_leaves)):
            out[q] = self.index.accumulate(q_leaves[q], self.share_by_tree,
                                           np.tile(gq[q], rounds))
        return out

    explains_prediction = True

    def prediction_scores(self, x_query) -> np.ndarray:
        """Minus each row's share of the query's leaves: the shares of all rows add up to
        the query's prediction minus the base score (regression, one output)."""
        self.explaining = "prediction"
        q_leaves = self.adapter.leaves(x_query).reshape(len(x_query), -1)
        minus = -np.ones(q_leaves.shape[1])
        return np.stack([self.index.accumulate(q, self.share_by_tree, minus)
                         for q in q_leaves])

    def self_influence(self) -> np.ndarray:
        _, g = self._final_gradient(self.x_train, self.y_train)
        rounds = self.share.shape[1] // self.k_count
        return (self.share * np.tile(g, (1, rounds))).sum(1)

    def reasons(self, x_query, y_query, top, scores):
        shared = shared_leaf_reasons(self.adapter, self.index_leaves, x_query, top)
        return [[f"{why}; {self.effect(scores[q, r])}"
                 for why, r in zip(shared[q], top[q], strict=True)] for q in range(len(top))]
