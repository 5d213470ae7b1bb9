"""Per-example gradients on each decoder family (issue 12). Prints a table, writes JSON.

    .venv/bin/python bench/families.py [--hidden 64] [--rows 16] [--out bench/results/families.json]

For GPT-2, Llama, Qwen2, Mistral (byte-level BPE tokenizer, ChatML template) and Gemma (a
SentencePiece-style tokenizer with byte fallback, Gemma's turn format), random weights
built here from their transformers configs, LoRA r=8 on every linear layer,
on chat rows of about 128 and 512 tokens, in one run on the same rows:

- max |cos(batched, per-row)| difference over rows: the one-backward hook path against one
  autograd backward per row (the reference), and the max relative |difference|;
- featurization rows/s of both paths, and their ratio;
- peak resident memory of each (family, length) measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import with_provenance

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gemma")
WORDS = [
    "alpha", "beta", "gamma", "delta", "model", "data", "row", "trace", "blame",
    "gradient", "answer", "question", "capital", "city", "river", "mountain", "north",
    "south", "east", "west", "red", "blue", "green",
]


def _conversation(rng: random.Random, n_words: int) -> dict:
    half = max(1, n_words // 2)
    return {"messages": [
        {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(half))},
        {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(half))}]}


def _build(root: Path, family: str, hidden: int, positions: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    from datablame.demo.toy_lm import (
        toy_decoder_config,
        train_bpe_tokenizer,
        train_sentencepiece_tokenizer,
    )

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    tok = train_sentencepiece_tokenizer(corpus, root / "base", vocab_size=400) \
        if family == "gemma" else train_bpe_tokenizer(corpus, root / "base", vocab_size=400)
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=hidden,
                            n_layer=2, n_head=4, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        targets = ["c_attn", "c_proj", "c_fc"]
    else:
        config = toy_decoder_config(family, tok, hidden=hidden, positions=positions)
        targets = "all-linear"
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                      fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def one(family: str, tokens: int, hidden: int, n_rows: int, strategy: str) -> dict:
    """One configuration, run in its own process so its peak memory is its own."""
    from datablame.data.chat import ChatTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter

    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = _build(Path(tmp), family, hidden, positions=tokens + 64)
        chat = ChatTemplate.from_model(base)
        rng = random.Random(1)
        # mixed lengths around the target: one padded batch holds short and long rows
        texts = [chat.format(_conversation(rng, int(tokens * f)))
                 for f in np.linspace(0.55, 0.95, n_rows)]
        lm = CausalLMAdapter(base, adapter, max_length=tokens + 64)
        lm.gradients(texts[:2], batch_size=2, strategy=strategy, warn=False)  # warm up
        start = time.perf_counter()
        grads = lm.gradients(texts, batch_size=8, strategy=strategy, warn=False)
        seconds = time.perf_counter() - start
        lengths = [len(ids) for ids in lm.encode(texts).input_ids]
        out = Path(tmp) / "grads.npy"
        np.save(out, grads)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"family": family, "tokens": tokens, "strategy": strategy,
                "rows_per_s": n_rows / seconds, "peak_mb": peak_mb,
                "num_params": lm.num_params, "padded_length": max(lengths),
                "grads": grads.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default="bench/results/families.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # family:tokens:strategy (subprocess)
    args = ap.parse_args()
    if args.one:
        family, tokens, strategy = args.one.split(":")
        print(json.dumps(one(family, int(tokens), args.hidden, args.rows, strategy)))
        return
    table = []
    for family in args.families.split(","):
        for tokens in map(int, args.lengths.split(",")):
            runs = {}
            for strategy in ("hooks", "loop"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", f"{family}:{tokens}:{strategy}",
                     "--hidden", str(args.hidden), "--rows", str(args.rows)],
                    capture_output=True, text=True, check=True)
                runs[strategy] = json.loads(proc.stdout.strip().splitlines()[-1])
            batched = np.asarray(runs["hooks"].pop("grads"))
            per_row = np.asarray(runs["loop"].pop("grads"))
            unit = lambda g: g / np.linalg.norm(g, axis=1, keepdims=True)  # noqa: E731
            cos = np.abs((unit(batched) * unit(per_row)).sum(1) - 1).max()
            rel = np.abs(batched - per_row).max() / np.abs(per_row).max()
            row = {"family": family, "tokens": tokens,
                   "padded_length": runs["hooks"]["padded_length"],
                   "lora_params": runs["hooks"]["num_params"],
                   "max_abs_dcos": float(cos), "max_rel_diff": float(rel),
                   "hooks_rows_per_s": runs["hooks"]["rows_per_s"],
                   "loop_rows_per_s": runs["loop"]["rows_per_s"],
                   "speedup": runs["hooks"]["rows_per_s"] / runs["loop"]["rows_per_s"],
                   "hooks_peak_mb": runs["hooks"]["peak_mb"],
                   "loop_peak_mb": runs["loop"]["peak_mb"]}
            table.append(row)
            print(f"{family:8s} {tokens:4d} tok (padded {row['padded_length']:4d})  "
                  f"|dcos| {cos:.1e}  rel {rel:.1e}  hooks {row['hooks_rows_per_s']:7.1f} "
                  f"rows/s  loop {row['loop_rows_per_s']:7.1f} rows/s  x{row['speedup']:.1f}"
                  f"  peak {row['hooks_peak_mb']:.0f} / {row['loop_peak_mb']:.0f} MB",
                  flush=True)
    out = {"hidden": args.hidden, "rows": args.rows, "batch_size": 8, "table": table}
    Path(args.out).write_text(json.dumps(with_provenance(out), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
