"""Influence functions: the change in the query loss when a training row is removed.

    score(q, i) = (1/n) * g_q^T (H + damping*I)^{-1} g_i

with H the Hessian of the training objective (mean loss + the L2 penalty of training),
g the per-example loss gradients at the trained parameters (Koh & Liang 2017). Positive =
removing row i would raise the query's loss (the row helped). Four ways to apply H^{-1}:

  if-exact    materialise H and solve (small models: d up to ~20k parameters)
  if-cg       conjugate gradient on Hessian-vector products, one solve per query
  if-lissa    the LiSSA series (Agarwal et al. 2017) on mini-batch Hessian-vector products
  if-arnoldi  low rank: the top-r eigenpairs of H from Lanczos on HVPs (Schioppa et al.
              2022); gradient directions outside those r are ignored
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from datablame.methods.base import Method, to_numpy
from datablame.models.base import HESSIAN
from datablame.models.torch_module import as_tensor


class _InverseHessianMethod(Method):
    requires = (HESSIAN,)
    units = "loss"
    # 0.01 measured best on the MLP tasks of bench/tabular_influence.py (README: method
    # table) and equal on the convex ones.
    def __init__(self, damping: float = 0.01):
        self.damping = damping

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self.g_train = adapter.gradients(x_train, y_train).double()
        self._prepare()
        return self

    def _prepare(self) -> None:
        pass

    def _solve(self, v: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^{-1} v for v of shape (m, d)."""
        raise NotImplementedError

    explains_prediction = True

    def scores(self, x_query, y_query) -> np.ndarray:
        self.explaining = "loss"
        return self._from_query(self.adapter.gradients(x_query, y_query).double())

    def prediction_scores(self, x_query) -> np.ndarray:
        """Minus the influence on the output: (1/n) (-grad f_q)^T H^{-1} g_i."""
        self.explaining = "prediction"
        return self._from_query(-self.adapter.output_gradients(x_query).double())

    def _from_query(self, gq: torch.Tensor) -> np.ndarray:
        return to_numpy(self._solve(gq) @ self.g_train.T) / self.n_train

    def self_influence(self) -> np.ndarray:
        solved = self._solve(self.g_train)
        return to_numpy((solved * self.g_train).sum(1)) / self.n_train


class ExactInfluence(_InverseHessianMethod):
    name = "if-exact"

    def _prepare(self) -> None:
        h = self.adapter.hessian(self.x_train, self.y_train).double()
        h = (h + h.T) / 2 + self.damping * torch.eye(h.shape[0], dtype=h.dtype)
        self.chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:  # positive definite (convex models): a Cholesky solve is exact
            return
        self.chol = None
        # negative curvature (non-convex models): use |eigenvalue|, which keeps H^{-1}
        # positive definite as the Gauss-Newton view would. float32 beyond 1000 parameters:
        # 2-3x faster and far below the approximation error of influence itself.
        work = h.float() if h.shape[0] > 1000 else h
        evals, evecs = torch.linalg.eigh(work)
        self.evals = evals.double().abs().clamp(min=self.damping)
        self.evecs = evecs.double()

    def _solve(self, v):
        if self.chol is not None:
            return torch.cholesky_solve(v.T, self.chol).T
        return ((v @ self.evecs) / self.evals) @ self.evecs.T


class ConjugateGradientInfluence(_InverseHessianMethod):
    name = "if-cg"

    def __init__(self, damping: float = 0.01, max_iter: int = 200, tol: float = 1e-8):
        super().__init__(damping)
        self.max_iter, self.tol = max_iter, tol

    def _prepare(self) -> None:
        hvp = self.adapter.hvp_fn(self.x_train, self.y_train)
        vhvp = torch.func.vmap(hvp)
        self._hvp = lambda v: vhvp(v.float()).double() + self.damping * v

    def _solve(self, v):
        """Batched CG: every right-hand side iterates together (one vmapped HVP a step)."""
        self._warned = getattr(self, "_warned", False)
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rs = (r * r).sum(1, keepdim=True)
        for _ in range(self.max_iter):
            hp = self._hvp(p)
            curvature = (p * hp).sum(1, keepdim=True)
            if bool((curvature <= 0).any()) and not self._warned:
                self._warned = True
                warnings.warn("if-cg met negative curvature: the Hessian plus damping is not "
                              "positive definite here; raise damping or use if-exact",
                              stacklevel=3)
            alpha = rs / curvature.clamp(min=1e-30)
            x = x + alpha * p
            r = r - alpha * hp
            rs_new = (r * r).sum(1, keepdim=True)
            if torch.all(rs_new.sqrt() <= self.tol * (v * v).sum(1, keepdim=True).sqrt()):
                break
            p = r + (rs_new / rs.clamp(min=1e-30)) * p
            rs = rs_new
        return x


class LissaInfluence(_InverseHessianMethod):
    """x_{t+1} = v + (1 - damping/scale) x_t - H_batch x_t / scale; H^{-1}v ~ x_T / scale."""

    name = "if-lissa"

    def __init__(self, damping: float = 0.01, scale: float | None = None, depth: int = 1000,
                 batch_size: int = 128, seed: int = 0):
        super().__init__(damping)
        self.scale, self.depth, self.batch_size, self.seed = scale, depth, batch_size, seed

    def _prepare(self) -> None:
        x, y = as_tensor(self.x_train), as_tensor(self.y_train, floating=False)
        self._xy = (x, y)
        if self.scale is None:  # must exceed the largest eigenvalue for the series to converge
            hvp = torch.func.vmap(self.adapter.hvp_fn(x, y))
            v = torch.randn(1, self.adapter.num_params, generator=torch.Generator()
                            .manual_seed(self.seed))
            for _ in range(30):  # power iteration
                v = hvp(v)
                v = v / v.norm()
            self.scale = float(1.5 * (v * hvp(v)).sum()) + self.damping

    def _solve(self, v):
        gen = torch.Generator().manual_seed(self.seed)
        x_all, y_all = self._xy
        est = v.clone()
        n = len(x_all)
        for _ in range(self.depth):
            idx = torch.randperm(n, generator=gen)[: self.batch_size]
            hvp = torch.func.vmap(self.adapter.hvp_fn(x_all[idx], y_all[idx]))
            est = v + (1 - self.damping / self.scale) * est - hvp(est.float()).double() / \
                self.scale
        return est / self.scale


class ArnoldiInfluence(_InverseHessianMethod):
    """Top-`rank` eigenpairs of H by Lanczos (scipy eigsh on HVPs); rank-limited inverse."""

    name = "if-arnoldi"

    def __init__(self, damping: float = 0.01, rank: int = 50, seed: int = 0):
        super().__init__(damping)
        self.rank, self.seed = rank, seed

    def _prepare(self) -> None:
        from scipy.sparse.linalg import LinearOperator, eigsh

        d = self.adapter.num_params
        hvp = self.adapter.hvp_fn(self.x_train, self.y_train)
        op = LinearOperator((d, d), dtype=np.float64, matvec=lambda v: hvp(
            torch.as_tensor(v, dtype=torch.float32).reshape(-1)).double().numpy())
        k = min(self.rank, d - 1)
        v0 = np.random.default_rng(self.seed).standard_normal(d)
        evals, evecs = eigsh(op, k=k, which="LM", v0=v0)
        self.evals = torch.as_tensor(np.abs(evals)) + self.damping
        self.evecs = torch.as_tensor(evecs)

    def _solve(self, v):
        return ((v @ self.evecs) / self.evals) @ self.evecs.T
