"""BoostIn (Brophy et al. 2023): TracIn for gradient-boosted trees.

For every boosting round t, a training row i moves the value of the leaf it falls in; with
the tree structure held fixed, the Newton leaf value w = -G/(H + l2) (G, H = sums of loss
gradients and hessians of the leaf's rows, scaled by the learning rate lr) changes, when i is
removed, by about

    dv_t(i) = lr * (g_i + w * h_i) / (H + l2)

and that reaches the query only if the query falls in the same leaf. So

    score(q, i) = sum_t [leaf_t(q) == leaf_t(i)] * g_t(q) * dv_t(i)

with g_t(q) the query's loss gradient before round t. Positive = removing the row would
raise the query's loss (it helped). Earlier rounds' effect on later rounds' gradients is
ignored (that is leaf-influence). Per query: one vectorised comparison over (rows x trees).
"""

from __future__ import annotations

import numpy as np

from datablame.features.leaf_index import LeafIndex
from datablame.methods.base import Method, shared_leaf_reasons
from datablame.models.base import NEWTON
from datablame.models.trees.base import newton_stats, round_stats


class BoostIn(Method):
    name = "boostin"
    requires = (NEWTON,)

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        leaves, g, h, denom = newton_stats(self.name, adapter, x_train, y_train)
        n = len(leaves)
        lr = adapter.learning_rate
        w = adapter.leaf_values(leaves) / (lr if lr > 0 else 1.0)  # unscaled Newton values
        self.leaves = leaves.reshape(n, -1)
        self.dv = (lr * (g + w * h) / denom).reshape(n, -1)
        self.dv_by_tree = np.ascontiguousarray(self.dv.T)
        self.index = LeafIndex(self.leaves)
        return self

    def scores(self, x_query, y_query) -> np.ndarray:
        q_leaves, gq, _, _ = round_stats(self.adapter, x_query, y_query)
        q_leaves = q_leaves.reshape(len(q_leaves), -1)
        gq = gq.reshape(len(gq), -1)
        out = np.empty((len(q_leaves), self.n_train))
        for q in range(len(q_leaves)):
            out[q] = self.index.accumulate(q_leaves[q], self.dv_by_tree, gq[q])
        return out

    explains_prediction = True

    def prediction_scores(self, x_query) -> np.ndarray:
        """-sum_t [same leaf] dv_t(i): the row's fixed-structure effect on the prediction."""
        self.explaining = "prediction"
        q_leaves = self.adapter.leaves(x_query).reshape(len(x_query), -1)
        minus = -np.ones(q_leaves.shape[1])
        return np.stack([self.index.accumulate(q, self.dv_by_tree, minus) for q in q_leaves])

    def self_influence(self) -> np.ndarray:
        _, g, _, _ = round_stats(self.adapter, self.x_train, self.y_train)
        return (self.dv * g.reshape(self.n_train, -1)).sum(1)

    def reasons(self, x_query, y_query, top, scores):
        return shared_leaf_reasons(self.adapter, self.leaves, x_query, top)
