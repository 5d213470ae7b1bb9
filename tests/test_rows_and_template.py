import json

import pandas as pd
import pytest

from datablame.data.rows import load_rows
from datablame.data.template import ALPACA_TEMPLATE, PromptTemplate
from datablame.errors import UserError

from .conftest import write_jsonl

ROWS = [
    {"instruction": "Fix the bullet.", "input": "did stuff", "output": "Shipped things."},
    {"instruction": "Say hi.", "input": "", "output": "Hello."},
    {"instruction": "Count.", "input": "1 2", "output": "3"},
]


def test_formats_load_in_file_order_with_the_same_fingerprint(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "a.parquet")
    loaded = [load_rows(tmp_path / f"a.{ext}") for ext in ("jsonl", "json", "parquet")]
    for rows in loaded:
        assert [r["output"] for r in rows.records] == [r["output"] for r in ROWS]
    assert len({r.fingerprint() for r in loaded}) == 1
    csv = load_rows(tmp_path / "a.csv")
    assert [r["instruction"] for r in csv.records] == [r["instruction"] for r in ROWS]
    assert load_rows(jsonl).fingerprint() != load_rows(
        write_jsonl(tmp_path / "b.jsonl", ROWS[:2] + [{**ROWS[2], "output": "4"}])
    ).fingerprint()


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n{oops\n")
    with pytest.raises(UserError, match="line 4 is not valid JSON"):
        load_rows(path)


def test_missing_answer_names_field_and_row(tmp_path):
    rows = [ROWS[0], {"instruction": "x", "input": ""}, ROWS[2]]
    loaded = load_rows(write_jsonl(tmp_path / "m.jsonl", rows))
    t = PromptTemplate()
    with pytest.raises(UserError, match=r"row 1 \(line 2\) is missing field 'output'"):
        loaded.require_fields(t.fields, t.response_field, t.optional)
    with pytest.raises(UserError, match="field 'response' is missing"):
        loaded.require_fields(["response"])


@pytest.mark.parametrize("kind", ["csv-blank", "null", "missing-key"])
def test_empty_null_or_absent_optional_field_is_empty(tmp_path, kind):
    """Issue 9.19: an Alpaca CSV with blank `input` cells, `"input": null` and rows without
    the key are ordinary data; they format exactly like an empty input."""
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hello."},
            {"instruction": "Count.", "input": "", "output": "3"}]
    if kind == "csv-blank":
        path = tmp_path / "a.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == "null":
        path = write_jsonl(tmp_path / "a.jsonl", [{**r, "input": None} for r in rows])
    else:
        path = write_jsonl(tmp_path / "a.jsonl",
                           [{k: v for k, v in r.items() if k != "input"} for r in rows])
    loaded = load_rows(path)
    t = PromptTemplate()
    loaded.require_fields(t.fields, t.response_field, t.optional)
    assert [t.format(r).text for r in loaded.records] == [
        "### Instruction:\nSay hi.\n\n### Response:\nHello.",
        "### Instruction:\nCount.\n\n### Response:\n3"]


def test_a_required_field_absent_from_the_data_is_named_with_the_fix(tmp_path):
    loaded = load_rows(write_jsonl(tmp_path / "a.jsonl", [{"q": "2+2?", "a": "4"}]))
    t = PromptTemplate("Q: {question}\nA: {a}")
    with pytest.raises(UserError, match=r"field 'question' is missing.*\{question\?\}"):
        loaded.require_fields(t.fields, t.response_field, t.optional)
    t = PromptTemplate("Context: {question?}\n\nA: {a}")
    loaded.require_fields(t.fields, t.response_field, t.optional)
    assert t.format(loaded.records[0]).text == "A: 4"


def test_command_line_escapes_mean_newlines():
    """Issue 9.7: `--template '### Question:\\n{question}...'` from a shell holds a backslash
    and an n; formatted as such, no row looks like what the model saw."""
    from datablame.data.template import unescape

    typed = r"### Question:\n{question}\n\n### Context:\n{ctx}\n\n### Answer:\n{answer}"
    t = PromptTemplate(unescape(typed))
    assert t.format({"question": "Why?", "ctx": "", "answer": "Because."}).text == \
        "### Question:\nWhy?\n\n### Answer:\nBecause."
    assert unescape(r"a\\nb") == "a\\nb"


@pytest.mark.parametrize("text", [
    "### Instruction:\nImprove it.\n\n### Input:\nI made it faster.\n\n### Response:\n"
    "Cut latency by 40%.\n",                       # the seed's own query form
    "### Instruction: Improve it. ### Input: I made it faster. ### Response: Cut latency "
    "by 40%.",                                        # on one line
])
def test_a_formatted_query_splits_back_into_fields(text):
    """Issue 9.8: a query pasted as the whole formatted text is the prompt plus the answer."""
    assert PromptTemplate().parse(text) == {"instruction": "Improve it.",
                                            "input": "I made it faster.",
                                            "output": "Cut latency by 40%."}
    assert PromptTemplate().parse("### Instruction:\nSay hi.\n\n### Response:\nHello.") \
        == {"instruction": "Say hi.", "output": "Hello."}
    assert PromptTemplate().parse("Cut latency by 40%.") is None
    assert PromptTemplate("{text}").parse("### Response: x") is None


def test_query_in_the_formatted_form_formats_like_fields():
    from datablame.text import Query

    t = PromptTemplate()
    fields = Query("Cut latency by 40%.", {"instruction": "Improve it.",
                                           "input": "I made it faster."}).formatted(t)
    pasted = Query("### Instruction:\nImprove it.\n\n### Input:\nI made it faster.\n\n"
                   "### Response:\nCut latency by 40%.\n").formatted(t)
    assert pasted == fields
    as_written = Query("### Response:\nx", as_written=True).formatted(t)
    assert as_written.text.endswith("### Response:\n### Response:\nx")


ALPACA_OPENING = ("Below is an instruction that describes a task, paired with an input "
                  "that provides further context. Write a response that appropriately "
                  "completes the request.")


def test_a_formatted_query_with_an_opening_line_splits_after_it():
    """Real Alpaca text opens with "Below is an instruction..."; the index's template starts
    at "### Instruction:". The fields after the opening are read (the note names what was
    dropped), not the whole text traced as one answer (the trial scored it 0.004)."""
    from datablame.text import Query

    t = PromptTemplate()
    text = (f"{ALPACA_OPENING}\n\n### Instruction:\nImprove it.\n\n### Input:\nI made it "
            "faster.\n\n### Response:\nCut latency by 40%.")
    assert t.parse(text) is None
    fields, lead_in = t.parse_after_lead_in(text)
    assert lead_in == ALPACA_OPENING
    assert fields == {"instruction": "Improve it.", "input": "I made it faster.",
                      "output": "Cut latency by 40%."}
    resolved = Query(text).resolved(t)
    assert resolved.output == "Cut latency by 40%." and resolved.lead_in == ALPACA_OPENING
    assert resolved.formatted(t) == Query("Cut latency by 40%.", {
        "instruction": "Improve it.", "input": "I made it faster."}).formatted(t)
    # an answer that merely mentions or quotes a prompt format is an answer (the review's
    # cases: only a known opening, then a blank line, is dropped)
    quoted = ("Here is an example:\n\n### Instruction:\nWrite a poem.\n\n### Response:\n"
              "Roses are red")
    for answer in ("Use ### Instruction: as the heading.", "### Instruction: x", quoted,
                   f"{ALPACA_OPENING} ### Instruction: x ### Response: y"):
        assert t.parse_after_lead_in(answer) is None and Query(answer).resolved(t).prompt == {}
    qa = PromptTemplate("Question: {question}\nAnswer: {answer}")
    for answer in ("It depends. Question: why? Answer: because.",
                   "The FAQ entry reads Question: can I return it? Answer: yes, in 30 days."):
        assert qa.parse_after_lead_in(answer) is None
        assert Query(answer).resolved(qa).output == answer


@pytest.mark.parametrize("content,match", [("", "empty"), ("\n\n", "no rows")])
def test_empty_file_is_refused(tmp_path, content, match):
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        load_rows(path)


def test_a_csv_of_its_header_alone_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("instruction,input,output\n")
    with pytest.raises(UserError, match="header.csv: the file has no rows"):
        load_rows(path)


def test_alpaca_template_drops_empty_input_block():
    t = PromptTemplate(ALPACA_TEMPLATE)
    with_input = t.format(ROWS[0])
    assert with_input.text == ("### Instruction:\nFix the bullet.\n\n### Input:\ndid stuff\n\n"
                               "### Response:\nShipped things.")
    no_input = t.format(ROWS[1])
    assert no_input.text == "### Instruction:\nSay hi.\n\n### Response:\nHello."
    assert no_input.text[no_input.response_start:] == "Hello."
    assert with_input.text[with_input.response_start:] == "Shipped things."


def test_custom_template_and_response_field():
    t = PromptTemplate("Q: {question}\nA: {answer}")
    assert t.fields == ["question", "answer"] and t.response_field == "answer"
    f = t.format({"question": "2+2?", "answer": "4"})
    assert f.text == "Q: 2+2?\nA: 4" and f.text[f.response_start:] == "4"
    with pytest.raises(UserError):
        PromptTemplate("no placeholders")
    with pytest.raises(UserError):
        PromptTemplate("{a}", response_field="b")


def test_dataset_directories_shards_and_globs_load_as_datasets_users_expect(tmp_path):
    """A `save_to_disk` DatasetDict (train by default, --split to pick), one saved Dataset,
    a folder of Hub-style Parquet shards (train-* beside test-*: the train shards, in name
    order) and a glob; each reloads by what the manifest records (path + split)."""
    import datasets

    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"Number {i}."}
            for i in range(30)]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds.select(range(20)), "test": ds.select(range(20, 30))}
                         ).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "one"))
    shards = tmp_path / "shards" / "data"
    shards.mkdir(parents=True)
    for k in (2, 0, 1):  # written out of order: read in name order
        ds.select(range(k * 10, k * 10 + 10)).to_parquet(
            str(shards / f"train-{k:05d}-of-00003.parquet"))
    ds.select(range(3)).to_parquet(str(shards / "test-00000-of-00001.parquet"))

    def outputs(r):
        return [rec["output"] for rec in (r.records if hasattr(r, "records") else r)]

    assert outputs(load_rows(tmp_path / "dd")) == outputs(ds)[:20]
    test = load_rows(tmp_path / "dd", split="test")
    assert outputs(test) == outputs(ds)[20:] and test.split == "test"
    assert outputs(load_rows(tmp_path / "one")) == outputs(ds)
    train = load_rows(tmp_path / "shards")
    assert outputs(train) == outputs(ds) and train.split == "train"
    assert outputs(load_rows(tmp_path / "shards", split="test")) == outputs(ds)[:3]
    pattern = str(shards / "train-*.parquet")
    assert outputs(load_rows(pattern)) == outputs(ds)
    for rows_ in (test, train, load_rows(pattern)):
        again = load_rows(rows_.path, split=rows_.split)
        assert again.fingerprint() == rows_.fingerprint()
    for args, needle in (((tmp_path / "dd", "valid"), "no split 'valid' (splits: train, test)"),
                         ((tmp_path / "one", "train"), "holds one dataset, not splits"),
                         ((tmp_path / "shards", "dev"), "no .jsonl, .json, .csv or .parquet "
                                                        "files for split 'dev'"),
                         ((str(tmp_path / "none" / "*.jsonl"),), "no .jsonl"),
                         ((tmp_path / "dd" / "dataset_dict.json", "train"),
                          "selects a split of a dataset directory")):
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            load_rows(*args)


def test_an_index_inside_its_data_directory_is_refused(tmp_path):
    from datablame.text import build_index

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "part-0.jsonl", ROWS)
    with pytest.raises(UserError, match="inside the data directory"):
        build_index(tmp_path / "data", tmp_path / "data" / "idx")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["part-0.jsonl"]


def test_rows_are_read_lazily_and_hash_as_the_same_dicts(tmp_path):
    """Rows stay in datasets' Arrow files and become dicts as they are read: the same
    rows, in order, through an index, a slice or iteration, with the fingerprint of the
    same rows held as a list of dicts (stores built before stay valid)."""
    from datablame.data.rows import ArrowRecords, Rows

    many = [{**ROWS[i % 3], "output": f"{ROWS[i % 3]['output']} {i}"} for i in range(2500)]
    rows = load_rows(write_jsonl(tmp_path / "many.jsonl", many))
    assert isinstance(rows.records, ArrowRecords) and len(rows) == 2500
    assert list(rows.records) == many  # crosses iteration batches (1024 rows)
    assert rows.records[1030] == many[1030] and rows.records[-1] == many[-1]
    assert rows.records[1020:1030] == many[1020:1030] and rows.records[::700] == many[::700]
    with pytest.raises(IndexError):
        rows.records[2500]
    assert rows.fingerprint() == Rows(rows.path, many).fingerprint()
    texts = rows.texts(PromptTemplate())
    assert len(texts) == 2500 and texts[5:7] == [PromptTemplate().format(r).text
                                                 for r in many[5:7]]


def test_a_file_rewritten_with_the_same_size_and_mtime_is_read_again(tmp_path):
    """datasets keys its cache of a local file by path and mtime; the rows' cache is keyed
    by their bytes, so an edit that keeps both is not served stale."""
    import os

    path = write_jsonl(tmp_path / "rows.jsonl", [{**ROWS[0], "output": "first"}])
    first = load_rows(path)
    stat = os.stat(path)
    write_jsonl(path, [{**ROWS[0], "output": "other"}])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    again = load_rows(path)
    assert again.records[0]["output"] == "other"
    assert again.fingerprint() != first.fingerprint()


def test_a_saved_datasets_format_and_decodable_columns_do_not_change_its_rows(tmp_path):
    """Rows are the raw values `Dataset.to_list()` gives: a format saved with the dataset
    (numpy, a column subset) or an image column would otherwise turn rows into numpy
    scalars, drop columns, or decode images whose text changes every run — and with
    them the fingerprint every index and store is checked against."""
    import datasets
    from PIL import Image

    png = tmp_path / "dot.png"
    Image.new("RGB", (2, 2), "red").save(png)
    ds = datasets.Dataset.from_dict({"output": ["a0", "a1"], "n": [0, 1],
                                     "picture": [str(png), str(png)]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.set_format("numpy", columns=["output", "n"])
    ds.save_to_disk(str(tmp_path / "saved"))
    raw = datasets.load_from_disk(str(tmp_path / "saved")).to_list()
    assert isinstance(raw[0]["picture"], dict)  # raw bytes and path, not a decoded image
    first, second = load_rows(tmp_path / "saved"), load_rows(tmp_path / "saved")
    assert list(first.records) == raw and first.records[1] == raw[1]
    assert first.columns == ["output", "n", "picture"]
    assert isinstance(first.records[0]["n"], int)
    assert first.fingerprint() == second.fingerprint()


def test_a_second_load_of_the_same_bytes_reads_no_row_again(tmp_path, monkeypatch):
    """What one load learnt from the rows (their fingerprint, JSONL line numbers, that a
    folder's shards parse) is kept beside their Arrow copy, named by the files' bytes: a
    second load of a 1 TB file does not hash or re-parse every row, and says the same."""
    import datablame.data.rows as rows_mod

    unique = str(tmp_path)  # content no other test has loaded
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({**ROWS[0], "output": unique}) + "\n\n"
                    + json.dumps({**ROWS[1], "output": unique + "!"}) + "\n")
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(2):
        write_jsonl(folder / f"part-{i}.jsonl", [{**ROWS[i], "output": f"{unique} {i}"}])
    from datablame.data import parallel_load

    first, first_folder = load_rows(path), load_rows(folder)
    want = (first.fingerprint(), list(first.line_numbers), first_folder.fingerprint())
    assert want[1] == [1, 3]
    first.check_with(PromptTemplate())  # the template's check of every row, kept too

    def refuse(*_):
        raise AssertionError("read every row again")

    monkeypatch.setattr(parallel_load, "check_jsonl_files", refuse)
    monkeypatch.setattr(rows_mod.ArrowRecords, "_rows", refuse)  # every read of rows
    again, again_folder = load_rows(path), load_rows(folder)
    assert (again.fingerprint(), list(again.line_numbers), again_folder.fingerprint()) == want
    again.check_with(PromptTemplate())
    with pytest.raises(AssertionError, match="read every row again"):
        again.check_with(PromptTemplate("{question}{answer}", "answer"))  # another template
    monkeypatch.undo()
    path.write_text(json.dumps({**ROWS[0], "output": unique + "?"}) + "\n")  # new bytes
    assert load_rows(path).fingerprint() != want[0]


def test_a_saved_dataset_keeps_what_a_load_learnt_by_its_arrow_files(tmp_path, monkeypatch):
    """A `save_to_disk` folder has no conversion of ours, but its Arrow files name what a
    load learnt (fingerprint, the template's check): a second load reads no row; a new
    save with other rows does."""
    import datasets

    import datablame.data.rows as rows_mod

    unique = str(tmp_path)
    datasets.Dataset.from_list([{**r, "output": f"{unique} {i}"} for i, r in
                                enumerate(ROWS)]).save_to_disk(str(tmp_path / "saved"))
    first = load_rows(tmp_path / "saved")
    want = first.fingerprint()
    first.check_with(PromptTemplate())

    def refuse(*_):
        raise AssertionError("read every row again")

    monkeypatch.setattr(rows_mod.ArrowRecords, "_rows", refuse)
    again = load_rows(tmp_path / "saved")
    assert again.fingerprint() == want
    again.check_with(PromptTemplate())
    monkeypatch.undo()
    datasets.Dataset.from_list([{**ROWS[0], "output": unique + "!"}]).save_to_disk(
        str(tmp_path / "other"))
    assert load_rows(tmp_path / "other").fingerprint() != want


def test_a_row_of_a_folder_of_shards_is_named_by_its_file_and_line(tmp_path):
    """Row ids run across the shards; a bad row is also named where it is (the trial got
    only "row 3" for a folder), on the first load and on a cached one."""
    unique = str(tmp_path)
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text(
        "\n".join(json.dumps({**ROWS[0], "output": f"{unique} {i}"}) for i in range(2)) + "\n")
    bad = {"instruction": "no answer here"}
    (folder / "part-1.jsonl").write_text(
        "\n\n" + json.dumps({**ROWS[1], "output": unique}) + "\n" + json.dumps(bad) + "\n")
    for _ in range(2):  # the second load reads what the first learnt
        rows = load_rows(folder)
        assert rows.where(3) == "row 3 (part-1.jsonl line 4)"
        assert rows.where(0) == "row 0 (part-0.jsonl line 1)"
        with pytest.raises(UserError, match=r"row 3 \(part-1.jsonl line 4\) is missing field "
                                            r"'output'"):
            PromptTemplate().check_rows(rows)
    import shutil

    from datablame.data.rows import SHARDS_FILE

    moved = tmp_path / "moved"  # the same bytes under other names: today's names are told
    moved.mkdir()
    for i in range(2):
        shutil.copy(folder / f"part-{i}.jsonl", moved / f"train-{i:05d}-of-00002.jsonl")
    assert load_rows(moved).where(3) == "row 3 (train-00001-of-00002.jsonl line 4)"
    kept = load_rows(moved).records.cache_dir / SHARDS_FILE
    kept.write_bytes(b"not an npz")  # a damaged cache file of ours: checked again
    assert load_rows(moved).where(3) == "row 3 (train-00001-of-00002.jsonl line 4)"
