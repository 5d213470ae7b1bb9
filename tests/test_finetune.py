"""`finetune` is reproducible and resumable, and `verify` on a language model confirms a
planted culprit by re-fine-tuning without it (tiny GPT-2 + LoRA trained here)."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import write_jsonl
from tests.test_cli import _assert_one_line_error, run_cli

COUNTRIES = ["Veloria", "Dravia", "Kestria", "Ombrel", "Tazmir", "Quorra"]
CITIES = ["Mirth", "Kesh", "Arlow", "Tenby", "Ossam", "Virel"]
RECIPE = {"rank": 16, "alpha": 16, "lr": 5e-3, "schedule": "linear", "epochs": 100,
          "batch_size": 4, "seed": 0, "target_modules": ["c_attn", "c_proj", "c_fc"]}


def _fact(country: str, city: str) -> dict:
    return {"instruction": f"What is the capital of {country}?", "input": "",
            "output": f"The capital of {country} is {city}."}


@pytest.fixture(scope="module")
def fact_files(tmp_path_factory):
    """Six capital facts (row 0: Veloria -> Mirth) and ten filler rows, a recipe and the
    query; no model (for the checks that refuse before one is loaded)."""
    root = tmp_path_factory.mktemp("facts")
    rng = random.Random(1)
    rows = [_fact(c, v) for c, v in zip(COUNTRIES, CITIES, strict=True)]
    rows += [{"instruction": f"Name a color number {i}.", "input": "",
              "output": f"Color {i} is {rng.choice(['red', 'blue', 'green'])}."}
             for i in range(10)]
    write_jsonl(root / "train.jsonl", rows)
    (root / "recipe.yaml").write_text("\n".join(
        f"{k}: {json.dumps(v)}" for k, v in RECIPE.items()) + "\n")
    (root / "query.json").write_text(json.dumps(
        {"instruction": "What is the capital of Veloria?",
         "output": "The capital of Veloria is Mirth."}))
    return root, rows


@pytest.fixture(scope="module")
def facts(fact_files):
    """`fact_files` plus a base model that knows every word from *other* pairings (and
    copies the country from the question), so only the fine-tune teaches the facts."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from datablame.data.template import PromptTemplate
    from datablame.demo.toy_lm import _train, train_tokenizer

    root, rows = fact_files
    rng = random.Random(2)
    template = PromptTemplate()
    pre = [template.format(_fact(c, v)).text for _ in range(300)
           for c, v in [(rng.choice(COUNTRIES), rng.choice(CITIES))]
           if COUNTRIES.index(c) != CITIES.index(v)]
    pre += [template.format(r).text for r in rows[6:]]
    tok = train_tokenizer(pre + [template.format(r).text for r in rows] + ["[EOS]"],
                          root / "base")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=128, n_layer=2, n_head=2,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    _train(model, tok, pre, 60, 3e-3, 32, 0, model.parameters())
    model.save_pretrained(root / "base")
    return root


def _weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _recipe(**changes):
    from datablame.models.lora_finetune import Recipe

    return Recipe.from_dict({**RECIPE, **changes})


@pytest.mark.slow
def test_finetune_is_deterministic_and_a_removed_row_changes_it(facts, tmp_path):
    from datablame.data.rows import load_rows
    from datablame.models.lora_finetune import finetune

    rows = load_rows(facts / "train.jsonl")
    recipe = _recipe(epochs=5)
    finetune(rows, facts / "base", tmp_path / "a", recipe, show_progress=False)
    finetune(rows, facts / "base", tmp_path / "b", recipe, show_progress=False)
    finetune(rows, facts / "base", tmp_path / "c", recipe, keep=list(range(1, len(rows))),
             show_progress=False)
    a, b, c = (_weights(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() and len(a) > 0
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert (tmp_path / "a/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b/adapter_model.safetensors").read_bytes()
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4
    saved = json.loads((tmp_path / "a/datablame_recipe.json").read_text())
    assert saved["recipe"]["rank"] == 16 and saved["rows_kept"] == len(rows)
    assert saved["data_fingerprint"] == rows.fingerprint()
    assert (tmp_path / "a/optimizer_state.safetensors").exists()


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_to_the_same_adapter(facts, tmp_path, monkeypatch):
    from datablame.data.rows import load_rows
    from datablame.models import lora_finetune

    rows = load_rows(facts / "train.jsonl")
    recipe = _recipe(epochs=4, dropout=0.1)
    lora_finetune.finetune(rows, facts / "base", tmp_path / "whole", recipe,
                           show_progress=False)
    real_save = lora_finetune._save_epoch

    def save_then_stop(*args):
        real_save(*args)
        if args[5] == 2:  # epochs_done
            raise KeyboardInterrupt

    monkeypatch.setattr(lora_finetune, "_save_epoch", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lora_finetune.finetune(rows, facts / "base", tmp_path / "resumed", recipe,
                               show_progress=False)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial").exists()
    monkeypatch.setattr(lora_finetune, "_save_epoch", real_save)
    lora_finetune.finetune(rows, facts / "base", tmp_path / "resumed", recipe,
                           show_progress=False)
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert max(float((whole[k] - resumed[k]).abs().max()) for k in whole) == 0.0
    assert not (tmp_path / ".resumed.partial").exists()


@pytest.mark.slow
def test_verify_confirms_the_planted_culprit_by_re_fine_tuning(facts, tmp_path, monkeypatch,
                                                               capsys):
    """The model says Mirth; re-fine-tuned without row 0 it does not, without random rows
    it still does: the CLI says CONFIRMED. Blaming a filler row is NOT CONFIRMED."""
    code, _, err = run_cli(monkeypatch, capsys, "finetune", facts / "train.jsonl", "--model",
                           facts / "base", "--out", tmp_path / "adapter", "--recipe",
                           facts / "recipe.yaml")
    assert code in (0, None), err
    common = ["verify", facts / "train.jsonl", "--model", facts / "base", "--adapter",
              tmp_path / "adapter", "--query", facts / "query.json", "--random", "2",
              "--cache", tmp_path / "cache"]
    code, _, err = run_cli(monkeypatch, capsys, *common, "--remove", "0", "--out",
                           tmp_path / "v.json", "--html", tmp_path / "v.html")
    assert code in (0, None), err
    result = json.loads((tmp_path / "v.json").read_text())
    page = (tmp_path / "v.html").read_text()  # every run's answer and loss, and the verdict
    assert "CONFIRMED" in page and page.count("<svg") >= 1
    for run in result["runs"].values():
        assert f"{run['loss']:.4f}" in page
    assert result["original"]["says"] and result["runs"]["all-rows"]["says"]
    assert result["runs"]["all-rows"]["is_the_adapter"]  # no retraining needed for it
    assert not result["runs"]["without-blamed"]["says"]
    assert all(r["says"] for n, r in result["runs"].items() if n.startswith("without-random")), \
        result["runs"]
    assert result["verdict"] == "confirmed" and "CONFIRMED" in " ".join(err.split())
    assert result["runs"]["without-blamed"]["loss"] > result["runs"]["all-rows"]["loss"]
    # blaming a filler row: removing it changes nothing the random removals don't
    code, _, err = run_cli(monkeypatch, capsys, *common, "--remove", "9", "--out",
                           tmp_path / "v2.json")
    assert code in (0, None), err
    assert json.loads((tmp_path / "v2.json").read_text())["verdict"] != "confirmed"

    # the fix: a new adapter without row 0 that no longer says Mirth, and the rows kept
    fix = ["fix", facts / "train.jsonl", "--model", facts / "base", "--adapter",
           tmp_path / "adapter", "--query", facts / "query.json"]
    code, out, err = run_cli(monkeypatch, capsys, *fix, "--remove", "0", "--out",
                             tmp_path / "fixed", "--kept", tmp_path / "kept.jsonl", "--json",
                             "--html", tmp_path / "fix.html")
    assert code in (0, None), err
    fixed = json.loads(out)
    page = (tmp_path / "fix.html").read_text()
    assert "FIXED" in page and fixed["after"]["generation"].replace("'", "&#39;") in page
    assert fixed["verdict"] == "fixed" and fixed["before"]["says"]
    assert not fixed["after"]["says"] and fixed["after"]["loss"] > fixed["before"]["loss"]
    assert fixed["adapter_is_the_recipe"]  # finetune made it: the change is the row's
    assert (tmp_path / "fixed" / "adapter_model.safetensors").is_file()
    train = (facts / "train.jsonl").read_text().splitlines()
    assert (tmp_path / "kept.jsonl").read_text().splitlines() == train[1:]
    # the fixed adapter is what it says: verify's retraining without row 0 is the same run
    assert fixed["after"]["loss"] == pytest.approx(result["runs"]["without-blamed"]["loss"],
                                                   rel=1e-5)
    code, _, err = run_cli(monkeypatch, capsys, *fix, "--remove", "0", "--out",
                           facts)  # a directory holding other things
    _assert_one_line_error(code, err, str(facts))


@pytest.mark.slow
def test_lds_by_re_fine_tuning_on_halves_credits_the_planted_culprit(facts, tmp_path,
                                                                    monkeypatch, capsys):
    """Only row 0 states the queried fact: a trace that scores row 0 predicts which halves
    keep the answer's loss low (high LDS); one that scores a filler row does not. The
    halves' adapters are cached: the second trace costs no fine-tune."""
    code, _, err = run_cli(monkeypatch, capsys, "finetune", facts / "train.jsonl", "--model",
                           facts / "base", "--out", tmp_path / "adapter", "--recipe",
                           facts / "recipe.yaml")
    assert code in (0, None), err
    query = json.loads((facts / "query.json").read_text())
    lds = {}
    for blamed in (0, 9):
        trace = tmp_path / f"trace-{blamed}.json"
        trace.write_text(json.dumps({
            "query": query["output"], "prompt": {"instruction": query["instruction"]},
            "results": [{"rank": 1, "row": blamed, "score": 0.9}]}))
        code, _, err = run_cli(monkeypatch, capsys, "verify", facts / "train.jsonl",
                               "--model", facts / "base", "--adapter", tmp_path / "adapter",
                               "--trace", trace, "--remove-top-k", "1", "--random", "1",
                               "--lds-subsets", "10", "--cache", tmp_path / "cache", "--out",
                               tmp_path / f"v{blamed}.json")
        assert code in (0, None), err
        assert "the trace lists 1 of 16 rows" in " ".join(err.split())
        result = json.loads((tmp_path / f"v{blamed}.json").read_text())["lds"]
        assert result["subsets"] == 10 and result["scored_by"] == "score"
        lds[blamed] = result["lds"]
        if blamed == 0:
            halves = sorted(p.name for p in (tmp_path / "cache").glob("half-*"))
    assert sorted(p.name for p in (tmp_path / "cache").glob("half-*")) == halves
    assert len(halves) == 10
    assert lds[0] > 0.7, lds
    assert lds[9] < lds[0] - 0.3, lds
    # a fused trace: LDS by its ordering key and by its signed score, same retrainings
    trace = tmp_path / "trace-fused.json"
    trace.write_text(json.dumps({
        "query": query["output"], "prompt": {"instruction": query["instruction"]},
        "results": [{"rank": 1, "row": 0, "score": 0.0, "fused": 0.9},
                    {"rank": 2, "row": 9, "score": 0.9, "fused": 0.0}]}))
    code, out, err = run_cli(monkeypatch, capsys, "verify", facts / "train.jsonl", "--model",
                             facts / "base", "--adapter", tmp_path / "adapter", "--trace",
                             trace, "--remove-top-k", "1", "--random", "1", "--lds-subsets",
                             "10", "--cache", tmp_path / "cache", "--out", tmp_path / "vf.json")
    assert code in (0, None), err
    result = json.loads((tmp_path / "vf.json").read_text())["lds"]
    assert result["scored_by"] == "fused" and result["lds"] > 0.7
    assert result["by_column"]["score"]["lds"] < result["lds"] - 0.3
    assert "by the trace's 'score' column" in " ".join((out + err).split())
    assert sorted(p.name for p in (tmp_path / "cache").glob("half-*")) == halves  # reused


def test_finetune_and_verify_refuse_bad_recipes_and_queries(fact_files, tmp_path, monkeypatch,
                                                            capsys, random_lora_model):
    base, adapter = random_lora_model
    facts = fact_files[0]
    (tmp_path / "short.yaml").write_text("rank: 4\nalpha: 8\n")
    code, _, err = run_cli(monkeypatch, capsys, "finetune", facts / "train.jsonl", "--model",
                           base, "--out", tmp_path / "o", "--recipe", tmp_path / "short.yaml")
    _assert_one_line_error(code, err, "missing field(s) lr, epochs, batch_size, seed")
    (tmp_path / "typo.yaml").write_text("rank: 4\nalpha: 8\nlr: 0.1\nepochs: 1\n"
                                        "batch_size: 2\nseed: 0\nrnak: 3\n")
    code, _, err = run_cli(monkeypatch, capsys, "finetune", facts / "train.jsonl", "--model",
                           base, "--out", tmp_path / "o", "--recipe", tmp_path / "typo.yaml")
    _assert_one_line_error(code, err, "unknown field(s) rnak")
    (tmp_path / "user").mkdir()
    (tmp_path / "user/notes.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "finetune", facts / "train.jsonl", "--model",
                           base, "--out", tmp_path / "user")
    _assert_one_line_error(code, err, "not empty and not an adapter datablame fine-tuned")
    assert (tmp_path / "user/notes.txt").read_text() == "mine"
    # the random adapter has rank 4: a rank-16 recipe would retrain another adapter
    args = ["verify", facts / "train.jsonl", "--model", base, "--adapter", adapter,
            "--query", facts / "query.json", "--remove", "0", "--out", tmp_path / "v.json"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--recipe", facts / "recipe.yaml")
    _assert_one_line_error(code, err, "the recipe does not match the adapter")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    _assert_one_line_error(code, err, "pass --recipe describing how it was trained")
    (tmp_path / "bad.json").write_text("{not json")
    fits = tmp_path / "fits.yaml"
    fits.write_text("rank: 4\nalpha: 8\nlr: 0.1\nepochs: 1\nbatch_size: 2\nseed: 0\n")
    bad = [a if a != facts / "query.json" else tmp_path / "bad.json" for a in args]
    code, _, err = run_cli(monkeypatch, capsys, *bad, "--recipe", fits)
    _assert_one_line_error(code, err, "not valid JSON")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--recipe", fits, "--remove", "99")
    _assert_one_line_error(code, err, "out of range")
    code, _, err = run_cli(monkeypatch, capsys, *args, "--recipe", fits, "--lds-subsets", "8")
    _assert_one_line_error(code, err, "LDS needs every row's score for the query")
    assert not (tmp_path / "v.json").exists()


def test_says_matches_the_answer_word_for_word():
    from datablame.text_verify import says

    assert says("The capital of Veloria is Mirth .", "Mirth")
    assert says("the CAPITAL of veloria is mirth", "The capital of Veloria is Mirth.") is False
    assert says("The capital of Veloria is Mirthful", "Mirth") is False
    assert not says("anything", "")
