"""scikit-learn linear models (LogisticRegression, LinearRegression, Ridge, ...) as a
model family: the fitted estimator itself is the contract (closed forms read its
coefficients), plus what verification compares on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datablame.models.base import LINEAR, TABULAR


@dataclass
class LinearModelAdapter:
    model: object

    capabilities = frozenset({LINEAR, TABULAR})

    @property
    def is_regression(self) -> bool:
        from sklearn.base import is_regressor

        return is_regressor(self.model)

    def predict_targets(self, x) -> np.ndarray:
        return self.model.predict(x)

    def query_losses(self, x, y) -> np.ndarray:
        """Log loss of the true class (classifiers with probabilities), squared error
        otherwise."""
        y = np.asarray(y)
        if hasattr(self.model, "predict_proba"):
            proba = self.model.predict_proba(x)
            column = np.searchsorted(self.model.classes_, y)
            p = np.clip(proba[np.arange(len(y)), column], 1e-12, 1)
            return -np.log(p)
        return (self.model.predict(x) - y) ** 2
