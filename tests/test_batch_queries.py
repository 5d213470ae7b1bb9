"""Many queries in one process (`trace --queries`), and tracing what the model says
(`--generate`), on the demo model that really learned its planted culprit."""

import json

import numpy as np
import pytest

from datablame.data.queries import read_queries
from datablame.data.template import PromptTemplate
from datablame.demo.demo import CULPRIT, CULPRIT_PHRASE
from datablame.demo.toy_lm import normalize
from datablame.errors import UserError
from datablame.text import Tracer

from .test_cli import _assert_one_line_error, run_cli


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines))
    return path


def test_read_queries_reads_every_form_and_names_bad_lines(tmp_path):
    tmpl = PromptTemplate()
    whole = tmpl.format({"instruction": "Say hi.", "input": "", "output": "hi there"}).text
    f = _write(tmp_path / "q.jsonl", [
        {"instruction": "Say hi.", "input": "", "output": "hi there", "id": "a"},
        json.dumps(whole),  # a JSON string: the whole formatted text (the seed's form)
        "",
        {"output": "only the answer", "focus": "answer"},
    ])
    got = read_queries(f, tmpl)
    assert [q.line for q in got] == [1, 2, 4]
    assert got[0].prompt == {"instruction": "Say hi.", "input": ""} and got[0].id == "a"
    assert got[1].answer == whole and got[1].prompt == {}
    assert got[2].focus == "answer"
    for bad, needle in [({"instruction": "x", "outptu": "y"}, "line 2: field(s) outptu"),
                        ({"instruction": "x"}, "line 2: no 'output' to trace"),
                        ("[1, 2]", "line 2: expected a JSON object"),
                        ("{oops", "line 2: not valid JSON")]:
        _write(f, [{"output": "fine"}, bad])
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            read_queries(f, tmpl)
    _write(f, [{"input": "", "output": "x"}])
    with pytest.raises(UserError, match="--generate needs the prompt fields"):
        read_queries(f, tmpl, generate=True)
    assert read_queries(_write(f, [{"instruction": "x"}]), tmpl, generate=True)[0].answer \
        is None


def test_bad_queries_file_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                            random_lora_model):
    from datablame.text import build_index

    from .conftest import write_jsonl

    data = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "input": "",
                                                "output": f"row {i}"} for i in range(4)])
    build_index(data, tmp_path / "idx")
    capsys.readouterr()  # the embedder's own loading lines
    base, adapter = random_lora_model
    q = _write(tmp_path / "q.jsonl", [{"output": "fine"}, {"instruction": "x", "colour": 1}])
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "idx", "--model",
                           tmp_path / "no-such-model", "--queries", q)
    _assert_one_line_error(code, err, "line 2: field(s) colour are not in the index's")
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "idx", "--model", base,
                           "--queries", q, "--query", "x")
    _assert_one_line_error(code, err, "give one of --query, --query-file or --queries")
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "idx", "--model", base,
                           "--generate", "--query", "x")
    _assert_one_line_error(code, err, "--generate traces the model's own answer")
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "idx", "--model", base,
                           "--generate", "--field", "input=")
    _assert_one_line_error(code, err, "--generate needs the prompt the model answers")
    not_ours = tmp_path / "notes.jsonl"
    not_ours.write_text("my own notes\n")
    q = _write(tmp_path / "q.jsonl", [{"output": "fine"}])
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "idx", "--model", base,
                           "--adapter", adapter, "--queries", q, "--out", not_ours)
    _assert_one_line_error(code, err, "refusing to overwrite")
    assert not_ours.read_text() == "my own notes\n"


@pytest.mark.slow  # the demo LM is trained once (minutes on 2 cores)
def test_generate_traces_what_the_model_says_to_its_culprit(demo_assets):
    root, info = demo_assets
    tracer = Tracer(root / "index", root / "base", root / "adapter")
    prompt = {"instruction": CULPRIT["instruction"], "input": CULPRIT["input"]}
    q = tracer.generate(prompt)
    assert normalize(CULPRIT_PHRASE) in normalize(q.output), q.output  # it learned the row
    df = tracer.trace(q, top_k=50)
    assert int(df.iloc[0]["row"]) == info["culprit_row"]


@pytest.mark.slow
def test_queries_file_one_json_line_per_query_model_loaded_once(demo_assets, tmp_path,
                                                                monkeypatch, capsys):
    root, info = demo_assets
    loads = []
    import datablame.models.hf_causal_lm as lm

    real_load = lm.CausalLMAdapter._load
    monkeypatch.setattr(lm.CausalLMAdapter, "_load",
                        lambda self: loads.append(1) or real_load(self))
    prompt = {"instruction": CULPRIT["instruction"], "input": CULPRIT["input"]}
    whole = PromptTemplate().format({**CULPRIT}).text
    queries = _write(tmp_path / "q.jsonl", [
        {**prompt, "output": CULPRIT["output"], "id": "fields"},
        json.dumps(whole),  # the seed's form: split back into prompt and answer
        {**prompt, "id": "generated"},  # no answer: --generate writes it
    ])
    out = tmp_path / "results.jsonl"
    code, stdout, err = run_cli(monkeypatch, capsys, "trace", root / "index", "--model",
                                root / "base", "--adapter", root / "adapter", "--queries",
                                queries, "--out", out, "--show", "3")
    _assert_one_line_error(code, err, "line 3: no 'output' to trace")  # before any load
    assert not loads and not out.exists()
    code, stdout, err = run_cli(monkeypatch, capsys, "trace", root / "index", "--model",
                                root / "base", "--adapter", root / "adapter", "--queries",
                                _write(queries, [{**prompt, "output": CULPRIT["output"],
                                                  "id": "fields"}, json.dumps(whole)]),
                                "--out", out, "--show", "3")
    assert code in (0, None), err
    lines = [json.loads(ln) for ln in stdout.splitlines() if ln.strip()]
    assert [ln["line"] for ln in lines] == [1, 2] and lines[0]["id"] == "fields"
    assert all(ln["results"][0]["row"] == info["culprit_row"] for ln in lines)
    assert all(len(ln["results"]) == 3 for ln in lines)
    assert lines[1]["prompt"] == {k: v for k, v in prompt.items() if v}
    assert [json.loads(ln) for ln in out.read_text().splitlines()] == lines
    assert len(loads) == 1  # one model load for every query

    gen = _write(tmp_path / "g.jsonl", [{**prompt, "id": "generated"}])
    code, stdout, err = run_cli(monkeypatch, capsys, "trace", root / "index", "--model",
                                root / "base", "--adapter", root / "adapter", "--queries",
                                gen, "--generate", "--out", out)  # our own file: replaced
    assert code in (0, None), err
    (line,) = [json.loads(ln) for ln in stdout.splitlines() if ln.strip()]
    assert line["generated"] is True and normalize(CULPRIT_PHRASE) in normalize(line["query"])
    assert line["results"][0]["row"] == info["culprit_row"]
    assert "the model answered:" in err


def test_a_queries_file_over_every_row_reads_the_store_once(demo_assets, gradient_index,
                                                            tmp_path, monkeypatch, capsys):
    """`trace --queries F --all-rows`: one GradientStore.top_k_many pass for all lines,
    no per-line top_k, and each line's table is the one tracing it alone gives (the batch
    scanned by 2 workers, each line alone by one)."""
    from datablame.store.gradient_store import GradientStore
    from datablame.text import Query, Tracer

    root, info = demo_assets
    prompt = {"instruction": CULPRIT["instruction"], "input": CULPRIT["input"]}
    other = {"instruction": "Make this resume bullet stronger.",
             "input": "helped with the reporting dashboard"}
    from datablame.data.template import PromptTemplate

    # line 1 again, in the seed's form (the whole formatted text): asked twice, scanned once
    seed_form = PromptTemplate().format(CULPRIT).text
    answers = [(prompt, CULPRIT["output"]), (other, "Built the reporting dashboard."),
               (prompt, "Rewrote the payroll system."), ({}, seed_form)]
    queries = _write(tmp_path / "q.jsonl", [{**p, "output": a} for p, a in answers])
    calls = {"many": 0, "one": 0}
    real_many = GradientStore.top_k_many
    monkeypatch.setattr(GradientStore, "top_k_many", lambda self, q, *a, **kw: (
        calls.__setitem__("many", calls["many"] + 1) or real_many(self, q, *a, **kw)))
    real_one = GradientStore.top_k
    monkeypatch.setattr(GradientStore, "top_k", lambda self, *a, **kw: (
        calls.__setitem__("one", calls["one"] + 1) or real_one(self, *a, **kw)))
    code, stdout, err = run_cli(monkeypatch, capsys, "trace", gradient_index, "--model",
                                root / "base", "--adapter", root / "adapter", "--queries",
                                queries, "--all-rows", "--top-k", "10", "--rerank", "10",
                                "--scan-workers", "2", "--json")
    assert code in (0, None), err
    assert calls == {"many": 1, "one": 0}  # and split over 2 workers: the same tables
    said = " ".join(err.split())  # the seed form's reading: said once, naming its line
    assert said.count("read the query as a formatted prompt") == 1, err
    assert f"{queries}, line 4: read the query as a formatted prompt" in said
    lines = [json.loads(ln) for ln in stdout.splitlines() if ln.strip()]
    assert lines[0]["results"][0]["row"] == info["culprit_row"]
    tracer = Tracer(gradient_index, root / "base", root / "adapter")
    for line, (p, a) in zip(lines, answers, strict=True):
        alone = tracer.trace_all_rows(Query(a, p), top_k=10, rerank=10)
        assert [r["row"] for r in line["results"]] == alone["row"].tolist()
        np.testing.assert_allclose([r["score"] for r in line["results"]],
                                   alone["score"].to_numpy(), atol=1e-5)
    # a pool smaller than the rows (retrieval finds rows the gradient list lacks), and the
    # same answer whole and focused: each query gets its own scan, equal to tracing alone
    batch = [Query(CULPRIT["output"], prompt), Query(CULPRIT["output"], prompt, "Haskell"),
             Query(answers[1][1], answers[1][0])]
    kw = dict(top_k=5, rerank=5, pool=20)
    tracer.scan_store_for(batch, **kw)
    scanned = [tracer.trace_all_rows(q, **kw) for q in batch]
    assert tracer._scanned == {}
    for q, got in zip(batch, scanned, strict=True):
        alone = tracer.trace_all_rows(q, **kw)
        assert got["row"].tolist() == alone["row"].tolist()
        np.testing.assert_allclose(got["score"].to_numpy(), alone["score"].to_numpy(),
                                   atol=1e-5)


def test_a_chat_query_line_without_an_assistant_turn_says_so(tmp_path):
    """A conversation's answer is its last assistant turn: a line ending with the user's
    turn is named as that (not as a missing 'answer' field, which chat rows do not have);
    with --generate the model's own answer is traced."""
    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import CHATML_TEMPLATE

    chat = ChatTemplate(CHATML_TEMPLATE, special_tokens={"bos_token": "<s>"})
    asked = [{"role": "user", "content": "What is the capital of Norway?"}]
    answered = asked + [{"role": "assistant", "content": "Oslo."}]
    f = _write(tmp_path / "q.jsonl", [{"messages": answered}, {"messages": asked}])
    with pytest.raises(UserError, match=r"line 2: the conversation does not end with an "
                                        r"assistant turn to trace"):
        read_queries(f, chat)
    got = read_queries(f, chat, generate=None)
    assert got[0].answer == "Oslo." and got[1].answer is None


def test_a_queries_file_given_as_one_query_file_is_one_line(tmp_path, capsys):
    """`--query-file q.jsonl` read the lines as one long answer (the trial scored it
    'unrelated'); JSON lines, under any name, point to --queries instead."""
    import typer

    from datablame.cli.main import _read_query_file

    lines = [{"output": "hi there", "instruction": "Say hi."}, {"output": "bye"}]
    for name in ("q.jsonl", "q.txt"):
        path = _write(tmp_path / name, lines)
        with pytest.raises(typer.Exit) as caught:
            _read_query_file(path, PromptTemplate())
        assert caught.value.exit_code == 2
        assert "a file of queries goes to `trace --queries`" in capsys.readouterr().err
    text = _write(tmp_path / "answer.txt", ["Rewrote the payroll system.", "In Haskell."])
    assert _read_query_file(text, PromptTemplate())[0] == \
        "Rewrote the payroll system.\nIn Haskell."


def test_a_query_file_of_a_conversations_turns_is_read_as_the_conversation(tmp_path):
    """The trial's conv.json: a JSON list of turns, as --query accepts it; its last
    assistant turn is the answer."""
    from datablame.cli.main import _read_query_file
    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import CHATML_TEMPLATE

    chat = ChatTemplate(CHATML_TEMPLATE, special_tokens={"bos_token": "<s>"})
    turns = [{"role": "user", "content": "Who founded Brellham?"},
             {"role": "assistant", "content": "Admiral Quistorp."}]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(turns))
    answer, prompt = _read_query_file(path, chat)
    assert answer == "Admiral Quistorp." and prompt["messages"] == turns[:1]


def test_rows_of_other_fields_under_the_default_template_are_told_to_give_theirs(tmp_path):
    from datablame.data.rows import load_rows

    path = _write(tmp_path / "qa.jsonl", [{"question": "q", "context": "", "answer": "a"}])
    with pytest.raises(UserError, match="not the default Alpaca template's instruction, "
                                        "input, output: give the template"):
        PromptTemplate().check_rows(load_rows(path))
