import json

import pandas as pd
import pytest

from datablame.errors import UserError
from datablame.rows import load_rows
from datablame.template import ALPACA_TEMPLATE, PromptTemplate

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


def test_missing_field_names_field_and_row(tmp_path):
    rows = [ROWS[0], {"instruction": "x", "output": "y"}, ROWS[2]]
    loaded = load_rows(write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(UserError, match=r"row 1 \(line 2\) is missing field 'input'"):
        loaded.require_fields(PromptTemplate().fields)
    with pytest.raises(UserError, match="field 'response' is missing"):
        loaded.require_fields(["response"])


@pytest.mark.parametrize("content,match", [("", "empty"), ("\n\n", "no rows")])
def test_empty_file_is_refused(tmp_path, content, match):
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
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
