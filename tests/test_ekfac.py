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

    def kronecker_factors(self, rows, sampled_labels=None):
        """`sampled_labels` (a seed): output gradients from `drawn[seed]` when given (a
        stand-in for answers drawn from a model), else the rows' own."""
        gs = self.gs if sampled_labels is None else self.drawn[sampled_labels]
        grads, a, s, tokens = [], 0.0, 0.0, 0
        for i in rows:
            x, g = self.xs[i], gs[i]
            grad = g.T @ x  # (out, in)
            grads.append((grad.T if self.conv else grad).reshape(-1))
            a, s, tokens = a + x.T @ x, s + g.T @ g, tokens + len(x)
        factors = {"layer.weight": {"A": a, "S": s, "tokens": tokens,
                                    "kind": "conv1d" if self.conv else "linear"}}
        return torch.stack(grads), factors

    def gradients(self, rows, y=None):
        return self.kronecker_factors(rows)[0]


class SampledFactors(FactorsOnly):
    """FactorsOnly whose every draw (by seed) has its own random output gradients."""

    def __init__(self, xs, gs, rng):
        super().__init__(xs, gs)
        self.rng = rng
        self.drawn: dict = {}

    def kronecker_factors(self, rows, sampled_labels=None):
        if sampled_labels is not None and sampled_labels not in self.drawn:
            self.drawn[sampled_labels] = [torch.from_numpy(self.rng.normal(size=g.shape))
                                          for g in self.gs]
        return super().kronecker_factors(rows, sampled_labels)


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
    method = EKFAC(fisher="empirical").fit(adapter, list(range(n)), None)
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
    linear = EKFAC(fisher="empirical").fit(FactorsOnly(xs, gs), list(range(20)), None)
    conv = EKFAC(fisher="empirical").fit(FactorsOnly(xs, gs, conv=True), list(range(20)),
                                        None)
    np.testing.assert_allclose(conv.scores(list(range(3)), None),
                               linear.scores(list(range(3)), None), rtol=1e-9)
    # and a row's own score is positive: (1/n) g^T H^-1 g with H positive definite
    assert (np.diag(linear.scores(list(range(20)), None)) > 0).all()


def test_without_the_correction_it_is_kfac_the_kronecker_product_of_the_factors():
    """correct_eigenvalues=False: (S (x) A + damping I)^-1 exactly, A per token and S per
    row, for a weight flattened row-major (out, in)."""
    rng = np.random.default_rng(2)
    xs = [torch.from_numpy(rng.normal(size=(int(t), 4))) for t in rng.integers(1, 5, 30)]
    gs = [torch.from_numpy(rng.normal(size=(len(x), 3))) for x in xs]
    method = EKFAC(correct_eigenvalues=False, fisher="empirical").fit(
        FactorsOnly(xs, gs), list(range(30)), None)
    tokens = sum(len(x) for x in xs)
    a = sum((x.T @ x).numpy() for x in xs) / tokens
    s = sum((g.T @ g).numpy() for g in gs) / len(xs)
    curvature = np.kron(s, a)
    damping = 0.1 * np.outer(np.linalg.eigvalsh(s), np.linalg.eigvalsh(a)).mean()
    v = rng.normal(size=(4, 12))
    want = np.linalg.solve(curvature + damping * np.eye(12), v.T).T
    np.testing.assert_allclose(method._solve(torch.from_numpy(v)).numpy(), want, rtol=1e-9)


def test_kfac_has_the_scale_of_the_fisher_whatever_share_of_tokens_a_layer_sees():
    """With independent zero-mean tokens, E[vec(G) vec(G)^T] = T E[x x^T] (x) E[g g^T]
    exactly. K-FAC must match that scale (its trace) for a layer whose gradient reaches
    every token and for one it reaches on 1 token in 4 (as a last layer sees only the
    answer): a per-token S would be 4x too small for the first and right for neither."""
    rng = np.random.default_rng(3)
    n, t = 4000, 4
    for share in (t, 1):
        xs = [torch.from_numpy(rng.normal(size=(share, 3))) for _ in range(n)]
        gs = [torch.from_numpy(rng.normal(size=(share, 2))) for _ in range(n)]
        method = EKFAC(correct_eigenvalues=False, fisher="empirical", damping_scale=0.0).fit(
            FactorsOnly(xs, gs), list(range(n)), None)
        grads = method.g_train.numpy()
        fisher_trace = (grads ** 2).sum(1).mean()  # trace of (1/n) sum G G^T
        kfac_trace = float(method.blocks[0][5].sum())
        assert abs(kfac_trace / fisher_trace - 1) < 0.05, (share, kfac_trace, fisher_trace)


def test_the_sampled_fisher_is_the_gauss_newton_expectation_over_the_models_answers(
        random_lora_model):
    """S from answers drawn from the model must converge to its exact expectation,
    sum over answer positions and vocabulary of p(v) h h^T / T (h: the output gradient of
    the loss with answer v at that position), computed here by enumerating every v."""
    from datablame.data.template import PromptTemplate
    from datablame.models import linear_hooks
    from datablame.models.hf_causal_lm import CausalLMAdapter
    from datablame.models.text_rows import TextRowsAdapter

    base, adapter_dir = random_lora_model
    lm = CausalLMAdapter(base, adapter_dir, params="lora")
    text = PromptTemplate().format({"instruction": "say hi", "input": "",
                                    "output": "hello there"})
    draws = 3000
    _, sampled = TextRowsAdapter(lm, batch_size=500).kronecker_factors([text] * draws,
                                                                       sampled_labels=0)
    batch = lm.encode([text])
    ids, labels = batch.input_ids, batch.labels
    positions = [int(p) for p in (labels[0, 1:] != -100).nonzero()[:, 0]]
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    vocab = logits.shape[-1]
    exact: dict = {}
    for p in positions:
        probs = torch.softmax(logits[p].float(), -1)

        def weighted(p=p, probs=probs):  # example v: sqrt(p(v)) x loss of answer v at p
            out = lm.model(input_ids=ids.repeat(vocab, 1),
                           attention_mask=torch.ones(vocab, ids.shape[1], dtype=torch.long))
            nll = torch.nn.functional.cross_entropy(out.logits[:, p].float(),
                                                    torch.arange(vocab), reduction="none")
            return nll * probs.sqrt() / len(positions) ** 0.5

        linear_hooks.per_example_grads(lm.model, lm.param_names, weighted, exact)
    for name in lm.param_names:
        want = exact[name]["S"]
        got = sampled[name]["S"] / draws
        err = float((got - want).norm() / want.norm())
        assert err < 0.1, (name, err)


def test_the_sampled_curvature_averages_its_draws_and_scores_the_rows_own_gradients():
    """K-FAC's S is the mean over draws of the per-row sum of g g^T; EK-FAC's eigenvalues
    the mean over draws of the rotated squares; the scores use the rows' own gradients.
    Recomputing draws that do not fit in memory gives the same answer."""
    rng = np.random.default_rng(4)
    xs = [torch.from_numpy(rng.normal(size=(int(t), 4))) for t in rng.integers(1, 4, 25)]
    gs = [torch.from_numpy(rng.normal(size=(len(x), 3))) for x in xs]
    adapter = SampledFactors(xs, gs, rng)
    kfac = EKFAC(correct_eigenvalues=False, samples=3).fit(adapter, list(range(25)), None)
    seeds = [kfac._draw_seed(d) for d in range(3)]
    assert sorted(adapter.drawn) == sorted(seeds)
    s_mean = sum(sum((g.T @ g).numpy() for g in adapter.drawn[sd]) for sd in seeds) / (25 * 3)
    l_s = np.linalg.eigvalsh(s_mean)
    a = sum((x.T @ x).numpy() for x in xs) / sum(len(x) for x in xs)
    lam = np.outer(l_s.clip(min=0), np.linalg.eigvalsh(a).clip(min=0))
    got = kfac.blocks[0][5].numpy()
    np.testing.assert_allclose(np.sort(got.ravel()), np.sort((lam + 0.1 * lam.mean()).ravel()),
                               rtol=1e-9)
    own = torch.stack([(g.T @ x).reshape(-1) for x, g in zip(xs, gs, strict=True)])
    np.testing.assert_allclose(kfac.g_train.numpy(), own.numpy())

    ekfac = EKFAC(samples=3).fit(adapter, list(range(25)), None)
    _, _, _, q_s, q_a, lam_e = ekfac.blocks[0]
    want = sum(np.mean([(q_s.T @ (g.T @ x) @ q_a).numpy() ** 2
                        for x, g in zip(xs, adapter.drawn[sd], strict=True)], axis=0)
               for sd in seeds) / 3
    np.testing.assert_allclose(lam_e.numpy(), want + 0.1 * want.mean(), rtol=1e-9)
    tight = EKFAC(samples=3)
    tight.KEEP_BYTES = 0  # every draw recomputed from its seed for the correction
    tight.fit(adapter, list(range(25)), None)
    np.testing.assert_allclose(tight.blocks[0][5].numpy(), lam_e.numpy(), rtol=1e-12)


def test_one_seed_gives_the_same_sampled_scores_and_another_seed_other_ones(
        random_lora_model):
    from datablame.data.template import PromptTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter
    from datablame.models.text_rows import TextRowsAdapter

    base, adapter_dir = random_lora_model
    adapter = TextRowsAdapter(CausalLMAdapter(base, adapter_dir, params="lora"), 4)
    tmpl = PromptTemplate()
    rows = [tmpl.format({"instruction": w, "input": "", "output": "hello there friend"})
            for w in ("say hi", "hi", "say", "say say hi")]

    def scores(seed):
        return EKFAC(samples=2, seed=seed).fit(adapter, rows, None).scores(rows[:2], None)

    np.testing.assert_array_equal(scores(0), scores(0))
    assert not np.allclose(scores(0), scores(1))
