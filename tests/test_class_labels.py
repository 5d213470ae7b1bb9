"""A classifier's targets are read as its classes: a model fitted on string labels
("no"/"yes", as scikit-learn, LightGBM's and CatBoost's classifiers allow) scores exactly
as the same model fitted on 0/1, and a target the model does not know (a "yes"/"no" column
for a model trained on 1/0) is one line, where it was a silent miscount or a traceback."""

import numpy as np
import pandas as pd
import pytest

from datablame.errors import UserError
from datablame.tabular import score_matrix

from .test_cli import _assert_one_line_error, run_cli


def _data(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.standard_normal((n, 3)), columns=["a", "b", "c"])
    y = (x["a"] + 0.7 * x["b"] + 0.4 * rng.standard_normal(n) > 0).astype(int).to_numpy()
    return x.iloc[:100], y[:100], x.iloc[100:]


def _models(kind: str):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    if kind == "logistic":
        return lambda: LogisticRegression(C=1.0)
    if kind == "forest":
        return lambda: RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0)
    import lightgbm as lgb

    return lambda: lgb.LGBMClassifier(n_estimators=8, num_leaves=4, min_child_samples=5,
                                      verbose=-1)


@pytest.mark.parametrize("kind", ["logistic", "forest", "lightgbm"])
def test_a_model_fitted_on_string_labels_scores_as_on_numbers(kind):
    x, y, xq = _data()
    words = np.where(y == 1, "yes", "no")
    make = _models(kind)
    on_numbers, on_words = make().fit(x, y), make().fit(x, words)
    assert list(on_words.classes_) == ["no", "yes"]
    want = score_matrix(on_numbers, x, y, xq)
    got = score_matrix(on_words, x, words, xq)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert np.abs(want).max() > 0
    # the true labels of the queries, as labels
    yq = np.where(xq["a"].to_numpy() > 0, "yes", "no")
    np.testing.assert_allclose(score_matrix(on_words, x, words, xq, yq),
                               score_matrix(on_numbers, x, y, xq, (yq == "yes").astype(int)),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(UserError, match="the query targets hold 'maybe'"):
        score_matrix(on_words, x, words, xq, np.array(["maybe"] * len(xq)))


@pytest.mark.parametrize("kind", ["logistic", "forest", "lightgbm"])
def test_labels_the_model_does_not_know_are_one_line(kind):
    x, y, xq = _data()
    model = _models(kind)().fit(x, y)  # trained on 0/1
    with pytest.raises(UserError, match=r"the training targets hold 'no', 'yes', which the "
                                        r"model does not know: its classes are 0, 1"):
        score_matrix(model, x, np.where(y == 1, "yes", "no"), xq)
    with pytest.raises(UserError, match="hold 2, which the model does not know"):
        score_matrix(model, x, np.where(y == 1, 2, 0), xq)


def test_a_booster_file_with_a_yes_no_target_column_is_one_line(tmp_path, monkeypatch, capsys):
    """The trial's case: a LightGBM booster trained on 0/1, the CSV saying yes/no."""
    import lightgbm as lgb

    x, y, xq = _data()
    booster = lgb.train({"objective": "binary", "num_leaves": 4, "verbose": -1,
                         "min_data_in_leaf": 5}, lgb.Dataset(x, y), num_boost_round=5)
    booster.save_model(str(tmp_path / "model.txt"))
    x.assign(bought=np.where(y == 1, "yes", "no")).to_csv(tmp_path / "train.csv", index=False)
    xq.to_csv(tmp_path / "query.csv", index=False)
    code, _, err = run_cli(monkeypatch, capsys, "tabular", tmp_path / "train.csv", "--target",
                           "bought", "--model", tmp_path / "model.txt", "--query",
                           tmp_path / "query.csv")
    _assert_one_line_error(code, err, "the training targets hold 'no', 'yes'")


def test_probabilities_as_a_binary_boosters_targets_are_taken_as_they_are():
    """XGBoost's binary:logistic trains on targets in [0, 1]: they are soft targets, not
    labels to refuse; the scores equal those of the adapter's own loss gradient."""
    import xgboost as xgb

    x, y, xq = _data()
    soft = np.clip(0.5 + 0.4 * np.tanh(x["a"].to_numpy()), 0, 1)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 2},
                        xgb.DMatrix(x, label=soft), num_boost_round=5)
    scores = score_matrix(booster, x, soft, xq, method="leaf-influence")
    assert scores.shape == (len(xq), len(x)) and np.abs(scores).max() > 0


def test_a_logistic_regression_on_float_labels_is_not_read_as_probabilities():
    """Labels 1.0 / 2.0 are classes (the review: they were taken as probabilities, 37x
    off): the scores equal the same model's on 0 / 1."""
    from sklearn.linear_model import LogisticRegression

    x, y, xq = _data()
    floats = y.astype(float) + 1.0
    want = score_matrix(LogisticRegression().fit(x, y), x, y, xq, (xq["a"] > 0).astype(int))
    got = score_matrix(LogisticRegression().fit(x, floats), x, floats, xq,
                       (xq["a"] > 0).astype(float) + 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["logistic", "forest"])
def test_a_retraining_without_a_rare_class_costs_its_rows_a_near_zero_probability(kind):
    """Verification retrains on subsets; one without the query's class cannot predict it:
    the query's loss is that of probability 1e-12, not an error about the user's data."""
    from datablame.models import loading
    from datablame.tabular import task

    x, y, xq = _data(200)
    y = np.where(np.arange(100) < 3, "rare", np.where(y == 1, "yes", "no"))
    model = _models(kind)().fit(x, y)
    t = task(model, x, y, xq)
    retrain, _ = t.retrain(np.array(["rare"] * len(xq)))
    without = np.flatnonzero(y != "rare")
    losses = retrain(without, 0)
    np.testing.assert_allclose(losses, -np.log(1e-12))
    assert loading.class_labels(model, t.adapter) == ["no", "rare", "yes"]
