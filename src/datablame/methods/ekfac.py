"""EK-FAC (George et al. 2018; Grosse et al. 2023): an inverse Hessian per linear layer
from Kronecker factors, with eigenvalues corrected to the data.

For a weight W (out x in) whose per-example gradient is G = sum_t g_t x_t^T, K-FAC
approximates the layer's curvature E[vec(G) vec(G)^T] by A (x) S: A = E[x x^T] over the
tokens that carry gradient, S = E_rows[sum_t g g^T] (per row, not per token: a later
layer's gradient reaches only the answer's tokens, and a per-token mean would shrink its
curvature against the others'). EK-FAC keeps the eigenbases of A and S but replaces the
Kronecker eigenvalues by the data's own second moments in that basis,
lam[o, i] = mean_n ((Q_S^T G_n Q_A)[o, i])^2, so that
H^-1 V = Q_S ((Q_S^T V Q_A) / (lam + damping)) Q_A^T, damping = 0.1 x mean(lam) per layer
(kronfluence's heuristic). Scores are (1/n) g_q^T H^-1 g_i, positive = the row helped,
over the selected parameters (LoRA matrices by default): one d_out x d_out and one
d_in x d_in eigendecomposition per matrix, never a d x d matrix.

The curvature is the true Fisher by default: its gradients come from answers drawn from
the model's own predictions (as bergson and kronfluence fit it), not the rows' answers (the
empirical Fisher), which a fine-tune has already driven towards zero. One draw per row is
a noisy estimate on a small training set, so small sets get several draws (`samples`).
"""

from __future__ import annotations

import torch

from datablame.methods.base import Method
from datablame.methods.influence import _InverseHessianMethod
from datablame.models.base import KRONECKER


class EKFAC(_InverseHessianMethod):
    name = "ekfac"
    requires = (KRONECKER,)

    def __init__(self, damping_scale: float = 0.1, correct_eigenvalues: bool = True,
                 fisher: str = "sampled", samples: int | None = None, seed: int = 0):
        if fisher not in ("empirical", "sampled"):
            raise ValueError(f"fisher must be 'empirical' or 'sampled', not {fisher!r}")
        if samples is not None and samples < 1:
            raise ValueError(f"samples must be at least 1, not {samples}")
        self.damping_scale = damping_scale
        self.correct_eigenvalues = correct_eigenvalues  # False: plain K-FAC eigenvalues
        self.fisher = fisher
        self.samples = samples  # draws per row; None: enough for SAMPLED_ROWS in all
        self.seed = seed

    SAMPLED_ROWS = 4096
    MAX_DRAWS = 16

    def draws_for(self, n_rows: int) -> int:
        if self.samples is not None:
            return self.samples
        return max(1, min(self.MAX_DRAWS, -(-self.SAMPLED_ROWS // max(n_rows, 1))))

    def fit(self, adapter, x_train, y_train):
        Method.fit(self, adapter, x_train, y_train)
        if self.fisher == "sampled":
            draws = [adapter.kronecker_factors(x_train, sampled_labels=self.seed * 1000 + k)
                     for k in range(self.draws_for(len(x_train)))]
            self.g_train = adapter.gradients(x_train, y_train).double()
            curvature = [grads for grads, _ in draws]
            # the inputs (A) do not depend on the answer: one draw's; S summed over draws
            factors = {name: {**f, "S": sum(d[1][name]["S"] for d in draws)}
                       for name, f in draws[0][1].items()}
        else:
            grads, factors = adapter.kronecker_factors(x_train)
            self.g_train = grads.double()
            curvature = [grads]
        self.blocks = []
        start = 0
        for name, shape in zip(adapter.lm.param_names, adapter.shapes, strict=True):
            size = int(torch.Size(shape).numel())
            f = factors[name]
            # E[G G^T] ~ (mean of x x^T over the tokens that carry gradient) (x) (sum of
            # g g^T per row): a later layer's gradient reaches fewer tokens (only the
            # answer's), so a per-token mean of g g^T would shrink its curvature.
            a = f["A"] / max(f["tokens"], 1)
            s = f["S"] / (len(self.g_train) * len(curvature))
            l_a, q_a = torch.linalg.eigh(a)
            l_s, q_s = torch.linalg.eigh(s)
            conv = f["kind"] == "conv1d"  # weight stored (in, out): work on its transpose
            block = slice(start, start + size)
            if self.correct_eigenvalues:  # the data's own second moments in the eigenbasis
                lam = sum((self._rotate(self._matrices(g[:, block].double(), shape, conv),
                                        q_s, q_a) ** 2).mean(0) for g in curvature)
                lam = lam / len(curvature)
            else:  # K-FAC: the Kronecker product of the factors' eigenvalues
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
        return self._apply(v, -1.0)

    def whiten(self, v: torch.Tensor) -> torch.Tensor:
        """H^-1/2 v: vectors whose dot product is g_q^T H^-1 g_i, and whose cosine is the
        alignment of two gradients after the curvature is divided out."""
        return self._apply(v, -0.5)

    def _apply(self, v: torch.Tensor, power: float) -> torch.Tensor:
        out = torch.empty_like(v)
        for block, shape, conv, q_s, q_a, lam in self.blocks:
            solved = q_s @ (self._rotate(self._matrices(v[:, block], shape, conv), q_s, q_a)
                            * lam ** power) @ q_a.T
            out[:, block] = (solved.transpose(1, 2) if conv else solved).reshape(
                v.shape[0], -1)
        return out
