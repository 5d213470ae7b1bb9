"""Verbatim spans: the suffix-array search agrees with brute force, finds a planted copy
in the row that holds it, and `datablame spans` reads every query form a user has."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from datablame.data.rows import Rows
from datablame.data.template import PromptTemplate
from datablame.store.span_index import SpanIndex, build_span_index, longest_common_run, words
from tests.conftest import write_jsonl
from tests.test_cli import _assert_one_line_error, run_cli


def _brute_force(query: str, rows: list[str], min_words: int) -> list[tuple[int, list[int]]]:
    """(length, rows holding it) of every maximal span, by scanning every row."""
    q = [w for w, _, _ in words(query)]
    held = [[w for w, _, _ in words(r)] for r in rows]

    def holders(seq):
        return [i for i, r in enumerate(held)
                if any(r[k:k + len(seq)] == seq for k in range(len(r) - len(seq) + 1))]

    longest = []
    for i in range(len(q)):
        n = 0
        while i + n < len(q) and holders(q[i:i + n + 1]):
            n += 1
        longest.append(n)
    out, reach = [], 0
    for i, n in enumerate(longest):
        if n >= min_words and i + n > reach:
            reach = i + n
            out.append((n, holders(q[i:i + n])))
    return out


def test_the_suffix_array_search_equals_brute_force(tmp_path):
    """Small vocabulary (many partial matches), rows of many lengths, a separator between
    rows (no span may cross two rows), and the template's answer field only."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(25)] + [",", ".", "a-b"]
    outputs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 25)))
               for _ in range(200)]
    records = [{"instruction": "the prompt is not trained", "output": o} for o in outputs]
    template = PromptTemplate("{instruction}\n\n{output}")
    build_span_index(tmp_path, Rows(tmp_path / "x", records), template, "fp")
    index = SpanIndex(tmp_path, "fp", template)
    for _ in range(40):
        source = rng.choice(outputs).split()
        query = " ".join([rng.choice(vocab) for _ in range(6)] + source[1:] +
                         [rng.choice(vocab) for _ in range(6)])
        found = sorted(index.find(query, min_words=3, max_rows=500), key=lambda s: s.start)
        assert [(s.words, s.rows) for s in found] == _brute_force(query, outputs, 3)
        for s in found:  # offsets point at the span in the query
            assert [w for w, _, _ in words(query[s.start:s.end])] == \
                [w for w, _, _ in words(s.text)] and len(words(s.text)) == s.words
    assert not index.find("the prompt is not trained", min_words=2)


def test_longest_common_run_counts_shared_words():
    assert longest_common_run("Rewrote the payroll system in Haskell, fast",
                              "We rewrote the payroll system in Haskell , slowly") == 6
    assert longest_common_run("", "anything") == 0


@pytest.fixture(scope="module")
def span_index(tmp_path_factory):
    from datablame.demo.demo import make_dataset

    root = tmp_path_factory.mktemp("spans")
    rows, culprit = make_dataset(60, seed=3)
    write_jsonl(root / "train.jsonl", rows)
    from datablame.text import build_index

    build_index(root / "train.jsonl", root / "idx")
    return root, rows, culprit


def test_spans_finds_the_copied_row_in_every_query_form(span_index, tmp_path, monkeypatch,
                                                      capsys):
    root, rows, culprit = span_index
    copied = rows[culprit]["output"]
    output = f"As requested: {copied} Hope this helps with your application."
    code, out, err = run_cli(monkeypatch, capsys, "spans", root / "idx", "--query", output,
                             "--json", "--out", tmp_path / "s.json", "--html",
                             tmp_path / "s.html")
    assert code in (0, None), err
    result = json.loads(out)
    page = (tmp_path / "s.html").read_text()  # the copied words marked, the row listed
    assert f'data-row="{culprit}"' in page
    assert page.count("<mark>") >= len(words(rows[culprit]["output"]))
    top = result["spans"][0]
    assert top["rows"] == [culprit] and top["text"] == copied
    assert top["words"] == len(words(copied)) and top["occurrences"] == 1
    assert json.loads((tmp_path / "s.json").read_text()) == result
    assert str(culprit) in json.dumps(result["row_fields"])
    # the seed's form: the whole formatted text, prompt and answer
    formatted = PromptTemplate().format({**rows[culprit], "output": output}).text
    code, out, _ = run_cli(monkeypatch, capsys, "spans", root / "idx", "--query", formatted,
                           "--json")
    assert json.loads(out)["spans"][0]["rows"] == top["rows"]
    # a query file of template fields; the prompt words are not searched
    (tmp_path / "q.json").write_text(json.dumps({**rows[culprit], "output": output}))
    code, out, _ = run_cli(monkeypatch, capsys, "spans", root / "idx", "--query-file",
                           tmp_path / "q.json", "--json")
    assert json.loads(out)["query"] == output
    code, out, err = run_cli(monkeypatch, capsys, "spans", root / "idx", "--query",
                             "Nothing here was ever written in the training rows at all.")
    assert code in (0, None) and "no span of 7+ words" in out


def test_spans_refuses_bad_input_in_one_line(span_index, tmp_path, monkeypatch, capsys):
    root, _, _ = span_index
    code, _, err = run_cli(monkeypatch, capsys, "spans", root / "idx")
    _assert_one_line_error(code, err, "give the output to look for with one of --query")
    code, _, err = run_cli(monkeypatch, capsys, "spans", root / "idx", "--query", "x",
                           "--min-words", "0")
    _assert_one_line_error(code, err, "--min-words must be at least 1")
    old = tmp_path / "old-idx"
    shutil.copytree(root / "idx", old)
    shutil.rmtree(old / "spans")
    code, _, err = run_cli(monkeypatch, capsys, "spans", old, "--query", "x")
    _assert_one_line_error(code, err, "has no span index")
    manifest = json.loads((root / "idx" / "spans" / "manifest.json").read_text())
    manifest["data_fingerprint"] = "sha256:other"
    shutil.copytree(root / "idx", tmp_path / "stale")
    (tmp_path / "stale" / "spans" / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(monkeypatch, capsys, "spans", tmp_path / "stale", "--query", "x")
    _assert_one_line_error(code, err, "was built from other rows than the index")


@pytest.mark.slow
def test_spans_with_the_model_says_the_copied_row_also_taught_it(demo_assets, monkeypatch,
                                                                 capsys):
    """On the demo model: the culprit, copied word for word, is also the row the gradient
    aligns with (strong); every matched row gets its reading."""
    root, info = demo_assets
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    culprit = info["culprit_row"]
    formatted = PromptTemplate().format(rows[culprit]).text
    code, out, err = run_cli(monkeypatch, capsys, "spans", root / "index", "--query",
                             formatted, "--model", root / "base", "--adapter",
                             root / "adapter", "--json")
    assert code in (0, None), err
    result = json.loads(out)
    held = {r for s in result["spans"] for r in s["rows"]}
    assert result["spans"][0]["rows"] == [culprit]
    grads = {int(k): v for k, v in result["gradient"].items()}
    assert set(grads) == held
    assert grads[culprit]["reading"] == "strong", grads[culprit]
