"""SimplEx (Crabbe et al. 2021): explain a query as a convex mixture of training rows in
the model's latent space.

Find weights w >= 0, sum(w) = 1 over a corpus of training rows minimising
|h(x_q) - sum_i w_i h(x_i)|^2, with h the latent representation: for tree ensembles the
one-hot leaf embedding (which leaf in every tree, each tree scaled by 1/sqrt(T) so the
squared distance is the fraction of trees whose leaves differ); for torch models the
penultimate layer. The corpus is the `corpus_size` rows nearest in that space (all rows by
default for small data). Solved by projected gradient descent on the simplex. The score is
the weight (>= 0: a decomposition, not an influence); `reconstruction_error` says how well
the corpus explains the query — a large error means no mixture of training rows looks
like it.
"""

from __future__ import annotations

import numpy as np

from datablame.methods.base import Method
from datablame.models.base import LATENT, LEAVES, has


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of v onto the probability simplex."""
    u = -np.sort(-v, axis=1)
    css = np.cumsum(u, axis=1) - 1
    idx = np.arange(1, v.shape[1] + 1)
    rho = (u - css / idx > 0).sum(1)
    theta = css[np.arange(len(v)), rho - 1] / rho
    return np.maximum(v - theta[:, None], 0)


def simplex_weights(target: np.ndarray, corpus: np.ndarray, steps: int = 500) -> np.ndarray:
    """argmin_w |target - w @ corpus|^2 over the simplex (accelerated projected gradient)."""
    gram = corpus @ corpus.T
    lip = max(np.linalg.eigvalsh(gram)[-1], 1e-12)
    w = np.full(len(corpus), 1.0 / len(corpus))
    z, t = w.copy(), 1.0
    lin = corpus @ target
    for _ in range(steps):
        grad = gram @ z - lin
        w_new = project_simplex((z - grad / lip)[None])[0]
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = w_new + (t - 1) / t_new * (w_new - w)
        w, t = w_new, t_new
    return w


class Simplex(Method):
    name = "simplex"
    requires = (LEAVES, LATENT)

    def __init__(self, corpus_size: int = 1000, steps: int = 500):
        self.corpus_size, self.steps = corpus_size, steps

    def _latent(self, x) -> np.ndarray:
        if has(self.adapter, LEAVES):
            return self.adapter.leaves(x).reshape(len(x), -1)  # compared as one-hot, lazily
        return self.adapter.latent(x)

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self.train_latent = self._latent(x_train)
        self.is_leaves = has(adapter, LEAVES)
        return self

    def _embed(self, leaves: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
        """One-hot leaf embedding restricted to the leaves that occur (dense, small)."""
        parts = [(leaves[:, c][:, None] == vals[None]).astype(np.float64)
                 for c, vals in enumerate(columns)]
        return np.hstack(parts) / np.sqrt(len(columns))

    def scores(self, x_query, y_query=None) -> np.ndarray:
        q_latent = self._latent(x_query)
        out = np.zeros((len(q_latent), self.n_train))
        self.reconstruction_error = np.zeros(len(q_latent))
        for q, target in enumerate(q_latent):
            if self.is_leaves:
                dist = 1 - (self.train_latent == target).mean(1)
            else:
                dist = np.linalg.norm(self.train_latent - target, axis=1)
            corpus_ids = np.argsort(dist, kind="stable")[: self.corpus_size]
            if self.is_leaves:
                cols = [np.unique(np.r_[self.train_latent[corpus_ids, c], target[c]])
                        for c in range(self.train_latent.shape[1])]
                corpus = self._embed(self.train_latent[corpus_ids], cols)
                tvec = self._embed(target[None], cols)[0]
            else:
                corpus, tvec = self.train_latent[corpus_ids], target
            w = simplex_weights(tvec, corpus, self.steps)
            out[q, corpus_ids] = w
            self.reconstruction_error[q] = float(np.linalg.norm(tvec - w @ corpus))
        return out

    def reasons(self, x_query, y_query, top, scores):
        return [[f"weight {scores[q, r]:.2f} in the query's reconstruction (error "
                 f"{self.reconstruction_error[q]:.3g})" for r in top[q]]
                for q in range(len(top))]
