"""Loading a model the way a 7B one must be loaded, checked on tiny models on the CPU:
gradient checkpointing, base weights quantized by bitsandbytes (8-bit and 4-bit NF4, which
run on the CPU too), layers placed by accelerate (`device_map="auto"`), and a batch that
runs out of memory retried smaller. Each must leave the per-example gradients as they are
(or, for quantized weights, equal per-row autograd on the same quantized model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import write_jsonl
from tests.test_chat import TWO_TURNS, _fact, _tokenizer_texts
from tests.test_cli import _assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A random tiny Llama (BPE, ChatML) with a random LoRA on every linear layer; hidden
    size 64, the smallest that bitsandbytes' 4-bit blocks (64 weights) divide."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from datablame.demo.toy_lm import toy_decoder_config, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("llama64")
    tok = train_bpe_tokenizer(_tokenizer_texts(), root / "base")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(toy_decoder_config("llama", tok, hidden=64))
    model.save_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                      task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _chat_texts(base):
    from datablame.data.chat import ChatTemplate

    chat = ChatTemplate.from_model(base)
    return [chat.format(r) for r in (_fact("Veloria", "Mirth"), {"messages": TWO_TURNS},
                                     _fact("Quorra", "Kesh", system=True))]


def _relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("model", ["llama64", "random_lora_model"])
def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(model, request):
    """GPT-2 (Conv1D, dropout 0.1 in its config) and Llama: each layer really runs twice
    (forward, then the recompute), and no dropout comes back with the training flag the
    checkpointing needs: the gradients are the plain ones."""
    from datablame.models.hf_causal_lm import CausalLMAdapter

    base, adapter = request.getfixturevalue(model)
    texts = _chat_texts(base) if model == "llama64" else _alpaca_texts()
    plain = CausalLMAdapter(base, adapter).gradients(texts, batch_size=3, warn=False)
    lm = CausalLMAdapter(base, adapter, checkpointing=True)
    calls = []
    first_lora_b = next(m for n, m in lm.model.named_modules() if n.endswith("lora_B.default"))
    first_lora_b.register_forward_hook(lambda *_: calls.append(1))
    grads = lm.gradients(texts, batch_size=3, warn=False)
    assert len(calls) == 2, "the layer was not recomputed: checkpointing is off"
    assert _relative_gap(grads, plain) <= 1e-6
    assert not any(m.training for m in lm.model.modules())  # no dropout anywhere


@pytest.fixture(scope="module")
def opt_model(tmp_path_factory):
    """A random tiny OPT with dropout 0.1, which its decoder layer applies itself by its
    training flag, and which flattens tokens to (B*T, d) before its MLP; LoRA on q/v and
    the MLP."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    from datablame.demo.toy_lm import train_tokenizer

    root = tmp_path_factory.mktemp("opt")
    tok = train_tokenizer(["### Instruction :\n say hi\n\n### Response :\n hello there .",
                           "the quick brown fox jumps over the lazy dog again ,"], root / "base")
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                       ffn_dim=64, num_attention_heads=2, max_position_embeddings=64,
                       word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                       eos_token_id=tok.eos_token_id)
    OPTForCausalLM(config).save_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1", "fc2"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(OPTForCausalLM.from_pretrained(root / "base"), lora
                   ).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def test_a_model_whose_layers_apply_their_own_dropout_keeps_its_gradients(opt_model):
    """OPT: the batched hooks equal per-row autograd (its MLP sees (B*T, d) inputs), and
    checkpointing neither brings its dropout back nor changes a gradient, run after run."""
    from datablame.models.hf_causal_lm import CausalLMAdapter

    texts = _alpaca_texts()
    lm = CausalLMAdapter(*opt_model)
    plain = lm.gradients(texts, batch_size=3, strategy="hooks", warn=False)
    per_row = np.stack([lm.gradients([t], strategy="loop", warn=False)[0] for t in texts])
    assert _relative_gap(plain, per_row) <= 1e-5
    checkpointed = CausalLMAdapter(*opt_model, checkpointing=True)
    for _ in range(2):
        assert _relative_gap(checkpointed.gradients(texts, batch_size=3, warn=False),
                             plain) <= 1e-6


def test_checkpointing_with_weights_off_the_hook_path_is_said_and_changes_nothing(
        random_lora_model):
    """--params all (embeddings, norms: the vmap path): a warning, the plain gradients."""
    from datablame.models.hf_causal_lm import CausalLMAdapter

    base, _ = random_lora_model
    texts = _alpaca_texts()
    plain = CausalLMAdapter(base, None, params="all").gradients(texts, batch_size=3,
                                                                warn=False)
    with pytest.warns(UserWarning, match="--gradient-checkpointing applies to linear"):
        lm = CausalLMAdapter(base, None, params="all", checkpointing=True)
    assert _relative_gap(lm.gradients(texts, batch_size=3, warn=False), plain) <= 1e-6


def _alpaca_texts():
    from datablame.data.template import PromptTemplate

    tmpl = PromptTemplate()
    return [tmpl.format({"instruction": "say hi", "input": "", "output": o})
            for o in ("hello there friend .", "the quick brown fox .", "hi")]


@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_base_weights_give_exact_per_example_lora_gradients(llama64, quantize,
                                                                      random_lora_model):
    """On a bitsandbytes-quantized base the batched hook gradients equal per-row autograd
    on the same quantized model, and stay close to the full-precision ones (quantization
    moves them a little: that is why a store records it). GPT-2's layers have biases,
    which bitsandbytes' CPU inference layout cannot take a backward pass through: a
    gradient-free forward first (a generation does one) must not switch to it."""
    from datablame.errors import UserError
    from datablame.models.hf_causal_lm import CausalLMAdapter

    gpt2 = CausalLMAdapter(*random_lora_model, quantize=quantize)
    texts = _alpaca_texts()
    gpt2.losses(texts)  # gradient-free
    batched = gpt2.gradients(texts, batch_size=3, strategy="hooks", warn=False)
    per_row = np.stack([gpt2.gradients([t], strategy="loop", warn=False)[0] for t in texts])
    assert _relative_gap(batched, per_row) <= 1e-5

    base, adapter = llama64
    texts = _chat_texts(base)
    full = CausalLMAdapter(base, adapter).gradients(texts, batch_size=3, warn=False)
    lm = CausalLMAdapter(base, adapter, quantize=quantize)
    assert any("bitsandbytes" in type(m).__module__ for m in lm.model.modules())
    batched = lm.gradients(texts, batch_size=3, strategy="hooks", warn=False)
    per_row = np.stack([lm.gradients([t], strategy="loop", warn=False)[0] for t in texts])
    assert _relative_gap(batched, per_row) <= 1e-5
    assert _cosines(batched, full).min() > 0.99
    assert lm.identity()["quantize"] == quantize
    assert "quantize" not in CausalLMAdapter(base, adapter).identity()  # old stores stay valid
    with pytest.raises(UserError, match="selects 2 quantized base weights .* no gradient"):
        CausalLMAdapter(base, adapter, quantize=quantize, params=r"layers\.0\.self_attn\."
                        r"(q_proj\.base_layer|k_proj\.base_layer)\.weight")


def test_device_map_auto_loads_through_accelerate_and_keeps_the_gradients(llama64):
    """On a machine without GPUs accelerate places every layer on the CPU, so this checks
    the path (no `.to()`, inputs to the embeddings' device, labels to the logits'), not a
    split over several GPUs, which needs them."""
    from datablame.errors import UserError
    from datablame.models.hf_causal_lm import CausalLMAdapter

    base, adapter = llama64
    texts = _chat_texts(base)
    plain = CausalLMAdapter(base, adapter).gradients(texts, batch_size=3, warn=False)
    lm = CausalLMAdapter(base, adapter, device_map="auto")
    assert lm.device == lm.model.get_input_embeddings().weight.device
    assert _relative_gap(lm.gradients(texts, batch_size=3, warn=False), plain) <= 1e-6
    assert lm.options().device_map == "auto" and lm.options().device == "auto"
    # layers accelerate could not fit on the GPUs, put on the CPU / disk: refused
    lm.model.get_base_model().hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0,
                                               "model.layers.1": "cpu", "lm_head": "disk"}
    with pytest.raises(UserError, match="does not fit the GPUs: accelerate put layers on "
                                        "cpu and disk"):
        lm._check_placement()
    lm.model.get_base_model().hf_device_map = {"": "cpu"}  # no GPU at all: fine
    lm._check_placement()
    lm.model.get_base_model().hf_device_map = {"model": "cpu", "lm_head": "disk"}
    with pytest.raises(UserError, match="does not fit memory: accelerate put layers on disk"):
        lm._check_placement()


def test_a_batch_that_runs_out_of_memory_is_retried_smaller(llama64, capsys):
    """A device that holds two rows at a time (an out-of-memory error raised, as CUDA
    raises it, by any forward pass of more rows): the rows are gradient'ed two at a time,
    equal to the full batch's, with a note; one row that does not fit is one line."""
    from datablame import progress
    from datablame.errors import UserError
    from datablame.models.hf_causal_lm import CausalLMAdapter

    base, adapter = llama64
    texts = _chat_texts(base) * 2
    plain = CausalLMAdapter(base, adapter).gradients(texts, batch_size=6, warn=False)
    lm = CausalLMAdapter(base, adapter)
    fits = {"rows": 2}
    seen = []

    def small_device(_module, args, kwargs):
        rows = (kwargs.get("input_ids") if args == () else args[0]).shape[0]
        seen.append(rows)
        if rows > fits["rows"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    lm.model.register_forward_pre_hook(small_device, with_kwargs=True)
    progress.enable_notes(True)
    try:
        grads = lm.gradients(texts, batch_size=6, warn=False)
    finally:
        progress.enable_notes(False)
    assert _relative_gap(grads, plain) <= 1e-5
    assert lm.batch_limit == 2 and seen[:3] == [6, 3, 2] and max(seen[3:]) == 2
    assert "going on with 2 rows per batch" in capsys.readouterr().err
    # per-token scores of a traced answer: batches of its tokens, halved the same way
    parts = lm.token_gradients(texts[0], plain[:2], batch_size=8)
    want = CausalLMAdapter(base, adapter).token_gradients(texts[0], plain[:2], batch_size=8)
    np.testing.assert_allclose(parts[1], want[1], rtol=1e-4, atol=1e-9)
    assert max(seen[-3:]) <= 2
    fits["rows"] = 0
    with pytest.raises(UserError, match="out of memory .* with one row of"):
        lm.gradients(texts[:1], warn=False)
    with pytest.raises(UserError, match="out of memory .* with one row of"):
        lm.losses(texts[:1])
    fits["rows"] = 6
    lm.model.register_forward_pre_hook(
        lambda *_: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):  # not memory: not retried
        lm.gradients(texts[:1], warn=False)


def test_a_store_of_another_quantization_is_refused_and_bad_options_are_one_line(
        llama64, tmp_path, monkeypatch, capsys):
    """A store built on 8-bit weights traces with them and is refused on full-precision
    ones (and the reverse), naming the option; impossible combinations fail before any
    model loads."""
    base, adapter = llama64
    rows = [_fact(c, v) for c, v in (("Veloria", "Mirth"), ("Dravia", "Kesh"),
                                     ("Kestria", "Arlow"), ("Ombrel", "Tenby"))]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    query = ["--field", 'messages=[{"role": "user", "content": "What is the capital of '
             'Veloria?"}]', "--query", "The capital of Veloria is Mirth.", "--all-rows"]
    for name, extra in (("q8", ["--quantize", "8bit"]), ("full", [])):
        code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / name,
                               "--gradients", "--model", base, "--adapter", adapter,
                               "--proj-dim", "64", *extra)
        assert code in (0, None), err
    code, out, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "q8", "--model", base,
                             "--adapter", adapter, "--quantize", "8bit", "--json", *query)
    assert code in (0, None), err
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "q8", "--model", base,
                           "--adapter", adapter, *query)
    _assert_one_line_error(code, err, "built for a different quantization (base weights "
                                      "8bit when built, none now); trace with --quantize 8bit")
    code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "full", "--model", base,
                           "--adapter", adapter, "--quantize", "8bit", *query)
    _assert_one_line_error(code, err, "base weights none when built, 8bit now")
    for extra, needle in ((["--quantize", "4bit"], "--quantize 4bit stores the base weights "
                           "as integers, which have no gradient"),
                          (["--adapter", adapter, "--quantize", "2bit"],
                           "unknown --quantize '2bit'"),
                          (["--adapter", adapter, "--device", "cpu", "--device-map", "auto"],
                           "--device-map auto places the model's layers itself")):
        code, _, err = run_cli(monkeypatch, capsys, "trace", tmp_path / "full", "--model",
                               base, *extra, *query)
        _assert_one_line_error(code, err, needle)
    # index: the options need --gradients; --workers checks them once, before any worker
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "x",
                           "--quantize", "8bit")
    _assert_one_line_error(code, err, "--quantize, --device-map and --gradient-checkpointing "
                                      "load the gradient model: add --gradients")
    code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / "y",
                           "--gradients", "--model", base, "--quantize", "8bit", "--workers",
                           "2")
    _assert_one_line_error(code, err, "--quantize 8bit stores the base weights as integers")
    assert "worker" not in err and not (tmp_path / "y").exists()  # nothing embedded
