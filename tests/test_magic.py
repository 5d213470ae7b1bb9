"""MAGIC (methods/magic.py): the replay is the fine-tune, and its scores are the exact
derivative of the query loss by each row's weight (finite differences agree)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import write_jsonl
from tests.test_cli import _assert_one_line_error, run_cli

COLORS = ["red", "blue", "green", "red", "gold", "blue", "green", "gold"]
RECIPE = {"rank": 2, "alpha": 4, "lr": 1e-2, "epochs": 3, "batch_size": 3, "seed": 0,
          "target_modules": ["c_attn", "c_fc"]}
QUERY = {"instruction": "What is item 0?", "input": "", "output": "Item 0 is red."}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Eight rows, an untrained tiny GPT-2 (dropout on) and its LoRA fine-tune."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from datablame.data.rows import load_rows
    from datablame.data.template import PromptTemplate
    from datablame.demo.toy_lm import train_tokenizer
    from datablame.models.lora_finetune import Recipe, finetune

    root = tmp_path_factory.mktemp("magic")
    rows = [{"instruction": f"What is item {i}?", "input": "", "output": f"Item {i} is {c}."}
            for i, c in enumerate(COLORS)]
    write_jsonl(root / "train.jsonl", rows)
    template = PromptTemplate()
    tok = train_tokenizer([template.format(r).text for r in rows] + ["[EOS]"], root / "base")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2,
                               n_head=2, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)).save_pretrained(root / "base")
    recipe = Recipe.from_dict(RECIPE)
    train = load_rows(root / "train.jsonl")
    finetune(train, root / "base", root / "adapter", recipe, show_progress=False)
    return root, train, recipe, template.format(QUERY)


def test_the_replay_reproduces_the_fine_tuned_adapter(tiny):
    from datablame.errors import UserError
    from datablame.methods.magic import FineTuneReplay
    from datablame.models.lora_finetune import Recipe

    root, train, recipe, _ = tiny
    replay = FineTuneReplay(train, root / "base", recipe)
    assert len(replay.steps) == 3 * 3  # 8 rows in batches of 3, three epochs
    assert replay.difference(replay.run(), root / "adapter") < 1e-5
    other = FineTuneReplay(train, root / "base", Recipe.from_dict({**RECIPE, "lr": 2e-2}))
    with pytest.raises(UserError, match="does not reproduce the adapter"):
        other.check_reproduces(other.run(), root / "adapter")


def test_same_schedule_retraining_is_the_replay_with_zero_weights(tiny):
    """`finetune(keep=..., same_schedule=True)` is the counterfactual MAGIC differentiates:
    the full run's batches with the left-out rows at weight 0; re-batching is another run."""
    from datablame.methods.magic import FineTuneReplay
    from datablame.models.lora_finetune import finetune

    root, train, recipe, _ = tiny
    keep = [0, 2, 3, 4, 6, 7]
    finetune(train, root / "base", root / "same", recipe, keep=keep, same_schedule=True,
             show_progress=False)
    finetune(train, root / "base", root / "rebatched", recipe, keep=keep, show_progress=False)
    finetune(train, root / "base", root / "same-all", recipe, same_schedule=True,
             show_progress=False)
    replay = FineTuneReplay(train, root / "base", recipe)
    weights = np.zeros(len(train))
    weights[keep] = 1.0
    without = replay.run(weights)
    assert replay.difference(without, root / "same") < 1e-5
    assert replay.difference(without, root / "rebatched") > 1e-2
    assert replay.difference(replay.run(), root / "same-all") < 1e-5
    assert replay.difference(replay.run(), root / "same") > 1e-2  # the rows did matter
    summary = json.loads((root / "same" / "datablame_recipe.json").read_text())
    assert summary["rows_kept"] == 6 and "weigh 0" in summary["schedule"]


def test_magic_scores_equal_finite_differences_of_the_row_weights(tiny):
    import torch

    from datablame.methods.magic import FineTuneReplay

    root, train, recipe, query = tiny
    replay = FineTuneReplay(train, root / "base", recipe, dtype=torch.float64)
    scores = replay.scores([query], show_progress=False)[0]
    h = 1e-4
    finite = []
    for i in range(len(train)):
        w = np.ones(len(train))
        w[i] = 1 + h
        up = replay.query_losses(replay.run(w), [query])[0]
        w[i] = 1 - h
        down = replay.query_losses(replay.run(w), [query])[0]
        finite.append(-(up - down) / (2 * h))
    finite = np.array(finite)
    assert np.abs(finite).max() > 1e-5  # the rows matter: a non-trivial check
    np.testing.assert_allclose(scores, finite, rtol=1e-4, atol=1e-9)
    # and a zeroed row's effect is what the score predicts (a large, nonlinear step)
    base = replay.query_losses(replay.run(), [query])[0]
    zeroed = []
    for i in range(len(train)):
        w = np.ones(len(train))
        w[i] = 0.0
        zeroed.append(replay.query_losses(replay.run(w), [query])[0] - base)
    from datablame.verify import spearman

    assert spearman(scores, np.array(zeroed)) > 0.8
    assert int(np.argmax(scores)) == 0  # the row that states the query's answer


def test_trace_method_magic_end_to_end_and_its_refusals(tiny, tmp_path, monkeypatch,
                                                        capsys):
    from datablame.text import build_index

    root, _, _, _ = tiny
    build_index(root / "train.jsonl", tmp_path / "index")
    base = ["trace", str(tmp_path / "index"), "--model", str(root / "base")]
    q = ["--field", "instruction=What is item 0?", "--query", "Item 0 is red."]
    capsys.readouterr()
    code, out, err = run_cli(monkeypatch, capsys, *base, "--adapter", str(root / "adapter"), *q,
                        "--method", "magic", "--json", "--top-k", "8")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert results[0]["row"] == 0 and len(results) == 8
    assert results[0]["reading"].endswith("loss if removed")
    # refusals: no adapter, --recipe without magic, a recipe that trained another model
    def refused(*args, needle: str) -> None:
        code, _, err = run_cli(monkeypatch, capsys, *base, *q, *args)
        # the replay's own progress lines may come first: it finds the mismatch at its end
        replay = [ln for ln in err.splitlines() if ln.startswith("replaying the fine-tune")]
        _assert_one_line_error(code, "\n".join(ln for ln in err.splitlines()
                                                if ln not in replay), needle)

    refused("--method", "magic", needle="--adapter")
    (tmp_path / "other.json").write_text(json.dumps({**RECIPE, "lr": 3e-2}))
    adapter = ["--adapter", str(root / "adapter")]
    refused(*adapter, "--recipe", tmp_path / "other.json", needle="--method magic")
    refused(*adapter, "--method", "magic", "--recipe", tmp_path / "other.json",
            needle="does not reproduce the adapter")
    (tmp_path / "broken.yaml").write_text("rank: 2\n")
    refused(*adapter, "--method", "magic", "--recipe", tmp_path / "broken.yaml",
            needle="missing field")


def test_a_chaotic_fine_tune_is_refused_not_scored(tiny):
    """At a learning rate of 0.1 the reverse pass blows up (scores of 1e24 where removing a
    row moves the loss by 0.1): the removal check catches it, and check_smooth refuses."""
    from datablame.errors import UserError
    from datablame.methods.magic import FineTuneReplay
    from datablame.models.lora_finetune import Recipe

    root, train, recipe, query = tiny
    calm = FineTuneReplay(train, root / "base", recipe)
    check = calm.removal_check(calm.scores([query], show_progress=False), [query])
    calm.check_smooth(check)  # the fixture's fine-tune passes
    wild = FineTuneReplay(train, root / "base",
                          Recipe.from_dict({**RECIPE, "lr": 0.1, "epochs": 30}))
    check = wild.removal_check(wild.scores([query], show_progress=False), [query])
    assert check["ratio"] > 1e3
    with pytest.raises(UserError, match="too chaotic"):
        wild.check_smooth(check)


def test_a_queries_file_is_traced_with_one_replay(tiny, tmp_path, monkeypatch, capsys):
    """--queries with --method magic: one forward replay and one reverse pass for every
    line (the removal check adds one more replay), and each line's scores equal the
    query traced alone."""
    from datablame.methods import magic
    from datablame.text import build_index

    root, _, _, _ = tiny
    build_index(root / "train.jsonl", tmp_path / "index")
    lines = [{"instruction": f"What is item {i}?", "output": f"Item {i} is {COLORS[i]}."}
             for i in (0, 3, 5)]
    write_jsonl(tmp_path / "q.jsonl", lines)
    calls = []
    real_scores = magic.FineTuneReplay.scores

    def counted(self, queries, **kwargs):
        calls.append(len(queries))
        return real_scores(self, queries, **kwargs)

    monkeypatch.setattr(magic.FineTuneReplay, "scores", counted)
    base = ["trace", tmp_path / "index", "--model", root / "base", "--adapter",
            root / "adapter", "--method", "magic", "--top-k", "8"]
    code, out, err = run_cli(monkeypatch, capsys, *base, "--queries", tmp_path / "q.jsonl",
                             "--json")
    assert code == 0, err
    assert calls == [3]
    batched = [json.loads(line) for line in out.strip().splitlines()]
    for line, record in zip(lines, batched, strict=True):
        code, out, err = run_cli(monkeypatch, capsys, *base, "--json", "--field",
                                 f"instruction={line['instruction']}", "--query",
                                 line["output"])
        alone = {r["row"]: r["score"] for r in json.loads(out)["results"]}
        together = {r["row"]: r["score"] for r in record["results"]}
        assert alone.keys() == together.keys()
        assert np.allclose([alone[k] for k in alone], [together[k] for k in alone],
                           rtol=1e-4, atol=1e-7)
    assert [r["results"][0]["row"] for r in batched] == [0, 3, 5]


def test_smooth_adamw_is_torch_adamw_at_eps_root_0_and_bounds_near_zero_moments():
    import torch

    from datablame.models.lora_finetune import SmoothAdamW

    torch.manual_seed(0)
    grads = [torch.randn(5, 3) * (1e-6 if k % 2 else 1.0) for k in range(6)]
    ours, theirs, smooth = (torch.nn.Parameter(torch.ones(5, 3)) for _ in range(3))
    opts = [SmoothAdamW([ours], lr=1e-2, weight_decay=0.1, eps_root=0.0),
            torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1),
            SmoothAdamW([smooth], lr=1e-2, weight_decay=0.1, eps_root=1e-4)]
    for g in grads:
        for p, opt in zip((ours, theirs, smooth), opts, strict=True):
            p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # with eps_root, steps where the gradient is ~0 move far less than AdamW's near-sign step
    assert (smooth - 1).abs().sum() < (theirs - 1).abs().sum()


def test_a_metasmooth_recipe_is_replayed_and_differentiated_exactly(tiny):
    """adam_eps_root > 0: finetune's SmoothAdamW is what the replay runs, and the scores
    are still the finite differences of the row weights."""
    import torch

    from datablame.methods.magic import FineTuneReplay
    from datablame.models.lora_finetune import Recipe, finetune

    root, train, _, query = tiny
    recipe = Recipe.from_dict({**RECIPE, "adam_eps_root": 1e-6})
    finetune(train, root / "base", root / "smooth", recipe, show_progress=False)
    replay = FineTuneReplay(train, root / "base", recipe)
    assert replay.difference(replay.run(), root / "smooth") < 1e-5
    assert replay.difference(replay.run(), root / "adapter") > 1e-3  # another run
    exact = FineTuneReplay(train, root / "base", recipe, dtype=torch.float64)
    scores = exact.scores([query], show_progress=False)[0]
    h = 1e-4
    for i in (0, 3):
        w = np.ones(len(train))
        w[i] = 1 + h
        up = exact.query_losses(exact.run(w), [query])[0]
        w[i] = 1 - h
        down = exact.query_losses(exact.run(w), [query])[0]
        np.testing.assert_allclose(scores[i], -(up - down) / (2 * h), rtol=1e-4, atol=1e-9)


def test_verify_same_schedule_confirms_magic_by_single_model_retraining(tiny, tmp_path,
                                                                        monkeypatch, capsys):
    """`verify --same-schedule --lds-keep 0.75`: retrain with 2 of the 8 rows at weight 0
    in the full run's batches; the MAGIC trace's scores predict those losses."""
    from datablame.text import build_index

    root, _, _, _ = tiny
    build_index(root / "train.jsonl", tmp_path / "index")
    q = ["--field", "instruction=What is item 0?", "--query", "Item 0 is red."]
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "index", "--model",
                           root / "base", "--adapter", root / "adapter", *q, "--method",
                           "magic", "--top-k", "8", "--out", tmp_path / "trace.json")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "verify", root / "train.jsonl", "--model",
                             root / "base", "--adapter", root / "adapter", "--trace",
                             tmp_path / "trace.json", "--remove-top-k", "1", "--random", "1",
                             "--same-schedule", "--lds-subsets", "12", "--lds-keep", "0.75",
                             "--cache", tmp_path / "runs", "--out", tmp_path / "v.json")
    assert code in (0, None), err
    result = json.loads((tmp_path / "v.json").read_text())
    assert "weigh 0" in result["retraining"] and "weigh 0" in result["lds"]["retraining"]
    assert result["lds"]["kept_fraction"] == 0.75
    assert result["lds"]["lds"] > 0.6, result["lds"]  # 0.78 measured (12 subsets)
    assert all("same-schedule" in p.name for p in (tmp_path / "runs").iterdir())
    assert "keeping 75% of the rows, same schedule" in " ".join((out + err).split())
