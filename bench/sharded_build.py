"""Gradient store build: one process vs `--workers N` (issue 15). Table + JSON.

    .venv/bin/python bench/sharded_build.py [--rows 3000] [--workers 2]

A tiny GPT-2 + LoRA (random weights: the cost is the featurization, not what it learned)
and generated rows; the retrieval index is built first, once, so both runs time only the
gradient store. Each run is a separate `datablame index` process; wall time and the CPU
seconds of the process and its children (the worker processes) are measured, and the two
stores are compared file for file. On a shared 2-core machine, CPU-seconds are the fair
comparison (workers also pay a model load and an import each); wall time shows the
speed-up a free machine would give.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import with_provenance


def _tiny_model(root: Path) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from datablame.demo.toy_lm import train_tokenizer

    words = [f"w{i}" for i in range(200)]
    tok = train_tokenizer([" ".join(words), "### Instruction :\n### Response :\n"],
                          root / "base")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2,
                               n_head=2, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)).save_pretrained(root / "base")
    base = GPT2LMHeadModel.from_pretrained(root / "base")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                      fan_in_fan_out=True, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and everything it started)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _digest(store: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=250)
    ap.add_argument("--out", default="bench/results/sharded_build.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapter = _tiny_model(root)
        train = root / "train.jsonl"
        train.write_text("".join(json.dumps({
            "instruction": " ".join(f"w{rng.randrange(200)}" for _ in range(6)), "input": "",
            "output": " ".join(f"w{rng.randrange(200)}" for _ in range(rng.randrange(5, 30)))
        }) + "\n" for _ in range(args.rows)))
        cli = [sys.executable, "-m", "datablame", "index", str(train)]
        grad = ["--gradients", "--model", str(base), "--adapter", str(adapter),
                "--shard-rows", str(args.shard_rows), "--proj-dim", "1024"]
        subprocess.run([*cli, "--out", str(root / "idx")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.copytree(root / "idx", root / "idx-workers")
        one = _run([*cli, "--out", str(root / "idx"), *grad])
        many = _run([*cli, "--out", str(root / "idx-workers"), *grad,
                     "--workers", str(args.workers)])
        same = _digest(root / "idx" / "gradients") == \
            _digest(root / "idx-workers" / "gradients")
    table = [{"build": "one process", "wall_s": one[0], "cpu_s": one[1],
              "rows_per_s": args.rows / one[0]},
             {"build": f"--workers {args.workers}", "wall_s": many[0], "cpu_s": many[1],
              "rows_per_s": args.rows / many[0]}]
    print(f"{args.rows} rows, shards of {args.shard_rows}, {os.cpu_count()} cores")
    print(f"{'build':14s} {'wall s':>8s} {'CPU s':>8s} {'rows/s':>8s}")
    for r in table:
        print(f"{r['build']:14s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['rows_per_s']:8.0f}")
    print(f"stores byte-identical: {same}")
    out = {"rows": args.rows, "workers": args.workers, "shard_rows": args.shard_rows,
           "cores": os.cpu_count(), "table": table, "byte_identical": same}
    Path(args.out).write_text(json.dumps(with_provenance(out), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
