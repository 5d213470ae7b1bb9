"""DataInf (Kwon et al. 2024): a closed-form inverse Hessian per parameter block.

Per block l (one parameter tensor: a LoRA matrix, a layer's weight), the damped empirical
Fisher is inverted with the Sherman-Morrison approximation

    (F_l + lam_l I)^{-1} v  ~  1/(n lam_l) * sum_j ( v - (g_jl . v) / (lam_l + |g_jl|^2) g_jl )

with lam_l = 0.1 * mean_j |g_jl|^2 (the paper's default). Cheap (no HVPs, no d x d matrix),
designed for LoRA blocks; positive = the row helped, as (1/n) g_q^T H^{-1} g_i elsewhere.
"""

from __future__ import annotations

import torch

from datablame.methods.influence import _InverseHessianMethod
from datablame.models.base import GRADIENTS


class DataInf(_InverseHessianMethod):
    """Scores, prediction scores and self-influence come from the shared inverse-Hessian
    base; only the solve differs."""

    name = "datainf"
    requires = (GRADIENTS,)  # its own inverse from the gradients: no Hessian needed

    def __init__(self, lambda_scale: float = 0.1):
        self.lambda_scale = lambda_scale

    def _prepare(self) -> None:
        self.blocks = self._blocks(self.adapter)

    @staticmethod
    def _blocks(adapter) -> list[slice]:
        out, start = [], 0
        for size in adapter.sizes:
            out.append(slice(start, start + size))
            start += size
        return out

    def _solve(self, v: torch.Tensor) -> torch.Tensor:
        n = self.g_train.shape[0]
        result = torch.zeros_like(v)
        for blk in self.blocks:
            g = self.g_train[:, blk]
            sq = (g * g).sum(1)
            lam = self.lambda_scale * sq.mean().clamp(min=1e-12)
            coef = (v[:, blk] @ g.T) / (lam + sq)  # (m, n)
            result[:, blk] = (n * v[:, blk] - coef @ g) / (n * lam)
        return result
