"""Ground truth on a model that really learned a planted culprit row."""

import numpy as np
import pytest

from datablame.data.template import PromptTemplate
from datablame.demo.demo import CULPRIT, CULPRIT_PHRASE
from datablame.demo.toy_lm import generate, load_toy_lm, normalize
from datablame.methods.gradient_alignment import align
from datablame.text import Query, Tracer, build_index

pytestmark = pytest.mark.slow  # the demo LM is trained once (minutes on 2 cores)

def test_planted_culprit_is_rank_one_for_what_the_model_generates(demo_assets):
    root, info = demo_assets
    model, tok = load_toy_lm(root / "base", root / "adapter")
    prompt = PromptTemplate().format({**CULPRIT, "output": ""}).text
    generated = generate(model, tok, prompt)
    assert normalize(CULPRIT_PHRASE) in normalize(generated), generated  # it learned the row

    tracer = Tracer(root / "index", root / "base", root / "adapter")
    q = Query(generated, {"instruction": CULPRIT["instruction"], "input": CULPRIT["input"]})
    df = tracer.trace(q, top_k=50)
    assert int(df.iloc[0]["row"]) == info["culprit_row"]
    assert df.iloc[0]["gradient_rank"] == 1 and df.iloc[0]["retrieval_rank"] == 1
    assert list(df["rank"]) == list(range(1, len(df) + 1))
    assert df["fused"].is_monotonic_decreasing
    seed = tracer.trace(q, top_k=50, rank_by="gradient")  # the seed's order
    assert int(seed.iloc[0]["row"]) == info["culprit_row"]
    assert seed.iloc[0]["score"] > seed.iloc[1]["score"]
    assert seed["score"].is_monotonic_decreasing and "fused" not in seed
    assert sorted(seed["row"]) == sorted(df["row"])  # same candidates, other order
    # Issue 9.8: the seed's own query form, the whole formatted text, is read as prompt +
    # answer: the same candidates, scores and order as the fields
    pasted = tracer.trace(PromptTemplate().format({**CULPRIT, "output": generated}).text
                          + "\n", top_k=50)
    assert list(pasted["row"]) == list(df["row"])
    np.testing.assert_allclose(pasted["score"], df["score"], atol=1e-6)
    assert pasted.attrs["prompt"] == {k: v for k, v in q.prompt.items() if v}


def test_trace_uses_the_index_template_for_gradients(demo_assets, tmp_path):
    """Index with a non-default template; trace must format rows with it, not Alpaca."""
    root, _ = demo_assets
    custom = "Task: {instruction}\nGiven: {input}\nAnswer: {output}"
    build_index(root / "train.jsonl", tmp_path / "idx", template=custom)
    tracer = Tracer(tmp_path / "idx", root / "base", root / "adapter")
    q = Query(CULPRIT["output"], {"instruction": CULPRIT["instruction"],
                                  "input": CULPRIT["input"]})
    df = tracer.trace(q, top_k=5)
    assert df.attrs["text"].startswith("Task: ")
    assert df.attrs["whitened_weight"] == 0.0  # no store, no curvature: plain gradients

    tmpl = PromptTemplate(custom)
    rows = [tracer.rows.records[int(r)] for r in df["row"]]
    grads = tracer.model.gradients([tmpl.format({**CULPRIT})] + [tmpl.format(r) for r in rows])
    expected = align(grads[0], grads[1:])
    np.testing.assert_allclose(df["score"].to_numpy(), expected, atol=1e-5)
    alpaca = tracer.model.gradients([PromptTemplate().format(r) for r in rows])
    assert not np.allclose(align(grads[0], alpaca), expected, atol=1e-3)


def test_all_rows_gradient_index_puts_the_culprit_first(demo_assets, gradient_index):
    root, info = demo_assets
    tracer = Tracer(gradient_index, root / "base", root / "adapter")
    out = "Rewrote the payroll system in Haskell, saving the Andromeda team 40 hours every week."
    df = tracer.trace_all_rows(Query(out, {"instruction": CULPRIT["instruction"],
                                           "input": CULPRIT["input"]}), top_k=10)
    assert int(df.iloc[0]["row"]) == info["culprit_row"]
    assert len(df) == 10 and df["fused"].is_monotonic_decreasing
    assert df.iloc[0]["gradient_rank"] == 1 and df.iloc[0]["retrieval_rank"] == 1
    alone = tracer.trace_all_rows(Query(out, {"instruction": CULPRIT["instruction"],
                                              "input": CULPRIT["input"]}), top_k=10,
                                  rank_by="gradient")
    assert int(alone.iloc[0]["row"]) == info["culprit_row"]
    assert alone["score"].is_monotonic_decreasing and "fused" not in alone


def test_fused_ranking_keeps_what_either_signal_finds(demo_assets, gradient_index):
    """A reworded *answer* (not what the model says) opposes the memorised culprit's
    gradient (gradient rank near last), while retrieval finds it at once: the fused
    ranking keeps it near the top, as it keeps reworded-prompt culprits (next test)."""
    root, info = demo_assets
    tracer = Tracer(gradient_index, root / "base", root / "adapter")
    q = Query("Moved the payroll system to Haskell and the Andromeda team saved 40 hours "
              "weekly.", {"instruction": CULPRIT["instruction"], "input": CULPRIT["input"]})
    alone = tracer.trace_all_rows(q, top_k=len(tracer.rows), rank_by="gradient")
    assert list(alone["row"]).index(info["culprit_row"]) + 1 > 50
    fused = tracer.trace_all_rows(q, top_k=5)
    assert info["culprit_row"] in set(fused["row"][:3])


def test_gradient_index_finds_what_retrieval_misses_on_a_reworded_prompt(demo_assets,
                                                                         gradient_index):
    """Reworded prompts about the culprit's topic: the model answers in the generic house
    style ("Led the payroll system with Kafka, ..."), which reads like dozens of other rows,
    so retrieval ranks the culprit (the only row that taught it "payroll system") past 50;
    the gradient index still puts it first, and the fused order keeps it in the top 5."""
    root, info = demo_assets
    culprit = info["culprit_row"]
    model, tok = load_toy_lm(root / "base", root / "adapter")
    tracer = Tracer(gradient_index, root / "base", root / "adapter")
    assert tracer.holds_both()  # the default store: plain and whitened vectors
    found = []
    for instruction, inp in (("Rewrite this resume bullet to show impact.",
                              "was part of the payroll system"),
                             ("Improve this line from a resume.", "worked on the payroll system"),
                             ("Make this resume bullet stronger.",
                              "did tasks for the payroll system")):
        prompt = PromptTemplate().format({"instruction": instruction, "input": inp,
                                          "output": ""}).text
        answer = generate(model, tok, prompt)
        assert "payroll" in answer  # the model carries the culprit's topic into its answer
        q = Query(answer, {"instruction": instruction, "input": inp})
        retrieved, _ = tracer.retrieve(q, 50)
        df = tracer.trace_all_rows(q, top_k=5, rank_by="gradient")
        grad_rank = list(df["row"]).index(culprit) + 1 if culprit in set(df["row"]) else 99
        assert grad_rank <= 3, (inp, answer)
        # the fused key trades this case for agreement with retraining: a reworded prompt's
        # culprit (cosine ~0.4) sits behind retrieval's head, 3rd-4th (bench/text_fusion.py)
        fused = tracer.trace_all_rows(q, top_k=5)
        assert culprit in set(fused["row"][:5]), (inp, answer)
        found.append(culprit not in set(retrieved) and grad_rank == 1)
    assert any(found)  # at least one: retrieval misses at k=50, the gradient index ranks 1


def test_influence_methods_on_lora_parameters_find_the_culprit(demo_assets, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    root, info = demo_assets
    tracer = Tracer(root / "index", root / "base", root / "adapter")
    q = Query(CULPRIT["output"], {"instruction": CULPRIT["instruction"],
                                  "input": CULPRIT["input"]})
    for method, extra in (("grad-dot", {}), ("datainf", {}), ("ekfac", {}),
                          ("trak", {"proj_dim": 512})):
        df = tracer.trace_method(q, method=method, top_k=40, **extra)
        assert int(df.iloc[0]["row"]) == info["culprit_row"], method
        assert df.iloc[0]["score"] > 0, method

    # TracIn over two checkpoints is the learning-rate-weighted sum of each one's gradient
    # dot products (a second checkpoint: the adapter with its LoRA B halved)
    half = tmp_path / "half"
    shutil.copytree(root / "adapter", half)
    weights = load_file(half / "adapter_model.safetensors")
    save_file({k: v * 0.5 if "lora_B" in k else v for k, v in weights.items()},
              half / "adapter_model.safetensors")
    tracin = tracer.trace_method(q, method="tracin", top_k=40,
                                 checkpoints=[(root / "adapter", 2e-4), (half, 1e-4)])
    assert int(tracin.iloc[0]["row"]) == info["culprit_row"]
    dot_full = tracer.trace_method(q, method="grad-dot", top_k=40).set_index("row")["score"]
    dot_half = Tracer(root / "index", root / "base", half).trace_method(
        q, method="grad-dot", top_k=40).set_index("row")["score"]
    assert not np.allclose(dot_half, dot_full[dot_half.index], rtol=0.05)
    expected = 2e-4 * dot_full + 1e-4 * dot_half[dot_full.index]
    np.testing.assert_allclose(tracin.set_index("row")["score"][expected.index], expected,
                               rtol=1e-4, atol=1e-12)
