"""What scoring candidates where their gradients are computed saves (issue 15): host memory
and time of a trace's exact re-rank, the candidates' gradients brought to the host and
aligned there (before) vs reduced to their dots with the query in each batch
(`Tracer._exact_scores`, now), on the same rows. Prints a table, writes JSON.

    .venv/bin/python bench/rerank_memory.py [--size 1024x8] [--rows 100,300]
        [--tokens 128] [--batch-size 16] [--out bench/results/rerank_memory.json]

A random Llama config built here (`--size` HIDDENxLAYERS), LoRA r=16 on every linear
layer (the LoRA-B gradients are what a trace scores), chat rows of about `--tokens`
tokens. Each (variant, rows) runs in its own child process, so its peak is its own: the
child's peak RSS less its peak once the model is loaded and warmed up on one batch; the
faster of two runs. The scores of both variants are compared (max |difference|).
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

VARIANTS = ("host", "reduced")


def child(args) -> None:
    """One (variant, rows), in this process: load, score, report as one JSON line."""
    from families import _conversation

    from datablame.data.chat import ChatTemplate
    from datablame.methods.gradient_alignment import align
    from datablame.models.hf_causal_lm import CausalLMAdapter
    from datablame.text import Tracer

    class NoStore(Tracer):  # `_exact_scores` as a trace without a gradient store runs it
        def __init__(self, model):
            self.model = model

        def curvature(self):
            return None

        def holds_both(self) -> bool:
            return False

    root = Path(args.root)
    chat = ChatTemplate.from_model(root / "base")
    rng = random.Random(1)
    texts = [chat.format(_conversation(rng, int(args.tokens * f)))
             for f in np.linspace(0.7, 1.0, args.n + 1)]
    lm = CausalLMAdapter(root / "base", root / "adapter", device="cpu",
                         max_length=args.tokens + 64)
    q = lm.gradients(texts[:1], warn=False)
    lm.gradients(texts[1:1 + args.batch_size], batch_size=args.batch_size, warn=False)
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # warmed up
    seconds = float("inf")
    for _ in range(2):  # the faster of two: this machine is shared
        start = time.perf_counter()
        if args.variant == "host":  # what `_scores` did: every candidate's gradient, aligned
            scores = align(q[0], lm.gradients(texts[1:], batch_size=args.batch_size,
                                              warn=False))
        else:
            scores = NoStore(lm)._exact_scores(q, texts[1:], "cosine",
                                               batch_size=args.batch_size, warn=False)[0][0]
        seconds = min(seconds, time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(root / f"scores-{args.variant}-{args.n}.npy", scores)
    print(json.dumps({"variant": args.variant, "rows": args.n, "seconds": seconds,
                      "rows_per_s": args.n / seconds, "peak_mb": peak_mb - loaded_mb,
                      "process_peak_mb": peak_mb, "lora_b_params": lm.num_params}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1024x8")
    ap.add_argument("--rows", default="100,300")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="bench/results/rerank_memory.json")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    from gpu import build  # the same random Llama + LoRA r=16 on every linear layer
    from provenance import with_provenance

    hidden, layers = map(int, args.size.split("x"))
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), hidden, layers, args.tokens + 64)
        for n in map(int, args.rows.split(",")):
            for name in VARIANTS:
                cmd = [sys.executable, __file__, "--variant", name, "--root", tmp,
                       "--n", str(n), "--tokens", str(args.tokens),
                       "--batch-size", str(args.batch_size)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name} {n}: failed: {done.stderr.strip().splitlines()[-1]}",
                          flush=True)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(size=args.size, tokens=args.tokens, batch_size=args.batch_size)
                table.append(row)
            got = {v: np.load(Path(tmp) / f"scores-{v}-{n}.npy") for v in VARIANTS}
            diff = float(np.abs(got["host"] - got["reduced"]).max())
            for row in table[-2:]:
                row["max_abs_score_diff"] = diff
            host, reduced = table[-2:]
            print(f"{n:5d} candidates ({host['lora_b_params']:,} LoRA-B numbers a row): "
                  f"host {host['peak_mb']:7.0f} MB {host['rows_per_s']:5.2f} rows/s | "
                  f"reduced {reduced['peak_mb']:7.0f} MB {reduced['rows_per_s']:5.2f} rows/s"
                  f" | memory x{host['peak_mb'] / max(reduced['peak_mb'], 1.0):.1f}, "
                  f"max |score diff| {diff:.1e}", flush=True)
    Path(args.out).write_text(json.dumps(with_provenance({"rows": table}), indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
