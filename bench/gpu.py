"""Featurization and query speed on a GPU (issue 12), ready for a session that has one.
Prints a table, writes JSON; runs on the CPU too (a smoke test), where its numbers mean
little.

    .venv/bin/python bench/gpu.py [--device cuda] [--sizes tiny,large] [--rows 64]
        [--tokens 128] [--out bench/results/gpu.json]

For each model size (random weights, a Llama config built here: `tiny` = hidden 64 x 2
layers; `large` = hidden 2048 x 8 layers, about 0.5 B parameters, the largest that builds
in seconds and fits any GPU; `--sizes` takes HIDDENxLAYERS too), LoRA r=16 on every linear
layer, chat rows of about `--tokens` tokens, in one run on the same rows:

- featurization rows/s of the batched hook path vs one backward per row (the loop), and
  their ratio, in fp32 and bf16;
- max |cos(batched, loop)| difference (the hook path must equal the reference);
- featurization rows/s with the CountSketch projection on the device the gradients are on
  (what the store build does: only K numbers per row leave a GPU) vs bringing each
  batch's gradients to the host and projecting there (before), and how far apart they are;
- query latency: one query's gradient, projected (CountSketch), plus an exact cosine scan
  of `--store-rows` memory-mapped fp16 projected rows, shard by shard, as the gradient
  store's top-k does;
- peak GPU memory (torch.cuda.max_memory_allocated) or, on the CPU, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from families import WORDS, _conversation
from provenance import with_provenance

SIZES = {"tiny": (64, 2), "large": (2048, 8)}


def build(root: Path, hidden: int, layers: int, positions: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from datablame.demo.toy_lm import toy_decoder_config, train_bpe_tokenizer

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    tok = train_bpe_tokenizer(corpus, root / "base", vocab_size=400)
    torch.manual_seed(0)
    config = toy_decoder_config("llama", tok, hidden=hidden, layers=layers,
                                positions=positions)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                      init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter", sum(p.numel() for p in model.parameters())


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(size: str, args) -> list[dict]:
    from datablame.data.chat import ChatTemplate
    from datablame.features.curvature import unit_rows
    from datablame.features.projection import make_projector
    from datablame.models.hf_causal_lm import CausalLMAdapter

    hidden, layers = SIZES.get(size) or map(int, size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter, n_params = build(Path(tmp), hidden, layers, args.tokens + 64)
        chat = ChatTemplate.from_model(base)
        rng = random.Random(1)
        texts = [chat.format(_conversation(rng, int(args.tokens * f)))
                 for f in np.linspace(0.55, 0.95, args.rows)]
        for dtype in ("fp32", "bf16"):
            lm = CausalLMAdapter(base, adapter, dtype=dtype, device=args.device,
                                 max_length=args.tokens + 64)
            timing = {}
            grads = {}
            for strategy in ("hooks", "loop"):
                lm.gradients(texts[:2], batch_size=2, strategy=strategy, warn=False)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                grads[strategy] = lm.gradients(texts, batch_size=args.batch_size,
                                               strategy=strategy, warn=False)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                timing[strategy] = (time.perf_counter() - start, peak_mb(args.device))
            # featurization as the store build does it: projected where the gradients are
            # (only K numbers per row leave the device) vs brought to the host and
            # projected there (before), same rows, same projector, same batches
            projector = make_projector("countsketch", lm.num_params, args.proj_dim, seed=0)
            projected = {}
            for where in ("device", "host"):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                if where == "device":
                    projected[where] = lm.gradients(texts, batch_size=args.batch_size,
                                                    warn=False,
                                                    reduce=projector.project_tensor)
                else:  # the same length-sorted batches, whole gradients brought back
                    projected[where] = projector.project(lm.gradients(
                        texts, batch_size=args.batch_size, warn=False))
                if args.device == "cuda":
                    torch.cuda.synchronize()
                timing[f"project_on_{where}"] = (time.perf_counter() - start, 0.0)
            a, b = (unit_rows(projected[w]) for w in ("device", "host"))
            project_dcos = float(np.abs((a * b).sum(1) - 1).max())
            unit = [g / np.linalg.norm(g, axis=1, keepdims=True) for g in grads.values()]
            dcos = float(np.abs((unit[0] * unit[1]).sum(1) - 1).max())
            # query latency: one gradient, projected, and an exact cosine scan of a
            # memory-mapped fp16 matrix of projected rows, shard by shard (what the
            # gradient store's top-k does)
            matrix = np.lib.format.open_memmap(Path(tmp) / f"rows-{dtype}.npy", mode="w+",
                                               dtype=np.float16,
                                               shape=(args.store_rows, args.proj_dim))
            for start in range(0, args.store_rows, 100_000):
                stop = min(start + 100_000, args.store_rows)
                matrix[start:stop] = np.random.default_rng(start).standard_normal(
                    (stop - start, args.proj_dim))
            matrix.flush()
            norms = np.linalg.norm(matrix.astype(np.float32), axis=1)
            start = time.perf_counter()
            q = projector.project(lm.gradients(texts[:1], warn=False))[0].astype(np.float32)
            best = []
            for lo in range(0, args.store_rows, 100_000):
                part = matrix[lo:lo + 100_000].astype(np.float32) @ q
                part /= norms[lo:lo + 100_000] * (np.linalg.norm(q) or 1.0)
                top = np.argpartition(-part, min(10, len(part) - 1))[:10]
                best += [(float(part[i]), lo + int(i)) for i in top]
            sorted(best, reverse=True)[:10]
            latency = time.perf_counter() - start
            rows.append({"size": size, "hidden": hidden, "layers": layers,
                         "base_params": n_params, "lora_params": lm.num_params,
                         "dtype": dtype, "device": args.device, "tokens": args.tokens,
                         "hooks_rows_per_s": args.rows / timing["hooks"][0],
                         "loop_rows_per_s": args.rows / timing["loop"][0],
                         "speedup": timing["loop"][0] / timing["hooks"][0],
                         "max_abs_dcos": dcos, "query_latency_s": latency,
                         "project_on_device_rows_per_s":
                             args.rows / timing["project_on_device"][0],
                         "project_on_host_rows_per_s": args.rows / timing["project_on_host"][0],
                         "project_max_abs_dcos": project_dcos,
                         "store_rows": args.store_rows,
                         "peak_mb_hooks": timing["hooks"][1],
                         "peak_mb_loop": timing["loop"][1]})
            r = rows[-1]
            print(f"{size:6s} {dtype:4s} {args.device:4s} hooks {r['hooks_rows_per_s']:8.1f} "
                  f"rows/s  loop {r['loop_rows_per_s']:8.1f} rows/s  x{r['speedup']:.1f}  "
                  f"|dcos| {dcos:.1e}  projected on device "
                  f"{r['project_on_device_rows_per_s']:8.1f} / on host "
                  f"{r['project_on_host_rows_per_s']:8.1f} rows/s  "
                  f"query {latency * 1000:.0f} ms over "
                  f"{args.store_rows:,} rows  peak {r['peak_mb_hooks']:.0f} MB", flush=True)
            del lm
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="tiny,large")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--store-rows", type=int, default=1_000_000)
    ap.add_argument("--out", default="bench/results/gpu.json")
    args = ap.parse_args()
    table = [row for size in args.sizes.split(",") for row in measure(size, args)]
    Path(args.out).write_text(json.dumps(with_provenance({"rows": table}), indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
