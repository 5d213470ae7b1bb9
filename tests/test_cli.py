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


@pytest.mark.parametrize("args,needle", [
    (["--query", "Fixed.", "--top-k", "0"], "--top-k must be at least 1"),
    (["--query", "Fixed.", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--query", "Fixed.", "--max-length", "0"], "max length must be at least 2"),
    (["--query", "Fixed.", "--params", "lora_B("], "bad parameter pattern"),
    (["--query", "Fixed.", "--dtype", "fp8"], "unknown dtype"),
    (["--query", "Fixed.", "--method", "tracin"], "tracin needs checkpoints"),
    (["--query", "Fixed.", "--method", "tracin", "--checkpoint", "ck:x"],
     "--checkpoint expects ADAPTER_DIR:LR"),
    (["--query-file", "missing.json"], "query file not found"),
    (["--query", "Fixed.", "--focus", "Broken"], "not part of the traced output"),
    (["--query", "Fixed.", "--field", "question=Why?"], "not in the index's template"),
])
def test_trace_options_are_checked_before_the_model_loads(small_index, tmp_path, monkeypatch,
                                                          capsys, args, needle):
    """Issue 9.20: a typo must cost a second, not a 7B model load (here: no model at all)."""
    _, idx = small_index
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "trace", idx, "--model", tmp_path / "no-model",
                           *args)
    _assert_one_line_error(code, err, needle)


def test_template_escapes_from_the_shell_are_newlines(tmp_path, monkeypatch, capsys):
    """Issue 9.7: `--template '### Q:\\n{q}\\n\\n### A:\\n{a}'` as a shell passes it."""
    from datablame.store.retrieval_index import load_index

    data = write_jsonl(tmp_path / "q.jsonl", [{"q": "Why?", "a": "Because."}])
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "i",
                           "--template", r"### Q:\n{q}\n\n### A:\n{a}")
    assert code in (0, None), err
    tmpl = load_index(tmp_path / "i").template
    assert tmpl.format({"q": "Why?", "a": "Because."}).text == "### Q:\nWhy?\n\n### A:\nBecause."
    assert "note: template: '### Q:\\n{q}" in err


def test_moved_training_file_points_at_data(small_index, random_lora_model, monkeypatch,
                                            capsys):
    data, idx = small_index
    base, adapter = random_lora_model
    data.rename(data.with_name("moved.jsonl"))
    code, _, err = run_cli(monkeypatch, capsys, "trace", idx, "--model", base,
                           "--adapter", adapter, "--query", "Fixed.")
    _assert_one_line_error(code, err, "pass its new path with --data")


def test_adapter_errors_name_the_problem(small_index, random_lora_model, tmp_path,
                                         monkeypatch, capsys):
    """An adapter without weights, or trained on another base: one line that says which."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    _, idx = small_index
    base, adapter = random_lora_model
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(adapter / "adapter_config.json", empty)
    code, _, err = run_cli(monkeypatch, capsys, "trace", idx, "--model", base,
                           "--adapter", empty, "--query", "Fixed.")
    _assert_one_line_error(code, err, "has adapter_config.json but no weights")

    other = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2,
                                       n_head=2))
    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    get_peft_model(other, lora).save_pretrained(tmp_path / "foreign")
    config = json.loads((tmp_path / "foreign" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-base"  # what a real adapter records
    (tmp_path / "foreign" / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(monkeypatch, capsys, "trace", idx, "--model", base,
                           "--adapter", tmp_path / "foreign", "--query", "Fixed.")
    _assert_one_line_error(code, err, "does not fit the model")
    assert "trained on 'someone/other-base'" in err
