"""Rank fusion: one ordering from the gradient ranking and the retrieval ranking.

Why fused is the text default (measured in bench/facts.py and bench/paraphrase.py, numbers
in the README): signed gradients miss rows whose answer the query rewords, retrieval
misses rows whose prompt the query rewords; a row first in either list stays near the top.
"""

from __future__ import annotations

import numpy as np

from datablame.errors import UserError

RANKINGS = ("fused", "gradient")


def check_rank_by(rank_by: str) -> None:
    if rank_by not in RANKINGS:
        raise UserError(f"unknown ranking '{rank_by}' (use {' or '.join(RANKINGS)})")


def fuse_ranks(gradient_rank: np.ndarray, retrieval_rank: np.ndarray) -> np.ndarray:
    """1/(1 + gradient rank) + 1/(1 + retrieval rank): reciprocal-rank fusion with a sharp
    constant (k=1, measured better than the usual 60), so a row first in either list stays
    near the top.

    The gradient rank should be by |score|, strength in either direction: a memorised source
    can *oppose* a query that rewords it, and the `reading` column still says which way a
    row pushes.
    """
    return 1.0 / (1 + np.asarray(gradient_rank)) + 1.0 / (1 + np.asarray(retrieval_rank))


def strength_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every score by |score| (ties keep their order)."""
    ranks = np.empty(len(scores), dtype=int)
    ranks[np.argsort(-np.abs(scores), kind="stable")] = np.arange(1, len(scores) + 1)
    return ranks


def fused_order(gradient_rank: np.ndarray, retrieval_rank: np.ndarray, scores: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(order, fused key): rows by fused key, ties broken by the signed score."""
    fused = fuse_ranks(gradient_rank, retrieval_rank)
    return np.lexsort((-np.asarray(scores), -fused)), fused
