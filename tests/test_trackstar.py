"""TrackStar: the formula, what each of its parts is for, and the saved Adam moments."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import sqrtm

from datablame.errors import UserError
from datablame.methods.trackstar import saved_second_moments, trackstar_scores


def test_scores_are_cosines_of_whitened_adam_scaled_gradients():
    rng = np.random.default_rng(0)
    g, gq = rng.normal(size=(30, 8)), rng.normal(size=(3, 8))
    v = rng.uniform(0.1, 4.0, size=8)
    scores = trackstar_scores(gq, g, v, proj_dim=64, mix=0.25, ridge=1e-3)  # no projection
    phi, phq = g / np.sqrt(v + 1e-8), gq / np.sqrt(v + 1e-8)
    r = 0.75 * phi.T @ phi / 30 + 0.25 * phq.T @ phq / 3
    r += 1e-3 * np.trace(r) / 8 * np.eye(8)
    w = np.real(np.linalg.inv(sqrtm(r)))
    a, b = phq @ w, phi @ w
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ \
        (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9)


def test_dividing_by_the_second_moment_finds_a_source_hidden_under_loud_parameters():
    """Four parameters with gradients 100x larger on every row (noise) drown the forty
    that carry the query's signal; scaled by sqrt(v), as Adam moved them, the source is first."""
    rng = np.random.default_rng(1)
    n, source = 40, 7
    g = np.c_[100 * rng.normal(size=(n, 4)), rng.normal(size=(n, 40))]
    query = np.r_[100 * rng.normal(size=4), g[source, 4:]][None]
    v = (g ** 2).mean(0)
    plain = trackstar_scores(query, g, None, ridge=1e6)  # huge ridge: no whitening
    scaled = trackstar_scores(query, g, v, ridge=1e6)
    assert int(np.argmax(scaled[0])) == source
    assert int(np.argmax(plain[0])) != source


def test_whitening_down_weights_a_direction_every_row_shares():
    """Every row and the query share a large template direction u; raw cosines are all
    near 1 and barely separate the source, whitened ones do."""
    rng = np.random.default_rng(2)
    n, d, source = 50, 30, 11
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    g = 10 * u + 0.3 * rng.normal(size=(n, d))
    query = (g[source] + 0.1 * rng.normal(size=d))[None]
    raw = trackstar_scores(query, g, None, ridge=1e6)[0]
    white = trackstar_scores(query, g, None)[0]
    assert int(np.argmax(white)) == source
    gap = lambda s: s[source] - np.max(np.delete(s, source))  # noqa: E731
    assert gap(white) > 5 * gap(raw)  # 9x at the default ridge (3x the mean eigenvalue)
    assert np.median(raw) > 0.9 > np.median(white)


def test_saved_second_moments_cover_the_traced_parameters_or_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    names = ["a.lora_A.weight", "a.lora_B.weight"]
    save_file({f"{names[0]}.exp_avg_sq": torch.full((2, 3), 4.0),
               f"{names[1]}.exp_avg_sq": torch.full((3, 2), 9.0),
               f"{names[0]}.exp_avg": torch.zeros(2, 3)},
              str(tmp_path / "optimizer_state.safetensors"), metadata={"step": "3"})
    v = saved_second_moments(tmp_path, names)
    np.testing.assert_array_equal(v, np.r_[np.full(6, 4.0), np.full(6, 9.0)])
    assert saved_second_moments(tmp_path / "elsewhere", names) is None
    with pytest.raises(UserError, match="no second moment for 1 of the traced"):
        saved_second_moments(tmp_path, names + ["b.weight"])
