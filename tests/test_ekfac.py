"""EK-FAC against ground truth: where the empirical Fisher is diagonal in the Kronecker
eigenbasis, EK-FAC's inverse is the exact damped inverse; GPT-2's (in, out) Conv1D weights
give the same scores as the same layer stored (out, in)."""

from __future__ import annotations

import numpy as np
import torch

from datablame.methods.ekfac import EKFAC
from datablame.models.base import KRONECKER


class FactorsOnly:
    """An adapter that hands EK-FAC per-token inputs and output gradients of one layer."""

    capabilities = frozenset({KRONECKER})

    def __init__(self, xs, gs, conv: bool = False):
        self.xs, self.gs, self.conv = xs, gs, conv  # per example: (T, in), (T, out)
        out, inp = gs[0].shape[1], xs[0].shape[1]
        self.shapes = [(inp, out) if conv else (out, inp)]
        self.lm = type("LM", (), {"param_names": ["layer.weight"]})()

    def kronecker_factors(self, rows):
        grads, a, s, tokens = [], 0.0, 0.0, 0
        for i in rows:
            x, g = self.xs[i], self.gs[i]
            grad = g.T @ x  # (out, in)
            grads.append((grad.T if self.conv else grad).reshape(-1))
            a, s, tokens = a + x.T @ x, s + g.T @ g, tokens + len(x)
        factors = {"layer.weight": {"A": a, "S": s, "tokens": tokens,
                                    "kind": "conv1d" if self.conv else "linear"}}
        return torch.stack(grads), factors

    def gradients(self, rows, y=None):
        return self.kronecker_factors(rows)[0]


def test_ekfac_is_the_exact_damped_inverse_when_the_fisher_is_diagonal_in_its_basis():
    """One token per example, x and g each along one axis: every per-example gradient has
    one nonzero entry, so the Fisher is diagonal, and so are A and S (distinct counts per
    axis: no ties in their eigenvalues). EK-FAC must then equal (F + damping I)^-1."""
    rng = np.random.default_rng(0)
    n_in, n_out, n = 4, 3, 60
    ins = rng.choice(n_in, n, p=[0.4, 0.3, 0.2, 0.1])
    outs = rng.choice(n_out, n, p=[0.5, 0.3, 0.2])
    xs, gs = [], []
    for i, o in zip(ins, outs, strict=True):
        x = torch.zeros(1, n_in, dtype=torch.float64)
        g = torch.zeros(1, n_out, dtype=torch.float64)
        x[0, i] = rng.uniform(0.5, 2.0)
        g[0, o] = rng.normal()
        xs.append(x)
        gs.append(g)
    adapter = FactorsOnly(xs, gs)
    method = EKFAC().fit(adapter, list(range(n)), None)
    grads = method.g_train.numpy()
    fisher = grads.T @ grads / n
    assert np.count_nonzero(fisher - np.diag(np.diag(fisher))) == 0
    damping = 0.1 * np.diag(fisher).mean()
    v = rng.normal(size=(5, n_in * n_out))
    want = np.linalg.solve(fisher + damping * np.eye(len(fisher)), v.T).T
    got = method._solve(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_a_conv1d_weight_scores_as_the_same_linear_weight():
    rng = np.random.default_rng(1)
    xs = [torch.from_numpy(rng.normal(size=(int(t), 5))) for t in rng.integers(1, 6, 20)]
    gs = [torch.from_numpy(rng.normal(size=(len(x), 3))) for x in xs]
    linear = EKFAC().fit(FactorsOnly(xs, gs), list(range(20)), None)
    conv = EKFAC().fit(FactorsOnly(xs, gs, conv=True), list(range(20)), None)
    np.testing.assert_allclose(conv.scores(list(range(3)), None),
                               linear.scores(list(range(3)), None), rtol=1e-9)
    # and a row's own score is positive: (1/n) g^T H^-1 g with H positive definite
    assert (np.diag(linear.scores(list(range(20)), None)) > 0).all()


def test_without_the_correction_it_is_kfac_the_kronecker_product_of_the_factors():
    """correct_eigenvalues=False: (S (x) A + damping I)^-1 exactly, S and A per token, for a
    weight flattened row-major (out, in)."""
    rng = np.random.default_rng(2)
    xs = [torch.from_numpy(rng.normal(size=(int(t), 4))) for t in rng.integers(1, 5, 30)]
    gs = [torch.from_numpy(rng.normal(size=(len(x), 3))) for x in xs]
    method = EKFAC(correct_eigenvalues=False).fit(FactorsOnly(xs, gs), list(range(30)), None)
    tokens = sum(len(x) for x in xs)
    a = sum((x.T @ x).numpy() for x in xs) / tokens
    s = sum((g.T @ g).numpy() for g in gs) / tokens
    curvature = np.kron(s, a)
    damping = 0.1 * np.outer(np.linalg.eigvalsh(s), np.linalg.eigvalsh(a)).mean()
    v = rng.normal(size=(4, 12))
    want = np.linalg.solve(curvature + damping * np.eye(12), v.T).T
    np.testing.assert_allclose(method._solve(torch.from_numpy(v)).numpy(), want, rtol=1e-9)
