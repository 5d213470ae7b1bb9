"""The method interface shared by every estimator (scikit-learn style).

    method = get_method("if-exact", damping=0.01)   # constructor stores parameters
    method.fit(adapter, X_train, y_train)            # train-side work, done once
    S = method.scores(X_query, y_query)              # (n_queries, n_train)

Sign convention, for every method: a positive score means the training row *helped* the
model produce the query's target (removing it would raise the query's loss); negative
means it pushed against it. Influence-function methods return the estimated change of the
query loss on removing the row (loss units); the others are unitless similarities.
"""

from __future__ import annotations

import numpy as np
import torch


class Method:
    name = "method"
    needs_checkpoints = False

    def fit(self, adapter, x_train, y_train) -> Method:
        self.adapter = adapter
        self.x_train, self.y_train = x_train, y_train
        self.n_train = len(x_train)
        return self

    def scores(self, x_query, y_query) -> np.ndarray:
        raise NotImplementedError

    def self_influence(self) -> np.ndarray:
        """How much each row supports itself; large = memorised / suspicious."""
        raise NotImplementedError(f"{self.name} has no self-influence")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()
