"""Bad input gives exit code 2 and one readable line, no traceback."""

import json
import sys

import pytest

from datablame.cli import main as cli

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
    (["--query", "Fixed.", "--max-length", "0"], "--max-length must be at least 2"),
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


def test_a_model_folder_without_a_working_tokenizer_is_refused_before_any_work(
        random_lora_model, tmp_path, monkeypatch, capsys):
    """transformers 5 loads an empty tokenizer from a folder without vocabulary files, and
    every row became zero tokens (a reshape traceback after the embedding work): now one
    line before anything is embedded, whatever the files are called."""
    import shutil

    base, adapter = random_lora_model
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, bare)
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "say hi", "output": "hello"}])
    for files in ({}, {"vocab.json": "{}", "merges.txt": "#version: 0.2\n"}):
        for name, text in files.items():
            (bare / name).write_text(text)
        code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out",
                               tmp_path / "idx", "--gradients", "--model", bare, "--params",
                               "all")
        _assert_one_line_error(code, err, "turns text into no tokens")
        assert not (tmp_path / "idx").exists()  # refused before the embedding work
    # another model's tokenizer, larger than this model's embedding: an index error later
    from datablame.demo.toy_lm import train_tokenizer

    other = train_tokenizer([" ".join(f"word{i}" for i in range(200))], tmp_path / "other")
    for f in (tmp_path / "other").iterdir():
        shutil.copy(f, bare)
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "idx",
                           "--gradients", "--model", bare, "--params", "all")
    _assert_one_line_error(code, err, f"has {other.vocab_size} tokens but the model's "
                                      "embedding has")
    assert not (tmp_path / "idx").exists()


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


# -- issue 9: nothing lost, nothing crashes -------------------------------------------------

def test_index_out_refuses_a_directory_that_is_not_an_index(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [ROW])
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "p")
    _assert_one_line_error(code, err, "is a directory with 1 entry that is not a datablame "
                                      "index")
    assert (tmp_path / "p" / "notes.txt").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["notes.txt"]


def test_index_out_never_replaces_the_training_file_or_a_file(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [ROW])
    before = data.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", data)
    _assert_one_line_error(code, err, "is the training file")
    assert data.is_file() and data.read_bytes() == before
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", other)
    _assert_one_line_error(code, err, "is a file")
    assert other.read_text() == "keep me"
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", other / "idx")
    _assert_one_line_error(code, err, "is a file")
    assert not list(tmp_path.glob(".*"))  # no hidden leftovers beside them


def test_index_into_empty_dir_then_rebuilt_in_place(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [ROW, {**ROW, "output": "Done."}])
    (tmp_path / "idx").mkdir()
    code, _, _ = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx")
    assert code in (0, None)
    write_jsonl(data, [ROW, {**ROW, "output": "Changed."}, {**ROW, "output": "More."}])
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx")
    assert code in (0, None), err
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["data"]["rows"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_index_refuses_while_another_build_holds_the_lock(tmp_path, monkeypatch, capsys):
    import os
    import socket

    from datablame.store.index_dir import IndexLock

    data = write_jsonl(tmp_path / "t.jsonl", [ROW])
    with IndexLock(tmp_path / "idx"):
        code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "idx")
    _assert_one_line_error(code, err, f"another datablame build is writing {tmp_path / 'idx'} "
                                      f"(pid {os.getpid()} on {socket.gethostname()}, started")


def test_lock_is_released_when_its_process_dies(tmp_path):
    import subprocess

    from datablame.store.index_dir import IndexLock

    code = ("import sys, time; from datablame.store.index_dir import IndexLock;"
            f"lock = IndexLock({str(tmp_path / 'idx')!r}); lock.acquire();"
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(cli.UserError, match="another datablame build"):
            IndexLock(tmp_path / "idx").acquire()
    finally:
        proc.kill()
        proc.wait()
    with IndexLock(tmp_path / "idx"):  # the dead build's lock is gone
        pass


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--proj-dim", "0", "--proj-dim must be at least 1 (got 0)"),
    ("--shard-rows", "0", "--shard-rows must be at least 1 (got 0)"),
    ("--batch-size", "0", "--batch-size must be at least 1 (got 0)"),
    ("--grad-batch-size", "-1", "--grad-batch-size must be at least 0 (got -1)"),
    ("--max-length", "0", "--max-length must be at least 2 (got 0)"),
])
def test_index_refuses_bad_numbers_before_loading(tmp_path, monkeypatch, capsys, option, value,
                                                  needle):
    data = write_jsonl(tmp_path / "t.jsonl", [ROW])
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "i",
                           "--gradients", "--model", tmp_path / "no-model", option, value)
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "i").exists()


def test_trace_out_in_missing_dir_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "no-index", "--model",
                           tmp_path / "no-model", "--query", "Fixed.", "--out",
                           tmp_path / "missing" / "r.json")
    _assert_one_line_error(code, err, f"--out: {tmp_path / 'missing' / 'r.json'}: directory "
                                      "does not exist")


def test_plain_progress_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    from datablame import progress

    clock = iter(range(0, 1000, 1))
    monkeypatch.setattr(progress, "_now", lambda: float(next(clock)))
    progress.enable(True)
    try:
        with progress.task("row gradients", 2000) as advance:
            for _ in range(40):
                advance(50)
    finally:
        progress.enable(False)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "row gradients: 200/2000 (10%)"
    assert lines[-1].startswith("row gradients: 2000/2000 (100%) in ")
    assert len(lines) == 10


@pytest.mark.parametrize("flag", ["--no-checksum", "--no-verify"])  # the new name, the old
def test_trace_no_checksum_with_damaged_shard_header_is_one_line(flag, small_index,
                                                                 random_lora_model,
                                                                 monkeypatch, capsys):
    data, idx = small_index
    base, adapter = random_lora_model
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", idx, "--gradients",
                           "--model", base, "--adapter", adapter, "--proj-dim", "8")
    assert code in (0, None), err
    shard = idx / "gradients" / "shard-00000.npy"
    raw = bytearray(shard.read_bytes())
    raw[12:20] = b"@@@@@@@@"
    shard.write_bytes(bytes(raw))
    code, _, err = run_cli(monkeypatch, capsys, "trace", idx, "--model", base, "--adapter",
                           adapter, "--query", "Fixed.", "--all-rows", flag)
    _assert_one_line_error(code, err, "shard-00000.npy has a damaged header")


def test_a_rows_brackets_and_an_unstyled_reading_print_as_text():
    """Rows with '[/]', '[bold]', 'arr[i]' and MAGIC's '+0.1 loss if removed' reading once
    crashed the table (rich read them as markup)."""
    import pandas as pd
    from rich.console import Console

    from datablame.cli.render import results_table

    df = pd.DataFrame({"rank": [1], "row": [0], "score": [1.0],
                       "reading": ["+0.1 loss if removed"],
                       "field:output": ["x[/] [bold]y arr[i]"]})
    console = Console(width=160, record=True)
    console.print(results_table(df))
    text = console.export_text()
    assert "x[/] [bold]y arr[i]" in text and "+0.1 loss if removed" in text


def test_a_full_disk_under_the_output_is_one_line():
    """stdout on a full device (/dev/full): one line naming it, not a traceback."""
    import os
    import subprocess

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "datablame", "--help"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "error: could not write (No space left on device)"
