"""Method conformance: every registered method on every model family it declares.

For each (method, family) pair in FAMILY_METHODS, on tiny fixtures:
  - shape: scores are (n_query, n_train) and finite;
  - determinism: fitting and scoring twice gives identical scores;
  - reasons: one non-empty string per ranked row, tied to its row (not to its rank);
  - sign convention (positive = the row helped: removing it RAISES the query loss), checked
    against leave-one-out retraining for every method that claims it; similarity methods
    (leaf-sim, simplex, shap-neighbors, knn-shapley) carry no such sign by design, so they
    get what they do promise instead;
and for every family a method does NOT declare: `check_fits` and fitting both refuse in one
line naming the method.

Tabular fixtures share one binary task (and a regression one for Ridge); retrainings are
cached per model, so the sign checks of all methods on one model cost one leave-one-out
retraining per distinct row they rank first. The causal LM (an untrained tiny GPT-2 +
LoRA) gets the shape, determinism and reason checks, and for the methods with the sign of
g_q . g_i a one-gradient-step sign check instead of retraining (too slow per row here);
test_trace_end_to_end.py checks the planted culprit scores positive on the demo model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pytest
import torch

from datablame.errors import UserError
from datablame.methods.base import Method
from datablame.methods.families import FAMILY_METHODS
from datablame.methods.registry import METHODS, check_fits, get_method
from datablame.models import loading
from datablame.tabular import TabularTask, task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # this file only

# Which model each family is tested on; boosted trees on every supported library.
LIBRARIES = {"torch": ["torch"],
             "boosted-trees": ["xgboost", "lightgbm", "catboost", "sklearn-gb", "sklearn-hgb"],
             "forest": ["forest"], "linear": ["logistic", "ridge"], "causal-lm": ["causal-lm"]}
FAMILY_OF_LABEL = {label: fam for fam, labels in LIBRARIES.items() for label in labels}
# Methods that score similarity, not the effect of removing a row (see their docstrings):
# no sign convention to check against retraining; they get their own promise instead.
SIMILARITY = {"leaf-sim", "simplex", "shap-neighbors", "knn-shapley"}
TORCH_CONFIG = {"type": "mlp", "layers": [4, 2], "loss": "ce",
                "train": {"optimizer": "lbfgs", "epochs": 5, "l2": 0.01}}  # converged by 5
N_TRAIN, N_QUERY, N_RANDOM, TOP_K = 80, 6, 12, 4


def _pairs() -> list[tuple[str, str]]:
    pairs = []
    for family, methods in FAMILY_METHODS.items():
        for method in methods:
            for label in LIBRARIES[family]:
                if label == "ridge" and method != "linear-exact":
                    continue  # Ridge (regression) only for linear-exact's closed form
                pairs.append((method, label))
    return pairs


PAIRS = _pairs()
IDS = [f"{m}-{label}" for m, label in PAIRS]
SIGNED = [(m, label) for m, label in PAIRS if m not in SIMILARITY and label != "causal-lm"]
UNSUPPORTED = [(m, fam) for m in METHODS for fam in FAMILY_METHODS
               if m not in FAMILY_METHODS[fam]]


@dataclass
class Case:
    """A fitted model, its task (train rows, query rows) and cached retraining."""

    label: str
    t: TabularTask | None
    adapter: object
    x: object
    y: object
    xq: object
    yq: object
    retrain: Callable[[np.ndarray, int], np.ndarray] | None = None
    base: np.ndarray | None = None
    _loo: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return FAMILY_OF_LABEL[self.label]

    def loo_delta(self, row: int) -> np.ndarray:
        """Query losses after retraining without `row`, minus the trained model's."""
        if row not in self._loo:
            keep = np.delete(np.arange(N_TRAIN), row)
            self._loo[row] = np.asarray(self.retrain(keep, 0)) - self.base
        return self._loo[row]


def _data(regression: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_TRAIN + 40, 4))
    signal = x[:, 0] + 0.5 * x[:, 1]
    if regression:
        return x, signal + 0.3 * rng.standard_normal(len(x))
    return x, (signal + 0.5 * rng.standard_normal(len(x)) > 0).astype(np.int64)


def _tree_model(label: str):
    import catboost as cb
    import lightgbm as lgb
    import xgboost as xgb
    from sklearn import ensemble as ens

    return {"xgboost": lambda: xgb.XGBClassifier(n_estimators=15, max_depth=3, n_jobs=1),
            "lightgbm": lambda: lgb.LGBMClassifier(n_estimators=15, num_leaves=5,
                                                   min_child_samples=5, verbose=-1,
                                                   deterministic=True, force_row_wise=True,
                                                   n_jobs=1),
            # no bagging nor random split scores: retraining is then a function of the data
            "catboost": lambda: cb.CatBoostClassifier(iterations=15, depth=3, verbose=0,
                                                      bootstrap_type="No", random_strength=0,
                                                      thread_count=1, random_seed=0,
                                                      allow_writing_files=False),
            "sklearn-gb": lambda: ens.GradientBoostingClassifier(n_estimators=15, max_depth=2,
                                                                 random_state=0),
            "sklearn-hgb": lambda: ens.HistGradientBoostingClassifier(
                max_iter=15, max_leaf_nodes=5, min_samples_leaf=5, early_stopping=False,
                random_state=0),
            "forest": lambda: ens.RandomForestClassifier(n_estimators=10, max_depth=4,
                                                         random_state=0, n_jobs=1),
            }[label]()


@cache
def tabular_case(label: str) -> Case:
    """The model for `label` on the shared data; the N_QUERY held-out rows it finds hardest
    (largest loss of the true target) are the queries: there the effect of one row is
    large enough to measure."""
    from sklearn.linear_model import LogisticRegression, Ridge

    x, y = _data(regression=label == "ridge")
    config = None
    if label == "torch":
        from datablame.models.torch_files import trainer_from_config

        x = x.astype(np.float32)
        config = TORCH_CONFIG
        model = trainer_from_config(config).fit(x[:N_TRAIN], y[:N_TRAIN])
    elif label == "logistic":
        model = LogisticRegression(C=1.0).fit(x[:N_TRAIN], y[:N_TRAIN])
    elif label == "ridge":
        model = Ridge(alpha=1.0).fit(x[:N_TRAIN], y[:N_TRAIN])
    else:
        model = _tree_model(label).fit(x[:N_TRAIN], y[:N_TRAIN])
    xt, yt, xh, yh = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    held = task(model, xt, yt, xh, loss="ce", l2=0.01, config=config)
    hardest = np.sort(np.argsort(-np.asarray(held.adapter.query_losses(xh, yh)))[:N_QUERY])
    t = task(model, xt, yt, xh[hardest], loss="ce", l2=0.01, config=config)
    case = Case(label, t, t.adapter, xt, yt, xh[hardest], yh[hardest])
    if label != "forest":  # forest methods are all similarity methods: nothing to retrain
        case.retrain, case.base = t.retrain(case.yq)
    return case


@pytest.fixture(scope="module")
def lm_case(random_lora_model) -> Case:
    from datablame.data.template import PromptTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter
    from datablame.models.text_rows import TextRowsAdapter

    base, adapter_dir = random_lora_model
    tmpl = PromptTemplate()
    rows = [{"instruction": "say hi", "input": "", "output": "hello there friend ."},
            {"instruction": "the quick brown fox", "input": "", "output": "jumps over"},
            {"instruction": "say", "input": "", "output": "hi"},
            {"instruction": "again", "input": "the fox", "output": "the lazy dog again"},
            {"instruction": "say hello", "input": "", "output": "hello friend"}]
    queries = [{"instruction": "say hi", "input": "", "output": "hello friend ."},
               {"instruction": "the fox", "input": "", "output": "jumps over the dog"}]
    adapter = TextRowsAdapter(CausalLMAdapter(base, adapter_dir, device="cpu"), batch_size=8)
    return Case("causal-lm", None, adapter, [tmpl.format(r) for r in rows], None,
                [tmpl.format(q) for q in queries], None)


def _case(label: str, request) -> Case:
    return request.getfixturevalue("lm_case") if label == "causal-lm" else tabular_case(label)


def _params(method: str, case: Case) -> dict:
    """Method options a pair needs: TracIn's checkpoints (with different learning rates);
    LiSSA at depth 100, not 1000 (converged on this 10-parameter model: the series'
    contraction is well below 0.9 a step; the default takes ~30 s here)."""
    if method == "if-lissa":
        return {"depth": 100}
    if method != "tracin" or case.label not in ("torch", "causal-lm"):
        return {}
    if case.label == "causal-lm":
        return {"checkpoints": [(case.adapter, 2e-4), (case.adapter, 1e-4)]}
    from datablame.models.torch_files import trainer_from_config

    trainer = trainer_from_config(TORCH_CONFIG)
    _, snaps = trainer.fit(case.x, case.y, checkpoint_every=5)
    return {"checkpoints": [(trainer.adapter(m), lr / (i + 1))
                            for i, (m, lr) in enumerate(snaps)]}


def _fit_score(method: str, case: Case) -> tuple[Method, np.ndarray]:
    est = get_method(method, **_params(method, case)).fit(case.adapter, case.x, case.y)
    return est, est.scores(case.xq, case.yq)


@cache
def _scores_cache(method: str, label: str) -> tuple[Method, np.ndarray]:
    return _fit_score(method, tabular_case(label))


def _scored(method: str, label: str, request) -> tuple[Case, Method, np.ndarray]:
    case = _case(label, request)
    if label == "causal-lm":
        return (case, *_fit_score(method, case))
    return (case, *_scores_cache(method, label))


# -- shape, determinism, reasons ----------------------------------------------------------

@pytest.mark.parametrize("method,label", PAIRS, ids=IDS)
def test_scores_are_one_finite_number_per_query_and_row(method, label, request):
    case, _, scores = _scored(method, label, request)
    assert scores.shape == (len(case.xq), len(case.x))
    assert np.all(np.isfinite(scores))
    assert np.abs(scores).max() > 0  # an all-zero matrix ranks nothing


@pytest.mark.parametrize("method,label", PAIRS, ids=IDS)
def test_fitting_and_scoring_twice_gives_identical_scores(method, label, request):
    """Bit-identical: every method seeds its randomness (LiSSA's batches, Arnoldi's start
    vector, TRAK's projection) and runs the same operations in the same order."""
    case, _, first = _scored(method, label, request)
    _, again = _fit_score(method, case)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("method,label", PAIRS, ids=IDS)
def test_a_reason_for_every_ranked_row(method, label, request):
    """One non-empty line per ranked row; asked for the same rows in reverse order, the
    reasons come back reversed (each reason belongs to its row, not to its rank)."""
    case, est, scores = _scored(method, label, request)
    k = min(TOP_K, scores.shape[1])
    tops = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    why = est.reasons(case.xq, case.yq, tops, scores)
    assert [len(w) for w in why] == [k] * len(tops)
    assert all(isinstance(r, str) and r.strip() and "\n" not in r for w in why for r in w)
    back = est.reasons(case.xq, case.yq, tops[:, ::-1].copy(), scores)
    assert back == [w[::-1] for w in why]


# -- sign convention ------------------------------------------------------------------------

def _sign_wins(case: Case, scores: np.ndarray) -> tuple[float, float]:
    """(fraction of (query, random row) pairs where removing the query's top-scored row
    raises its loss more than removing the random row, mean loss change of the top rows)."""
    rand = np.random.default_rng(1).choice(N_TRAIN, N_RANDOM, replace=False)
    rand_delta = np.stack([case.loo_delta(int(r)) for r in rand], axis=1)  # (q, R)
    top = np.argmax(scores, axis=1)
    top_delta = np.array([case.loo_delta(int(r))[q] for q, r in enumerate(top)])
    return float((top_delta[:, None] > rand_delta).mean()), float(top_delta.mean())


@pytest.mark.slow  # leave-one-out retraining
@pytest.mark.parametrize("method,label", SIGNED, ids=[f"{m}-{lab}" for m, lab in SIGNED])
def test_removing_the_top_row_raises_the_query_loss_more_than_a_random_row(method, label,
                                                                         request):
    """The sign convention against leave-one-out retraining. Meta-check: the same test on
    the sign-flipped scores (top = the row scored most negative) must fail it."""
    case, _, scores = _scored(method, label, request)
    wins, mean_top = _sign_wins(case, scores)
    assert wins >= 0.65 and mean_top > 0, (wins, mean_top)
    flipped_wins, flipped_mean = _sign_wins(case, -scores)
    assert flipped_wins < 0.5 and flipped_mean < mean_top, (flipped_wins, flipped_mean)


@pytest.mark.parametrize("method", ["grad-dot", "grad-cos", "tracin"])
def test_on_a_language_model_a_positive_row_is_one_whose_training_step_lowers_the_query_loss(
        method, lm_case):
    """The LM's sign without retraining: a small gradient step on training row i changes
    the query loss by -eta g_q . g_i to first order, so it must fall exactly for the rows
    these methods score positive (all three have the sign of g_q . g_i). DataInf and TRAK
    precondition the gradients, so a plain step does not test them."""
    case = lm_case
    _, scores = _fit_score(method, case)
    lm = case.adapter.lm
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in lm.param_names}
    grads = case.adapter.gradients(case.x).double()
    first_order = -1e-2 * (case.adapter.gradients(case.xq).double() @ grads.T
                           / grads.norm(dim=1)).numpy()  # (q, i): the step's predicted change
    base = lm.losses(case.xq)
    checked = 0
    try:
        for i in range(len(case.x)):
            step = 1e-2 * grads[i] / grads[i].norm()
            start = 0
            with torch.no_grad():
                for n in lm.param_names:
                    size = params[n].numel()
                    params[n].sub_(step[start:start + size].reshape(params[n].shape)
                                   .to(params[n].dtype))
                    start += size
            change = lm.losses(case.xq) - base
            for n in lm.param_names:
                params[n].data.copy_(saved[n])
            for q in range(len(case.xq)):
                if abs(first_order[q, i]) > 1e-4:  # well above float32 noise in a loss ~5
                    checked += 1
                    assert np.sign(change[q]) == -np.sign(scores[q, i]), (q, i, change[q])
    finally:
        for n in lm.param_names:
            params[n].data.copy_(saved[n])
    assert checked >= len(case.x) * len(case.xq) // 2
    np.testing.assert_array_equal(lm.losses(case.xq), base)  # the model is restored


# -- what the similarity methods promise instead -----------------------------------------

SIMILAR = [(m, lab) for m, lab in PAIRS if m in SIMILARITY]


@pytest.mark.parametrize("method,label", SIMILAR, ids=[f"{m}-{lab}" for m, lab in SIMILAR])
def test_similarity_methods_keep_their_own_promise(method, label, request):
    case, est, scores = _scored(method, label, request)
    ad = case.adapter
    if method == "leaf-sim":  # the fraction of trees (x outputs) where the rows share a leaf
        lt = ad.leaves(case.x).reshape(len(case.x), -1)
        lq = ad.leaves(case.xq).reshape(len(case.xq), -1)
        np.testing.assert_allclose(scores, (lq[:, None, :] == lt[None]).mean(2))
    elif method == "simplex":  # a convex mixture at least as close as any single row
        assert scores.min() >= 0
        np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-6)
        if loading.family_of(case.t.model) == "torch":
            zt, zq = ad.latent(case.x), ad.latent(case.xq)
            vertex = np.linalg.norm(zq[:, None] - zt[None], axis=2).min(1)
        else:  # one-hot leaves, each of the C columns scaled 1/sqrt(C): |e - e'|^2 = 2 diff
            lt = ad.leaves(case.x).reshape(len(case.x), -1)
            lq = ad.leaves(case.xq).reshape(len(case.xq), -1)
            vertex = np.sqrt(2 * (lq[:, None, :] != lt[None]).mean(2)).min(1)
        assert np.all(est.reconstruction_error <= vertex + 1e-6)
        assert np.any(est.reconstruction_error < vertex - 1e-3)  # mixing rows does help
    elif method == "shap-neighbors":  # minus the distance between SHAP explanations
        import shap

        explainer = shap.TreeExplainer(ad.model) if loading.family_of(case.t.model) == \
            "trees" else shap.LinearExplainer(ad.model, case.x)
        st = np.asarray(explainer.shap_values(case.x)).reshape(len(case.x), -1)
        sq = np.asarray(explainer.shap_values(case.xq)).reshape(len(case.xq), -1)
        np.testing.assert_allclose(-scores, np.linalg.norm(sq[:, None] - st[None], axis=2),
                                   rtol=1e-6, atol=1e-9)
    elif method == "knn-shapley":
        # efficiency of the Shapley value: the rows' values add up to the KNN utility of
        # the whole training set, the fraction of the query's k nearest rows that share
        # its label (the nearest by the method's own distance, ties broken by row order)
        dist = est._distances(case.xq)
        for q in range(len(case.xq)):
            nearest = np.argsort(dist[q], kind="stable")[: est.k]
            utility = float(np.mean(case.y[nearest] == case.yq[q]))
            assert scores[q].sum() == pytest.approx(utility, abs=1e-9)
            far = np.argsort(dist[q], kind="stable")[-1]  # the farthest row moves nothing
            assert abs(scores[q, far]) <= 1 / N_TRAIN + 1e-12
    else:
        raise AssertionError(f"no promise checked for {method}")


def test_knn_shapley_distances_are_what_it_says():
    """The distance the efficiency check above reuses: standardised Euclidean on the
    features for a linear model, 1 - shared-leaf fraction for trees."""
    lin, trees = tabular_case("logistic"), tabular_case("lightgbm")
    est = get_method("knn-shapley").fit(lin.adapter, lin.x, lin.y)
    mu, sd = lin.x.mean(0), lin.x.std(0)
    expect = np.linalg.norm((lin.xq - mu)[:, None] / sd - (lin.x - mu)[None] / sd, axis=2)
    np.testing.assert_allclose(est._distances(lin.xq), expect, atol=1e-6)
    est = get_method("knn-shapley").fit(trees.adapter, trees.x, trees.y)
    lt = trees.adapter.leaves(trees.x).reshape(N_TRAIN, -1)
    lq = trees.adapter.leaves(trees.xq).reshape(N_QUERY, -1)
    np.testing.assert_allclose(est._distances(trees.xq), (lq[:, None] != lt[None]).mean(2))


# -- families a method does not declare ------------------------------------------------------

def _any_adapter(family: str, request) -> Case:
    return _case({"torch": "torch", "boosted-trees": "lightgbm", "forest": "forest",
                  "linear": "logistic", "causal-lm": "causal-lm"}[family], request)


@pytest.mark.parametrize("method,family", UNSUPPORTED,
                         ids=[f"{m}-{f}" for m, f in UNSUPPORTED])
def test_a_method_refuses_a_family_it_does_not_declare(method, family, request):
    with pytest.raises(UserError, match=f"method '{method}'") as refused:
        check_fits(method, family)
    assert "\n" not in str(refused.value)
    case = _any_adapter(family, request)
    with pytest.raises(UserError, match=f"'{method}'") as refused:
        get_method(method, **_params(method, case)).fit(case.adapter, case.x, case.y)
    assert "\n" not in str(refused.value)


def test_every_registered_method_is_declared_by_some_family_and_tested():
    declared = {m for methods in FAMILY_METHODS.values() for m in methods}
    assert declared == set(METHODS)
    assert {m for m, _ in PAIRS} == set(METHODS)
    assert {FAMILY_OF_LABEL[lab] for _, lab in PAIRS} == set(FAMILY_METHODS)
    assert {lab for m, lab in PAIRS if m == "leaf-share"} == set(LIBRARIES["boosted-trees"])
