"""Gradient alignment (the seed's method): cosine or dot product of loss gradients.

This is influence with the Hessian replaced by the identity. Positive = the row's gradient
step also lowers the query's loss (it helped); negative = it pushed against the query.
The one place a gradient cosine is computed: the exact re-ranking, the gradient store's
scan and the grad-cos method all call `cosines_from_dots`.
"""

from __future__ import annotations

import numpy as np

from datablame.errors import UserError

ALIGNMENTS = ("cosine", "dot")

# The seed's reading of a gradient cosine. Only meaningful for cosine scores.
READINGS = ((0.8, "strong"), (0.2, "related"), (-0.2, "unrelated"))


def reading(score: float) -> str:
    """strong >= 0.8 > related >= 0.2 > unrelated > -0.2 >= opposing."""
    for threshold, label in READINGS:
        if score >= threshold:
            return label
    return "opposing"


def check_alignment(kind: str) -> None:
    if kind not in ALIGNMENTS:
        raise UserError(f"unknown alignment '{kind}' (use {' or '.join(ALIGNMENTS)})")


def cosines_from_dots(dots: np.ndarray, row_norms, query_norms) -> np.ndarray:
    """Dot products (rows along the last axis) -> cosines; a zero gradient (nothing left
    to learn) scores 0 rather than NaN. `query_norms` is a scalar or one per query row."""
    dots = np.asarray(dots, dtype=np.float64)
    scale = np.asarray(row_norms, dtype=np.float64) * np.asarray(query_norms,
                                                                dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, dots / np.where(scale > 0, scale, 1.0), 0.0)


def align_dots(dots: np.ndarray, row_norms, query_norms, kind: str) -> np.ndarray:
    """Dot products as the chosen alignment: unchanged for dot, normalised for cosine."""
    check_alignment(kind)
    return np.asarray(dots, dtype=np.float64) if kind == "dot" else \
        cosines_from_dots(dots, row_norms, query_norms)


def align(query_grad: np.ndarray, row_grads: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """Score every row's gradient against one query gradient."""
    q = np.asarray(query_grad, dtype=np.float64).ravel()
    g = np.asarray(row_grads, dtype=np.float64)
    return align_dots(g @ q, np.linalg.norm(g, axis=1), np.linalg.norm(q), kind)
