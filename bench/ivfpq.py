"""Retrieval for large data (issue 15, "retrieval at 1B"): the `ivfpq` index against the
exact flat one on the same vectors. Table + JSON.

    .venv/bin/python bench/ivfpq.py [--rows 100000] [--dim 384] [--shard-rows 25000]

Synthetic clustered unit vectors stand in for embeddings (the embedder's cost is the same
for every index type and is not measured here); rows are a JSONL whose text looks up its
vector. Measured:
  - build seconds: the flat index (FAISS IndexFlatIP + float32 embeddings.npy) vs
    `save_ivfpq_index` (train on a sample, one piece per shard, merge the inverted lists
    on disk);
  - bytes on disk per row, split into what a query reads at random (the lists: codes and
    ids) and the fp16 embeddings the re-rank reads for ~10 k candidates;
  - the merged on-disk index against one IVF-PQ index holding every row in memory (same
    trained quantizers): identical ids and distances, or not;
  - recall@10 of the flat index's neighbours, and milliseconds per query (one query at a
    time, the lists and shards in page cache).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import with_provenance


def clustered(n: int, dim: int, seed: int, topics: int) -> np.ndarray:
    """Topics, and sub-topics within them: a row's nearest neighbours share its sub-topic
    (cosine ~0.8), the rest of its topic is further (~0.5)."""
    rng = np.random.default_rng(0)  # the same topics for rows and queries
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    subs = centres.repeat(10, 0) + 0.8 * rng.normal(size=(topics * 10, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = subs[rng.integers(0, len(subs), n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    import faiss

    from datablame.data.rows import load_rows
    from datablame.data.template import PromptTemplate
    from datablame.store import retrieval_index as ri

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--shard-rows", type=int, default=25_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default="bench/results/ivfpq.json")
    args = ap.parse_args()
    topics = max(1, args.rows // 1000)
    vectors = clustered(args.rows, args.dim, 0, topics)
    queries = clustered(args.queries, args.dim, 1, topics)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "rows.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"r{i}", "output": "x"}) + "\n"
                                for i in range(args.rows)))
        rows, tmpl = load_rows(path), PromptTemplate()
        where = {t: i for i, t in enumerate(rows.texts(tmpl))}

        def embed(texts):
            return vectors[[where[t] for t in texts]]

        t = time.perf_counter()
        ri.save_index(tmp / "flat", vectors, rows, tmpl, "synthetic", "flat")
        flat_s = time.perf_counter() - t
        t = time.perf_counter()
        ri.save_ivfpq_index(tmp / "pq", rows, tmpl, embed, "synthetic",
                            shard_rows=args.shard_rows)
        pq_s = time.perf_counter() - t
        flat, pq = ri.load_index(tmp / "flat"), ri.load_index(tmp / "pq")
        size = {p.name: p.stat().st_size for p in (tmp / "pq").iterdir()}
        lists = size["lists.ivfdata"]
        shards = sum(v for k, v in size.items() if k.startswith("embeddings-"))
        flat_bytes = sum(p.stat().st_size for p in (tmp / "flat").iterdir())

        # one index with every row, the same trained quantizers: the merge must equal it
        n_sample = min(args.rows, ri.IVFPQ_TRAIN_ROWS)
        ids = np.unique(np.linspace(0, args.rows - 1, n_sample).astype(np.int64))
        whole = ri.train_ivfpq(vectors[ids], args.rows)
        whole.add_with_ids(vectors, np.arange(args.rows, dtype=np.int64))
        whole.nprobe = pq.index.nprobe
        want_d, want_i = whole.search(queries, 100)
        got_d, got_i = pq.index.search(queries, 100)
        identical = bool((want_i == got_i).all() and (want_d == got_d).all())

        truth = flat.search(queries, 10)[1]

        def timed(index) -> tuple[float, np.ndarray]:
            index.search(queries[:5], 10)  # warm
            t = time.perf_counter()
            found = np.vstack([index.search(q[None], 10)[1] for q in queries])
            return (time.perf_counter() - t) / len(queries) * 1000, found

        flat_ms, _ = timed(flat)
        sweep = []
        nlist = pq.index.nlist
        for nprobe in sorted({max(1, nlist // 32), pq.index.nprobe, max(1, nlist // 2)}):
            pq.index.nprobe = nprobe
            ms, found = timed(pq)
            no_rerank = pq.index.search(queries, 10)[1]
            sweep.append({"nprobe": nprobe, "ms per query": ms, "recall@10": float(np.mean(
                [len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])),
                "recall@10 without re-rank": float(np.mean(
                    [len(set(a) & set(b)) / 10 for a, b in zip(no_rerank, truth,
                                                              strict=True)]))})
        faiss_threads = faiss.omp_get_max_threads()
    table = [{"index": "flat (exact)", "build s": flat_s,
              "bytes per row": flat_bytes / args.rows, "ms per query": flat_ms,
              "recall@10": 1.0, "recall@10 without re-rank": 1.0}]
    default = pq.manifest["ivfpq"]["nprobe"]
    for r in sweep:
        table.append({"index": f"ivfpq, {nlist} lists, nprobe {r['nprobe']}"
                               + (" (default)" if r["nprobe"] == default else ""),
                      "build s": pq_s, "bytes per row": (lists + shards) / args.rows, **r})
    print(f"{args.rows} rows x {args.dim}, shards of {args.shard_rows}, FAISS threads "
          f"{faiss_threads}")
    print(f"{'index':42s} {'build s':>8s} {'B/row':>7s} {'ms/query':>9s} {'recall@10':>9s} "
          f"{'(no re-rank)':>12s}")
    for r in table:
        print(f"{r['index']:42s} {r['build s']:8.1f} {r['bytes per row']:7.0f} "
              f"{r['ms per query']:9.2f} {r['recall@10']:9.3f} "
              f"{r['recall@10 without re-rank']:12.3f}")
    print(f"ivfpq lists {lists / args.rows:.0f} B/row (codes + ids), fp16 shards "
          f"{shards / args.rows:.0f} B/row; merged on disk == one in-memory index: "
          f"{identical}")
    out = {"rows": args.rows, "dim": args.dim, "shard_rows": args.shard_rows,
           "queries": args.queries, "table": table, "lists_bytes_per_row": lists / args.rows,
           "fp16_bytes_per_row": shards / args.rows,
           "merged_equals_one_index": identical, "ivfpq": pq.manifest["ivfpq"]}
    Path(args.out).write_text(json.dumps(with_provenance(out), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
