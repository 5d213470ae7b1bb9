"""The method interface shared by every estimator (scikit-learn style).

    method = get_method("if-exact", damping=0.01)   # constructor stores parameters
    method.fit(adapter, X_train, y_train)            # train-side work, done once
    S = method.scores(X_query, y_query)              # (n_queries, n_train)

Sign convention, for every method: a positive score means the training row *helped* the
model produce the query's target (removing it would raise the query's loss); negative
means it pushed against it. Influence-function methods return the estimated change of the
query loss on removing the row (loss units); the others are unitless similarities.

Regression without a query target: the squared loss of the model's own prediction has a
zero gradient, so "explain the prediction" instead. Methods that can (`explains_prediction`)
give `prediction_scores(x_query)`: each row's estimated contribution to the query's
predicted value, positive = the row raised it (removing it would lower the prediction).
"""

from __future__ import annotations

import numpy as np
import torch

from datablame.models.base import require_any


class Method:
    name = "method"
    needs_checkpoints = False
    # "loss": scores are the estimated change of the query's loss if the row is removed;
    # "similarity": unitless. Sets the default wording of `reasons`.
    units = "similarity"
    # True: `prediction_scores` gives each row's contribution to a regression prediction.
    explains_prediction = False
    explaining = "loss"  # what the last scores were of: "loss" or "prediction"
    # The adapter must give one of these (models/base.py); empty: any model.
    requires: tuple[str, ...] = ()

    def fit(self, adapter, x_train, y_train) -> Method:
        require_any(self.name, adapter, self.requires)
        self.adapter = adapter
        self.x_train, self.y_train = x_train, y_train
        self.n_train = len(x_train)
        return self

    def scores(self, x_query, y_query) -> np.ndarray:
        raise NotImplementedError

    def prediction_scores(self, x_query) -> np.ndarray:
        """(n_queries, n_train): each row's contribution to the query's predicted value."""
        raise NotImplementedError(f"{self.name} cannot explain a prediction itself")

    def effect(self, score: float) -> str:
        """The score in words, in the units of what was explained."""
        if self.explaining == "prediction":
            return f"adds {score:+.3g} to the prediction"
        return f"removing it: query loss {score:+.3g}"

    def reasons(self, x_query, y_query, top: np.ndarray, scores: np.ndarray
                ) -> list[list[str]]:
        """A short why for each ranked row: top[q] are query q's row ids, best first.

        Called after `scores`; methods with more to say (shared leaves, neighbour rank,
        reconstruction weight) override it.
        """
        if self.units == "loss":
            return [[self.effect(scores[q, r]) for r in top[q]]
                    for q in range(len(top))]
        return [[f"{self.name} {scores[q, r]:.3g}" for r in top[q]] for q in range(len(top))]

    def self_influence(self) -> np.ndarray:
        """How much each row supports itself; large = memorised / suspicious."""
        raise NotImplementedError(f"{self.name} has no self-influence")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def shared_leaf_reasons(adapter, train_leaves: np.ndarray, x_query, top: np.ndarray,
                        prefix: str = "") -> list[list[str]]:
    """'same leaf in 37/100 trees': why a tree method links a training row to the query.

    Counts trees, not tree x output: a forest's or CatBoost's tree gives all K outputs."""
    q_leaves = adapter.leaves(x_query).reshape(len(top), -1)
    if adapter.shared_outputs and adapter.n_outputs > 1:
        q_leaves, train_leaves = q_leaves[:, ::adapter.n_outputs], \
            train_leaves[:, ::adapter.n_outputs]
    total = q_leaves.shape[1]
    return [[f"{prefix}same leaf in {int((train_leaves[r] == q_leaves[q]).sum())}/{total} "
             "trees" for r in top[q]] for q in range(len(top))]
