"""grad-dot and grad-cos: influence with the Hessian replaced by the identity (the seed).

Cheap and a good first look, but measured here they rank rows worse than curvature-aware
methods on tabular models (see bench/tabular_influence.py): cosine discards the gradient
norm, which is exactly what says a row is poorly fit and therefore influential.
"""

from __future__ import annotations

import numpy as np

from datablame.methods.base import Method, to_numpy
from datablame.methods.gradient_alignment import cosines_from_dots
from datablame.models.base import GRADIENTS


class GradDot(Method):
    name = "grad-dot"
    requires = (GRADIENTS,)

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self.g_train = adapter.gradients(x_train, y_train)
        return self

    def _query(self, x_query, y_query):
        return self.adapter.gradients(x_query, y_query)

    explains_prediction = True

    def scores(self, x_query, y_query) -> np.ndarray:
        self.explaining = "loss"
        return self._from_query(self._query(x_query, y_query))

    def prediction_scores(self, x_query) -> np.ndarray:
        """The query's loss gradient replaced by minus its output gradient."""
        self.explaining = "prediction"
        return self._from_query(-self.adapter.output_gradients(x_query))

    def _from_query(self, q):
        return to_numpy(q @ self.g_train.T)

    def self_influence(self) -> np.ndarray:
        return to_numpy((self.g_train * self.g_train).sum(1))


class GradCos(GradDot):
    name = "grad-cos"

    def _from_query(self, q):
        return cosines_from_dots(to_numpy(q @ self.g_train.T), to_numpy(self.g_train.norm(dim=1)),
                                 to_numpy(q.norm(dim=1))[:, None])

    def self_influence(self) -> np.ndarray:
        return np.ones(self.n_train)
