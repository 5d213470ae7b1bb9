"""EK-FAC (George et al. 2018; Grosse et al. 2023): an inverse Hessian per linear layer
from Kronecker factors, with eigenvalues corrected to the data.

For a weight W (out x in) whose per-example gradient is G = sum_t g_t x_t^T, K-FAC
approximates the (empirical Fisher) curvature of the layer by A (x) S, A = E[x x^T] over
tokens, S = E[g g^T]. EK-FAC keeps the eigenbases of A and S but replaces the Kronecker
eigenvalues by the data's own second moments in that basis,
lam[o, i] = mean_n ((Q_S^T G_n Q_A)[o, i])^2, so that
H^-1 V = Q_S ((Q_S^T V Q_A) / (lam + damping)) Q_A^T, damping = 0.1 x mean(lam) per layer
(kronfluence's heuristic). Scores are (1/n) g_q^T H^-1 g_i, positive = the row helped,
over the selected parameters (LoRA matrices by default): one d_out x d_out and one
d_in x d_in eigendecomposition per matrix, never a d x d matrix.
"""

from __future__ import annotations

import torch

from datablame.methods.base import Method
from datablame.methods.influence import _InverseHessianMethod
from datablame.models.base import KRONECKER


class EKFAC(_InverseHessianMethod):
    name = "ekfac"
    requires = (KRONECKER,)

    def __init__(self, damping_scale: float = 0.1, correct_eigenvalues: bool = True):
        self.damping_scale = damping_scale
        self.correct_eigenvalues = correct_eigenvalues  # False: plain K-FAC eigenvalues

    def fit(self, adapter, x_train, y_train):
        Method.fit(self, adapter, x_train, y_train)
        grads, factors = adapter.kronecker_factors(x_train)
        self.g_train = grads.double()
        self.blocks = []
        start = 0
        for name, shape in zip(adapter.lm.param_names, adapter.shapes, strict=True):
            size = int(torch.Size(shape).numel())
            f = factors[name]
            a = f["A"] / max(f["tokens"], 1)
            s = f["S"] / max(f["tokens"], 1)
            l_a, q_a = torch.linalg.eigh(a)
            l_s, q_s = torch.linalg.eigh(s)
            conv = f["kind"] == "conv1d"  # weight stored (in, out): work on its transpose
            block = slice(start, start + size)
            if self.correct_eigenvalues:
                lam = (self._rotate(self._matrices(self.g_train[:, block], shape, conv),
                                    q_s, q_a) ** 2).mean(0)
            else:  # K-FAC: the Kronecker product of the factors' eigenvalues, per token
                lam = torch.outer(l_s.clamp(min=0), l_a.clamp(min=0))
            lam = lam + self.damping_scale * lam.mean().clamp(min=1e-30)
            self.blocks.append((block, shape, conv, q_s, q_a, lam))
            start += size
        return self

    @staticmethod
    def _matrices(flat: torch.Tensor, shape, conv: bool) -> torch.Tensor:
        """(m, d_block) -> (m, out, in)."""
        mats = flat.reshape(flat.shape[0], *shape)
        return mats.transpose(1, 2) if conv else mats

    @staticmethod
    def _rotate(mats: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
        return q_s.T @ mats @ q_a

    def _solve(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(v)
        for block, shape, conv, q_s, q_a, lam in self.blocks:
            solved = q_s @ (self._rotate(self._matrices(v[:, block], shape, conv), q_s, q_a)
                            / lam) @ q_a.T
            out[:, block] = (solved.transpose(1, 2) if conv else solved).reshape(
                v.shape[0], -1)
        return out
