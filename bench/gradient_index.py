"""Benchmarks for the gradient index (issue 3). Prints a table, writes JSON.

    .venv/bin/python bench/gradient_index.py [--rows 200] [--sizes 10000,100000,1000000]

1. featurization: batched (hooks, vmap) vs per-row loop on the same demo rows, rows/s and
   the max |cosine difference| of the unprojected gradients; then a whole index build's
   rate (gradients + projection to K) with the sparse and the dense projection;
2. projection fidelity: top-10 overlap of projected vs exact cosine rankings, vs K, for
   both projection kinds;
3. query latency over synthetic memory-mapped stores vs the time to read them once.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from provenance import with_provenance

from datablame.features.projection import PROJECTIONS, make_projector


def _cos(g: np.ndarray) -> np.ndarray:
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def featurization(root: Path, n_rows: int, long_words: int, proj_dim: int
                  ) -> tuple[list[dict], list[dict], np.ndarray]:
    """Each strategy on the same rows: the demo rows as they are, and long rows whose
    response joins several rows' outputs (a more realistic sequence length)."""
    from datablame.data.rows import load_rows
    from datablame.data.template import PromptTemplate
    from datablame.demo.demo import DemoConfig, build_assets
    from datablame.models.hf_causal_lm import CausalLMAdapter

    build_assets(root, DemoConfig())
    records = load_rows(root / "train.jsonl").records
    tmpl = PromptTemplate()
    short = [tmpl.format(r) for r in records[:n_rows]]
    long = []
    for i in range(n_rows // 2):
        outs, j = [], i
        while sum(len(o.split()) for o in outs) < long_words:
            outs.append(records[j % len(records)]["output"])
            j += 7
        long.append(tmpl.format({**records[i], "output": " ".join(outs)}))
    # every LoRA matrix (131k parameters), as in the numbers quoted in the README
    model = CausalLMAdapter(root / "base", root / "adapter", device="cpu", max_length=512,
                            params="lora")
    results, build, keep = [], [], None
    for label, texts in (("demo rows", short), ("long rows", long)):
        tokens = float(np.mean([len(model.tokenizer(t.text)["input_ids"]) for t in texts]))
        grads, times = {}, {}
        for strategy, bs in (("hooks", 32), ("vmap", 16), ("loop", 16)):
            model.gradients(texts[:4], batch_size=4, strategy=strategy)  # warm-up
            t = time.perf_counter()
            grads[strategy] = model.gradients(texts, batch_size=bs, strategy=strategy)
            times[strategy] = time.perf_counter() - t
        proj_s = {}
        for kind in PROJECTIONS:
            proj = make_projector(kind, model.num_params, proj_dim, seed=0)
            proj.project(grads["hooks"][:2])  # generate (and cache) the map once
            t = time.perf_counter()
            for b in range(0, len(texts), 32):
                proj.project(grads["hooks"][b : b + 32])
            proj_s[kind] = time.perf_counter() - t
        for strategy, kind in (("hooks", "countsketch"), ("hooks", "rademacher"),
                               ("loop", "countsketch"), ("loop", "rademacher")):
            build.append({"rows": label, "n": len(texts), "strategy": strategy,
                          "projection": kind, "K": proj_dim,
                          "grad_s": times[strategy], "proj_s": proj_s[kind],
                          "rows_per_s": len(texts) / (times[strategy] + proj_s[kind])})
        ref = _cos(grads["loop"])
        for strategy in ("hooks", "vmap", "loop"):
            c = _cos(grads[strategy])
            results.append({
                "rows": label, "n": len(texts), "mean_tokens": tokens,
                "params": model.num_params, "strategy": strategy,
                "rows_per_s": len(texts) / times[strategy],
                "speedup_vs_loop": times["loop"] / times[strategy],
                "max_abs_cosine_diff_vs_loop": float(np.max(np.abs(c[:20] @ c.T -
                                                                   ref[:20] @ ref.T))),
            })
        if keep is None:
            keep = grads["hooks"]
    return results, build, keep


def fidelity(grads: np.ndarray, ks=(256, 512, 1024, 2048, 4096)) -> list[dict]:
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    exact = unit @ unit.T
    out = []
    for kind in PROJECTIONS:
        for k in ks:
            p = make_projector(kind, grads.shape[1], k, seed=0).project(grads)
            p /= np.linalg.norm(p, axis=1, keepdims=True)
            approx = p @ p.T
            overlaps = []
            for i in range(len(grads)):
                e = set(np.argsort(-np.delete(exact[i], i))[:10])
                a = set(np.argsort(-np.delete(approx[i], i))[:10])
                overlaps.append(len(e & a) / 10)
            out.append({"projection": kind, "K": k, "top10_overlap": float(np.mean(overlaps)),
                        "max_abs_cosine_err": float(np.max(np.abs(approx - exact)))})
    return out


def _rss_anon_mb() -> float:
    """Anonymous (heap) resident memory: what a query allocates, not the page cache."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_during(fn) -> tuple[float, float]:
    """(seconds, peak anonymous RSS growth in MB) of fn(), sampled every 2 ms."""
    import threading

    base, peak, done = _rss_anon_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_mb() - base)
            done.wait(0.002)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t
    done.set()
    th.join()
    return elapsed, max(peak[0], _rss_anon_mb() - base)


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
            t_query, peak_mb = _peak_rss_during(partial(store.top_k, q, 50))
            out.append({"rows": n, "K": k, "store_MB": sum(s["bytes"] for s in shards) / 2**20,
                        "query_s": t_query, "read_once_s": t_read,
                        "ratio": t_query / t_read, "peak_heap_growth_MB": peak_mb,
                        "shard_fp32_MB": shard_rows * k * 4 / 2**20})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--long-words", type=int, default=60)
    ap.add_argument("--workdir", default=".datablame-cache/demo")
    ap.add_argument("--out", default="bench/results/gradient_index.json")
    args = ap.parse_args()

    feat, build, grads = featurization(Path(args.workdir), args.rows, args.long_words,
                                       args.proj_dim)
    fid = fidelity(grads)
    lat = latency([int(s) for s in args.sizes.split(",")], args.proj_dim)

    print("\nfeaturization (same rows, same model, LoRA params)")
    print(f"  {'rows':10s} {'tokens':>6s} {'strategy':8s} {'rows/s':>8s} {'x loop':>7s} "
          f"{'max|dcos|':>10s}")
    for r in feat:
        print(f"  {r['rows']:10s} {r['mean_tokens']:6.0f} {r['strategy']:8s} "
              f"{r['rows_per_s']:8.1f} {r['speedup_vs_loop']:7.1f} "
              f"{r['max_abs_cosine_diff_vs_loop']:10.2e}")
    print(f"\nindex build: gradients + projection to K={args.proj_dim} (same rows)")
    print(f"  {'rows':10s} {'strategy':8s} {'projection':12s} {'grad s':>7s} {'proj s':>7s} "
          f"{'rows/s':>8s}")
    for r in build:
        print(f"  {r['rows']:10s} {r['strategy']:8s} {r['projection']:12s} {r['grad_s']:7.2f} "
              f"{r['proj_s']:7.2f} {r['rows_per_s']:8.1f}")
    print("\nprojection fidelity (top-10 overlap with exact cosine)")
    for r in fid:
        print(f"  {r['projection']:12s} K={r['K']:5d}  overlap {r['top10_overlap']:.3f}  "
              f"max|dcos| {r['max_abs_cosine_err']:.3f}")
    print("\nquery latency (fp16 memory-mapped shards)")
    for r in lat:
        print(f"  rows={r['rows']:8d} K={r['K']}  {r['store_MB']:8.0f} MB  query "
              f"{r['query_s']:.3f}s  read-once {r['read_once_s']:.3f}s  ratio {r['ratio']:.2f}  "
              f"heap +{r['peak_heap_growth_MB']:.0f} MB (one fp32 shard "
              f"{r['shard_fp32_MB']:.0f} MB)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(with_provenance(
        {"featurization": feat, "index_build": build, "fidelity": fid, "latency": lat}),
        indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
