"""What a query costs through the default store of both vectors, against the plain store,
on the same rows (issue 11's store; issue 15's scan). Table + JSON.

    .venv/bin/python bench/both_scan.py [--rows 100000] [--dim 2048] [--queries 32]

Two synthetic fp16 stores of the same rows, read from the page cache (a warm-up pass
first): a plain one (rows x K) and one of both vectors (rows x 2K, unit halves, as
`index --gradients` writes it by default). One query as `trace --all-rows` scans them:
the plain store in one pass; the store of both vectors in one pass where the answer reads
as memorised (the plain column, by |score|) and two where the gradient is strong (then the
mix's column). A queries file: `top_k_many` over the plain store (one column per query)
and over the store of both vectors (three columns per query, one pass). Both stores'
exact top-k lists are checked against a float64 brute force. Ratios hold on a noisy
machine; absolute times do not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from gradient_scan import _best
from provenance import with_provenance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _store(root: Path, vectors: np.ndarray, shard_rows: int, proj_dim: int, both: bool):
    from datablame.store.gradient_store import GradientStore

    root.mkdir()
    shards = []
    for s, lo in enumerate(range(0, len(vectors), shard_rows)):
        hi = min(lo + shard_rows, len(vectors))
        np.save(root / f"shard-{s:05d}.npy", vectors[lo:hi])
        shards.append({"file": f"shard-{s:05d}.npy", "rows": [lo, hi]})
    np.save(root / "norms.npy", np.linalg.norm(vectors.astype(np.float32), axis=1))
    return GradientStore(root, {"shards": shards, "proj_dim": proj_dim,
                                **({"curvature": {"vectors": "both"}} if both else {})})


def main() -> None:
    from datablame.features.curvature import both_vectors, query_vector

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--shard-rows", type=int, default=65_536)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/both_scan.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    plain = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    whitened = plain + rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    qp = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    qw = qp + rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        flat = _store(Path(tmp) / "plain", plain.astype(np.float16), args.shard_rows,
                      args.dim, False)
        both_rows = both_vectors(plain, whitened).astype(np.float16)
        both = _store(Path(tmp) / "both", both_rows, args.shard_rows, args.dim, True)
        mixed, alone = query_vector(qp, qw, 0.75), query_vector(qp, qw, 0.0)
        for store, q in ((flat, qp[0]), (both, alone[0])):  # warm the page cache
            store.top_k(q, args.k)
        k = args.k
        t_plain, (p_ids, _) = _best(lambda: flat.top_k(qp[0], k, "cosine", absolute=True),
                                    args.reps)
        t_memo, (m_ids, _) = _best(lambda: both.top_k(alone[0], k, "dot", absolute=True),
                                   args.reps)
        t_mix, (x_ids, _) = _best(lambda: both.top_k(mixed[0], k, "dot", absolute=True),
                                  args.reps)
        columns = np.stack([mixed, alone, -alone], axis=1).reshape(-1, 2 * args.dim)
        t_many_plain, _ = _best(lambda: flat.top_k_many(qp, k, "cosine", absolute=True),
                                args.reps)
        t_many_both, _ = _best(lambda: both.top_k_many(columns, k, "dot", absolute=True),
                               args.reps)
    # exact lists: the same rows as a float64 brute force over the stored fp16 vectors
    stored = both_rows.astype(np.float64)
    for ids, q in ((m_ids, alone[0]), (x_ids, mixed[0])):
        brute = np.argsort(-np.abs(stored @ q), kind="stable")[:k]
        assert set(ids.tolist()) == set(brute.tolist()), "scan disagrees with brute force"
    p16 = plain.astype(np.float16).astype(np.float64)
    cos = (p16 @ qp[0]) / np.linalg.norm(p16, axis=1) / np.linalg.norm(qp[0])
    assert set(p_ids.tolist()) == set(np.argsort(-np.abs(cos), kind="stable")[:k].tolist())
    table = [
        {"scan": "plain store, one query (one pass)", "seconds": t_plain, "x plain": 1.0},
        {"scan": "both vectors, one query, memorised regime (one pass)", "seconds": t_memo,
         "x plain": t_memo / t_plain},
        {"scan": "both vectors, one query, mixed regime (two passes)",
         "seconds": t_memo + t_mix, "x plain": (t_memo + t_mix) / t_plain},
        {"scan": f"plain store, {args.queries} queries (one pass), per query",
         "seconds": t_many_plain / args.queries, "x plain": t_many_plain / args.queries
         / t_plain},
        {"scan": f"both vectors, {args.queries} queries x 3 columns (one pass), per query",
         "seconds": t_many_both / args.queries, "x plain": t_many_both / args.queries
         / t_plain},
    ]
    print(f"{args.rows} rows, K = {args.dim}, top {k}; plain store "
          f"{args.rows * args.dim * 2 / 1e9:.2f} GB, both vectors "
          f"{args.rows * args.dim * 4 / 1e9:.2f} GB")
    for r in table:
        print(f"{r['scan']:70s} {r['seconds']:8.3f} s  x{r['x plain']:.2f}")
    Path(args.out).write_text(json.dumps(with_provenance(
        {"rows": args.rows, "dim": args.dim, "k": k, "queries": args.queries,
         "table": table}), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
