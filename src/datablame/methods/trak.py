"""TRAK (Park et al. 2023): projected gradients of the model output, a ridge-regression
inverse, averaged over an ensemble of independently trained models or checkpoints.

    tau(q, i) = mean over models of  phi_q^T (Phi^T Phi + lambda I)^{-1} phi_i * (1 - p_i)

phi = random projection of the gradient of the *margin* (classification: log p/(1-p) of the
row's target; regression: the prediction); (1 - p_i) reweights by how poorly row i is fit.
Positive = the row raises the query's margin (helped). Give it several models
(`models=[...]`, adapters of the same architecture) for the ensemble it was designed for.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from datablame.features.projection import RandomProjector
from datablame.methods.base import Method
from datablame.models.torch_module import _ce, as_tensor


def _margin_and_prob(adapter, theta, x, y):
    out = functional_call(adapter.model, adapter._unflatten(theta), (x,))
    if adapter.loss_fn is _ce:
        if out.ndim == 1 or out.shape[-1] == 1:
            z = out.reshape(-1)
            sign = 2 * y.reshape(-1).float() - 1
            margin = sign * z
        else:
            correct = out.gather(1, y.long().reshape(-1, 1)).reshape(-1)
            others = out.clone()
            others.scatter_(1, y.long().reshape(-1, 1), float("-inf"))
            margin = correct - torch.logsumexp(others, dim=1)
        return margin, torch.sigmoid(margin)
    pred = out.reshape(out.shape[0], -1).sum(1)
    return pred, torch.zeros_like(pred)


class Trak(Method):
    name = "trak"

    def __init__(self, proj_dim: int = 2048, ridge: float = 1e-3, models=None, seed: int = 0):
        self.proj_dim, self.ridge, self.models, self.seed = proj_dim, ridge, models, seed

    def _features(self, adapter, x, y):
        if not hasattr(adapter, "theta"):  # a language model: the loss is the output function
            g = adapter.gradients(x, y).double()
            if adapter.num_params > self.proj_dim:
                g = torch.as_tensor(RandomProjector(adapter.num_params, self.proj_dim,
                                                    self.seed).project(g)).double()
            return g, torch.zeros(len(g), dtype=torch.float64)
        x, y = as_tensor(x), as_tensor(y, floating=False)

        def one(theta, xi, yi):
            return _margin_and_prob(adapter, theta, xi.unsqueeze(0), yi.unsqueeze(0))[0][0]

        g = vmap(grad(one), in_dims=(None, 0, 0))(adapter.theta, x, y)
        with torch.no_grad():
            _, p = _margin_and_prob(adapter, adapter.theta, x, y)
        if adapter.num_params > self.proj_dim:
            g = torch.as_tensor(RandomProjector(adapter.num_params, self.proj_dim,
                                                self.seed).project(g))
        return g.double(), p.double()

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self._models = list(self.models) if self.models else [adapter]
        self._fitted = []
        for m in self._models:
            phi, p = self._features(m, x_train, y_train)
            xtx = phi.T @ phi
            lam = self.ridge * torch.trace(xtx) / xtx.shape[0]
            inv = torch.linalg.inv(xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype))
            self._fitted.append((m, phi, inv, 1 - p))
        return self

    def scores(self, x_query, y_query) -> np.ndarray:
        total = 0
        for m, phi, inv, q_weight in self._fitted:
            phq, _ = self._features(m, x_query, y_query)
            total = total + (phq @ inv @ phi.T) * q_weight
        return (total / len(self._fitted)).numpy()

    def self_influence(self) -> np.ndarray:
        total = 0
        for _, phi, inv, w in self._fitted:
            total = total + ((phi @ inv) * phi).sum(1) * w
        return (total / len(self._fitted)).numpy()
