"""What the large-model loading options cost and save (issue 12): peak memory and rows/s of
per-example LoRA gradients for one model loaded plain, with --gradient-checkpointing, with
--quantize 8bit / 4bit, and 4bit + checkpointing. Prints a table, writes JSON.

    .venv/bin/python bench/memory_options.py [--device cpu|cuda] [--size 1024x8]
        [--rows 16] [--tokens 512] [--batch-size 8] [--out bench/results/memory_options.json]

A random Llama config built here (`--size` HIDDENxLAYERS), LoRA r=16 on every linear
layer, chat rows of about `--tokens` tokens. Each variant runs in its own child process,
so its peak is its own: on CUDA `torch.cuda.max_memory_allocated` during the gradients;
on the CPU the child's peak RSS, less its RSS once the model is loaded (the gradients'
own memory: activations, per-example gradients) and with it (the whole process). The
gradients of every variant are compared with the plain one's (cosine, worst row).
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

VARIANTS = {  # name: (quantize, checkpointing)
    "plain": ("none", False),
    "checkpointing": ("none", True),
    "8bit": ("8bit", False),
    "4bit": ("4bit", False),
    "4bit + checkpointing": ("4bit", True),
}


def child(args) -> None:
    """One variant, in this process: load, take the gradients, report as one JSON line."""
    import torch
    from families import _conversation

    from datablame.data.chat import ChatTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter

    root = Path(args.root)
    quantize, checkpointing = VARIANTS[args.variant]
    chat = ChatTemplate.from_model(root / "base")
    rng = random.Random(1)
    texts = [chat.format(_conversation(rng, int(args.tokens * f)))
             for f in np.linspace(0.8, 1.0, args.rows)]
    lm = CausalLMAdapter(root / "base", root / "adapter", dtype=args.dtype,
                         device=args.device, quantize=quantize, checkpointing=checkpointing,
                         max_length=args.tokens + 64)
    lm.gradients(texts[:1], warn=False)  # warm up
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    grads = lm.gradients(texts, batch_size=args.batch_size, warn=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(root / f"grads-{args.variant.replace(' ', '')}.npy", grads)
    print(json.dumps({
        "variant": args.variant, "rows_per_s": args.rows / seconds,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
        else peak_mb - loaded_mb,
        "process_peak_mb": peak_mb,
        "tokens_per_row": float(np.mean([len(lm.tokenizer(t.text)["input_ids"])
                                         for t in texts]))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="1024x8")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="bench/results/memory_options.json")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    from gpu import build  # the same random Llama + LoRA r=16 on every linear layer
    from provenance import with_provenance

    hidden, layers = map(int, args.size.split("x"))
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), hidden, layers, args.tokens + 64)
        for name in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", name, "--root", tmp,
                   *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("device", "rows", "tokens", "batch_size", "dtype"))]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name}: failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            grads = np.load(Path(tmp) / f"grads-{name.replace(' ', '')}.npy")
            plain = np.load(Path(tmp) / "grads-plain.npy")
            row["min_cos_vs_plain"] = float(((grads * plain).sum(1) / np.linalg.norm(
                grads, axis=1) / np.linalg.norm(plain, axis=1)).min())
            row.update(size=args.size, device=args.device, dtype=args.dtype,
                       batch_size=args.batch_size)
            table.append(row)
            print(f"{name:22s} {row['rows_per_s']:7.2f} rows/s  gradients' peak "
                  f"{row['peak_mb']:7.0f} MB  process {row['process_peak_mb']:7.0f} MB  "
                  f"min cos vs plain {row['min_cos_vs_plain']:.4f}  "
                  f"({row['tokens_per_row']:.0f} tokens/row)", flush=True)
    Path(args.out).write_text(json.dumps(with_provenance({"rows": table}), indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
