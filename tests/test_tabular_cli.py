"""Tabular CLI on a torch model file (safetensors + JSON): output and bad input."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from datablame.models.torch_files import build_mlp, save_torch_model, trainer_from_config

from .test_cli import _assert_one_line_error, run_cli

CONFIG = {"type": "mlp", "layers": [4, 2], "loss": "ce",
          "train": {"optimizer": "lbfgs", "epochs": 20, "l2": 0.01}}


@pytest.fixture()
def tables(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    cols = ["age", "income", "debt", "tenure"]
    train = pd.DataFrame(x[:60], columns=cols).assign(approved=y[:60])
    query = pd.DataFrame(x[60:65], columns=cols).assign(approved=y[60:65])
    train.to_csv(tmp_path / "train.csv", index=False)
    query.to_parquet(tmp_path / "query.parquet")
    trainer = trainer_from_config(CONFIG)
    model = trainer.fit(x[:60], y[:60])
    save_torch_model(model, tmp_path / "model.safetensors", CONFIG)
    return tmp_path


def test_tabular_json_and_score_matrix(tables, monkeypatch, capsys):
    t = tables
    code, out, _ = run_cli(monkeypatch, capsys, "tabular", t / "train.csv", "--target",
                           "approved", "--model", t / "model.safetensors", "--query",
                           t / "query.parquet", "--top-k", "3", "--json", "--out",
                           t / "scores.npy")
    assert code in (0, None)
    rows = json.loads(out)
    assert len(rows) == 15 and {"query", "rank", "row", "score", "age"} <= set(rows[0])
    scores = np.load(t / "scores.npy")
    assert scores.shape == (5, 60)
    q0 = [r["row"] for r in rows if r["query"] == 0]
    assert q0 == list(np.argsort(-scores[0])[:3])


def test_an_output_is_overwritten_only_where_datablame_wrote_it(tables, monkeypatch, capsys):
    """A .npy (or a JSON with a result's keys) of the user's is refused and left as it was,
    however much it looks like ours; a file datablame wrote is replaced on a rerun, but
    not once the user has changed it."""
    t = tables
    args = ["tabular", t / "train.csv", "--target", "approved", "--model",
            t / "model.safetensors", "--query", t / "query.parquet", "--top-k", "3"]
    mine = t / "mine.npy"
    np.save(mine, np.arange(5))
    before = mine.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", mine)
    _assert_one_line_error(code, err, "refusing to overwrite")
    assert mine.read_bytes() == before
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", t / "ours.npy")
    assert code in (0, None), err
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", t / "ours.npy")
    assert code in (0, None), err  # ours, unchanged: a rerun replaces it
    np.save(t / "ours.npy", np.load(t / "ours.npy") * 0)  # the user's now
    edited = (t / "ours.npy").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", t / "ours.npy")
    _assert_one_line_error(code, err, "refusing to overwrite")
    assert (t / "ours.npy").read_bytes() == edited
    notes = t / "v.json"  # a JSON with a verify result's keys, and the user's notes
    notes.write_text(json.dumps({"method": "x", "n_train": 1, "query_loss": 0,
                                 "my": "notes"}))
    code, _, err = run_cli(monkeypatch, capsys, "verify", *args[1:-2], "--out", notes)
    _assert_one_line_error(code, err, "refusing to overwrite")
    assert json.loads(notes.read_text())["my"] == "notes"


@pytest.mark.slow
def test_verify_writes_lds_and_remove_top_k(tables, monkeypatch, capsys):
    t = tables
    code, _, err = run_cli(monkeypatch, capsys, "verify", t / "train.csv", "--target",
                           "approved", "--model", t / "model.safetensors", "--query",
                           t / "query.parquet", "--lds-subsets", "10", "--remove-top-k", "5",
                           "--loo", "0,1", "--out", t / "v.json")
    assert code in (0, None), err
    res = json.loads((t / "v.json").read_text())
    # if-exact on a (convex) logistic model tracks retraining: measured LDS 0.91 here, and
    # its leave-one-out predictions line up with the actual retrained loss changes
    assert res["lds"]["subsets"] == 10 and res["lds"]["lds"] > 0.6
    loo = res["leave_one_out"]
    assert set(loo["delta"]) == {"0", "1"}
    actual = np.concatenate([loo["delta"][r] for r in ("0", "1")])
    predicted = np.concatenate([loo["predicted"][r] for r in ("0", "1")])
    assert np.corrcoef(actual, predicted)[0, 1] > 0.9
    assert "LDS" in " ".join(err.split())


@pytest.mark.parametrize("change,needle", [
    ("no_target", "target column 'approved' is missing"),
    ("nan", "is NaN/inf"),
    ("extra_col", "the model takes 4 features"),
    ("bad_format", "unknown model format"),
])
def test_bad_tabular_input_is_one_line(tables, monkeypatch, capsys, change, needle):
    t = tables
    train = pd.read_csv(t / "train.csv")
    model = t / "model.safetensors"
    if change == "no_target":
        train = train.drop(columns=["approved"])
    elif change == "nan":
        train.loc[7, "income"] = np.nan
    elif change == "extra_col":
        train["zip"] = 1.0
    elif change == "bad_format":
        model = t / "model.h5"
        model.write_bytes(b"x")
    train.to_csv(t / "bad.csv", index=False)
    code, _, err = run_cli(monkeypatch, capsys, "tabular", t / "bad.csv", "--target",
                           "approved", "--model", model, "--query", t / "query.parquet")
    _assert_one_line_error(code, err, needle)


def test_model_file_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_mlp([3, 5, 2], "tanh")
    save_torch_model(model, tmp_path / "m.safetensors",
                     {"type": "mlp", "layers": [3, 5, 2], "activation": "tanh"})
    from datablame.models.torch_files import load_torch_model

    again, _ = load_torch_model(tmp_path / "m.safetensors")
    x = torch.randn(4, 3)
    torch.testing.assert_close(again(x), model(x))


@pytest.fixture()
def tree_files(tmp_path):
    import lightgbm as lgb
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    df = data.frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    df.columns = [c.replace(" ", "_") for c in df.columns]
    df.iloc[:300].to_csv(tmp_path / "train.csv", index=False)
    df.iloc[300:310].to_csv(tmp_path / "query.csv", index=False)
    x = df.drop(columns=["target"])
    model = lgb.LGBMClassifier(n_estimators=20, num_leaves=7, verbose=-1)
    model.fit(x.iloc[:300], df["target"].iloc[:300])
    model.booster_.save_model(str(tmp_path / "model.txt"))
    return tmp_path


def test_tabular_on_a_lightgbm_file(tree_files, monkeypatch, capsys):
    t = tree_files
    code, out, err = run_cli(monkeypatch, capsys, "tabular", t / "train.csv", "--target",
                             "target", "--model", t / "model.txt", "--query", t / "query.csv",
                             "--top-k", "3", "--json")
    assert code in (0, None), err
    rows = json.loads(out)
    assert len(rows) == 30 and rows[0]["rank"] == 1
    assert "trees; removing it: query loss" in rows[0]["reason"]  # leaf-share's why


@pytest.mark.slow
def test_verify_on_a_lightgbm_file(tree_files, monkeypatch, capsys):
    t = tree_files
    code, _, err = run_cli(monkeypatch, capsys, "verify", t / "train.csv", "--target", "target",
                           "--model", t / "model.txt", "--query", t / "query.csv",
                           "--lds-subsets", "8", "--remove-top-k", "10", "--out", t / "v.json")
    assert code in (0, None), err
    res = json.loads((t / "v.json").read_text())
    assert res["method"] == "leaf-share" and res["lds"]["subsets"] == 8


def test_pickle_needs_explicit_trust(tree_files, monkeypatch, capsys):
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    t = tree_files
    train = pd.read_csv(t / "train.csv")
    rf = RandomForestClassifier(n_estimators=5, random_state=0)
    rf.fit(train.drop(columns=["target"]), train["target"])
    joblib.dump(rf, t / "rf.pkl")
    args = ["tabular", t / "train.csv", "--target", "target", "--model", t / "rf.pkl",
            "--query", t / "query.csv", "--json"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    _assert_one_line_error(code, err, "--trust-pickle")
    code, out, err = run_cli(monkeypatch, capsys, *args, "--trust-pickle")
    assert code in (0, None), err
    assert json.loads(out)[0]["rank"] == 1


@pytest.mark.parametrize("change,needle", [
    ("columns", "training rows: missing column(s) mean_radius, which the model was trained on"),
    ("nan_gb", "cannot take missing values"),
])
def test_bad_tree_input(tree_files, monkeypatch, capsys, change, needle):
    import skops.io as sio
    from sklearn.ensemble import GradientBoostingClassifier

    t = tree_files
    train = pd.read_csv(t / "train.csv")
    model_path = t / "model.txt"
    if change == "columns":
        train = train.rename(columns={"mean_radius": "radius_mean"})
    else:
        gb = GradientBoostingClassifier(n_estimators=5).fit(train.drop(columns=["target"]),
                                                            train["target"])
        model_path = t / "gb.skops"
        sio.dump(gb, model_path)
        train.loc[4, "mean_area"] = np.nan
    train.to_csv(t / "bad.csv", index=False)
    code, _, err = run_cli(monkeypatch, capsys, "tabular", t / "bad.csv", "--target", "target",
                           "--model", model_path, "--query", t / "query.csv")
    _assert_one_line_error(code, err, needle)


# -- issue 9: nothing lost, nothing crashes, nothing silently wrong -------------------------
def _tabular(monkeypatch, capsys, t, *extra, model="model.txt", train="train.csv",
             query="query.csv", target="target"):
    return run_cli(monkeypatch, capsys, "tabular", t / train, "--target", target, "--model",
                   t / model, "--query", t / query, *extra)


@pytest.fixture()
def regression_files(tmp_path):
    from sklearn.datasets import load_diabetes

    df = load_diabetes(as_frame=True).frame
    df.iloc[:150].to_csv(tmp_path / "train.csv", index=False)
    df.iloc[150:154].to_csv(tmp_path / "query.csv", index=False)
    return tmp_path, df


@pytest.mark.parametrize("library", ["lightgbm", "xgboost"])
def test_regression_explains_the_prediction_not_a_zero_loss(regression_files, library,
                                                            monkeypatch, capsys):
    """Each row's leaf-share of the query's leaves: the shares add up to the prediction
    minus the library's own base score (nothing of the prediction is lost or invented)."""
    t, df = regression_files
    x, y = df.drop(columns=["target"]), df["target"]
    if library == "lightgbm":
        import lightgbm as lgb

        model = lgb.LGBMRegressor(n_estimators=20, num_leaves=7, verbose=-1)
        model.fit(x.iloc[:150], y.iloc[:150])
        model.booster_.save_model(str(t / "model.txt"))
        path, base = "model.txt", float(y.iloc[:150].mean())  # boost_from_average
    else:
        import xgboost as xgb

        model = xgb.XGBRegressor(n_estimators=20, max_depth=3).fit(x.iloc[:150], y.iloc[:150])
        model.get_booster().save_model(str(t / "model.json"))
        cfg = json.loads(model.get_booster().save_config())
        path = "model.json"
        base = float(cfg["learner"]["learner_model_param"]["base_score"].strip("[]"))
    code, out, err = _tabular(monkeypatch, capsys, t, "--out", t / "s.npy", model=path)
    assert code in (0, None), err
    scores = np.load(t / "s.npy")
    pred = model.predict(x.iloc[150:154])
    np.testing.assert_allclose(scores.sum(1), pred - base, rtol=1e-4, atol=1e-3)
    assert np.abs(scores).max(1).min() > 1e-3  # no query scored all zeros
    assert "explains the prediction" in out
    assert "to the prediction" in out  # the reason speaks in prediction units


def test_a_regression_prediction_lists_the_rows_that_moved_it_most_either_way(
        regression_files, monkeypatch, capsys):
    """"Why so low?": the rows that lowered a prediction are culprits as much as those that
    raised it. auto ranks a regression's prediction by |score|; --order picks."""
    import lightgbm as lgb

    t, df = regression_files
    x, y = df.drop(columns=["target"]), df["target"]
    lgb.LGBMRegressor(n_estimators=20, num_leaves=7, verbose=-1).fit(
        x.iloc[:150], y.iloc[:150]).booster_.save_model(str(t / "model.txt"))
    scores = {}
    for order in ("auto", "highest", "lowest", "magnitude"):
        code, out, err = _tabular(monkeypatch, capsys, t, "--json", "--top-k", "6",
                                  "--order", order, "--out", t / f"{order}.npy",
                                  model="model.txt")
        assert code in (0, None), err
        rows = [r for r in json.loads(out) if r["query"] == 0]
        scores[order] = [r["score"] for r in rows]
    full = np.load(t / "auto.npy")[0]
    np.testing.assert_allclose(scores["highest"], sorted(full, reverse=True)[:6], rtol=1e-8)
    np.testing.assert_allclose(scores["lowest"], sorted(full)[:6], rtol=1e-8)
    for order in ("auto", "magnitude"):
        np.testing.assert_allclose(scores[order], sorted(full, key=abs, reverse=True)[:6],
                                   rtol=1e-8)
    assert min(scores["lowest"]) < 0  # rows that lowered it exist, and --order lowest finds them
    code, _, err = _tabular(monkeypatch, capsys, t, "--order", "biggest", model="model.txt")
    _assert_one_line_error(code, err, "unknown order 'biggest'")


def test_all_zero_scores_are_not_presented_as_a_ranking(regression_files, monkeypatch,
                                                        capsys):
    """Explaining the loss of a target equal to the prediction: the squared-loss gradient
    is exactly zero, so every score is; that is said, not ranked as rows 0, 1, 2."""
    import lightgbm as lgb

    t, df = regression_files
    x, y = df.drop(columns=["target"]), df["target"]
    model = lgb.LGBMRegressor(n_estimators=10, num_leaves=5, verbose=-1)
    model.fit(x.iloc[:150], y.iloc[:150])
    model.booster_.save_model(str(t / "model.txt"))
    query = x.iloc[150:152].assign(target=model.predict(x.iloc[150:152]))
    query.to_csv(t / "query.csv", index=False)
    code, out, err = _tabular(monkeypatch, capsys, t, "--true-label")
    assert code in (0, None), err
    assert "every score is zero" in " ".join((out + err).split())
    assert "┃ rank" not in out  # no table of tied rows
    from datablame.tabular import attribute

    with pytest.warns(UserWarning, match="every score is zero"):
        frame = attribute(model, x.iloc[:150], y.iloc[:150], x.iloc[150:152],
                          y_query=model.predict(x.iloc[150:152]))
    assert len(frame) == 0 and frame.attrs["all_zero_queries"] == [0, 1]


def test_forest_reasons_count_trees_not_tree_times_class(tree_files, monkeypatch, capsys):
    import skops.io as sio
    from sklearn.ensemble import RandomForestClassifier

    t = tree_files
    train, query = pd.read_csv(t / "train.csv"), pd.read_csv(t / "query.csv")
    xt, xq = train.drop(columns=["target"]), query.drop(columns=["target"])
    rf = RandomForestClassifier(n_estimators=30, max_depth=4, random_state=0)
    rf.fit(xt, train["target"])
    sio.dump(rf, t / "rf.skops")
    code, out, err = _tabular(monkeypatch, capsys, t, "--json", "--top-k", "3",
                              "--method", "leaf-sim", model="rf.skops")  # not the default's
    assert code in (0, None), err
    lt, lq = rf.apply(xt), rf.apply(xq)
    for r in json.loads(out):
        shared = int((lt[r["row"]] == lq[r["query"]]).sum())
        assert r["reason"] == f"same leaf in {shared}/30 trees"


@pytest.mark.slow
def test_verify_gives_a_verdict(tree_files, monkeypatch, capsys):
    from datablame.verify import lds_reading

    t = tree_files
    code, _, err = run_cli(monkeypatch, capsys, "verify", t / "train.csv", "--target", "target",
                           "--model", t / "model.txt", "--query", t / "query.csv",
                           "--lds-subsets", "6", "--remove-top-k", "5", "--out", t / "v.json")
    assert code in (0, None), err
    res = json.loads((t / "v.json").read_text())
    r = res["remove_top_k"]
    # leaf-share on this LightGBM model (deterministic retraining): measured +0.61 vs
    # -0.04 for remove-top-5 and LDS 0.46 over 6 subsets (per-query 0.2..0.77 but one)
    assert r["verdict"] == "pass" and r["top_k_mean"] > max(r["random_k_mean"], 0.0) + 0.2
    text = " ".join(err.split())
    assert "PASS: removing the top-5 raised" in text
    assert len(r["removed"]) == 5  # which rows, said and written
    assert f"the top-5 removed: rows {', '.join(map(str, r['removed']))}" in text
    lds = res["lds"]
    assert lds["lds"] > 0.25 and lds["ci95"][0] > 0
    assert lds["reading"] == lds_reading(lds["lds"], lds["ci95"]) != "none"
    assert f"LDS ({res['method']}, 6 subsets): {lds['lds']:.3f}" in text
    assert lds["reading"] in text


def test_verdict_wording_on_the_issues_numbers():
    from datablame.verify import lds_reading, remove_top_k_verdict

    verdict, line = remove_top_k_verdict({"k": 5, "top_k_mean": -0.0230,
                                          "random_k_mean": 0.0374})
    assert verdict == "fail" and line.startswith("FAIL: removing the top-5 did not raise")
    assert "-0.0230 vs +0.0374" in line
    verdict, line = remove_top_k_verdict({"k": 5, "top_k_mean": 0.12, "random_k_mean": 0.01})
    assert verdict == "pass" and line == ("PASS: removing the top-5 raised the query loss more "
                                          "than removing 5 random rows (+0.1200 vs +0.0100)")
    assert lds_reading(0.05, [-0.1, 0.2]) == "none"
    assert lds_reading(0.45, [0.3, 0.6]) == "moderate"
    assert lds_reading(0.8, [0.7, 0.9]) == "strong"


def _loan_tables(tmp_path, rng):
    n = 240
    purpose = rng.choice(["car", "home", "education", "boat"], n, p=[.4, .3, .2, .1])
    grade = rng.choice(["A", "B", "C"], n).astype(object)
    income = rng.normal(50, 15, n).round(1)
    grade[rng.choice(n, 20, replace=False)] = None  # blank cells
    approved = ((income > 50) ^ (purpose == "boat")).astype(int)
    frame = pd.DataFrame({"income": income, "purpose": purpose, "grade": grade,
                          "approved": approved})
    frame.iloc[:200].to_csv(tmp_path / "train.csv", index=False)
    query = frame.iloc[200:206].copy()
    query.iloc[0, 1] = "yacht"  # a category never seen in training
    query.to_csv(tmp_path / "query.csv", index=False)
    return frame, query


@pytest.mark.parametrize("library", ["lightgbm", "xgboost"])
def test_string_categories_in_a_csv_are_encoded_like_training(tmp_path, library,
                                                              monkeypatch, capsys):
    """A model the user trained on pandas categories and saved to its native file: the CLI
    reads the training categories from the file and gives exactly the scores the Python
    API gives on the in-memory model; a value never seen in training is missing."""
    from datablame.tabular import score_matrix

    frame, query = _loan_tables(tmp_path, np.random.default_rng(0))
    x = frame.drop(columns=["approved"]).astype({"purpose": "category", "grade": "category"})
    xt, yt = x.iloc[:200], frame["approved"].iloc[:200]
    xq = x.iloc[200:206].copy()
    xq.iloc[0, 1] = np.nan  # "yacht": missing, as LightGBM / XGBoost do in memory
    if library == "lightgbm":
        import lightgbm as lgb

        model = lgb.LGBMClassifier(n_estimators=15, num_leaves=7, verbose=-1,
                                   min_child_samples=5).fit(xt, yt)
        model.booster_.save_model(str(tmp_path / "model.txt"))
        path = "model.txt"
    else:
        import xgboost as xgb

        model = xgb.XGBClassifier(n_estimators=15, max_depth=3, enable_categorical=True,
                                  tree_method="hist").fit(xt, yt)
        model.get_booster().save_model(str(tmp_path / "model.json"))
        path = "model.json"
    code, out, err = _tabular(monkeypatch, capsys, tmp_path, "--json", "--top-k", "3",
                              "--out", tmp_path / "s.npy", model=path, target="approved")
    assert code in (0, None), err
    assert "'yacht'" in err and "missing" in err  # said, not silent
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), score_matrix(model, xt, yt, xq),
                               rtol=1e-6, atol=1e-9)
    rows = json.loads(out)
    assert rows[0]["purpose"] in ("car", "home", "education", "boat")


def test_xgboost_categories_it_cannot_read_back_are_one_line(tmp_path, monkeypatch, capsys):
    """XGBoost 3.2 (seen here) exports non-ASCII category names wrongly ('São Paulo' comes back as
    'São Paul'): encoding by them would explain another model (the trial saw a row read as
    missing come first), so it is refused in one line, naming the column, where a probe
    model shows this XGBoost has the bug (not by version number)."""
    import xgboost as xgb

    rng = np.random.default_rng(0)
    cities = ["Zürich", "São Paulo", "Berlin", "Oslo"]
    x = pd.DataFrame({"city": pd.Categorical(rng.choice(cities, 120)),
                      "income": rng.standard_normal(120)})
    y = (x["city"].isin(cities[:2]).to_numpy() ^ (x["income"] > 1).to_numpy()).astype(int)
    model = xgb.XGBClassifier(n_estimators=4, max_depth=2, enable_categorical=True,
                              tree_method="hist").fit(x, y)
    model.get_booster().save_model(str(tmp_path / "model.json"))
    x.assign(bought=y).to_csv(tmp_path / "train.csv", index=False)
    x.iloc[:3].to_csv(tmp_path / "query.csv", index=False)
    code, _, err = run_cli(monkeypatch, capsys, "tabular", tmp_path / "train.csv", "--target",
                           "bought", "--model", tmp_path / "model.json", "--query",
                           tmp_path / "query.csv")
    from datablame.models.trees.xgboost import _reads_back_non_ascii_categories

    exported = model.get_booster().get_categories(export_to_arrow=True).to_arrow()
    fixed = sorted(dict(exported)["city"].to_pylist()) == sorted(cities)
    assert _reads_back_non_ascii_categories() == fixed  # the probe sees what this model shows
    if fixed:
        assert code in (0, None), err  # a fixed XGBoost reads them back: nothing to refuse
        return
    _assert_one_line_error(code, err, "column 'city': XGBoost")


@pytest.mark.parametrize("names", [True, False])
def test_catboost_cbm_file_works_in_the_cli(tree_files, names, monkeypatch, capsys):
    import catboost as cb

    from datablame.tabular import score_matrix

    t = tree_files
    train, query = pd.read_csv(t / "train.csv"), pd.read_csv(t / "query.csv")
    xt, xq = train.drop(columns=["target"]), query.drop(columns=["target"])
    model = cb.CatBoostClassifier(iterations=10, depth=3, verbose=0, allow_writing_files=False)
    model.fit(xt if names else xt.to_numpy(), train["target"])
    model.save_model(str(t / "model.cbm"))
    code, _, err = _tabular(monkeypatch, capsys, t, "--out", t / "s.npy", model="model.cbm")
    assert code in (0, None), err
    np.testing.assert_allclose(np.load(t / "s.npy"),
                               score_matrix(model, xt, train["target"], xq), rtol=1e-6,
                               atol=1e-12)


@pytest.mark.parametrize("method,model,needle", [
    ("if-exact", "model.txt", "method 'if-exact' does not fit a boosted-tree model (use "
                              "leaf-share, boostin"),
    ("trak", "model.txt", "method 'trak' does not fit a boosted-tree model"),
    ("linear-exact", "model.txt", "method 'linear-exact' does not fit a boosted-tree"),
    ("leaf-share", "mlp.safetensors", "method 'leaf-share' does not fit a torch model (use "
                                      "if-exact"),
])
def test_a_method_that_does_not_fit_the_model_is_one_line(tree_files, method, model, needle,
                                                          monkeypatch, capsys):
    t = tree_files
    if model.endswith(".safetensors"):
        cfg = {"type": "mlp", "layers": [30, 4, 2], "loss": "ce"}
        save_torch_model(build_mlp(cfg["layers"]), t / model, cfg)
    code, _, err = _tabular(monkeypatch, capsys, t, "--method", method, model=model)
    _assert_one_line_error(code, err, needle)


def test_python_api_refuses_a_method_that_does_not_fit(tree_files):
    import lightgbm as lgb

    from datablame.errors import UserError
    from datablame.tabular import attribute, score_matrix

    train = pd.read_csv(tree_files / "train.csv")
    xt, yt = train.drop(columns=["target"]), train["target"]
    model = lgb.LGBMClassifier(n_estimators=3, verbose=-1).fit(xt, yt)
    with pytest.raises(UserError, match="method 'datainf' does not fit a boosted-tree"):
        attribute(model, xt, yt, xt.iloc[:2], method="datainf")
    with pytest.raises(UserError, match="method 'grad-cos' does not fit a boosted-tree"):
        score_matrix(model, xt, yt, xt.iloc[:2], method="grad-cos")


def test_help_says_which_methods_fit_which_model(monkeypatch, capsys):
    from datablame.methods.families import FAMILY_METHODS

    for command in ("tabular", "verify"):
        code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
        text = " ".join(out.replace("│", " ").split())
        for family, label in (("torch", "torch"), ("boosted-trees", "boosted trees"),
                              ("forest", "forests"), ("linear", "linear")):
            assert f"{label}: {', '.join(FAMILY_METHODS[family])}" in text, (command, text)


@pytest.mark.slow
def test_every_method_the_registry_lists_runs_on_its_family():
    """FAMILY_METHODS is what the CLI checks: every pairing it allows must work."""
    import lightgbm as lgb
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import Ridge

    from datablame.methods.families import FAMILY_METHODS
    from datablame.tabular import score_matrix

    x, y = load_breast_cancer(return_X_y=True)
    x = (x[:60, :4] - x[:60, :4].mean(0)) / x[:60, :4].std(0)
    y = y[:60]
    torch.manual_seed(0)
    models = {"torch": build_mlp([4, 2]),  # convex, so if-cg / if-lissa converge
              "boosted-trees": lgb.LGBMClassifier(n_estimators=3, num_leaves=4, verbose=-1,
                                                  min_child_samples=5).fit(x, y),
              "forest": RandomForestClassifier(n_estimators=3, max_depth=3,
                                               random_state=0).fit(x, y),
              "linear": Ridge(alpha=1.0).fit(x, y.astype(float))}
    for family in models:
        for name in FAMILY_METHODS[family]:
            params = {"corpus_size": 20} if name == "simplex" else {}
            s = score_matrix(models[family], x, y, x[:2], y[:2], method=name, **params)
            assert s.shape == (2, 60) and np.isfinite(s).all(), (family, name)


@pytest.fixture()
def junk_model(tree_files):
    (tree_files / "junk.txt").write_text("not a model")
    return tree_files


@pytest.mark.parametrize("command,extra,needle", [
    ("tabular", ["--top-k", "0"], "--top-k must be at least 1 (got 0)"),
    ("tabular", ["--method", "nope"], "unknown method 'nope'"),
    ("tabular", ["--out", "scores.json"], "--out must end in .npy"),
    ("tabular", ["--out", "missing/s.npy"], "directory does not exist"),
    ("verify", ["--lds-subsets", "-1"], "--lds-subsets must be at least 0 (got -1)"),
    ("verify", ["--remove-top-k", "-2"], "--remove-top-k must be at least 0 (got -2)"),
    ("verify", ["--loo", "3,x"], "--loo expects comma-separated row numbers, got 'x'"),
    ("verify", ["--out", "missing/v.json"], "directory does not exist"),
    ("verify", ["--out", "."], "is a directory"),
    ("verify", ["--out", "train.csv"], "refusing to overwrite"),
    ("verify", ["--cache", "train.csv"], "--cache: train.csv is a file"),
])
def test_bad_options_are_refused_before_any_work(junk_model, command, extra, needle,
                                                 monkeypatch, capsys):
    """The model file is junk: an option error must come before loading it."""
    t = junk_model
    monkeypatch.chdir(t)
    code, _, err = run_cli(monkeypatch, capsys, command, t / "train.csv", "--target", "target",
                           "--model", t / "junk.txt", "--query", t / "query.csv", *extra)
    _assert_one_line_error(code, err, needle)
    assert (t / "train.csv").read_text().startswith("mean_radius")  # not overwritten


def test_missing_query_file_is_refused_before_loading(junk_model, monkeypatch, capsys):
    t = junk_model
    code, _, err = _tabular(monkeypatch, capsys, t, model="junk.txt", query="nope.csv")
    _assert_one_line_error(code, err, "query file not found")


def test_query_columns_are_matched_by_name(tree_files, monkeypatch, capsys):
    t = tree_files
    query = pd.read_csv(t / "query.csv")
    code, out, err = _tabular(monkeypatch, capsys, t, "--json", "--out", t / "a.npy")
    assert code in (0, None), err
    query[list(reversed(query.columns))].to_csv(t / "shuffled.csv", index=False)
    code, out2, err = _tabular(monkeypatch, capsys, t, "--json", "--out", t / "b.npy",
                               query="shuffled.csv")
    assert code in (0, None), err
    np.testing.assert_array_equal(np.load(t / "a.npy"), np.load(t / "b.npy"))
    query.assign(zip=1).to_csv(t / "extra.csv", index=False)  # not a feature: left out
    code, _, err = _tabular(monkeypatch, capsys, t, "--out", t / "c.npy", query="extra.csv")
    assert code in (0, None), err
    np.testing.assert_array_equal(np.load(t / "a.npy"), np.load(t / "c.npy"))
    query.drop(columns=["mean_area"]).assign(zip=1).to_csv(t / "bad.csv", index=False)
    code, _, err = _tabular(monkeypatch, capsys, t, query="bad.csv")
    _assert_one_line_error(code, err, "query rows: missing column(s) mean_area, which the "
                                      "model was trained on")


@pytest.mark.parametrize("kind", ["logistic-with-names", "forest-without-names",
                                  "boosting-with-names"])
def test_no_library_warnings_leak_into_the_output(tree_files, kind, monkeypatch, capsys):
    import skops.io as sio
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    t = tree_files
    train, query = pd.read_csv(t / "train.csv"), pd.read_csv(t / "query.csv")
    xt, yt = train.drop(columns=["target"]), train["target"]
    scale = xt.std()
    xt = xt / scale  # standardised, so the logistic model converges
    xt.assign(target=yt).to_csv(t / "train.csv", index=False)
    (query.drop(columns=["target"]) / scale).assign(target=query["target"]).to_csv(
        t / "query.csv", index=False)
    if kind == "logistic-with-names":
        model = LogisticRegression(max_iter=2000).fit(xt, yt)
    elif kind == "boosting-with-names":
        model = GradientBoostingClassifier(n_estimators=5, max_depth=2).fit(xt, yt)
    else:
        model = RandomForestClassifier(n_estimators=5, random_state=0).fit(xt.to_numpy(), yt)
    sio.dump(model, t / "m.skops")
    code, _, err = _tabular(monkeypatch, capsys, t, "--json", model="m.skops")
    assert code in (0, None), err
    assert "warning" not in err.lower() and "feature names" not in err, err


def test_columns_the_model_does_not_use_are_left_out_and_lightgbm_names_matched(
        tmp_path, monkeypatch, capsys):
    """An id column and another target in the CSV are left out with a note; a column
    LightGBM renamed ("monthly income (€)" -> "monthly_income_(€)") is matched; the scores
    equal those of the model's own columns alone."""
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    x = pd.DataFrame({"monthly income (€)": rng.standard_normal(150),
                      "age": rng.integers(18, 80, 150).astype(float)})
    y = (x["monthly income (€)"] + 0.02 * (x["age"] - 50) > 0).astype(int)
    model = lgb.LGBMClassifier(n_estimators=10, num_leaves=4, min_child_samples=5,
                               verbose=-1).fit(x, y)
    assert model.booster_.feature_name() == ["monthly_income_(€)", "age"]
    model.booster_.save_model(str(tmp_path / "model.txt"))
    full = x.assign(customer_id=np.arange(150), bought=y, spend=rng.random(150))
    full.iloc[:120].to_csv(tmp_path / "train.csv", index=False)
    full.iloc[120:125].drop(columns=["spend"]).to_csv(tmp_path / "query.csv", index=False)
    x.iloc[:120].assign(bought=y[:120]).rename(
        columns={"monthly income (€)": "monthly_income_(€)"}).to_csv(tmp_path / "plain.csv",
                                                                       index=False)
    x.iloc[120:125].rename(columns={"monthly income (€)": "monthly_income_(€)"}).to_csv(
        tmp_path / "plain_query.csv", index=False)
    args = ["--target", "bought", "--model", tmp_path / "model.txt"]
    code, _, err = run_cli(monkeypatch, capsys, "tabular", tmp_path / "train.csv", *args,
                           "--query", tmp_path / "query.csv", "--out", tmp_path / "a.npy")
    assert code in (0, None), err
    assert "left out customer_id, spend (not features of the model)" in err
    code, _, err = run_cli(monkeypatch, capsys, "tabular", tmp_path / "plain.csv", *args,
                           "--query", tmp_path / "plain_query.csv", "--out", tmp_path / "b.npy")
    assert code in (0, None), err
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_catboost_blank_categories_are_one_line(tmp_path, monkeypatch, capsys):
    import catboost as cb

    rng = np.random.default_rng(0)
    x = pd.DataFrame({"city": rng.choice(["Oslo", "Berlin", "unknown"], 100),
                      "age": rng.standard_normal(100)})
    y = ((x["city"] == "Oslo") ^ (x["age"] > 1)).astype(int)
    model = cb.CatBoostClassifier(iterations=5, depth=2, verbose=0,
                                  cat_features=["city"]).fit(x, y)
    model.save_model(str(tmp_path / "model.cbm"))
    blanked = x.assign(bought=y).astype({"city": object})
    blanked.loc[blanked["city"] == "unknown", "city"] = np.nan  # as a CSV's blank cells
    blanked.to_csv(tmp_path / "train.csv", index=False)
    x.iloc[:3].to_csv(tmp_path / "query.csv", index=False)
    code, _, err = run_cli(monkeypatch, capsys, "tabular", tmp_path / "train.csv", "--target",
                           "bought", "--model", tmp_path / "model.cbm", "--query",
                           tmp_path / "query.csv")
    _assert_one_line_error(code, err, "categorical column 'city' is blank")


def test_hist_gradient_boosting_on_pandas_categories_loads_from_skops(tmp_path, monkeypatch,
                                                                      capsys):
    """categorical_features="from_dtype" keeps a functools.partial in the model, which
    skops lists as a type of its own; the function it wraps is still checked. The CLI's
    scores from the CSV's strings equal the API's on the in-memory categories."""
    import skops.io as sio
    from sklearn.ensemble import HistGradientBoostingClassifier

    from datablame.tabular import score_matrix

    rng = np.random.default_rng(0)
    x = pd.DataFrame({"city": pd.Categorical(rng.choice(["Oslo", "Lima", "Pune"], 200)),
                      "v": rng.standard_normal(200)})
    y = ((x["city"] == "Oslo") ^ (x["v"] > 0)).astype(int)
    model = HistGradientBoostingClassifier(max_iter=5, categorical_features="from_dtype",
                                           random_state=0).fit(x, y)
    sio.dump(model, tmp_path / "model.skops")
    x.assign(t=y).to_csv(tmp_path / "train.csv", index=False)
    x.iloc[:4].to_csv(tmp_path / "query.csv", index=False)
    code, _, err = run_cli(monkeypatch, capsys, "tabular", tmp_path / "train.csv", "--target",
                           "t", "--model", tmp_path / "model.skops", "--query",
                           tmp_path / "query.csv", "--out", tmp_path / "s.npy")
    assert code in (0, None), err
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"),
                               score_matrix(model, x, y, x.iloc[:4]), rtol=1e-6, atol=1e-9)


def test_a_torch_models_settings_file_given_as_the_model_points_to_its_weights(
        tables, monkeypatch, capsys):
    t = tables
    code, _, err = run_cli(monkeypatch, capsys, "tabular", t / "train.csv", "--target",
                           "approved", "--model", t / "model.json", "--query",
                           t / "query.parquet")
    _assert_one_line_error(code, err, "describes the torch model in model.safetensors")


def test_a_file_lightgbm_cannot_read_is_one_line_even_at_the_file_descriptor(
        tables, monkeypatch, capfd):
    """LightGBM's C++ prints "[LightGBM] [Fatal] ..." straight to file descriptor 2 before
    raising: the user saw two lines. capfd sees the descriptor, not just sys.stderr."""
    t = tables
    (t / "notes.txt").write_text("not a model\n")
    code, _, err = run_cli(monkeypatch, capfd, "tabular", t / "train.csv", "--target",
                           "approved", "--model", t / "notes.txt", "--query", t / "query.parquet")
    _assert_one_line_error(code, err, "could not be loaded as a lightgbm model")
    assert "[Fatal]" not in err and len(err.strip().splitlines()) == 1, err


def test_a_skops_file_binding_code_to_a_function_is_refused(tmp_path, monkeypatch, capsys):
    """The review's proof: functools.partial binding Python source to a scikit-learn
    testing helper that runs it, inside a HistGradientBoosting's preprocessor. Loading it
    must refuse, and the source must not run."""
    import functools

    import skops.io as sio
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.utils._testing import assert_run_python_script_without_output as run_script

    rng = np.random.default_rng(0)
    x = pd.DataFrame({"a": rng.standard_normal(100),
                      "c": pd.Categorical(rng.choice(list("xyz"), 100))})
    y = (x["a"] > 0).astype(int)
    model = HistGradientBoostingClassifier(max_iter=3).fit(x, y)
    marker = tmp_path / "ran"
    model._preprocessor.transformers_[1][1].func = functools.partial(
        run_script, f"open({str(marker)!r}, 'w').write('x')")
    sio.dump(model, tmp_path / "evil.skops")
    x.assign(t=y).to_csv(tmp_path / "train.csv", index=False)
    x.iloc[:3].to_csv(tmp_path / "query.csv", index=False)
    code, _, err = run_cli(monkeypatch, capsys, "tabular", tmp_path / "train.csv", "--target",
                           "t", "--model", tmp_path / "evil.skops", "--query",
                           tmp_path / "query.csv")
    _assert_one_line_error(code, err, "assert_run_python_script_without_output")
    assert not marker.exists()


def test_the_python_api_reads_a_tables_columns_by_the_models_names():
    """`attribute` given tables whose columns are reordered and hold an id: the model's
    columns are taken by name (LightGBM alone would read them by position), so the scores
    equal those of the model's own table."""
    import lightgbm as lgb

    from datablame.tabular import score_matrix

    rng = np.random.default_rng(1)
    x = pd.DataFrame({"income": rng.standard_normal(160), "age": rng.standard_normal(160),
                      "debt": rng.standard_normal(160)})
    y = (x["income"] - x["debt"] > 0).astype(int).to_numpy()
    model = lgb.LGBMClassifier(n_estimators=10, num_leaves=4, min_child_samples=5,
                               verbose=-1).fit(x, y)
    from datablame.tabular import attribute

    want = score_matrix(model, x[:120], y[:120], x[120:130])
    messy = x.assign(customer_id=np.arange(160))[["debt", "customer_id", "income", "age"]]
    got = score_matrix(model, messy[:120], y[:120], messy[120:130])
    np.testing.assert_array_equal(got, want)
    ranked = attribute(model, messy[:120], y[:120], messy[120:130], top_k=3)  # reasons too
    plain = attribute(model, x[:120], y[:120], x[120:130], top_k=3)
    assert ranked[["row", "score", "reason"]].equals(plain[["row", "score", "reason"]])
    assert not np.array_equal(  # what reading the reordered columns by position gives
        model.predict_proba(messy[["debt", "income", "age"]].to_numpy()[120:130]),
        model.predict_proba(x[120:130]))
