"""Group questions: the training rows behind many outputs together (e.g. every query row
the model gets wrong), for tabular and text models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.test_cli import _assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def planted_errors(tmp_path_factory):
    """A pocket of 13 training rows labelled wrong (x0 > 1.6, x1 > 0: label 0 where the
    rule says 1) that a LightGBM model learns: evaluation rows in that pocket come out
    wrong, and the planted rows are what made them wrong."""
    import lightgbm as lgb

    root = tmp_path_factory.mktemp("group")
    rng = np.random.default_rng(1)
    n = 400
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    pocket = np.flatnonzero((x[:, 0] > 1.6) & (x[:, 1] > 0))
    y[pocket] = 0
    cols = ["x0", "x1", "x2"]
    pd.DataFrame(x, columns=cols).assign(label=y).to_csv(root / "train.csv", index=False)
    xe = np.r_[rng.normal(size=(40, 3)), np.c_[rng.uniform(1.7, 2.6, 12),
                                                  rng.uniform(0.1, 1.0, 12),
                                                  rng.normal(size=12)]]
    ye = (xe[:, 0] + xe[:, 1] > 0).astype(int)
    pd.DataFrame(xe, columns=cols).assign(label=ye).to_csv(root / "eval.csv", index=False)
    model = lgb.LGBMClassifier(n_estimators=60, num_leaves=8, min_child_samples=5,
                               verbose=-1).fit(pd.DataFrame(x, columns=cols), y)
    model.booster_.save_model(str(root / "model.txt"))
    return root, set(int(i) for i in pocket)


def test_rows_behind_every_wrong_answer_are_the_planted_pocket(planted_errors, monkeypatch,
                                                               capsys):
    root, pocket = planted_errors
    common = ["tabular", root / "train.csv", "--target", "label", "--model",
              root / "model.txt", "--query", root / "eval.csv"]
    code, out, err = run_cli(monkeypatch, capsys, *common, "--aggregate", "--only-wrong",
                             "--top-k", "30", "--json", "--out", root / "scores.npy")
    assert code in (0, None), err
    result = json.loads(out)
    wrong = result["group"]
    assert len(wrong) >= 8  # the pocket's evaluation rows, mostly
    top = [r["row"] for r in result["results"]]
    assert pocket <= set(top)  # every planted row among the top 30
    hits = len(set(top[:len(pocket)]) & pocket)
    assert hits >= 0.8 * len(pocket), f"{hits} of the top {len(pocket)} are planted"
    # the group score is the mean of the per-query scores over exactly the wrong rows
    scores = np.load(root / "scores.npy")
    mean = scores[wrong].mean(axis=0)
    np.testing.assert_allclose([r["score"] for r in result["results"]], mean[top],
                               rtol=1e-6, atol=1e-12)
    assert top == list(np.argsort(-mean, kind="stable")[:30])
    first = result["results"][0]
    assert first["helps"] == int((scores[wrong][:, first["row"]] > 1e-12).sum())
    # the same question as a page
    code, _, err = run_cli(monkeypatch, capsys, *common, "--aggregate", "--only-wrong",
                           "--html", root / "group.html")
    assert code in (0, None), err
    assert f'"row": {top[0]}' not in (root / "group.html").read_text()  # a page, not JSON
    assert "Rows behind the group" in (root / "group.html").read_text()


def test_fix_without_the_rows_behind_the_errors_makes_them_right(planted_errors, tmp_path,
                                                                monkeypatch, capsys):
    """The group's top rows, removed and retrained: the wrong answers turn right, while
    removing as many random rows or retraining on every row leaves them wrong."""
    root, pocket = planted_errors
    common = ["--target", "label", "--model", root / "model.txt", "--query",
              root / "eval.csv"]
    code, out, err = run_cli(monkeypatch, capsys, "tabular", root / "train.csv", *common,
                             "--aggregate", "--only-wrong", "--top-k", str(len(pocket)),
                             "--json")
    assert code in (0, None), err
    (tmp_path / "group.json").write_text(out)
    code, out, err = run_cli(monkeypatch, capsys, "fix", root / "train.csv", *common,
                             "--trace", tmp_path / "group.json", "--top-k", str(len(pocket)),
                             "--kept", tmp_path / "kept.csv", "--json")
    assert code in (0, None), err
    fixed = json.loads(out)
    wrong = fixed["wrong"]
    assert wrong["retrained on every row"] == wrong["original model"] >= 8
    assert wrong["retrained without them"] <= 0.25 * wrong["original model"]
    assert all(wrong[k] >= 0.75 * wrong["original model"] for k in wrong
               if k.startswith("without random"))
    kept = pd.read_csv(tmp_path / "kept.csv")
    train = pd.read_csv(root / "train.csv")
    assert len(kept) == len(train) - len(fixed["removed"])
    pd.testing.assert_frame_equal(kept, train.drop(index=fixed["removed"]).reset_index(
        drop=True))
    # the printed table names each query row that moved; the page shows them too
    code, out, err = run_cli(monkeypatch, capsys, "fix", root / "train.csv", *common,
                             "--remove", ",".join(map(str, fixed["removed"])), "--html",
                             tmp_path / "fix.html")
    assert code in (0, None) and "wrong answers:" in " ".join((out + err).split())
    page = (tmp_path / "fix.html").read_text()
    assert "Query rows that moved" in page and page.count("<svg") == 1
    moved = [q["query"] for i, q in enumerate(fixed["queries"]) if fixed["changed"][i] > 0]
    assert moved and all(f"dir=\"auto\">{q}</span></td>" in page for q in moved)


def test_group_questions_refuse_what_they_cannot_answer(planted_errors, tmp_path,
                                                        monkeypatch, capsys):
    root, _ = planted_errors
    pd.read_csv(root / "eval.csv").drop(columns="label").to_csv(tmp_path / "q.csv",
                                                                index=False)
    code, _, err = run_cli(monkeypatch, capsys, "tabular", root / "train.csv", "--target",
                           "label", "--model", root / "model.txt", "--query",
                           tmp_path / "q.csv", "--only-wrong", "--aggregate")
    _assert_one_line_error(code, err, "needs the target column")
    code, _, err = run_cli(monkeypatch, capsys, "fix", root / "train.csv", "--target",
                           "label", "--model", root / "model.txt", "--query",
                           root / "eval.csv", "--remove", "3,900")
    _assert_one_line_error(code, err, "out of range")
    code, _, err = run_cli(monkeypatch, capsys, "fix", root / "train.csv", "--target",
                           "label", "--model", root / "model.txt", "--query",
                           root / "eval.csv")
    _assert_one_line_error(code, err, "exactly one of --remove or --trace")


@pytest.mark.slow
def test_rows_behind_several_text_outputs_together(demo_assets, gradient_index, tmp_path,
                                                   monkeypatch, capsys):
    """Two answers copied from two rows: those two rows lead the group ranking, and each
    row's group score is the mean of its exact cosines with the two answers, by retrieval
    candidates and over every row from the gradient store alike."""
    from datablame.text import Query, Tracer

    root, info = demo_assets
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    a, b = info["culprit_row"], 37
    queries = [Query(rows[r]["output"], {"instruction": rows[r]["instruction"],
                                         "input": rows[r]["input"]}) for r in (a, b)]
    tracer = Tracer(gradient_index, root / "base", root / "adapter")
    for all_rows in (False, True):
        group = tracer.trace_group(queries, top_k=20, all_rows=all_rows, names=["a", "b"])
        assert set(group["row"][:2]) == {a, b}, all_rows
        each = [tracer.score_rows(q, list(group["row"])) for q in queries]
        np.testing.assert_allclose(group["score"], np.mean(each, axis=0), atol=1e-6)
        assert group["score"].is_monotonic_decreasing
        lead = group.set_index("row").loc[a]
        assert lead["strongest_query"] == "a" and lead["helps"] >= 1

    lines = tmp_path / "q.jsonl"
    lines.write_text("".join(json.dumps({"id": n, **rows[r]}) + "\n"
                             for n, r in (("a", a), ("b", b))))
    code, out, err = run_cli(monkeypatch, capsys, "trace", gradient_index, "--model",
                             root / "base", "--adapter", root / "adapter", "--queries", lines,
                             "--aggregate", "--json", "--out", tmp_path / "g.json", "--html",
                             tmp_path / "g.html")
    assert code in (0, None), err
    result = json.loads((tmp_path / "g.json").read_text())
    assert {r["row"] for r in result["results"][:2]} == {a, b}
    assert [q["name"] for q in result["queries"]] == ["a", "b"]
    assert "Ranked rows" in (tmp_path / "g.html").read_text()
    code, _, err = run_cli(monkeypatch, capsys, "trace", gradient_index, "--model",
                           root / "base", "--query", "x", "--aggregate")
    _assert_one_line_error(code, err, "--aggregate ranks the rows behind a --queries file")


def test_kept_rows_are_the_training_rows_as_written(tmp_path):
    """--kept copies the rows that stay byte for byte (a JSON Lines row missing a key stays
    missing it, 1 stays 1), in .jsonl, a .json list, and a .pq table alike."""
    from datablame.outputs import write_training_rows

    def _write_kept(train, out, removed):  # what fix --kept writes
        n = 3
        write_training_rows(train, out, [i for i in range(n) if i not in set(removed)])

    lines = ['{"instruction": "a", "output": "x", "n": 1}', '{"instruction": "b", "output": "y"}',
             '{"output": "z", "meta": {"k": [1, 2]}}']
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n\n")
    _write_kept(tmp_path / "t.jsonl", tmp_path / "k.jsonl", [0])
    assert (tmp_path / "k.jsonl").read_text().splitlines() == lines[1:]
    (tmp_path / "t.json").write_text(json.dumps([json.loads(ln) for ln in lines]))
    _write_kept(tmp_path / "t.json", tmp_path / "k.json", [2])
    assert json.loads((tmp_path / "k.json").read_text()) == [json.loads(ln)
                                                               for ln in lines[:2]]
    table = pd.DataFrame({"a": [1, 2, 3], "b": ["p", "q", "r"]})
    table.to_parquet(tmp_path / "t.pq")
    _write_kept(tmp_path / "t.pq", tmp_path / "k.pq", [1])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "k.pq").reset_index(drop=True),
                                  table.drop(index=1).reset_index(drop=True))
