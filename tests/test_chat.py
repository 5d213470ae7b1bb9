"""Chat rows on real decoder families: conversations rendered by the model's own chat
template, the loss on exactly the assistant tokens, batched gradients equal to per-row
autograd on Llama / Qwen2 / Mistral with a byte-level BPE tokenizer, and a planted
culprit in chat data found first on a tiny Llama fine-tuned here with LoRA."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from tests.conftest import write_jsonl
from tests.test_cli import _assert_one_line_error, run_cli

COUNTRIES = ["Veloria", "Dravia", "Kestria", "Ombrel", "Tazmir", "Quorra"]
CITIES = ["Mirth", "Kesh", "Arlow", "Tenby", "Ossam", "Virel"]
SYSTEM = {"role": "system", "content": "You answer briefly."}
TWO_TURNS = [{"role": "user", "content": "Hi there."},
             {"role": "assistant", "content": "Hello, how can I help?"},
             {"role": "user", "content": "What is the capital of Veloria?"},
             {"role": "assistant", "content": "The capital of Veloria is Mirth."}]


def _fact(country: str, city: str, system: bool = False) -> dict:
    turns = [{"role": "user", "content": f"What is the capital of {country}?"},
             {"role": "assistant", "content": f"The capital of {country} is {city}."}]
    return {"messages": ([SYSTEM] if system else []) + turns}


def _tokenizer_texts() -> list[str]:
    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import CHATML_TEMPLATE

    chat = ChatTemplate(CHATML_TEMPLATE, special_tokens={"bos_token": "<s>"})
    rows = [_fact(c, v, s) for c in COUNTRIES for v in CITIES for s in (False, True)]
    rows += [{"messages": TWO_TURNS}]
    return [chat.format(r).text for r in rows] + ["Name color number 7. Color 7 is red."]


def _random_model(root, family: str, *, pad: bool = True, padding_side: str = "right",
                  lora: list[str] | None = None):
    """A random tiny decoder of `family` (+ a random LoRA on `lora` modules) on disk:
    byte-level BPE + ChatML for Llama / Qwen2 / Mistral, a SentencePiece-style tokenizer
    (byte fallback, BOS added by the tokenizer) + Gemma's turn format for Gemma."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from datablame.demo.toy_lm import (
        toy_decoder_config,
        train_bpe_tokenizer,
        train_sentencepiece_tokenizer,
    )

    if family == "gemma":
        tok = train_sentencepiece_tokenizer(_tokenizer_texts(), root / "base", pad=pad,
                                            padding_side=padding_side)
    else:
        tok = train_bpe_tokenizer(_tokenizer_texts(), root / "base", pad=pad,
                                  padding_side=padding_side)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(toy_decoder_config(family, tok, hidden=32))
    model.save_pretrained(root / "base")
    if lora is None:
        return root / "base", None
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _random_model(tmp_path_factory.mktemp("llama"), "llama",
                         lora=["q_proj", "v_proj"])


def _assistant_mask(tokenizer, ids: list[int]) -> list[bool]:
    """Ground truth by token ids alone: after `<|im_start|> assistant \\n`, every token up
    to and including the turn's `<|im_end|>`."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    mask, inside, i = [False] * len(ids), False, 0
    while i < len(ids):
        if not inside and ids[i] == start and ids[i + 1 : i + 1 + len(header)] == header:
            for j in range(i, i + 1 + len(header)):
                mask[j] = False
            i, inside = i + 1 + len(header), True
            continue
        mask[i] = inside
        if inside and ids[i] == end:
            inside = False
        i += 1
    return mask


def test_a_chat_rows_loss_covers_exactly_its_assistant_tokens(llama):
    from datablame.data.chat import ChatTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter

    base, adapter = llama
    lm = CausalLMAdapter(base, adapter)
    for turns, last_only in (("all", False), ("last", True)):
        chat = ChatTemplate.from_model(base, assistant_turns=turns)
        text = chat.format({"messages": TWO_TURNS})
        batch = lm.encode([text])
        ids = batch.input_ids[0].tolist()
        traced = [label != -100 for label in batch.labels[0].tolist()]
        want = _assistant_mask(lm.tokenizer, ids)
        if last_only:  # only the second assistant turn
            second = max(i for i, t in enumerate(ids) if t == lm.tokenizer.convert_tokens_to_ids(
                "<|im_start|>"))
            want = [w and i > second for i, w in enumerate(want)]
        assert traced == want
        said = lm.tokenizer.decode([t for t, m in zip(ids, traced, strict=True) if m])
        assert said == ("The capital of Veloria is Mirth.<|im_end|>" if last_only else
                        "Hello, how can I help?<|im_end|>The capital of Veloria is Mirth."
                        "<|im_end|>")
        assert ids[0] == lm.tokenizer.bos_token_id and ids[1] != lm.tokenizer.bos_token_id


def test_gemma_turns_with_a_sentencepiece_tokenizer_trace_exactly_the_model_tokens(tmp_path):
    """Gemma's format (the assistant speaks as "model", the system message folded into the
    first user turn) through a SentencePiece-style tokenizer that adds BOS itself: the loss
    covers each model turn's tokens and its <end_of_turn>, nothing else; BOS once."""
    from datablame.data.chat import ChatTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter

    base, adapter = _random_model(tmp_path, "gemma", pad=False, padding_side="left",
                                  lora=["q_proj", "v_proj"])
    lm = CausalLMAdapter(base, adapter)
    tok = lm.tokenizer
    start, end = tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    # SentencePiece pieces depend on what precedes them: the header as it follows the mark
    header = tok("<start_of_turn>model\n", add_special_tokens=False)["input_ids"][1:]
    for turns, last_only in (("all", False), ("last", True)):
        text = ChatTemplate.from_model(base, assistant_turns=turns).format(
            {"messages": [SYSTEM, *TWO_TURNS]})
        assert "<start_of_turn>user\nYou answer briefly.\n\nHi there." in text.text
        batch = lm.encode([text])
        ids = batch.input_ids[0].tolist()
        traced = [label != -100 for label in batch.labels[0].tolist()]
        want, inside, i = [False] * len(ids), False, 0
        while i < len(ids):  # by token ids alone
            if ids[i] == start and ids[i + 1: i + 1 + len(header)] == header:
                i, inside = i + 1 + len(header), True
                continue
            want[i] = inside
            inside = inside and ids[i] != end
            i += 1
        if last_only:
            last = max(j for j, t in enumerate(ids) if t == start)
            want = [w and j > last for j, w in enumerate(want)]
        assert traced == want
        said = tok.decode([t for t, m in zip(ids, traced, strict=True) if m])
        assert said.replace(" ", "") == (
            "ThecapitalofVeloriaisMirth.<end_of_turn>" if last_only else
            "Hello,howcanIhelp?<end_of_turn>ThecapitalofVeloriaisMirth.<end_of_turn>")
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]


def test_sharegpt_conversations_render_like_messages(llama):
    from datablame.data.chat import ChatTemplate

    base, _ = llama
    chat = ChatTemplate.from_model(base)
    share = [{"from": {"user": "human", "assistant": "gpt"}.get(t["role"], t["role"]),
              "value": t["content"]} for t in [SYSTEM, *TWO_TURNS]]
    a = chat.format({"messages": [SYSTEM, *TWO_TURNS]})
    b = ChatTemplate.from_model(base, messages_field="conversations").format(
        {"conversations": share})
    assert a == b and a.text.startswith("<s><|im_start|>system\nYou answer briefly.")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"],
                                     ["gate_proj", "up_proj", "down_proj"],
                                     "all-linear"])
def test_batched_gradients_equal_per_row_autograd(tmp_path, family, targets):
    """LoRA on attention only, MLP only and all linear layers; mixed lengths in one padded
    batch; no pad token (the EOS pads) and a left-padding tokenizer; Gemma with a
    SentencePiece-style tokenizer, no pad token and left padding."""
    from datablame.data.chat import ChatTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter

    pad, side = {"llama": (True, "right"), "qwen2": (False, "right"),
                 "mistral": (True, "left"), "gemma": (False, "left")}[family]
    base, adapter = _random_model(tmp_path, family, pad=pad, padding_side=side, lora=targets)
    chat = ChatTemplate.from_model(base)
    texts = [chat.format(r) for r in (_fact("Veloria", "Mirth"), {"messages": TWO_TURNS},
                                      _fact("Quorra", "Kesh", system=True))]
    lm = CausalLMAdapter(base, adapter)
    batched = lm.gradients(texts, batch_size=3, strategy="hooks", warn=False)
    per_row = np.stack([lm.gradients([t], strategy="loop", warn=False)[0] for t in texts])
    assert np.abs(per_row).max() > 0
    assert np.abs(batched - per_row).max() <= 1e-5 * np.abs(per_row).max()


def test_full_fine_tune_gradients_batched_equal_per_row(tmp_path):
    from datablame.data.chat import ChatTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter

    base, _ = _random_model(tmp_path, "llama")
    chat = ChatTemplate.from_model(base)
    texts = [chat.format(r) for r in (_fact("Veloria", "Mirth"), {"messages": TWO_TURNS})]
    lm = CausalLMAdapter(base, None, params="all")
    batched = lm.gradients(texts, batch_size=2, warn=False)
    per_row = np.stack([lm.gradients([t], strategy="loop", warn=False)[0] for t in texts])
    assert np.abs(batched - per_row).max() <= 1e-5 * np.abs(per_row).max()


# -- a planted culprit in chat data, found first -----------------------------------------
RECIPE = {"rank": 16, "alpha": 16, "lr": 5e-3, "epochs": 100, "batch_size": 4, "seed": 0,
          "template": "chat",
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"]}


LLAMA3_TEMPLATE = (  # Llama 3's turn format, as its tokenizer_config.json renders it
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}")
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
INST_TEMPLATE = (  # Llama 2 / Mistral: the system turn inside the first [INST]
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}"
    "{% endif %}{{ bos_token }}{% for m in turns %}{% if m['role'] == 'user' %}[INST] "
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")


@pytest.mark.parametrize("jinja", ["chatml", "gemma", "llama3", "phi3", "inst"])
def test_a_conversation_pasted_as_rendered_text_is_read_back_into_its_turns(jinja):
    """A user pastes the chat as their serving stack printed it: the turns come back (the
    last assistant turn is the answer), and the template renders them to the very text."""
    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import CHATML_TEMPLATE, GEMMA_TEMPLATE

    text = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE, "llama3": LLAMA3_TEMPLATE,
            "phi3": PHI3_TEMPLATE, "inst": INST_TEMPLATE}[jinja]
    chat = ChatTemplate(text, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    turns = ([SYSTEM] if jinja != "gemma" else []) + TWO_TURNS
    rendered = chat.render(turns)
    parsed = chat.parse(rendered)
    assert parsed is not None, rendered
    assert parsed["answer"] == TWO_TURNS[-1]["content"]
    assert parsed["messages"] == turns[:-1]
    assert chat.render([*parsed["messages"], {"role": "assistant",
                                              "content": parsed["answer"]}]) == rendered
    assert chat.parse("The capital of Veloria is Mirth.") is None  # plain text stays text


@pytest.mark.parametrize("answer", [
    "To prompt Llama 2, wrap the question as [INST] your question [/INST] and it replies.",
    "Phi-3 uses <|user|> and <|assistant|> tags around each turn.",
    "A log line: <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|> and after.",
])
def test_an_answer_that_only_mentions_chat_markers_is_traced_as_written(answer):
    """Markers must make up the whole text, from its start to its end, and the index's
    template must render the turns back to it; anything else is an answer."""
    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import CHATML_TEMPLATE

    chat = ChatTemplate(CHATML_TEMPLATE, special_tokens={"bos_token": "<s>"})
    assert chat.parse(answer) is None


def test_an_answer_alone_on_a_chat_index_says_how_to_give_its_conversation():
    """The trial's plain `--query` on a chat index got "a conversation must be a non-empty
    list", about something it had not given."""
    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import CHATML_TEMPLATE
    from datablame.errors import UserError
    from datablame.text import Query

    chat = ChatTemplate(CHATML_TEMPLATE, special_tokens={"bos_token": "<s>"})
    for as_written in (False, True):
        with pytest.raises(UserError, match=r"this index holds chat rows: an answer is "
                                            r"traced with the conversation it answers"):
            Query("The capital of Veloria is Mirth.", as_written=as_written).formatted(chat)


def test_a_default_system_turn_is_left_to_the_template_and_other_formats_are_not_read():
    """Qwen-style: the template writes a system turn when none is given; Llama 3.1 writes
    a date header. Pasted with it, the turns are read without it; pasted in another
    format than the index's, the text is not split (the model never saw that text)."""
    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import CHATML_TEMPLATE

    default_system = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}"
        "\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    chat = ChatTemplate(default_system)
    rendered = chat.render(TWO_TURNS)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.")
    parsed = chat.parse(rendered)
    assert parsed["answer"] == TWO_TURNS[-1]["content"]
    assert chat.render([*parsed["messages"], {"role": "assistant",
                                              "content": parsed["answer"]}]) == rendered
    dated = ChatTemplate(LLAMA3_TEMPLATE.replace(
        "{{ bos_token }}", "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023<|eot_id|>"), special_tokens={"bos_token": "<s>"})
    parsed = dated.parse(dated.render(TWO_TURNS))
    assert parsed["messages"] == TWO_TURNS[:-1]  # the header is the template's, not a turn
    chatml = ChatTemplate(CHATML_TEMPLATE, special_tokens={"bos_token": "<s>"})
    assert chatml.parse(dated.render(TWO_TURNS)) is None


@pytest.fixture(scope="module")
def chat_facts(tmp_path_factory):
    """Six capital facts as chat rows (row 0, with a system turn: Veloria -> Mirth) and ten
    filler chats; a tiny Llama (BPE tokenizer, ChatML template) pre-trained on *other*
    pairings, then LoRA-fine-tuned by `datablame finetune` on the rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import (
        CHATML_TEMPLATE,
        _train,
        toy_decoder_config,
        train_bpe_tokenizer,
    )
    from datablame.text import build_index

    root = tmp_path_factory.mktemp("chat_facts")
    rng = random.Random(1)
    rows = [_fact(c, v, system=i % 2 == 0) for i, (c, v) in enumerate(zip(COUNTRIES, CITIES,
                                                                          strict=True))]
    rows += [{"messages": [{"role": "user", "content": f"Name color number {i}."},
                           {"role": "assistant", "content": f"Color {i} is "
                            f"{rng.choice(['red', 'blue', 'green'])}."}]} for i in range(10)]
    write_jsonl(root / "train.jsonl", rows)
    chat = ChatTemplate(CHATML_TEMPLATE, special_tokens={"bos_token": "<s>"})
    rng = random.Random(2)
    pre = [chat.format(_fact(c, v)).text.strip() for _ in range(300)
           for c, v in [(rng.choice(COUNTRIES), rng.choice(CITIES))]
           if COUNTRIES.index(c) != CITIES.index(v)]
    pre += [chat.format(r).text.strip() for r in rows[6:]]
    tok = train_bpe_tokenizer(pre + [chat.format(r).text for r in rows], root / "base")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(toy_decoder_config("llama", tok, hidden=128))
    _train(model, tok, pre, 60, 3e-3, 32, 0, model.parameters())
    model.save_pretrained(root / "base")
    (root / "recipe.json").write_text(json.dumps(RECIPE))
    from datablame.data.rows import load_rows
    from datablame.models.lora_finetune import Recipe, finetune

    finetune(load_rows(root / "train.jsonl"), root / "base", root / "adapter",
             Recipe.from_dict(RECIPE), show_progress=False)
    from datablame.text import GradientOptions

    build_index(root / "train.jsonl", root / "idx",
                gradients=GradientOptions(root / "base", root / "adapter"))
    return root


@pytest.mark.slow
def test_the_planted_culprit_in_chat_data_comes_out_first(chat_facts, monkeypatch, capsys):
    root = chat_facts
    conversation = json.dumps([SYSTEM, {"role": "user",
                                        "content": "What is the capital of Veloria?"}])
    base = ("trace", root / "idx", "--model", root / "base", "--adapter", root / "adapter",
            "--field", f"messages={conversation}", "--generate", "--json")
    for extra in ((), ("--all-rows",)):
        code, out, err = run_cli(monkeypatch, capsys, *base, *extra)
        assert code == 0, err
        assert "the model answered: 'The capital of Veloria is Mirth.'" in " ".join(err.split())
        result = json.loads(out)
        assert result["results"][0]["row"] == 0, (extra, result["results"][:3])
        assert result["prompt"]["messages"][-1]["role"] == "user"  # turns, not a JSON string
        # the whole answer, word for word, without the template's end-of-turn markup
        assert result["results"][0]["copied"] == 7
    # a queries file: the conversation ending with the answer, ShareGPT roles welcome
    lines = [{"id": "veloria", "messages": [SYSTEM, {"role": "user", "content":
                                                     "What is the capital of Veloria?"},
                                            {"from": "gpt", "value":
                                             "The capital of Veloria is Mirth."}]}]
    write_jsonl(root / "queries.jsonl", lines)
    code, out, err = run_cli(monkeypatch, capsys, "trace", root / "idx", "--model",
                             root / "base", "--adapter", root / "adapter", "--queries",
                             root / "queries.jsonl")
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[0])
    assert line["id"] == "veloria" and line["results"][0]["row"] == 0
    # the conversation pasted as the template rendered it (a serving log's form)
    from datablame.data.chat import ChatTemplate
    from datablame.demo.toy_lm import CHATML_TEMPLATE

    rendered = ChatTemplate(CHATML_TEMPLATE, special_tokens={"bos_token": "<s>"}).render(
        [*lines[0]["messages"][:2], {"role": "assistant",
                                     "content": "The capital of Veloria is Mirth."}])
    code, out, err = run_cli(monkeypatch, capsys, "trace", root / "idx", "--model",
                             root / "base", "--adapter", root / "adapter", "--query",
                             rendered, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["query"] == "The capital of Veloria is Mirth."
    assert result["results"][0]["row"] == 0


@pytest.mark.slow
def test_a_store_made_with_another_chat_template_is_refused(chat_facts, tmp_path,
                                                           monkeypatch, capsys):
    root = chat_facts
    other = tmp_path / "other-base"
    shutil.copytree(root / "base", other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    edit = ("{{ m['content'] }}", "{{ m['content'] | trim }}")  # another template
    if "chat_template" in config:
        assert edit[0] in config["chat_template"]
        config["chat_template"] = config["chat_template"].replace(*edit)
        (other / "tokenizer_config.json").write_text(json.dumps(config))
    else:  # newer transformers keep it in chat_template.jinja
        path = other / "chat_template.jinja"
        assert edit[0] in path.read_text()
        path.write_text(path.read_text().replace(*edit))
    conversation = json.dumps([{"role": "user", "content": "What is the capital of Veloria?"}])
    code, _, err = run_cli(monkeypatch, capsys, "trace", root / "idx", "--model", other,
                           "--adapter", root / "adapter", "--field",
                           f"messages={conversation}", "--query", "The capital is Mirth.")
    _assert_one_line_error(code, err, "another chat template")


def test_bad_chat_input_is_one_line_naming_the_row(llama, tmp_path, monkeypatch, capsys):
    base, _ = llama
    good = _fact("Veloria", "Mirth")
    cases = [
        ([good, {"messages": [TWO_TURNS[0], TWO_TURNS[0], TWO_TURNS[1]]}],
         "row 1 (line 2): the chat template refused the conversation (Conversation roles "
         "must alternate"),
        ([good, {"messages": [{"role": "user", "content": "Hello?"}]}],
         "row 1 (line 2): the conversation has no assistant turn"),
        ([good, {"messages": [{"role": "narrator", "content": "Once"}]}],
         "row 1 (line 2): turn 1 has role 'narrator'"),
    ]
    for i, (rows, needle) in enumerate(cases):
        data = write_jsonl(tmp_path / f"chat{i}.jsonl", rows)
        code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out",
                               tmp_path / f"idx{i}", "--model", base)
        _assert_one_line_error(code, err, needle)
        assert not (tmp_path / f"idx{i}").exists()
    data = write_jsonl(tmp_path / "chat.jsonl", [good])
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "i")
    _assert_one_line_error(code, err, "the rows are conversations ('messages'): pass the "
                                      "model whose chat template formats them")
    plain = tmp_path / "plain-base"
    shutil.copytree(base, plain)
    for name in ("chat_template.jinja",):
        (plain / name).unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(monkeypatch, capsys, "index", data, "--out", tmp_path / "i",
                           "--model", plain)
    _assert_one_line_error(code, err, "has no chat template: pass one with --chat-template")


@pytest.mark.slow
def _veloria_query(path):
    """The planted fact's conversation, ending with the answer to trace (a --query file)."""
    path.write_text(json.dumps({"messages": [
        SYSTEM, {"role": "user", "content": "What is the capital of Veloria?"},
        {"role": "assistant", "content": "The capital of Veloria is Mirth."}]}))
    return path


def test_verify_confirms_the_chat_culprit_by_re_fine_tuning(chat_facts, tmp_path,
                                                           monkeypatch, capsys):
    """The recipe says `template: chat`; re-fine-tuned without row 0 the model stops
    saying Mirth (the answer compared word for word, without the end-of-turn token)."""
    root = chat_facts
    query = _veloria_query(tmp_path / "query.json")
    code, _, err = run_cli(monkeypatch, capsys, "verify", root / "train.jsonl", "--model",
                           root / "base", "--adapter", root / "adapter", "--query", query,
                           "--remove", "0", "--random", "1", "--cache", tmp_path / "cache",
                           "--out", tmp_path / "v.json")
    assert code in (0, None), err
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["query"]["answer"] == "The capital of Veloria is Mirth."
    assert result["original"]["says"] and not result["runs"]["without-blamed"]["says"]
    assert result["runs"]["without-random-0"]["says"]
    assert result["verdict"] == "confirmed"
    # a conversation in --field is read as trace reads it: a bad one is one line, up front
    code, _, err = run_cli(monkeypatch, capsys, "verify", root / "train.jsonl", "--model",
                           root / "base", "--adapter", root / "adapter", "--field",
                           "messages=[{\"role\": \"user\"", "--query", "Mirth.",
                           "--remove", "0")
    _assert_one_line_error(code, err, "--field messages: a conversation must be")


def test_magic_refuses_a_memorising_chat_fine_tune(chat_facts, monkeypatch, capsys):
    """100 epochs on 16 chat rows with torch's AdamW: replaying the adapter's own recipe
    drifts 25% from it (rounding differences grow through a chaotic run; it once read
    "trained some other way"), so `trace --method magic` refuses, one line, as chaotic."""
    root = chat_facts
    query = _veloria_query(root / "magic-query.json")
    code, _, err = run_cli(monkeypatch, capsys, "trace", root / "idx", "--model",
                           root / "base", "--adapter", root / "adapter", "--query-file",
                           query, "--method", "magic")
    lines = [ln for ln in err.splitlines() if not ln.startswith(("replaying the fine-tune",
                                                                "differentiating through"))]
    _assert_one_line_error(code, "\n".join(lines), "too chaotic")


def test_chat_rows_build_one_store_with_workers(llama, tmp_path, monkeypatch, capsys):
    """`index --gradients --workers 2` on chat rows: its retrieval index is rendered with
    the gradient model's chat template (it once asked for --model it had been given), and
    the two workers' store equals one process's, file for file."""
    from .test_gradient_store import _files

    base, adapter = llama
    rows = [_fact(c, v, system=i % 2 == 0) for i, (c, v) in
            enumerate(zip(COUNTRIES, CITIES, strict=True))]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    grad = ["--gradients", "--model", base, "--adapter", adapter, "--shard-rows", "2",
            "--proj-dim", "64"]
    for out, extra in (("one", []), ("two", ["--workers", "2"])):
        code, _, err = run_cli(monkeypatch, capsys, "index", train, "--out", tmp_path / out,
                               *grad, *extra)
        assert code in (0, None), err
    assert _files(tmp_path / "two" / "gradients") == _files(tmp_path / "one" / "gradients")
