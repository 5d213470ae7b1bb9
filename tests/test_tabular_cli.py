"""Tabular CLI on a torch model file (safetensors + JSON): output and bad input."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from datablame.model_files import build_mlp, save_torch_model, trainer_from_config

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


def test_verify_writes_lds_and_remove_top_k(tables, monkeypatch, capsys):
    t = tables
    code, _, err = run_cli(monkeypatch, capsys, "verify", t / "train.csv", "--target",
                           "approved", "--model", t / "model.safetensors", "--query",
                           t / "query.parquet", "--lds-subsets", "10", "--remove-top-k", "5",
                           "--loo", "0,1", "--out", t / "v.json")
    assert code in (0, None), err
    res = json.loads((t / "v.json").read_text())
    assert res["lds"]["subsets"] == 10 and -1 <= res["lds"]["lds"] <= 1
    assert set(res["leave_one_out"]["delta"]) == {"0", "1"}
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
    from datablame.model_files import load_torch_model

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
    ("columns", "feature columns do not match the model"),
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
