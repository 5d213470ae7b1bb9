"""shap-neighbors: training rows whose SHAP explanation is closest to the query's.

An *explanation-similarity heuristic*, not an influence estimate: it finds rows the model
explains the same way (same features pushing the same direction), which is a useful "rows
like this one" for auditors but says nothing about what removing a row would change.
SHAP values come from shap's TreeExplainer (tree ensembles) or LinearExplainer (linear
models). Score = -Euclidean distance in SHAP space (higher = more similar).
"""

from __future__ import annotations

import numpy as np

from datablame.errors import UserError
from datablame.methods.base import Method
from datablame.models.base import LEAVES, LINEAR, has


class ShapNeighbors(Method):
    name = "shap-neighbors"
    requires = (LEAVES, LINEAR)

    def _explainer(self):
        import shap

        try:
            if has(self.adapter, LEAVES):
                return shap.TreeExplainer(self.adapter.model)
            return shap.LinearExplainer(self.adapter.model, np.asarray(self.x_train))
        except shap.utils._exceptions.InvalidModelError as exc:  # e.g. multiclass sklearn GB
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"shap cannot explain this model ({message}): choose another "
                            "--method (auto picks the measured default)") from None

    def _shap(self, x) -> np.ndarray:
        values = self.explainer.shap_values(np.asarray(x) if not hasattr(x, "iloc") else x)
        arr = np.asarray(values, dtype=np.float64)
        if isinstance(values, list):  # older shap: one array per class
            arr = np.stack(values, axis=-1)
        return arr.reshape(len(x), -1)

    def fit(self, adapter, x_train, y_train):
        super().fit(adapter, x_train, y_train)
        self.explainer = self._explainer()
        self.train_shap = self._shap(x_train)
        return self

    def scores(self, x_query, y_query=None) -> np.ndarray:
        q = self._shap(x_query)
        sq = (q * q).sum(1)[:, None] + (self.train_shap ** 2).sum(1)[None] - \
            2 * q @ self.train_shap.T
        return -np.sqrt(np.maximum(sq, 0))

    def reasons(self, x_query, y_query, top, scores):
        return [[f"SHAP explanation distance {-scores[q, r]:.3g}" for r in top[q]]
                for q in range(len(top))]
