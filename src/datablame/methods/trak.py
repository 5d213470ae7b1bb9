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

from datablame.features.projection import RandomProjector
from datablame.methods.base import Method
from datablame.methods.trackstar import spectrum_scale
from datablame.models.base import GRADIENTS, MARGIN_GRADIENTS, has


class Trak(Method):
    name = "trak"
    requires = (GRADIENTS,)

    def __init__(self, proj_dim: int = 2048, ridge: float | None = None, models=None,
                 seed: int = 0):
        """`ridge`, in units of the mean non-zero eigenvalue of Phi^T Phi (None: 1e-3 for a
        classifier or regressor's margin, the old default, unchanged where rows outnumber
        dimensions; 10 for a language model's loss, chosen on bench/text_lds.py seed 0 among
        1e-3 / 0.1 / 1 / 10, where a few hundred rows span a fraction of the projection)."""
        self.proj_dim, self.ridge, self.models, self.seed = proj_dim, ridge, models, seed

    def _features(self, adapter, x, y):
        if has(adapter, MARGIN_GRADIENTS):
            g, p = adapter.margin_gradients(x, y)
        else:  # a language model: its loss is the output function
            g = adapter.gradients(x, y).double()
            p = torch.zeros(len(g), dtype=torch.float64)
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
            ridge = self.ridge if self.ridge is not None else (
                1e-3 if has(m, MARGIN_GRADIENTS) else 10.0)
            lam = ridge * spectrum_scale(xtx.numpy(), len(phi))
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
