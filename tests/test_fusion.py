"""The trace's fused ordering key: which signal leads when, and what it is invariant to."""

import numpy as np

from datablame.methods.fusion import fused_key, fused_order, strength_ranks


def _ranks(scores: np.ndarray) -> np.ndarray:
    r = np.empty(len(scores), dtype=int)
    r[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return r


def test_a_strongly_aligned_row_leads_and_a_weak_gradient_defers_to_retrieval():
    rng = np.random.default_rng(0)
    retrieval_rank = np.r_[40, 1, np.arange(2, 40)]  # row 1 is retrieval's first
    # after a short fine-tune: row 0's gradient is strongly aligned (cosine 0.9)
    strong = np.r_[0.9, 0.1, rng.uniform(-0.1, 0.1, 38)]
    order, _ = fused_order(strength_ranks(strong), retrieval_rank, strong)
    assert order[0] == 0
    # a memorised answer: every cosine is weak, the best (row 0) only 0.2
    weak = np.r_[0.2, 0.05, rng.uniform(-0.05, 0.05, 38)]
    order, _ = fused_order(strength_ranks(weak), retrieval_rank, weak)
    assert order[0] == 1


def test_the_key_is_the_score_plus_rank_bonuses_so_sums_over_rows_stay_additive():
    scores = np.array([0.3, -0.2, 0.1, 0.0])
    g_rank, r_rank = strength_ranks(scores), np.array([2, 1, 4, 3])
    key = fused_key(scores, g_rank, r_rank)
    bonus = key - scores
    # the bonus depends on the ranks only: shifting every score keeps the ranks and bonus
    np.testing.assert_allclose(fused_key(scores + 0.05, strength_ranks(scores + 0.05), r_rank)
                               - (scores + 0.05), bonus)
    assert bonus[1] > bonus[0] > bonus[3] > bonus[2]  # retrieval's head weighs most


def test_dot_products_are_put_on_the_cosine_scale_first():
    dots = np.array([120.0, -40.0, 3.0])
    r_rank = np.array([3, 1, 2])
    small = fused_key(dots / 100, strength_ranks(dots), r_rank, bounded=False)
    np.testing.assert_allclose(fused_key(dots, strength_ranks(dots), r_rank, bounded=False),
                               small)
    assert _ranks(small)[0] == 1  # the dominant dot product still leads
