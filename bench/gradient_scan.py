"""Query scan over a gradient store (issue 15, "queries at bandwidth"). Table + JSON.

    .venv/bin/python bench/gradient_scan.py [--rows 200000] [--dim 2048] [--queries 32]

One synthetic fp16 store (default 200k rows x 2048 = 0.82 GB, the size issue 15 quotes),
read from the page cache (a warm-up pass first), scored by:
  - the scan before this change (numpy: a whole shard converted to float32, one GEMV);
  - `GradientStore.top_k`: an fp16 product per block bounds every row's score, and only
    rows that may reach the top k are converted and scored exactly (one query);
  - `GradientStore.top_k_many` with --queries queries (one GEMM per block), per query;
  - the fp16 GEMM products of those queries alone: what a batch first pass in fp16 would
    spend before filtering anything (if it is slower than the whole float32 scan, the
    one-query first pass does not carry over to batches on this CPU);
  - both again with --scan-workers threads over groups of shards (merged exact top-k);
  - FAISS's exact fp16 flat scan (IndexScalarQuantizer QT_fp16, inner product) for
    reference: it ranks by dot product only (no per-row norm), so it cannot serve cosine.
Every exact path returns the same top-k (checked). Ratios hold on a noisy machine;
absolute GB/s do not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import with_provenance


def _best(fn, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _old_scan(store, q: np.ndarray, k: int) -> np.ndarray:
    """The loop top_k ran before: a whole shard to float32 by numpy, then a GEMV."""
    from datablame.methods.gradient_alignment import align_dots

    norms = np.load(store.path / "norms.npy", mmap_mode="r")
    qn = float(np.linalg.norm(q))
    best = []
    for shard in store.manifest["shards"]:
        lo, hi = shard["rows"]
        block = np.load(store.path / shard["file"], mmap_mode="r")
        scores = align_dots(np.asarray(block, dtype=np.float32) @ q, norms[lo:hi], qn,
                            "cosine")
        idx = np.argpartition(-scores, k - 1)[:k]
        best += [(scores[i], lo + int(i)) for i in idx]
    return np.array([r for _, r in sorted(best, reverse=True)[:k]])


def main() -> None:
    import faiss

    from datablame.store.gradient_store import GradientStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--shard-rows", type=int, default=65_536)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scan-workers", type=int, default=2)
    ap.add_argument("--out", default="bench/results/gradient_scan.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, norms = [], []
        for s, lo in enumerate(range(0, args.rows, args.shard_rows)):
            hi = min(lo + args.shard_rows, args.rows)
            block = rng.standard_normal((hi - lo, args.dim), dtype=np.float32)
            block = block.astype(np.float16)
            np.save(root / f"shard-{s:05d}.npy", block)
            norms.append(np.linalg.norm(block.astype(np.float32), axis=1))
            shards.append({"file": f"shard-{s:05d}.npy", "rows": [lo, hi]})
        np.save(root / "norms.npy", np.concatenate(norms))
        store = GradientStore(root, {"shards": shards, "proj_dim": args.dim})
        gb = args.rows * args.dim * 2 / 1e9
        queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        q = queries[0]
        _old_scan(store, q, args.k)  # warm the page cache

        t_old, old_ids = _best(lambda: _old_scan(store, q, args.k), args.reps)
        t_one, (one_ids, _) = _best(lambda: store.top_k(q, args.k), args.reps)
        t_many, many = _best(lambda: store.top_k_many(queries, args.k), args.reps)
        assert list(old_ids) == list(one_ids) == list(many[0][0]), "scans disagree"
        t_split, (split_ids, _) = _best(lambda: store.top_k(q, args.k,
                                                           workers=args.scan_workers),
                                        args.reps)
        t_split_many, split_many = _best(lambda: store.top_k_many(
            queries, args.k, workers=args.scan_workers), args.reps)
        assert list(split_ids) == list(one_ids) and all(
            list(a[0]) == list(b[0]) for a, b in zip(split_many, many, strict=True)), \
            "split scan disagrees"

        # what a batch first pass in fp16 would cost before any filtering: the products
        # alone (torch's fp16 GEMM on this CPU), to compare with top_k_many's whole scan
        import torch

        q16 = torch.from_numpy(queries.T.copy()).half()

        def fp16_products():
            for shard in shards:
                block = np.load(root / shard["file"], mmap_mode="c")
                for start in range(0, len(block), 16384):
                    torch.from_numpy(block[start:start + 16384]) @ q16
        t_fp16_many, _ = _best(fp16_products, args.reps)

        index = faiss.IndexScalarQuantizer(args.dim, faiss.ScalarQuantizer.QT_fp16,
                                           faiss.METRIC_INNER_PRODUCT)
        for shard in shards:  # fp16 codes are the vectors' own bytes
            codes = np.load(root / shard["file"]).view(np.uint8).reshape(-1)
            index.add_sa_codes(codes.reshape(shard["rows"][1] - shard["rows"][0], -1))
        t_faiss, _ = _best(lambda: index.search(q[None], args.k), args.reps)
        t_faiss_many, _ = _best(lambda: index.search(queries, args.k), args.reps)

    rows = [
        {"scan": "before: numpy float32 conversion + GEMV (cosine)", "seconds": t_old,
         "GB/s": gb / t_old, "per query vs one query": 1.0},
        {"scan": "top_k: fp16 first pass + exact re-score (cosine)", "seconds": t_one,
         "GB/s": gb / t_one, "per query vs one query": 1.0},
        {"scan": f"top_k_many: {args.queries} queries, one GEMM per block (cosine)",
         "seconds": t_many, "GB/s": gb * args.queries / t_many,
         "per query vs one query": t_many / args.queries / t_one},
        {"scan": f"{args.queries} queries, fp16 GEMM products alone (no top-k)",
         "seconds": t_fp16_many, "GB/s": gb * args.queries / t_fp16_many,
         "per query vs one query": t_fp16_many / args.queries / t_one},
        {"scan": f"top_k, {args.scan_workers} scan workers (threads over shard groups)",
         "seconds": t_split, "GB/s": gb / t_split, "per query vs one query": 1.0},
        {"scan": f"top_k_many, {args.queries} queries, {args.scan_workers} scan workers",
         "seconds": t_split_many, "GB/s": gb * args.queries / t_split_many,
         "per query vs one query": t_split_many / args.queries / t_one},
        {"scan": "FAISS SQ fp16 flat, 1 query (dot only)", "seconds": t_faiss,
         "GB/s": gb / t_faiss, "per query vs one query": 1.0},
        {"scan": f"FAISS SQ fp16 flat, {args.queries} queries (dot only)",
         "seconds": t_faiss_many, "GB/s": gb * args.queries / t_faiss_many,
         "per query vs one query": t_faiss_many / args.queries / t_faiss},
    ]
    print(f"store: {args.rows} rows x {args.dim} fp16 = {gb:.2f} GB, k = {args.k}")
    print(f"{'scan':64s} {'seconds':>8s} {'GB/s':>7s} {'per-query x':>11s}")
    for r in rows:
        print(f"{r['scan']:64s} {r['seconds']:8.3f} {r['GB/s']:7.2f} "
              f"{r['per query vs one query']:11.3f}")
    print(f"top_k vs before: {t_old / t_one:.2f}x faster; {args.queries} queries in one "
          f"pass: {t_many / t_one:.2f}x one query's time; {args.scan_workers} scan workers: "
          f"{t_one / t_split:.2f}x (1 query), {t_many / t_split_many:.2f}x ({args.queries})")
    out = {"rows": args.rows, "dim": args.dim, "gb": gb, "k": args.k,
           "queries": args.queries, "table": rows,
           "speedup_top_k_vs_before": t_old / t_one,
           "many_queries_time_vs_one": t_many / t_one,
           "fp16_gemm_products_vs_many_queries_scan": t_fp16_many / t_many,
           "scan_workers": args.scan_workers,
           "speedup_scan_workers_one_query": t_one / t_split,
           "speedup_scan_workers_many_queries": t_many / t_split_many}
    Path(args.out).write_text(json.dumps(with_provenance(out), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
