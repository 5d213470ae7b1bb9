"""How far are per-example gradients in bf16 / fp16 from fp32 (issue 12)? Prints a table,
writes JSON.

    .venv/bin/python bench/dtype_fidelity.py [--out bench/results/dtype_fidelity.json]

The same random tiny models as bench/families.py (LoRA r=8 on every linear layer, chat
rows of about 128 tokens), loaded with `--dtype fp32`, `bf16` and `fp16`; for each row the
cosine between its reduced-precision gradient and the fp32 one, and whether the top-5 rows
by cosine with a query (the first row's own gradient, perturbed) stay the same. On a CPU;
a GPU's bf16 kernels accumulate differently, so rerun it there before trusting bf16.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
from families import _build, _conversation
from provenance import with_provenance


def main() -> None:
    from datablame.data.chat import ChatTemplate
    from datablame.models.hf_causal_lm import CausalLMAdapter

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", default="bench/results/dtype_fidelity.json")
    args = ap.parse_args()
    table = []
    for family in ("gpt2", "llama", "qwen2"):
        with tempfile.TemporaryDirectory() as tmp:
            base, adapter = _build(Path(tmp), family, args.hidden, positions=256)
            chat = ChatTemplate.from_model(base)
            rng = random.Random(1)
            texts = [chat.format(_conversation(rng, rng.randint(40, 90)))
                     for _ in range(args.rows)]
            grads = {}
            for dtype in ("fp32", "bf16", "fp16"):
                lm = CausalLMAdapter(base, adapter, dtype=dtype, max_length=256)
                grads[dtype] = lm.gradients(texts, batch_size=8, warn=False).astype(np.float64)
            unit = {k: g / np.linalg.norm(g, axis=1, keepdims=True) for k, g in grads.items()}
            query = unit["fp32"][0] + 0.5 * unit["fp32"][1:].mean(0)
            top = {k: set(np.argsort(-(u[1:] @ query))[:5]) for k, u in unit.items()}
            for dtype in ("bf16", "fp16"):
                cos = (unit[dtype] * unit["fp32"]).sum(1)
                row = {"family": family, "dtype": dtype, "rows": args.rows,
                       "min_cos": float(cos.min()), "median_cos": float(np.median(cos)),
                       "top5_overlap": len(top[dtype] & top["fp32"]) / 5}
                table.append(row)
                print(f"{family:6s} {dtype}: cosine with fp32 min {row['min_cos']:.4f} "
                      f"median {row['median_cos']:.4f}; top-5 overlap {row['top5_overlap']:.1f}",
                      flush=True)
    Path(args.out).write_text(json.dumps(with_provenance({"table": table}), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
