"""leaf-sim: the seed's "fraction of trees where the two rows share a leaf".

A similarity, not an influence: it says which training rows the model treats like the
query, not which ones moved its prediction. `weighting="leaf-size"` down-weights big leaves
(sharing a leaf with 3 rows says more than sharing one with 300); "tree-weight" weights
each tree by the magnitude of the query's leaf value (trees that matter for this query).
"""

from __future__ import annotations

import numpy as np

from datablame.features.leaf_index import LeafIndex
from datablame.methods.base import Method, shared_leaf_reasons
from datablame.models.base import LEAVES

WEIGHTINGS = ("none", "leaf-size", "tree-weight")


class LeafSim(Method):
    name = "leaf-sim"
    requires = (LEAVES,)

    def __init__(self, weighting: str = "none"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}")
        self.weighting = weighting

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self.train_leaves = adapter.leaves(x_train).reshape(self.n_train, -1)  # (n, T*K)
        self.index = LeafIndex(self.train_leaves)
        self.inv_size = None
        if self.weighting == "leaf-size":
            self.inv_size = np.empty(self.train_leaves.shape, dtype=np.float64)
            for c in range(self.train_leaves.shape[1]):
                _, inverse, counts = np.unique(self.train_leaves[:, c], return_inverse=True,
                                               return_counts=True)
                self.inv_size[:, c] = 1.0 / counts[inverse]
            self.inv_size = np.ascontiguousarray(self.inv_size.T)
        return self

    def scores(self, x_query, y_query=None) -> np.ndarray:
        q_raw = self.adapter.leaves(x_query)  # (m, T, K), asked of the library once
        q_leaves = q_raw.reshape(len(x_query), -1)
        out = np.empty((len(q_leaves), self.n_train))
        tree_w = None
        if self.weighting == "tree-weight":
            vals = np.abs(self.adapter.leaf_values(q_raw))
            tree_w = vals.reshape(len(q_leaves), -1)
        columns = q_leaves.shape[1]
        for q, leaves in enumerate(q_leaves):
            if self.weighting == "tree-weight":
                w = tree_w[q] / max(tree_w[q].sum(), 1e-12)
                out[q] = self.index.accumulate(leaves, per_column=w)
            else:
                out[q] = self.index.accumulate(leaves, self.inv_size) / columns
        return out

    def reasons(self, x_query, y_query, top, scores):
        return shared_leaf_reasons(self.adapter, self.train_leaves, x_query, top)
