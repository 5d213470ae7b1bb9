"""Gradient alignment (the seed's method): cosine or dot product of loss gradients.

This is influence with the Hessian replaced by the identity. Positive = the row's gradient
step also lowers the query's loss (it helped); negative = it pushed against the query.
"""

from __future__ import annotations

import numpy as np

# The seed's reading of a gradient cosine. Only meaningful for cosine scores.
READINGS = ((0.8, "strong"), (0.2, "related"), (-0.2, "unrelated"))


def reading(score: float) -> str:
    """strong >= 0.8 > related >= 0.2 > unrelated > -0.2 >= opposing."""
    for threshold, label in READINGS:
        if score >= threshold:
            return label
    return "opposing"


def align(query_grad: np.ndarray, row_grads: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """Score every row against the query; zero gradients (nothing to learn) score 0."""
    q = np.asarray(query_grad, dtype=np.float64).ravel()
    g = np.asarray(row_grads, dtype=np.float64)
    dots = g @ q
    if kind == "dot":
        return dots
    if kind != "cosine":
        raise ValueError(f"unknown alignment '{kind}'")
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
