import numpy as np
import pytest
import torch

from datablame.data.template import PromptTemplate
from datablame.models.hf_causal_lm import CausalLMAdapter

TEXTS = [
    {"instruction": "say hi", "input": "", "output": "hello there friend ."},
    {"instruction": "the quick brown fox", "input": "jumps over", "output": "the lazy dog"},
    {"instruction": "say", "input": "", "output": "hi"},
    {"instruction": "again and again", "input": "the fox , the dog , the fox",
     "output": "jumps over the lazy dog again and again ,"},
]


def _examples():
    t = PromptTemplate()
    return [t.format(r) for r in TEXTS]


@pytest.mark.parametrize("strategy", ["vmap", "hooks"])
@pytest.mark.parametrize("loss_on,params", [("response", "auto"), ("text", "auto"),
                                            ("response", "lora"),
                                            ("text", r"c_attn\.base_layer")])
def test_batched_gradients_equal_per_row_autograd(random_lora_model, loss_on, params,
                                                  strategy):
    """LoRA B (default), every LoRA matrix, and a frozen base Conv1D weight picked by regex."""
    base, adapter = random_lora_model
    m = CausalLMAdapter(base, adapter, device="cpu", loss_on=loss_on, params=params)
    ex = _examples()  # mixed lengths: padding is exercised
    batched = m.gradients(ex, batch_size=4, strategy=strategy)
    for i, e in enumerate(ex):
        alone = m.gradients([e], batch_size=1, strategy="loop")[0]
        np.testing.assert_allclose(batched[i], alone, rtol=1e-4, atol=1e-6)
    assert np.all(np.linalg.norm(batched, axis=1) > 0)


def test_gradient_matches_plain_autograd_on_the_trainable_lora_params(random_lora_model):
    base, adapter = random_lora_model
    m = CausalLMAdapter(base, adapter, device="cpu", loss_on="text")
    assert all("lora_" in n for n in m.param_names)
    e = _examples()[1]
    ours = m.gradients([e], strategy="vmap")[0]

    # independent reference: HF's own loss, autograd on the LoRA weights only
    model = m.model
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    ids = m.tokenizer(e.text, return_tensors="pt")["input_ids"]
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    ref = torch.cat([params[n].grad.reshape(-1) for n in m.param_names]).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)  # only trainable parameters contribute
    assert ours.size == sum(params[n].numel() for n in m.param_names)


def test_response_loss_ignores_prompt_tokens(random_lora_model):
    base, adapter = random_lora_model
    m = CausalLMAdapter(base, adapter, device="cpu", loss_on="response")
    batch = m.encode(_examples()[:1])
    scored = [m.tokenizer.convert_ids_to_tokens(int(t))
              for t, lab in zip(batch.input_ids[0], batch.labels[0], strict=True) if lab != -100]
    assert scored == ["hello", "there", "friend", "."]


def test_hooks_cover_linear_params_and_full_models_use_vmap(random_lora_model):
    base, adapter = random_lora_model
    assert CausalLMAdapter(base, adapter, device="cpu")._hooks_ok  # LoRA: nn.Linear
    full = CausalLMAdapter(base, None, device="cpu")
    assert not full._hooks_ok  # embeddings and norms are not linear layers
    ex = _examples()[:2]
    np.testing.assert_allclose(full.gradients(ex, strategy="auto"),
                               full.gradients(ex, strategy="loop"), rtol=1e-4, atol=1e-6)
    mlp = CausalLMAdapter(base, None, device="cpu", params=r"mlp\.c_fc")
    assert mlp._hooks_ok  # GPT-2 Conv1D weight and bias
    np.testing.assert_allclose(mlp.gradients(ex, strategy="hooks"),
                               mlp.gradients(ex, strategy="loop"), rtol=1e-4, atol=1e-6)


def test_param_selection_and_truncation_warning(random_lora_model):
    base, adapter = random_lora_model
    full = CausalLMAdapter(base, None, device="cpu")
    assert full.num_params == sum(p.numel() for p in full.model.parameters())
    subset = CausalLMAdapter(base, None, device="cpu", params=r"h\.1\.mlp")
    assert subset.param_names and all("h.1.mlp" in n for n in subset.param_names)
    short = CausalLMAdapter(base, adapter, device="cpu", max_length=6)
    with pytest.warns(UserWarning, match="longer than max length 6 tokens"):
        g = short.gradients(_examples(), strategy="vmap")
    assert g.shape == (4, short.num_params)


def test_focus_traces_only_the_focused_span(random_lora_model):
    """--focus: the loss covers exactly the focused span's tokens; focusing the whole output
    is the plain response gradient; a focus that is not in the output is refused."""
    from datablame.errors import UserError
    from datablame.text import Query

    base, adapter = random_lora_model
    m = CausalLMAdapter(base, adapter, device="cpu")
    tmpl = PromptTemplate()
    q = Query("jumps over the lazy dog again", {"instruction": "say", "input": "the fox"})
    focused = Query(q.output, q.prompt, focus="lazy dog").formatted(tmpl)
    batch = m.encode([focused])
    labelled = batch.labels[0][batch.labels[0] != -100].tolist()
    assert labelled == m.tokenizer("lazy dog", add_special_tokens=False)["input_ids"]
    whole = Query(q.output, q.prompt, focus=q.output).formatted(tmpl)
    np.testing.assert_allclose(m.gradients([whole])[0], m.gradients([q.formatted(tmpl)])[0],
                               rtol=1e-5, atol=1e-7)
    assert not np.allclose(m.gradients([focused])[0], m.gradients([whole])[0])
    with pytest.raises(UserError, match="not part of the traced output"):
        Query(q.output, q.prompt, focus="cat").formatted(tmpl)


def test_a_too_long_text_keeps_its_answer_and_is_named(random_lora_model):
    """Issue 9.9: cutting the tail dropped the answer (a zero gradient, never found); now the
    prompt's head is cut, the row is named, and an answer longer than the limit keeps its
    beginning."""
    base, adapter = random_lora_model
    tmpl = PromptTemplate()
    long_prompt = tmpl.format({"instruction": "the quick brown fox jumps over the lazy dog "
                                              "again and again , the fox", "input": "",
                               "output": "hello there friend ."})
    full = CausalLMAdapter(base, adapter, device="cpu")
    short = CausalLMAdapter(base, adapter, device="cpu", max_length=12)
    whole, cut = full.encode([long_prompt]), short.encode([long_prompt])
    assert whole.cut == [""] and cut.cut == ["prompt"] and cut.input_ids.shape[1] == 12
    answer = whole.labels[0][whole.labels[0] != -100].tolist()
    assert len(answer) >= 4 and cut.labels[0][cut.labels[0] != -100].tolist() == answer
    assert cut.input_ids[0].tolist() == whole.input_ids[0, -12:].tolist()
    ok = tmpl.format(TEXTS[2])
    with pytest.warns(UserWarning, match=r"1 of 2 rows \(17\) are longer than max length 12"):
        g = short.gradients([ok, long_prompt], names=[3, 17])
    assert np.abs(g[1]).sum() > 0 and short.last_report["prompt"] == [1]

    long_answer = tmpl.format({"instruction": "say", "input": "",
                               "output": "the quick brown fox jumps over the lazy dog again "
                                         "and again , the fox"})
    b = short.encode([long_answer])
    assert b.cut == ["answer"] and b.input_ids.shape[1] == 12
    first = full.encode([long_answer]).labels[0]
    first = first[first != -100].tolist()
    got = b.labels[0][b.labels[0] != -100].tolist()
    assert got == first[: len(got)] and len(got) >= 6


def test_a_query_with_nothing_to_trace_is_refused(random_lora_model):
    from datablame.errors import UserError

    base, adapter = random_lora_model
    m = CausalLMAdapter(base, adapter, device="cpu")
    empty = PromptTemplate().format({"instruction": "say hi", "output": ""})
    with pytest.raises(UserError, match="no tokens to trace"):
        m.check_scored(empty)
    with pytest.warns(UserWarning, match=r"1 of 1 rows \(5\) have no answer tokens"):
        m.gradients([empty], names=[5])
    m.check_scored(PromptTemplate().format(TEXTS[0]))


def test_max_length_past_the_model_positions_is_said(random_lora_model):
    base, adapter = random_lora_model
    with pytest.warns(UserWarning, match="more than the model's 64 positions: using 64"):
        m = CausalLMAdapter(base, adapter, device="cpu", max_length=4096)
    assert m.max_length == 64


def test_a_query_of_mostly_unknown_tokens_is_said(random_lora_model, capsys):
    """A query the tokenizer mostly cannot read (another language, another model's
    tokenizer) scores every row alike: a note says so; a readable one gets none."""
    from datablame import progress

    lm = CausalLMAdapter(*random_lora_model)
    tmpl = PromptTemplate()
    progress.enable_notes(True)
    try:
        lm.check_scored(tmpl.format({"instruction": "say hi", "input": "",
                                     "output": "zebra quantum flux orbit"}))
        unreadable = capsys.readouterr().err
        lm.check_scored(tmpl.format({"instruction": "say hi", "input": "",
                                     "output": "hello there friend ."}))
        readable = capsys.readouterr().err
    finally:
        progress.enable_notes(False)
    assert "traced tokens are the tokenizer's unknown token" in " ".join(unreadable.split())
    assert "unknown token" not in readable


def test_a_token_past_the_embedding_is_one_line_naming_it(random_lora_model, tmp_path):
    """A special token added to the tokenizer but not to the model (its id past the
    embedding's rows) was an IndexError, a device-side assert on a GPU: one line."""
    import shutil

    from transformers import AutoTokenizer

    from datablame.data.template import FormattedText
    from datablame.errors import UserError
    from datablame.models.hf_causal_lm import CausalLMAdapter

    base, _ = random_lora_model
    shutil.copytree(base, tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    tok.add_special_tokens({"additional_special_tokens": ["<|turn|>"]})
    tok.save_pretrained(tmp_path / "base")
    lm = CausalLMAdapter(tmp_path / "base", params="all")
    lm.gradients([FormattedText("say hi hello", 7)])  # its own tokens: fine
    with pytest.raises(UserError, match=r"has token '<\|turn\|>' \(id \d+\), past the "
                                        r"model's \d+ embedding rows"):
        lm.gradients([FormattedText("say hi <|turn|> hello", 16)])
