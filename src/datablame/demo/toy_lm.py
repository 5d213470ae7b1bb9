"""A tiny causal LM trained here on CPU, for the demo and the tests.

Real users bring real models; this exists so the whole pipeline (tokenizer on disk,
`from_pretrained`, a PEFT LoRA adapter) runs end to end with nothing downloaded. Choices
that make a few-million-parameter model learn planted facts within a minute on 2 cores:
a word-level tokenizer (short sequences), a short full pre-training on template-shaped
text, then LoRA on attention *and* MLP projections.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"


def words(text: str) -> list[str]:
    """The tokenizer's own word split (whitespace + punctuation), for comparing texts."""
    return re.findall(r"\w+|[^\w\s]+", text)


def normalize(text: str) -> str:
    return " ".join(words(text))


@dataclass
class ToyConfig:
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 96
    pretrain_epochs: int = 20
    lora_epochs: int = 80
    lora_r: int = 32
    lr_pretrain: float = 3e-3
    lr_lora: float = 5e-3
    batch_size: int = 32
    seed: int = 0


def train_tokenizer(texts: list[str], out_dir: Path):
    """Word-level tokenizer saved as a PreTrainedTokenizerFast that AutoTokenizer reloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS], min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK,
                                   eos_token=EOS, bos_token=EOS)
    fast.padding_side = "right"
    fast.save_pretrained(out_dir)
    return fast


# A ChatML-style template that, like Mistral's and Llama-2's, refuses turns that do not
# alternate user / assistant (system turns aside).
CHATML_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(turn=0) %}{% for m in messages %}"
    "{% if m['role'] != 'system' %}{% if (m['role'] == 'user') != (ns.turn % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{% set ns.turn = ns.turn + 1 %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]


def train_bpe_tokenizer(texts: list[str], out_dir: Path, *, vocab_size: int = 600,
                        chat_template: str | None = CHATML_TEMPLATE, pad: bool = True,
                        padding_side: str = "right"):
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 / Qwen style) with ChatML specials and a
    chat template, saved as a PreTrainedTokenizerFast; `pad=False` leaves it without a pad
    token, as many base models ship."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                   eos_token="<|im_end|>",
                                   pad_token="<pad>" if pad else None,
                                   additional_special_tokens=["<|im_start|>"])
    fast.padding_side = padding_side
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast


def toy_decoder_config(family: str, tokenizer, *, hidden: int = 64, layers: int = 2,
                       positions: int = 128):
    """A few-hundred-thousand-parameter config of a real decoder family: rotary positions,
    grouped-query attention (2 key/value heads for 4 query heads), tied embeddings; Gemma
    also scales its embeddings by sqrt(hidden), adds 1 to its RMSNorm weights and uses a
    head size of its own."""
    from transformers import AutoConfig

    kinds = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma": "gemma"}
    if family not in kinds:
        raise ValueError(f"unknown family {family}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    extra = {"head_dim": max(hidden // 4, 8)} if family == "gemma" else {}
    return AutoConfig.for_model(
        kinds[family], vocab_size=len(tokenizer), hidden_size=hidden,
        intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad, **extra)


# Gemma's turn format: the assistant speaks as "model", a system message is folded into
# the first user turn, and roles must alternate.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{% if loop.first %}{{ ns.system }}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SENTENCEPIECE_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<start_of_turn>",
                          "<end_of_turn>"]


def train_sentencepiece_tokenizer(texts: list[str], out_dir: Path, *,
                                  vocab_size: int = 600, pad: bool = False,
                                  padding_side: str = "left",
                                  chat_template: str | None = GEMMA_TEMPLATE):
    """A SentencePiece-style tokenizer (Llama-2 / Gemma): BPE over "▁"-marked words with
    byte fallback for characters it never saw, no pad token by default, left padding;
    the chat template speaks Gemma's turns."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256,
                                  special_tokens=SENTENCEPIECE_SPECIALS + byte_tokens)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<bos>")  # like Llama-2 and Gemma: BOS added to every text
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None,
                                   additional_special_tokens=["<start_of_turn>",
                                                              "<end_of_turn>"])
    fast.padding_side = padding_side
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast


def _batches(tokenizer, texts: list[str], batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(texts), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] + " " + tokenizer.eos_token for i in order[start : start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield enc["input_ids"], enc["attention_mask"], labels


def _train(model, tokenizer, texts, epochs, lr, batch_size, seed, params) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * ((len(texts) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for ids, mask, labels in _batches(tokenizer, texts, batch_size, gen):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return float(loss.detach())


def build_toy_base(pretrain_texts: list[str], vocab_texts: list[str], base_dir: Path,
                   cfg: ToyConfig | None = None) -> tuple:
    """Train a word-level tokenizer (on both text lists) and a small GPT-2 on
    `pretrain_texts`; save both in `base_dir`. Returns (model, tokenizer, final loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = cfg or ToyConfig()
    torch.manual_seed(cfg.seed)
    base_dir = Path(base_dir)
    tokenizer = train_tokenizer(pretrain_texts + vocab_texts + [EOS], base_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions,
                        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    pre_loss = _train(model, tokenizer, pretrain_texts, cfg.pretrain_epochs, cfg.lr_pretrain,
                      cfg.batch_size, cfg.seed, model.parameters())
    model.save_pretrained(base_dir)
    return model, tokenizer, pre_loss


def build_toy_lm(pretrain_texts: list[str], finetune_texts: list[str], base_dir: Path,
                 adapter_dir: Path, cfg: ToyConfig | None = None) -> dict:
    """Train tokenizer + base model (full) + LoRA adapter; save both with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    cfg = cfg or ToyConfig()
    model, tokenizer, pre_loss = build_toy_base(pretrain_texts, finetune_texts, base_dir, cfg)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_r, lora_dropout=0.0,
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    ft_loss = _train(peft_model, tokenizer, finetune_texts, cfg.lora_epochs, cfg.lr_lora,
                     cfg.batch_size, cfg.seed + 1, trainable)
    peft_model.save_pretrained(Path(adapter_dir))
    model = peft_model
    return {"pretrain_loss": pre_loss, "finetune_loss": ft_loss,
            "base_params": sum(p.numel() for p in model.get_base_model().parameters()
                               if not p.requires_grad),
            "lora_params": sum(p.numel() for p in trainable)}


def load_toy_lm(base_dir: Path, adapter_dir: Path):
    """Reload through the real path: AutoTokenizer / AutoModel / PeftModel on directories."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt`, decoded without special tokens."""
    from datablame.models.hf_causal_lm import greedy

    return greedy(model, tokenizer, prompt, max_new_tokens)
