"""`datablame audit labels`: flipped labels in real data (scikit-learn's breast cancer) come
out on top, and retraining without them beats retraining without random rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.test_cli import _assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """400 training rows with 40 labels flipped, 169 clean evaluation rows, an XGBoost
    model trained on the flipped labels, saved the way users save it."""
    import xgboost as xgb
    from sklearn.datasets import load_breast_cancer

    root = tmp_path_factory.mktemp("audit")
    x, y = load_breast_cancer(return_X_y=True, as_frame=True)
    x.columns = [c.replace(" ", "_") for c in x.columns]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, held = order[:400], order[400:]
    labels = y.iloc[train].to_numpy().copy()
    flips = rng.choice(400, 40, replace=False)
    labels[flips] = 1 - labels[flips]
    xt = x.iloc[train].reset_index(drop=True)
    pd.concat([xt, pd.Series(labels, name="label")], axis=1).to_csv(root / "train.csv",
                                                                    index=False)
    xe = x.iloc[held].reset_index(drop=True)
    pd.concat([xe, pd.Series(y.iloc[held].to_numpy(), name="label")], axis=1).to_csv(
        root / "eval.csv", index=False)
    model = xgb.XGBClassifier(n_estimators=40, max_depth=3, learning_rate=0.3)
    model.fit(xt, labels)
    model.get_booster().save_model(str(root / "model.json"))
    return root, set(int(i) for i in flips)


def test_flipped_labels_come_first_and_removing_them_is_proven(flipped, monkeypatch, capsys):
    root, flips = flipped
    code, out, err = run_cli(monkeypatch, capsys, "audit", "labels", root / "train.csv",
                             "--model", root / "model.json", "--target", "label", "--eval",
                             root / "eval.csv", "--top-k", "40", "--json", "--out",
                             root / "audit.json")
    assert code in (0, None), err
    result = json.loads(out)
    assert result["scorer"] == "self-influence"  # the auto choice for a tree model
    top = [r["row"] for r in result["ranked"]]
    precision = len(flips & set(top)) / 40
    assert precision >= 0.6, precision  # random: 0.10
    assert all({"oof-loss", "loss", "self-influence"} <= set(r) for r in result["ranked"])
    runs = result["proof"]["runs"]
    assert runs["without suspects"]["loss"] < runs["without random rows"]["loss"]
    assert runs["without suspects"]["accuracy"] >= runs["all rows"]["accuracy"]
    assert result["proof"]["verdict"] == "confirmed"
    assert json.loads((root / "audit.json").read_text()) == result
    # relabelling: the out-of-fold suggestion restores the true label of the flipped rows
    # listed; trained with the corrected labels the model is as accurate as without the
    # suspects (measured 0.953 vs 0.947 with every row as given; its eval loss, 0.153 vs
    # 0.145, is not better, so the relabel verdict here is "not confirmed": said as is)
    listed_flips = [r for r in result["ranked"] if r["row"] in flips]
    restored = sum(r["suggested"] != r["label"] for r in listed_flips)
    assert restored >= 0.8 * len(listed_flips), (restored, len(listed_flips))
    fixed = runs["suspects relabelled"]
    assert fixed["accuracy"] >= runs["all rows"]["accuracy"]
    assert fixed["loss"] < runs["without random rows"]["loss"]
    assert fixed["relabelled"] == sum(r["suggested"] != r["label"] for r in result["ranked"])
    beats = fixed["loss"] < runs["without random rows"]["loss"] - \
        runs["without random rows"]["spread"]["loss"] and fixed["loss"] <= runs["all rows"]["loss"]
    assert result["proof"]["relabel_verdict"] == ("confirmed" if beats else "not confirmed")
    # the table form names the verdict
    code, out, err = run_cli(monkeypatch, capsys, "audit", "labels", root / "train.csv",
                             "--model", root / "model.json", "--target", "label", "--eval",
                             root / "eval.csv", "--top-k", "40", "--scorer", "oof-loss",
                             "--relabelled", root / "relabelled.csv")
    assert code in (0, None), err
    assert "CONFIRMED" in out + err and "suspected label errors (oof-loss" in out + err
    assert "relabel " in out + err and "suggested labels" in " ".join((out + err).split())
    given = pd.read_csv(root / "train.csv")
    fixed_table = pd.read_csv(root / "relabelled.csv")
    changed = set(np.flatnonzero(given["label"].to_numpy() != fixed_table["label"].to_numpy()))
    assert len(changed) >= 20 and len(changed & flips) >= 0.8 * len(changed)
    pd.testing.assert_frame_equal(given.drop(columns="label"),
                                  fixed_table.drop(columns="label"))


def test_every_label_scorer_finds_the_flipped_rows_on_its_own(flipped):
    """Each scorer's own top 40 (measured: oof-loss 34, loss 33, self-influence 36 of 40
    flipped; random would give 4)."""
    from datablame.audit import SCORERS, label_audit
    from datablame.cli.tabular import load_task

    root, flips = flipped
    t, _, _ = load_task(root / "train.csv", "label", root / "model.json", root / "train.csv")
    for scorer in SCORERS:
        top = {r["row"] for r in label_audit(t, scorer=scorer, top_k=40)["ranked"]}
        assert len(top & flips) >= 28, (scorer, len(top & flips))


def test_audit_labels_refuses_bad_input_in_one_line(flipped, tmp_path, monkeypatch, capsys):
    root, _ = flipped
    base = ["audit", "labels", root / "train.csv", "--model", root / "model.json"]
    code, _, err = run_cli(monkeypatch, capsys, *base, "--target", "nope")
    _assert_one_line_error(code, err, "target column 'nope' is missing")
    code, _, err = run_cli(monkeypatch, capsys, *base, "--target", "label", "--scorer", "x")
    _assert_one_line_error(code, err, "unknown scorer 'x'")
    code, _, err = run_cli(monkeypatch, capsys, *base, "--target", "label", "--folds", "1")
    _assert_one_line_error(code, err, "--folds must be at least 2")
    unlabeled = tmp_path / "eval.csv"
    pd.read_csv(root / "eval.csv").drop(columns=["label"]).to_csv(unlabeled, index=False)
    code, _, err = run_cli(monkeypatch, capsys, *base, "--target", "label", "--eval",
                           unlabeled)
    _assert_one_line_error(code, err, "need the label column 'label'")


def test_prune_writes_the_kept_and_removed_rows_and_retrains(flipped, tmp_path, monkeypatch,
                                                             capsys):
    """The kept and removed files are the training file's rows, split (same columns, same
    values, same order); the proof retrains without them and without random rows."""
    root, _ = flipped
    base = ["audit", "prune", root / "train.csv", "--model", root / "model.json",
            "--target", "label", "--eval", root / "eval.csv", "--fraction", "0.1"]
    code, out, err = run_cli(monkeypatch, capsys, *base, "--kept", tmp_path / "kept.csv",
                             "--removed", tmp_path / "removed.csv", "--json")
    assert code in (0, None), err
    result = json.loads(out)
    gone = sorted(r["row"] for r in result["pruned"])
    assert len(gone) == 40 and result["scorer"] == "loss-easy"
    train = pd.read_csv(root / "train.csv")
    kept, removed = pd.read_csv(tmp_path / "kept.csv"), pd.read_csv(tmp_path / "removed.csv")
    pd.testing.assert_frame_equal(removed, train.iloc[gone].reset_index(drop=True))
    pd.testing.assert_frame_equal(kept, train.drop(index=gone).reset_index(drop=True))
    runs = result["runs"]
    assert set(runs) == {"all rows", "without suspects", "without random rows"}
    assert runs["without suspects"]["accuracy"] >= runs["all rows"]["accuracy"] - 0.03
    # never overwrites a file it did not write; bad fractions and scorers in one line
    code, _, err = run_cli(monkeypatch, capsys, *base, "--kept", tmp_path / "kept.csv")
    _assert_one_line_error(code, err, "refusing to overwrite")
    assert pd.read_csv(tmp_path / "kept.csv").equals(kept)
    code, _, err = run_cli(monkeypatch, capsys, *base[:-2], "--fraction", "0.7")
    _assert_one_line_error(code, err, "--fraction must be in (0, 0.5)")
    code, _, err = run_cli(monkeypatch, capsys, *base, "--scorer", "x")
    _assert_one_line_error(code, err, "unknown scorer 'x'")
    code, _, err = run_cli(monkeypatch, capsys, *base, "--kept", tmp_path / "kept.parquet")
    _assert_one_line_error(code, err, "--kept must end in .csv")


def test_prune_by_influence_is_judged_on_rows_it_was_not_chosen_on(flipped):
    """Influence on the evaluation rows chooses the rows; judged on those same rows the
    choice would look good by construction, so half the rows choose, the other half
    judge."""
    import xgboost as xgb

    from datablame.audit import prune_audit
    from datablame.tabular import task

    root, _ = flipped
    train, held = pd.read_csv(root / "train.csv"), pd.read_csv(root / "eval.csv")
    x, y = train.drop(columns=["label"]), train["label"].to_numpy()
    model = xgb.XGBClassifier(n_estimators=20, max_depth=3).fit(x, y)
    t = task(model, x, y, held.drop(columns=["label"]))
    result = prune_audit(t, held.drop(columns=["label"]), held["label"].to_numpy(),
                         scorer="influence", n_random=1)
    assert result["judged_on"] == len(held) - len(held) // 2
    assert len(result["pruned"]) == 40


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """A loan table (string groups, numeric income) where 60 high-income group-B rows were
    planted as denied: a LightGBM model trained on it denies group B more often."""
    import lightgbm as lgb

    root = tmp_path_factory.mktemp("fair")
    rng = np.random.default_rng(0)

    def make(n, plant):
        df = pd.DataFrame({"income": rng.normal(50, 12, n).round(1),
                           "group": rng.choice(["A", "B"], n),
                           "age": rng.integers(20, 70, n).astype(float)})
        df["approved"] = (df["income"] + rng.normal(0, 4, n) > 50).astype(int)
        planted = np.flatnonzero((df["group"] == "B") & (df["income"] > 52))[:60] if plant \
            else np.array([], dtype=int)
        df.loc[planted, "approved"] = 0
        return df, planted

    train, planted = make(600, True)
    held, _ = make(400, False)
    train.to_csv(root / "train.csv", index=False)
    held.to_csv(root / "eval.csv", index=False)
    x = train.drop(columns=["approved"]).astype({"group": "category"})
    model = lgb.LGBMClassifier(n_estimators=60, num_leaves=7, verbose=-1)
    model.fit(x, train["approved"])
    model.booster_.save_model(str(root / "model.txt"))
    return root, set(int(i) for i in planted)


def test_fairness_finds_the_planted_rows_and_removing_them_closes_the_gap(
        biased, monkeypatch, capsys):
    root, planted = biased
    base = ["audit", "fairness", root / "train.csv", "--model", root / "model.txt",
            "--target", "approved", "--group", "group", "--eval", root / "eval.csv",
            "--top-k", "60"]
    code, out, err = run_cli(monkeypatch, capsys, *base, "--json")
    assert code in (0, None), err
    result = json.loads(out)
    assert (result["advantaged"], result["disadvantaged"]) == ("A", "B")
    flagged = {r["row"] for r in result["ranked"]}
    assert len(flagged & planted) >= 45, len(flagged & planted)  # measured 55 of 60
    top = result["patterns"][0]
    assert "approved=0" in top["pattern"] and "income >" in top["pattern"]
    assert top["flagged"] / top["rows"] > 0.8
    proof = result["proof"]
    assert proof["all rows"]["gap"] > 0.1
    assert proof["without flagged"]["gap"] < proof["without random rows"]["gap"] / 2
    assert proof["verdict"] == "confirmed"
    code, out, err = run_cli(monkeypatch, capsys, *base, "--metric", "eq-opportunity")
    assert code in (0, None), err
    assert "eq-opportunity between group=A (advantaged) and group=B" in out + err


def test_fairness_refuses_bad_input_in_one_line(biased, monkeypatch, capsys):
    root, _ = biased
    base = ["audit", "fairness", root / "train.csv", "--model", root / "model.txt",
            "--target", "approved", "--eval", root / "eval.csv"]
    code, _, err = run_cli(monkeypatch, capsys, *base, "--group", "colour")
    _assert_one_line_error(code, err, "no group column 'colour'")
    code, _, err = run_cli(monkeypatch, capsys, *base, "--group", "group", "--metric", "x")
    _assert_one_line_error(code, err, "unknown metric 'x'")
    code, _, err = run_cli(monkeypatch, capsys, *base, "--group", "group", "--favorable",
                           "yes")
    _assert_one_line_error(code, err, "--favorable yes is not a label")


def test_fairness_reads_a_protected_attribute_the_model_never_saw(biased, tmp_path,
                                                                 monkeypatch, capsys):
    """The usual audit: the model is trained without the group column, on income, age and
    a region that agrees with the group 90% of the time (a proxy: the planted denials
    still make it unfair); the group is read from the tables for the gap and the
    patterns, not fed to the model."""
    import lightgbm as lgb

    root, planted = biased
    rng = np.random.default_rng(1)
    tables = {}
    for name in ("train", "eval"):
        table = pd.read_csv(root / f"{name}.csv")
        proxy = (table["group"] == "B").to_numpy()
        flip = rng.random(len(table)) < 0.1
        table["region"] = np.where(flip, ~proxy, proxy).astype(float)
        table.to_csv(tmp_path / f"{name}.csv", index=False)
        tables[name] = table
    features = ["income", "age", "region"]
    model = lgb.LGBMClassifier(n_estimators=60, num_leaves=7, verbose=-1)
    model.fit(tables["train"][features], tables["train"]["approved"])
    model.booster_.save_model(str(tmp_path / "blind.txt"))
    code, out, err = run_cli(monkeypatch, capsys, "audit", "fairness", tmp_path / "train.csv",
                             "--model", tmp_path / "blind.txt", "--target", "approved",
                             "--group", "group", "--eval", tmp_path / "eval.csv", "--top-k",
                             "60", "--json")
    assert code in (0, None), err
    result = json.loads(out)
    assert (result["advantaged"], result["disadvantaged"]) == ("A", "B")
    assert result["proof"]["all rows"]["gap"] > 0.05
    assert len({r["row"] for r in result["ranked"]} & planted) >= 30
    assert result["proof"]["verdict"] == "confirmed"


def test_an_audit_rerun_from_its_cache_retrains_nothing(flipped, tmp_path, monkeypatch,
                                                        capsys):
    """Every retraining's numbers are saved as it finishes: a second run (e.g. after an
    interruption) takes them from the cache, retrains nothing and says the same."""
    import datablame.audit as audit

    root, _ = flipped
    args = ["audit", "labels", root / "train.csv", "--model", root / "model.json",
            "--target", "label", "--eval", root / "eval.csv", "--top-k", "40", "--json",
            "--cache", tmp_path / "cache"]
    code, first, err = run_cli(monkeypatch, capsys, *args)
    assert code in (0, None), err
    saved = list((tmp_path / "cache").glob("audit-*.json"))
    assert len(saved) == 1
    entries = json.loads(saved[0].read_text())["entries"]
    assert len(entries) == 5 + 5 + 1  # folds, every row / without / 3 random, relabelled

    def no_retraining(*a, **k):
        raise AssertionError("retrained although the cache had it")

    monkeypatch.setattr(audit, "fitted_adapter", no_retraining)
    code, second, err = run_cli(monkeypatch, capsys, *args)
    assert code in (0, None), err
    assert json.loads(second) == json.loads(first)
    # an interrupted run: the cache lost its last entries; only those are retrained
    kept = dict(list(entries.items())[:6])
    saved[0].write_text(json.dumps({"task": json.loads(saved[0].read_text())["task"],
                                    "entries": kept}))
    monkeypatch.undo()
    code, third, err = run_cli(monkeypatch, capsys, *args)
    assert code in (0, None), err
    assert json.loads(third) == json.loads(first)
    # another model's audit in the same cache directory gets its own file
    other = tmp_path / "other.json"
    other.write_text((root / "model.json").read_text() + "\n")  # other bytes, same model
    code, _, err = run_cli(monkeypatch, capsys, *[other if a == root / "model.json" else a
                                                  for a in args])
    assert code in (0, None), err
    assert len(list((tmp_path / "cache").glob("audit-*.json"))) == 2
