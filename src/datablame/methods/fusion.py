"""Fusion: one ordering from the gradient scores and the retrieval ranking.

Why fused is the text default: signed gradients miss rows whose answer the query rewords,
retrieval misses rows whose prompt the query rewords (bench/facts.py, bench/paraphrase.py),
and which of the two says more about what removing rows does depends on the fine-tune: on a
short fine-tune the gradient cosine predicts retraining far better than retrieval, on one
that memorised its rows the reverse (bench/text_lds.py). The key below was chosen among
rank and score fusions by LDS against retraining (bench/text_fusion.py; numbers in the
README).
"""

from __future__ import annotations

import numpy as np

from datablame.errors import UserError

RANKINGS = ("fused", "gradient")
RETRIEVAL_BONUS = 1.0  # added as RETRIEVAL_BONUS / (1 + retrieval rank)
# the key for cosines between whitened gradients (a store built with --curvature ekfac),
# chosen by the same rule among keys on the whitened cosine: they predict retraining better
# than plain cosines, so retrieval weighs less beside them and |score| not at all
RETRIEVAL_BONUS_WHITENED = 0.25
STRENGTH_BONUS_WHITENED = 0.0
STRENGTH_BONUS = 0.25  # added as STRENGTH_BONUS / (1 + rank by |gradient score|)
# a store of both vectors (--curvature both, the default where the curvature is cheap):
# per query, where the best plain |cosine| over the rows reaches REGIME_COSINE the
# gradient is strong (a smooth fine-tune) and the score is the mix below, with its own
# retrieval bonus; below it the answer reads as memorised and the score is the plain
# cosine with the default key. Chosen by bench/text_fusion.py's third round.
REGIME_COSINE = 0.4
MIX_WHITENED = 0.75  # the whitened cosine's weight in the mix; the plain one's is 0.25
RETRIEVAL_BONUS_MIX = 0.1
STRENGTH_BONUS_MIX = 0.0


def check_rank_by(rank_by: str) -> None:
    if rank_by not in RANKINGS:
        raise UserError(f"unknown ranking '{rank_by}' (use {' or '.join(RANKINGS)})")


def fused_key(scores: np.ndarray, gradient_rank: np.ndarray, retrieval_rank: np.ndarray,
              bounded: bool = True, retrieval_bonus: float = RETRIEVAL_BONUS,
              strength_bonus: float = STRENGTH_BONUS) -> np.ndarray:
    """signed score + 1 / (1 + retrieval rank) + 0.25 / (1 + |score| rank) (the bonuses
    are `retrieval_bonus` and `strength_bonus`: the *_WHITENED ones for whitened cosines).

    Additive, so a sum of keys over a set of rows still estimates what removing them does
    (a sum of reciprocal ranks did not: LDS near 0 where only small removals were scored).
    The score is a cosine, bounded by 1, so the fixed retrieval bonus weighs more exactly
    when the gradient is weak: the best-aligned row of a memorised answer has cosine ~0.2
    and retrieval then leads; after a short fine-tune it is ~0.8 and the gradient leads.
    The |score| term (gradient_rank: rank by |score|) keeps a strong row that *opposes* the
    query (a memorised source a reworded query pulls against) near the top. Unbounded
    scores (`bounded=False`, e.g. dot products) are first divided by their largest
    magnitude.
    """
    s = np.asarray(scores, dtype=float)
    if not bounded and len(s):
        s = s / (np.abs(s).max() or 1.0)
    return (s + retrieval_bonus / (1 + np.asarray(retrieval_rank))
            + strength_bonus / (1 + np.asarray(gradient_rank)))


def strength_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every score by |score| (ties keep their order)."""
    ranks = np.empty(len(scores), dtype=int)
    ranks[np.argsort(-np.abs(scores), kind="stable")] = np.arange(1, len(scores) + 1)
    return ranks


def mix_weight(best_plain_cosine: float) -> float:
    """A store of both vectors: the whitened cosine's weight in one query's score, from the
    largest |plain cosine| over the rows (0: the plain cosine, a memorised answer)."""
    return MIX_WHITENED if best_plain_cosine >= REGIME_COSINE else 0.0


def fused_order(gradient_rank: np.ndarray, retrieval_rank: np.ndarray, scores: np.ndarray,
                bounded: bool = True, whitened: bool = False, mixed: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """(order, fused key): rows by fused key, ties broken by the signed score; `whitened`:
    the scores are cosines of whitened gradients (the whitened store's bonuses); `mixed`:
    the mix of a store of both vectors (its bonuses)."""
    bonuses = (RETRIEVAL_BONUS_MIX, STRENGTH_BONUS_MIX) if mixed else \
        (RETRIEVAL_BONUS_WHITENED, STRENGTH_BONUS_WHITENED) if whitened else \
        (RETRIEVAL_BONUS, STRENGTH_BONUS)
    fused = fused_key(scores, gradient_rank, retrieval_rank, bounded, *bonuses)
    return np.lexsort((-np.asarray(scores), -fused)), fused
