"""Benchmarks for the gradient index (issue 3). Prints a table, writes JSON.

    .venv/bin/python bench/gradient_index.py [--rows 200] [--sizes 10000,100000,1000000]

1. featurization: batched (vmap) vs per-row loop on the same demo rows, rows/s and the max
   |cosine difference| of the unprojected gradients;
2. projection fidelity: top-10 overlap of projected vs exact cosine rankings, vs K;
3. query latency over synthetic memory-mapped stores vs the time to read them once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from datablame.features.projection import RandomProjector


def featurization(root: Path, n_rows: int) -> dict:
    from datablame.adapters.hf_causal_lm import CausalLMAdapter
    from datablame.demo import DemoConfig, build_assets
    from datablame.rows import load_rows
    from datablame.template import PromptTemplate

    build_assets(root, DemoConfig())
    rows = load_rows(root / "train.jsonl").records[:n_rows]
    tmpl = PromptTemplate()
    texts = [tmpl.format(r) for r in rows]
    model = CausalLMAdapter(root / "base", root / "adapter", device="cpu", max_length=128)
    model.gradients(texts[:8], strategy="vmap")  # warm-up
    t = time.perf_counter()
    batched = model.gradients(texts, batch_size=16, strategy="vmap")
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    loop = model.gradients(texts, batch_size=16, strategy="loop")
    t_loop = time.perf_counter() - t
    cos = lambda g: g / np.linalg.norm(g, axis=1, keepdims=True)  # noqa: E731
    q = cos(batched)[:20]
    diff = float(np.max(np.abs(q @ cos(batched).T - cos(loop)[:20] @ cos(loop).T)))
    return {"rows": len(texts), "params": model.num_params,
            "batched_rows_per_s": len(texts) / t_batched, "loop_rows_per_s": len(texts) / t_loop,
            "speedup": t_loop / t_batched, "max_abs_cosine_diff": diff, "grads": batched}


def fidelity(grads: np.ndarray, ks=(256, 512, 1024, 2048, 4096)) -> list[dict]:
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    exact = unit @ unit.T
    out = []
    for k in ks:
        p = RandomProjector(grads.shape[1], k, seed=0).project(grads)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        approx = p @ p.T
        overlaps = []
        for i in range(len(grads)):
            e = set(np.argsort(-np.delete(exact[i], i))[:10])
            a = set(np.argsort(-np.delete(approx[i], i))[:10])
            overlaps.append(len(e & a) / 10)
        out.append({"K": k, "top10_overlap": float(np.mean(overlaps)),
                    "max_abs_cosine_err": float(np.max(np.abs(approx - exact)))})
    return out


def latency(sizes: list[int], k: int, shard_rows: int = 16384) -> list[dict]:
    from datablame.store.gradient_store import GradientStore

    out = []
    rng = np.random.default_rng(0)
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=".") as tmp:
            path = Path(tmp) / "gradients"
            path.mkdir()
            shards, norms = [], []
            for s, lo in enumerate(range(0, n, shard_rows)):
                hi = min(n, lo + shard_rows)
                block = rng.standard_normal((hi - lo, k), dtype=np.float32).astype(np.float16)
                f = path / f"shard-{s:05d}.npy"
                np.save(f, block)
                norms.append(np.linalg.norm(block.astype(np.float32), axis=1))
                shards.append({"file": f.name, "rows": [lo, hi], "bytes": f.stat().st_size,
                               "sha256": ""})
            np.save(path / "norms.npy", np.concatenate(norms))
            store = GradientStore(path, {"shards": shards, "proj_dim": k})
            q = rng.standard_normal(k).astype(np.float32)
            store.top_k(q, 50)  # warm page cache
            t = time.perf_counter()
            total = 0
            for sh in shards:  # read the store once from page cache
                total += int(np.asarray(np.load(path / sh["file"], mmap_mode="r")).sum() != 0)
            t_read = time.perf_counter() - t
            t = time.perf_counter()
            store.top_k(q, 50)
            t_query = time.perf_counter() - t
            out.append({"rows": n, "K": k, "store_MB": sum(s["bytes"] for s in shards) / 2**20,
                        "query_s": t_query, "read_once_s": t_read,
                        "ratio": t_query / t_read})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--workdir", default=".datablame-cache/demo")
    ap.add_argument("--out", default="bench/results/gradient_index.json")
    args = ap.parse_args()

    feat = featurization(Path(args.workdir), args.rows)
    fid = fidelity(feat.pop("grads"))
    lat = latency([int(s) for s in args.sizes.split(",")], args.proj_dim)

    print("\nfeaturization (same rows, same model)")
    print(f"  rows={feat['rows']} params={feat['params']:,}  batched "
          f"{feat['batched_rows_per_s']:.1f} rows/s  loop {feat['loop_rows_per_s']:.1f} "
          f"rows/s  speedup {feat['speedup']:.1f}x  "
          f"max|dcos| {feat['max_abs_cosine_diff']:.2e}")
    print("\nprojection fidelity (top-10 overlap with exact cosine)")
    for r in fid:
        print(f"  K={r['K']:5d}  overlap {r['top10_overlap']:.3f}  "
              f"max|dcos| {r['max_abs_cosine_err']:.3f}")
    print("\nquery latency (fp16 memory-mapped shards)")
    for r in lat:
        print(f"  rows={r['rows']:8d} K={r['K']}  {r['store_MB']:8.0f} MB  query "
              f"{r['query_s']:.3f}s  read-once {r['read_once_s']:.3f}s  ratio {r['ratio']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"featurization": feat, "fidelity": fid,
                                          "latency": lat}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
