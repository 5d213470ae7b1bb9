"""linear-exact: closed-form attribution for scikit-learn linear models.

- LinearRegression / Ridge: the *exact* leave-one-out change of the query's squared error,
  from the hat matrix (no retraining): removing row i moves the coefficients by
  -(X'X + a*P)^{-1} x_i e_i / (1 - h_ii), with e_i the row's residual, h_ii its leverage
  and P the penalty (the intercept is not penalised, as in scikit-learn).
- LogisticRegression: the influence function with the exact Hessian of scikit-learn's
  objective C * sum(log-loss) + |w|^2 / 2 (intercept unpenalised), a first-order estimate.

Positive = removing the row would raise the query's loss (it helped).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from datablame.errors import UserError
from datablame.methods.base import Method
from datablame.models.base import LINEAR


def _design(model, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.ones((len(x), 1))]) if model.fit_intercept else x


class LinearExact(Method):
    name = "linear-exact"
    requires = (LINEAR,)
    units = "loss"

    def fit(self, adapter, x_train, y_train):
        from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge

        super().fit(adapter, x_train, y_train)
        model = self.model = adapter.model
        xd = _design(model, x_train)
        d = xd.shape[1]
        penalty = np.eye(d)
        if model.fit_intercept:
            penalty[-1, -1] = 0.0
        if isinstance(model, (LinearRegression, Ridge)):
            self.kind = "ridge"
            alpha = float(getattr(model, "alpha", 0.0))
            self.theta = np.r_[np.ravel(model.coef_), np.ravel(model.intercept_)[:1]] \
                if model.fit_intercept else np.ravel(model.coef_)
            a = xd.T @ xd + alpha * penalty
            self.a_inv = np.linalg.pinv(a)
            self.resid = xd @ self.theta - np.asarray(y_train, dtype=np.float64)
            self.lev = np.einsum("ij,jk,ik->i", xd, self.a_inv, xd)
            self.xd = xd
        elif isinstance(model, LogisticRegression):
            if len(model.classes_) != 2:
                raise UserError("linear-exact supports binary LogisticRegression")
            self.kind = "logistic"
            c = float(model.C)
            self.theta = np.r_[np.ravel(model.coef_), np.ravel(model.intercept_)] \
                if model.fit_intercept else np.ravel(model.coef_)
            yb = (np.asarray(y_train) == model.classes_[1]).astype(float)
            p = expit(xd @ self.theta)
            hess = c * (xd * (p * (1 - p))[:, None]).T @ xd + penalty
            self.h_inv = np.linalg.inv(hess)
            self.g_train = c * (p - yb)[:, None] * xd  # per-row gradient of C * log-loss
            self.xd = xd
        else:
            raise UserError(f"linear-exact supports LinearRegression, Ridge and "
                            f"LogisticRegression, not {type(model).__name__}")
        return self

    def scores(self, x_query, y_query) -> np.ndarray:
        xq = _design(self.model, x_query)
        yq = np.asarray(y_query)
        if self.kind == "ridge":
            yq = yq.astype(np.float64)
            # delta theta_i = a_inv x_i e_i / (1 - h_ii)  (theta_{-i} = theta + delta)
            shift = (self.a_inv @ self.xd.T) * (self.resid / np.maximum(1 - self.lev, 1e-12))
            pred = xq @ self.theta
            new = pred[:, None] + xq @ shift  # (m, n) query predictions without row i
            return (new - yq[:, None]) ** 2 - (pred - yq)[:, None] ** 2
        # probabilities of the second class, unless every value is one of the classes
        # (a model fitted on 1.0 / 2.0 has float labels, not probabilities)
        soft = yq.dtype.kind == "f" and not np.isin(yq, self.model.classes_).all()
        yb = yq.astype(float) if soft else (yq == self.model.classes_[1]).astype(float)
        p = expit(xq @ self.theta)
        gq = (p - yb)[:, None] * xq
        return gq @ self.h_inv @ self.g_train.T  # removal effect on the query loss

    explains_prediction = True

    def prediction_scores(self, x_query) -> np.ndarray:
        """Ridge / least squares: exactly how much each row raised the query's prediction
        (prediction with the row minus prediction without it)."""
        if self.kind != "ridge":
            raise UserError("linear-exact explains a prediction of a regression model only")
        self.explaining = "prediction"
        xq = _design(self.model, x_query)
        shift = (self.a_inv @ self.xd.T) * (self.resid / np.maximum(1 - self.lev, 1e-12))
        return -(xq @ shift)

    def self_influence(self) -> np.ndarray:
        if self.kind == "ridge":
            return self.resid ** 2 * (1 / (1 - self.lev) ** 2 - 1)
        return np.einsum("ij,jk,ik->i", self.g_train, self.h_inv, self.g_train)
