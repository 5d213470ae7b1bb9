"""An inverted index from (tree, leaf) to the training rows in it.

Scoring a query against n rows x T trees by comparing leaf ids costs n*T work and memory per
query; with the rows grouped by leaf per tree, a query touches only the rows that share
its leaves, and `accumulate` sums per-(row, tree) weights over them with one bincount.
"""

from __future__ import annotations

import numpy as np


class LeafIndex:
    def __init__(self, leaves: np.ndarray):
        """leaves: (n, C) leaf id of each row in each tree column."""
        self.n, self.columns = leaves.shape
        by_column = np.ascontiguousarray(leaves.T)  # (C, n): one tree's rows are contiguous
        self.order = np.argsort(by_column, axis=1, kind="stable")
        self.sorted = np.take_along_axis(by_column, self.order, axis=1)

    def rows(self, column: int, leaf: int) -> np.ndarray:
        col = self.sorted[column]
        lo, hi = np.searchsorted(col, leaf, "left"), np.searchsorted(col, leaf, "right")
        return self.order[column, lo:hi]

    def accumulate(self, query_leaves: np.ndarray, weights=None,
                   per_column: np.ndarray | None = None) -> np.ndarray:
        """sum over columns c of [leaf_c(row) == query_leaves[c]] * w, for every row.

        w = weights[c][row] (a (C, n) array: one tree's weights contiguous) times
        per_column[c], or 1 when not given.
        """
        idx, w = [], []
        for c in range(self.columns):
            rows = self.rows(c, query_leaves[c])
            if not len(rows):
                continue
            idx.append(rows)
            part = weights[c][rows] if weights is not None else np.ones(len(rows))
            w.append(part * (per_column[c] if per_column is not None else 1.0))
        if not idx:
            return np.zeros(self.n)
        return np.bincount(np.concatenate(idx), weights=np.concatenate(w), minlength=self.n)
