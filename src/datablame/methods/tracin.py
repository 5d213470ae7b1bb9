"""TracIn (Pruthi et al. 2020): sum over training checkpoints of lr_c * g_q . g_i.

Follows training dynamics instead of assuming an optimum: give the checkpoints saved during
training with the learning rate in force at each, `checkpoints=[(adapter, lr), ...]`.
Without checkpoints it falls back to the final model alone (= grad-dot times lr 1).
Positive = a gradient step on the row lowered the query's loss (it helped).
"""

from __future__ import annotations

import numpy as np

from datablame.methods.base import Method, to_numpy
from datablame.models.base import GRADIENTS


class TracIn(Method):
    name = "tracin"
    requires = (GRADIENTS,)
    needs_checkpoints = True

    def __init__(self, checkpoints=None):
        self.checkpoints = checkpoints

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self._ckpts = list(self.checkpoints) if self.checkpoints else [(adapter, 1.0)]
        self._g = [(a, lr, a.gradients(x_train, y_train)) for a, lr in self._ckpts]
        return self

    explains_prediction = True

    def scores(self, x_query, y_query) -> np.ndarray:
        self.explaining = "loss"
        return sum(lr * to_numpy(a.gradients(x_query, y_query) @ g.T) for a, lr, g in self._g)

    def prediction_scores(self, x_query) -> np.ndarray:
        self.explaining = "prediction"
        return sum(lr * to_numpy(-a.output_gradients(x_query) @ g.T) for a, lr, g in self._g)

    def self_influence(self) -> np.ndarray:
        return sum(lr * to_numpy((g * g).sum(1)) for _, lr, g in self._g)
