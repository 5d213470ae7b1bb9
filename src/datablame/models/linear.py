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
            from datablame.data.tables import class_positions

            proba = self.model.predict_proba(x)
            # a label the model lacks (retrained on rows without its class): probability 0
            column = class_positions(y, self.model.classes_, unknown_ok=True)
            p = np.where(column >= 0, proba[np.arange(len(y)), np.maximum(column, 0)], 0.0)
            return -np.log(np.clip(p, 1e-12, 1))
        return (self.model.predict(x) - y) ** 2
