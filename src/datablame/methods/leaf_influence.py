"""leaf-influence (Sharchilev et al. 2018): influence functions for GBDTs with the tree
structure held fixed.

Each leaf value is a Newton step v = -lr * G / (H + l2) over its rows' gradients and
hessians, which depend on the predictions of all earlier rounds. Weighting row i by w_i and
differentiating at w = 1 gives, per round and leaf,

    dv/dw_i = -lr * (dG/dw_i + (v/lr) * dH/dw_i) / (H + l2)
    dG/dw_i = [i in leaf] g_i + sum_{j in leaf} h_j * dF(x_j)/dw_i
    dH/dw_i = [i in leaf] h_i + sum_{j in leaf} h'_j * dF(x_j)/dw_i

and dF(x_j)/dw_i accumulates over rounds. Removing row i changes the query's final raw score
by about -dF(x_q)/dw_i, hence its loss by -g_q * dF(x_q)/dw_i: that is the score (positive =
the row helped). Unlike BoostIn it follows a row's effect through every later round, at
O(rounds * n^2) time and O(n^2) memory: meant for up to ~20k training rows. Multiclass uses
the diagonal of the softmax Hessian.
"""

from __future__ import annotations

import numpy as np

from datablame.errors import UserError
from datablame.methods.base import Method, shared_leaf_reasons
from datablame.models.base import NEWTON
from datablame.models.trees.base import leaf_sums, round_stats

MAX_ROWS = 20000


class LeafInfluence(Method):
    name = "leaf-influence"
    requires = (NEWTON,)
    units = "loss"

    def fit(self, adapter, x_train, y_train):
        n = len(x_train)
        if n > MAX_ROWS:
            raise UserError(f"leaf-influence keeps an n x n matrix; {n} rows is too many "
                            f"(max {MAX_ROWS}): use boostin")
        super().fit(adapter, x_train, y_train)
        leaves, g, h, third = round_stats(adapter, x_train, y_train)
        self.train_leaves = leaves.reshape(n, -1)  # for `reasons`
        _, rounds, k_count = leaves.shape
        lr, l2 = adapter.learning_rate, adapter.l2
        jac = np.zeros((k_count, n, n))  # jac[k, j, i] = dF_k(x_j)/dw_i before the round
        self.derivatives: list[list[np.ndarray]] = []  # [round][k] -> (leaves, n) dv/dw
        eye_rows = np.arange(n)
        for r in range(rounds):
            per_class = []
            for k in range(k_count):
                table = adapter.values[r][k]
                size = len(table)
                lt = leaves[:, r, k]
                hess = leaf_sums(lt, h[:, r, k], size)
                w = np.nan_to_num(table / lr if lr > 0 else table)
                d_g = np.zeros((size, n))
                d_h = np.zeros((size, n))
                np.add.at(d_g, lt, h[:, r, k, None] * jac[k])
                np.add.at(d_h, lt, third[:, r, k, None] * jac[k])
                d_g[lt, eye_rows] += g[:, r, k]
                d_h[lt, eye_rows] += h[:, r, k]
                dv = -lr * (d_g + w[:, None] * d_h) / (hess[:, None] + l2 + 1e-300)
                per_class.append(dv)
            for k in range(k_count):  # all K trees of a round used the same predictions
                jac[k] += per_class[k][leaves[:, r, k]]
            self.derivatives.append(per_class)
        self.final_jac = jac
        return self

    def _dF(self, q_leaves: np.ndarray) -> np.ndarray:
        """(m, K, n): d raw_k(x_q) / d w_i for each query."""
        m, rounds, k_count = q_leaves.shape
        out = np.zeros((m, k_count, self.n_train))
        for r in range(rounds):
            for k in range(k_count):
                out[:, k] += self.derivatives[r][k][q_leaves[:, r, k]]
        return out

    explains_prediction = True

    def prediction_scores(self, x_query) -> np.ndarray:
        """dF(x_q)/dw_i: removing row i moves the prediction by minus that."""
        self.explaining = "prediction"
        return self._dF(self.adapter.leaves(x_query))[:, 0, :]

    def scores(self, x_query, y_query) -> np.ndarray:
        self.explaining = "loss"
        q_leaves = self.adapter.leaves(x_query)
        raw = self.adapter.raw_from_leaves(q_leaves)
        gq, _, _ = self.adapter.grad_hess(raw, y_query)
        return -np.einsum("mk,mki->mi", gq, self._dF(q_leaves))

    def self_influence(self) -> np.ndarray:
        raw = self.adapter.raw_from_leaves(self.adapter.leaves(self.x_train))
        g, _, _ = self.adapter.grad_hess(raw, self.y_train)
        diag = np.einsum("kjj->jk", self.final_jac)
        return -(g * diag).sum(1)

    def reasons(self, x_query, y_query, top, scores):
        shared = shared_leaf_reasons(self.adapter, self.train_leaves, x_query, top)
        return [[f"{why}; {self.effect(scores[q, r])}"
                 for why, r in zip(shared[q], top[q], strict=True)] for q in range(len(top))]
