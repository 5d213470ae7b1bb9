"""Bad input gives exit code 2 and one readable line, no traceback."""

import json
import sys

import pytest

from datablame import cli

from .conftest import write_jsonl

ROW = {"instruction": "Fix it.", "input": "", "output": "Fixed."}


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["datablame", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert lines and lines[0].startswith("error:"), err
    assert needle in " ".join(err.split()), err


def test_malformed_jsonl(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n{not json\n")
    code, _, err = run_cli(monkeypatch, capsys, "index", bad, "--out", tmp_path / "i")
    _assert_one_line_error(code, err, "line 2 is not valid JSON")


def test_missing_field(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "m.jsonl", [ROW, {"instruction": "x", "input": ""}])
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "i")
    _assert_one_line_error(code, err, "row 1 (line 2) is missing field 'output'")


def test_empty_file(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    code, _, err = run_cli(monkeypatch, capsys, "index", empty, "--out", tmp_path / "i")
    _assert_one_line_error(code, err, "empty")


@pytest.fixture()
def small_index(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [ROW, {**ROW, "output": "Done."}])
    code, _, _ = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx")
    assert code in (0, None)
    return data, tmp_path / "idx"


def test_missing_adapter_dir(small_index, random_lora_model, tmp_path, monkeypatch, capsys):
    _, idx = small_index
    base, _ = random_lora_model
    code, _, err = run_cli(monkeypatch, capsys, "trace", idx, "--model", base,
                           "--adapter", tmp_path / "nope", "--query", "Fixed.")
    _assert_one_line_error(code, err, "adapter directory not found")


def test_empty_query(small_index, random_lora_model, monkeypatch, capsys):
    _, idx = small_index
    base, adapter = random_lora_model
    code, _, err = run_cli(monkeypatch, capsys, "trace", idx, "--model", base,
                           "--adapter", adapter, "--query", "   ")
    _assert_one_line_error(code, err, "query is empty")


def test_stale_index(small_index, random_lora_model, monkeypatch, capsys):
    data, idx = small_index
    base, adapter = random_lora_model
    write_jsonl(data, [ROW, {**ROW, "output": "Changed."}])
    code, _, err = run_cli(monkeypatch, capsys, "trace", idx, "--model", base,
                           "--adapter", adapter, "--query", "Fixed.")
    _assert_one_line_error(code, err, "is stale")


def test_trace_json_lists_every_candidate(small_index, random_lora_model, monkeypatch, capsys,
                                          tmp_path):
    _, idx = small_index
    base, adapter = random_lora_model
    code, out, _ = run_cli(monkeypatch, capsys, "trace", idx, "--model", base, "--adapter",
                           adapter, "--query", "Fixed.", "--field", "instruction=Fix it.",
                           "--json", "--show", "1", "--out", tmp_path / "r.json")
    assert code in (0, None)
    doc = json.loads(out)
    assert doc["query"] == "Fixed."
    assert [r["rank"] for r in doc["results"]] == [1, 2]
    assert sorted(r["row"] for r in doc["results"]) == [0, 1]
    assert set(doc["results"][0]["fields"]) == {"instruction", "input", "output"}
    assert json.loads((tmp_path / "r.json").read_text()) == doc
