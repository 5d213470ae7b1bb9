"""Tree ensembles: library round trips and ground truth for the tree methods."""

import warnings

import numpy as np
import pytest
from sklearn import ensemble as ens
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine

from datablame.methods.registry import get_method
from datablame.models.trees.base import TreeEnsembleAdapter

warnings.filterwarnings("ignore", category=UserWarning)


def _data(kind):
    loader = {"binary": load_breast_cancer, "multiclass": load_wine,
              "regression": load_diabetes}[kind]
    x, y = loader(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    return x[perm], y[perm]


def _models(kind):
    import catboost as cb
    import lightgbm as lgb
    import xgboost as xgb

    clf = kind != "regression"
    cb_loss = {"binary": "Logloss", "multiclass": "MultiClass", "regression": "RMSE"}[kind]
    return {
        "xgboost": (xgb.XGBClassifier if clf else xgb.XGBRegressor)(n_estimators=15,
                                                                    max_depth=3),
        "lightgbm": (lgb.LGBMClassifier if clf else lgb.LGBMRegressor)(
            n_estimators=15, num_leaves=7, verbose=-1),
        "catboost": (cb.CatBoostClassifier if clf else cb.CatBoostRegressor)(
            iterations=15, depth=3, verbose=0, loss_function=cb_loss, allow_writing_files=False),
        "sklearn-gb": (ens.GradientBoostingClassifier if clf else
                       ens.GradientBoostingRegressor)(n_estimators=15, max_depth=2),
        "sklearn-hgb": (ens.HistGradientBoostingClassifier if clf else
                        ens.HistGradientBoostingRegressor)(max_iter=15),
        "sklearn-rf": (ens.RandomForestClassifier if clf else ens.RandomForestRegressor)(
            n_estimators=8, max_depth=4, random_state=0),
        "sklearn-et": (ens.ExtraTreesClassifier if clf else ens.ExtraTreesRegressor)(
            n_estimators=8, max_depth=4, random_state=0),
    }


@pytest.mark.parametrize("kind", ["binary", "multiclass", "regression"])
def test_every_library_round_trips_its_own_predictions(kind):
    """bias + sum of the leaf values at datablame's leaf ids == the library's raw output,
    on rows the bias was not fitted on, with missing values where the library takes them."""
    x, y = _data(kind)
    x = x.copy()
    x[::9, 0] = np.nan
    cut = 120 if kind == "multiclass" else 300
    for name, model in _models(kind).items():
        xf = np.nan_to_num(x) if name in ("sklearn-gb", "sklearn-rf", "sklearn-et") else x
        model.fit(xf[:cut], y[:cut])
        ad = TreeEnsembleAdapter.from_model(model, xf[:cut], y[:cut])
        leaves = ad.leaves(xf[cut:])
        rebuilt = ad.raw_from_leaves(leaves)
        np.testing.assert_allclose(rebuilt, ad.library_raw(xf[cut:]), rtol=1e-6, atol=1e-5,
                                   err_msg=name)


def test_categorical_splits_and_sample_weights_round_trip():
    import lightgbm as lgb
    import pandas as pd
    import xgboost as xgb

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.standard_normal(300),
                       "c": pd.Categorical(rng.choice(["x", "y", "z", "w"], 300))})
    y = ((df["a"] > 0) ^ df["c"].isin(["x", "z"])).astype(int)
    w = rng.uniform(0.5, 2, 300)
    for model in (lgb.LGBMClassifier(n_estimators=10, verbose=-1, min_child_samples=5),
                  xgb.XGBClassifier(n_estimators=10, enable_categorical=True,
                                    tree_method="hist")):
        model.fit(df, y, sample_weight=w)
        ad = TreeEnsembleAdapter.from_model(model, df, y)
        np.testing.assert_allclose(ad.raw_from_leaves(ad.leaves(df)), ad.library_raw(df),
                                   atol=1e-5)


def test_histgradientboosting_categorical_splits_round_trip():
    """Categorical bitsets, missing values, and categories never seen in training (which
    scikit-learn sends the missing-value way) must reproduce the library's predictions."""
    import pandas as pd

    rng = np.random.default_rng(0)
    cats = [f"k{i}" for i in range(12)]
    df = pd.DataFrame({"a": rng.standard_normal(400),
                       "c": pd.Categorical(rng.choice(cats[:10], 400), categories=cats),
                       "b": rng.standard_normal(400)})
    df.loc[rng.choice(400, 30, replace=False), "a"] = np.nan
    df.loc[rng.choice(400, 30, replace=False), "c"] = np.nan
    y3 = df["c"].cat.codes.to_numpy() % 3
    y = ((df["b"] > 0) ^ np.isin(df["c"], ["k1", "k3", "k4", "k8"])).astype(int)
    query = df.copy()
    query.loc[:20, "c"] = "k11"  # a category the model never saw
    for model, target in ((ens.HistGradientBoostingClassifier(max_iter=15,
                                                              categorical_features="from_dtype"),
                           y),
                          (ens.HistGradientBoostingClassifier(max_iter=10,
                                                              categorical_features="from_dtype"),
                           y3),
                          (ens.HistGradientBoostingRegressor(max_iter=10,
                                                             categorical_features="from_dtype"),
                           df["b"].to_numpy() + y)):
        model.fit(df, target)
        assert any(p.nodes["is_categorical"].any() for row in model._predictors for p in row)
        ad = TreeEnsembleAdapter.from_model(model, df, target)
        for data in (df, query):
            np.testing.assert_allclose(ad.raw_from_leaves(ad.leaves(data)),
                                       ad.library_raw(data), atol=1e-6)


def test_leaf_influence_matches_hand_computed_leaf_change_single_tree():
    """One squared-error tree: leaf value = lr * mean residual of its rows. Removing row i
    with the structure fixed changes it by lr * (mean_S - r_i) / (|S| - 1); the first-order
    derivative is lr * (mean_S - r_i) / |S|."""
    x, y = _data("regression")
    x, y = x[:200], y[:200]
    model = ens.GradientBoostingRegressor(n_estimators=1, max_depth=2, learning_rate=0.5)
    model.fit(x, y)
    ad = TreeEnsembleAdapter.from_model(model, x, y)
    method = get_method("leaf-influence").fit(ad, x, y)
    leaves = ad.leaves(x)[:, 0, 0]
    f0 = ad.bias[0]
    resid = y - f0
    dv = method.derivatives[0][0]  # (leaf, row): d leaf value / d weight of row
    for i in (0, 5, 17):
        s = leaves == leaves[i]
        hand_derivative = 0.5 * (resid[i] - resid[s].mean()) / s.sum()
        assert dv[leaves[i], i] == pytest.approx(hand_derivative, rel=1e-9)
        refit = 0.5 * resid[s & (np.arange(200) != i)].mean()
        actual_change = refit - 0.5 * resid[s].mean()
        assert -dv[leaves[i], i] == pytest.approx(actual_change, rel=1.5 / s.sum())
        others = np.unique(leaves[~s])
        assert np.all(dv[others, i] == 0)  # structure fixed: other leaves do not move


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
@pytest.mark.parametrize("library", ["lightgbm", "xgboost", "sklearn-gb", "sklearn-hgb"])
def test_leaf_shares_add_up_to_the_libraries_leaf_values(library, kind):
    """leaf-share splits each Newton leaf value into per-row shares: in every tree, the
    shares of a leaf's rows must add up to the value the library stored for that leaf.
    This pins down each library's Newton step: learning rate, L2, starting score (LightGBM
    folds it into the first trees) and multiclass hessian scale (K/(K-1), XGBoost 2)."""
    import lightgbm as lgb
    import xgboost as xgb

    x, y = _data(kind)
    x, y = x[:300], y[:300]
    model = {"lightgbm": lambda: lgb.LGBMClassifier(n_estimators=12, num_leaves=7, verbose=-1,
                                                    min_child_samples=5),
             "xgboost": lambda: xgb.XGBClassifier(n_estimators=12, max_depth=3,
                                                  min_child_weight=0),
             "sklearn-gb": lambda: ens.GradientBoostingClassifier(n_estimators=12, max_depth=2),
             "sklearn-hgb": lambda: ens.HistGradientBoostingClassifier(max_iter=12)}[library]()
    model.fit(x, y)
    ad = TreeEnsembleAdapter.from_model(model, x, y)
    method = get_method("leaf-share").fit(ad, x, y)
    leaves = ad.leaves(x)
    share = method.share.reshape(leaves.shape)
    for t in range(leaves.shape[1]):
        for k in range(leaves.shape[2]):
            lt = leaves[:, t, k]
            sums = np.bincount(lt, weights=share[:, t, k], minlength=len(ad.values[t][k]))
            used = np.unique(lt)
            np.testing.assert_allclose(-sums[used], ad.values[t][k][used], rtol=1e-4,
                                       atol=1e-6, err_msg=f"tree {t} class {k}")


def _retrain_loss(model_factory, x, y, xq, yq, rows):
    m = model_factory().fit(x[rows], y[rows])
    ad = TreeEnsembleAdapter.from_model(m, x[rows], y[rows])
    return ad.losses(ad.library_raw(xq), yq)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["leaf-share", "boostin", "leaf-influence"])
def test_removing_top_k_raises_the_query_loss_more_than_random(method):
    import lightgbm as lgb

    x, y = _data("binary")
    x, y, xq, yq = x[:300], y[:300], x[300:340], y[300:340]

    def factory():
        return lgb.LGBMClassifier(n_estimators=30, num_leaves=7, learning_rate=0.2,
                                  verbose=-1, deterministic=True, force_row_wise=True)

    model = factory().fit(x, y)
    ad = TreeEnsembleAdapter.from_model(model, x, y)
    scores = get_method(method).fit(ad, x, y).scores(xq, yq)
    base = ad.losses(ad.library_raw(xq), yq)
    rng = np.random.default_rng(0)
    top_delta, rand_delta = [], []
    for q in np.argsort(-base)[:5]:  # the five hardest queries
        keep_top = np.setdiff1d(np.arange(300), np.argsort(-scores[q])[:15])
        keep_rand = np.setdiff1d(np.arange(300), rng.choice(300, 15, replace=False))
        top_delta.append(_retrain_loss(factory, x, y, xq, yq, keep_top)[q] - base[q])
        rand_delta.append(_retrain_loss(factory, x, y, xq, yq, keep_rand)[q] - base[q])
    assert np.mean(top_delta) > np.mean(rand_delta) + 0.05
    assert np.mean(top_delta) > 0


def test_leaf_sim_is_the_shared_leaf_fraction_and_finds_a_duplicate():
    x, y = _data("binary")
    model = ens.RandomForestClassifier(n_estimators=20, max_depth=5, random_state=0)
    # a held-out query and its planted duplicate as training row 300 (not the query
    # itself scored against itself): the duplicate shares every leaf, others fewer
    xt, yt = np.vstack([x[:300], x[[310]]]), np.r_[y[:300], y[310]]
    model.fit(xt, yt)
    ad = TreeEnsembleAdapter.from_model(model, xt, yt)
    s = get_method("leaf-sim").fit(ad, xt, yt).scores(x[[310, 311]])
    assert int(np.argmax(s[0])) == 300 and s[0, 300] == 1.0
    leaves = ad.leaves(xt).reshape(301, -1)
    lq = ad.leaves(x[[310, 311]]).reshape(2, -1)
    np.testing.assert_allclose(s, (lq[:, None] == leaves[None]).mean(2))
    assert s[1].max() < 1.0  # a query with no duplicate


def test_knn_shapley_matches_brute_force_shapley():
    """Exact Shapley of the KNN utility, by enumerating permutations on a tiny set."""
    from itertools import permutations

    from datablame.methods.knn_shapley import knn_shapley_values

    rng = np.random.default_rng(0)
    n, k = 6, 2
    dist = rng.uniform(size=n)
    order = np.argsort(dist)

    def brute_force(agree):
        """Average marginal gain of each row over all orders, utility = mean agreement of
        the k nearest rows present."""
        def utility(subset):
            return sum(agree[i] for i in sorted(subset, key=lambda i: dist[i])[:k]) / k

        out = np.zeros(n)
        perms = list(permutations(range(n)))
        for p in perms:
            for j, i in enumerate(p):
                out[i] += utility(p[: j + 1]) - utility(p[:j])
        return out / len(perms)

    match = rng.integers(0, 2, n).astype(bool)  # classification: [y == y_q]
    np.testing.assert_allclose(knn_shapley_values(order, match, k),
                               brute_force(match.astype(float)), atol=1e-12)
    agree = rng.normal(size=n)  # regression: exact for any real-valued agreement
    np.testing.assert_allclose(knn_shapley_values(order, agree, k), brute_force(agree),
                               atol=1e-12)


def test_knn_shapley_on_a_regression_model_rewards_close_labels():
    """A query identical to training row 7 (features and target): that row is its nearest
    neighbour and agrees fully, so it gets the largest value; the row with the most
    distant label gets little or negative value."""
    x, y = _data("regression")
    x, y = x[:200], y[:200]
    gb = ens.GradientBoostingRegressor(n_estimators=20, max_depth=2).fit(x, y)
    ad = TreeEnsembleAdapter.from_model(gb, x, y)
    scores = get_method("knn-shapley", k=5).fit(ad, x, y).scores(x[7:8], y[7:8])
    assert int(np.argmax(scores[0])) == 7
    far = int(np.argmax(np.abs(y - y[7])))
    assert scores[0, far] < 0 or scores[0, far] < scores[0, 7] / 10


def test_linear_exact_equals_actual_leave_one_out_for_ridge():
    from sklearn.linear_model import Ridge

    from datablame.models.linear import LinearModelAdapter

    x, y = _data("regression")
    x, y, xq, yq = x[:80], y[:80], x[80:85], y[80:85]
    model = Ridge(alpha=0.3).fit(x, y)
    scores = get_method("linear-exact").fit(LinearModelAdapter(model), x, y) \
        .scores(xq, yq)
    base = (model.predict(xq) - yq) ** 2
    for i in range(0, 80, 7):
        keep = np.arange(80) != i
        again = Ridge(alpha=0.3).fit(x[keep], y[keep])
        actual = (again.predict(xq) - yq) ** 2 - base
        np.testing.assert_allclose(scores[:, i], actual, rtol=1e-6, atol=1e-6)


def test_simplex_reconstructs_a_training_row_exactly():
    x, y = _data("binary")
    model = ens.GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0)
    model.fit(x[:200], y[:200])
    ad = TreeEnsembleAdapter.from_model(model, x[:200], y[:200])
    method = get_method("simplex", corpus_size=50).fit(ad, x[:200], y[:200])
    w = method.scores(x[[11]])[0]
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-6)
    leaves = ad.leaves(x[:200]).reshape(200, -1)
    twins = np.flatnonzero((leaves == leaves[11]).all(1))
    assert w[twins].sum() == pytest.approx(1.0, abs=1e-3)  # rows with identical leaves
    assert method.reconstruction_error[0] < 1e-3


def test_shap_neighbors_ranks_by_distance_between_shap_explanations():
    import lightgbm as lgb

    x, y = _data("binary")
    model = lgb.LGBMClassifier(n_estimators=20, verbose=-1).fit(x[:200], y[:200])
    ad = TreeEnsembleAdapter.from_model(model, x[:200], y[:200])
    s = get_method("shap-neighbors").fit(ad, x[:200], y[:200]).scores(x[200:203])
    # against SHAP values computed here on held-out queries (not a row against itself)
    import shap

    explainer = shap.TreeExplainer(model)
    st = np.asarray(explainer.shap_values(x[:200])).reshape(200, -1)
    sq = np.asarray(explainer.shap_values(x[200:203])).reshape(3, -1)
    dist = np.linalg.norm(sq[:, None] - st[None], axis=2)
    np.testing.assert_allclose(-s, dist, rtol=1e-6, atol=1e-9)
    assert list(np.argmax(s, axis=1)) == list(np.argmin(dist, axis=1))
    assert np.all(s < 0)  # no held-out query explains exactly like a training row


def test_python_attribute_takes_tree_and_linear_models():
    import pandas as pd
    from sklearn.linear_model import Ridge

    from datablame.tabular import attribute, score_matrix

    x, y = _data("binary")
    cols = [f"f{i}" for i in range(x.shape[1])]
    xt, xq = pd.DataFrame(x[:200], columns=cols), pd.DataFrame(x[200:203], columns=cols)
    gb = ens.GradientBoostingClassifier(n_estimators=10, max_depth=2).fit(xt, y[:200])
    df = attribute(gb, xt, y[:200], xq, top_k=4)
    assert list(df["rank"]) == [1, 2, 3, 4] * 3 and "f0" in df.columns
    ad = TreeEnsembleAdapter.from_model(gb, xt, y[:200])
    direct = get_method("leaf-share").fit(ad, xt, y[:200]).scores(xq,
                                                                  ad.predict_targets(xq))
    np.testing.assert_allclose(score_matrix(gb, xt, y[:200], xq), direct)
    xr, yr = _data("regression")
    ridge = Ridge(alpha=1.0).fit(xr[:80], yr[:80])
    s = score_matrix(ridge, xr[:80], yr[:80], xr[80:82], yr[80:82])
    assert s.shape == (2, 80)


def test_every_tree_method_gives_a_reason_per_ranked_row():
    """The reason must be true: leaf-sim's 'same leaf in a/T trees' is its own score, and
    every boosted-tree method explains each ranked row in one line."""
    import re

    import lightgbm as lgb

    from datablame.methods.registry import FAMILY_METHODS

    x, y = _data("binary")
    x, y, xq = x[:150], y[:150], x[150:153]
    model = lgb.LGBMClassifier(n_estimators=12, num_leaves=5, verbose=-1,
                               min_child_samples=5).fit(x, y)
    ad = TreeEnsembleAdapter.from_model(model, x, y)
    yq = ad.predict_targets(xq)
    for name in FAMILY_METHODS["boosted-trees"]:
        est = get_method(name).fit(ad, x, y)
        scores = est.scores(xq, yq)
        top = np.argsort(-scores, axis=1)[:, :4]
        why = est.reasons(xq, yq, top, scores)
        assert [len(w) for w in why] == [4, 4, 4], name
        assert all(isinstance(r, str) and r for w in why for r in w), name
        if name == "leaf-sim":
            for q in range(3):
                for r, text in zip(top[q], why[q], strict=True):
                    shared, total = map(int, re.search(r"(\d+)/(\d+) trees", text).groups())
                    assert shared / total == pytest.approx(scores[q, r])


def test_regression_without_a_target_explains_the_prediction_torch_and_ridge():
    """No query target on a regression model: each row's contribution to the predicted
    value (positive = the row raised it), checked against actually leaving the row out:
    exactly for Ridge (closed form), to first order for a torch linear model at its
    optimum (the influence function's own approximation)."""
    import torch
    from sklearn.linear_model import Ridge

    from datablame.tabular import attribute, score_matrix

    x, y = _data("regression")
    x, y, xq = x[:60, :3] * 10, y[:60] / 100, x[60:63, :3] * 10
    ridge = Ridge(alpha=0.5).fit(x, y)
    loo = np.stack([ridge.predict(xq) - Ridge(alpha=0.5).fit(np.delete(x, i, 0),
                                                             np.delete(y, i)).predict(xq)
                    for i in range(60)], axis=1)
    np.testing.assert_allclose(score_matrix(ridge, x, y, xq), loo, rtol=1e-6, atol=1e-9)

    l2, n = 0.1, 60

    def optimum(xx, yy):
        xt = np.hstack([xx, np.ones((len(xx), 1))])
        return np.linalg.solve(2 / len(xx) * xt.T @ xt + l2 * np.eye(4), 2 / len(xx) * xt.T @ yy)

    theta = optimum(x, y)
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(theta[:3]).reshape(1, 3))
        model.bias.copy_(torch.tensor(theta[3:]))
    xqd = np.hstack([xq, np.ones((3, 1))])
    actual = np.stack([xqd @ theta - xqd @ optimum(np.delete(x, i, 0), np.delete(y, i))
                       for i in range(n)], axis=1)
    df = attribute(model, x.astype(np.float32), y.astype(np.float32).reshape(-1, 1),
                   xq.astype(np.float32), loss="mse", l2=l2, damping=0.0, top_k=3)
    assert df.attrs["explains"] == "prediction"
    scores = score_matrix(model, x.astype(np.float32), y.astype(np.float32).reshape(-1, 1),
                          xq.astype(np.float32), loss="mse", l2=l2, damping=0.0)
    np.testing.assert_allclose(scores, actual, rtol=0.1, atol=0.05 * np.abs(actual).max())
    # a regression's prediction: the rows that moved it most, either way, come first
    assert [int(r) for r in df["row"][:3]] == list(np.argsort(-np.abs(scores[0]))[:3])
    assert int(df["row"][0]) == int(np.argmax(np.abs(actual[0])))  # the same first row


def test_catboost_retrains_fitted_and_loaded_models(tmp_path):
    """Verification retrains with the model's own settings: a fitted CatBoostClassifier
    and a model loaded from .cbm both retrain (a fitted model's parameters cannot be set,
    which broke this), and on the same rows give the same model back."""
    import catboost as cb

    from datablame.models.loading import retrainer

    x, y = _data("binary")
    x, y = x[:120], y[:120]
    model = cb.CatBoostClassifier(iterations=8, depth=3, verbose=0, random_seed=0,
                                  allow_writing_files=False).fit(x, y)
    model.save_model(str(tmp_path / "m.cbm"))
    loaded = cb.CatBoost().load_model(str(tmp_path / "m.cbm"))
    for m in (model, loaded):
        again = retrainer(m)(x, y)
        assert type(again) is type(m)
        np.testing.assert_allclose(again.predict(x, prediction_type="RawFormulaVal"),
                                   m.predict(x, prediction_type="RawFormulaVal"), atol=1e-9)
        fewer = retrainer(m)(x[:100], y[:100])
        assert not np.allclose(fewer.predict(x, prediction_type="RawFormulaVal"),
                               m.predict(x, prediction_type="RawFormulaVal"))


def test_shap_neighbors_on_a_model_shap_cannot_explain_is_one_line():
    """shap's TreeExplainer refuses scikit-learn's multiclass gradient boosting: a user
    error naming it and pointing to another method, not shap's traceback."""
    from sklearn.datasets import load_wine
    from sklearn.ensemble import GradientBoostingClassifier

    from datablame.errors import UserError

    x, y = load_wine(return_X_y=True)
    model = GradientBoostingClassifier(n_estimators=5, random_state=0).fit(x, y)
    ad = TreeEnsembleAdapter.from_model(model, x, y)
    with pytest.raises(UserError, match=r"shap cannot explain this model \(Gradient"
                                        r"BoostingClassifier is only supported for binary"):
        get_method("shap-neighbors").fit(ad, x, y)
