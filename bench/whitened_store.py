"""What `index --gradients --curvature ekfac` costs over a plain gradient store, on the same
rows, model and shards (issue 11's whitened store). Table + JSON.

    .venv/bin/python bench/whitened_store.py [--rows 2000 8000]

Per row count: the plain build, the whitened build (its curvature fit timed apart: one
true-Fisher EK-FAC on at most 4,096 evenly spaced rows) and the curvature file's size.
Then how far the whitened store's projected cosines sit from the exact whitened cosines
(the projection's error, K = 2048) over every pair of the demo's own rows. Model: the
demo's tiny GPT-2 + LoRA (`.datablame-cache/demo`, made by `make demo`), LoRA-B
parameters (the store's default).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from index_memory import rows as make_rows
from provenance import with_provenance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--out", default="bench/results/whitened_store.json")
    args = ap.parse_args()
    from datablame.data.rows import load_rows
    from datablame.data.template import PromptTemplate
    from datablame.features import curvature
    from datablame.features.gradients import build_gradient_store
    from datablame.models.hf_causal_lm import CausalLMAdapter
    from datablame.store.gradient_store import GradientStore

    demo = ROOT / ".datablame-cache" / "demo"
    model = CausalLMAdapter(demo / "base", demo / "adapter")
    tmpl = PromptTemplate()
    table = []
    for n in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "train.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n)))
            rows = load_rows(data)
            t = time.perf_counter()
            build_gradient_store(Path(tmp) / "plain", rows, tmpl, model)
            plain_s = time.perf_counter() - t
            plan = curvature.curvature_plan("ekfac", n, 0, model)
            sample = curvature.sample_rows(n)
            t = time.perf_counter()
            curvature.fit_curvature(model, [tmpl.format(rows.records[int(i)])
                                            for i in sample], plan)
            fit_s = time.perf_counter() - t
            t = time.perf_counter()
            build_gradient_store(Path(tmp) / "whitened", rows, tmpl, model, curvature="ekfac")
            whitened_s = time.perf_counter() - t
            store = GradientStore.load(Path(tmp) / "whitened")
            table.append({"rows": n, "plain build s": plain_s, "whitened build s": whitened_s,
                          "of which curvature fit s": fit_s,
                          "fit rows": int(len(sample)), "draws per row": plan["draws_per_row"],
                          "curvature bytes": store.manifest["curvature"]["bytes"],
                          "lora-b params": model.num_params})
    # the projection's error on whitened cosines, on the demo's own rows (the generated
    # rows above are mostly out of the demo tokenizer's vocabulary: near-identical texts)
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_rows(demo / "train.jsonl")
        build_gradient_store(Path(tmp), rows, tmpl, model, curvature="ekfac")
        store = GradientStore.load(Path(tmp))
        texts = [tmpl.format(r) for r in rows.records]
        w = store.curvature.whiten(model.gradients(texts, batch_size=32)).numpy()
        w = w.astype(np.float64) / np.linalg.norm(w, axis=1, keepdims=True)
        stored = np.concatenate([np.load(Path(tmp) / "gradients" / s["file"])
                                 for s in store.manifest["shards"]]).astype(np.float64)
        p = stored / np.linalg.norm(stored, axis=1, keepdims=True)
        error = np.abs(p @ p.T - w @ w.T)[np.triu_indices(len(texts), 1)]
        projection = {"rows": len(texts), "K": store.manifest["proj_dim"],
                      "median |projected - exact| whitened cosine": float(np.median(error)),
                      "max |projected - exact| whitened cosine": float(error.max())}
    print(f"{'rows':>6s} {'plain s':>8s} {'whitened s':>11s} {'fit s':>6s} {'ratio':>6s} "
          f"{'curvature KB':>13s}")
    for r in table:
        print(f"{r['rows']:6d} {r['plain build s']:8.1f} {r['whitened build s']:11.1f} "
              f"{r['of which curvature fit s']:6.1f} "
              f"{r['whitened build s'] / r['plain build s']:6.2f} "
              f"{r['curvature bytes'] / 1024:13.0f}")
    print(f"projection error on whitened cosines, all pairs of the demo's {projection['rows']} "
          f"rows, K = {projection['K']}: median "
          f"{projection['median |projected - exact| whitened cosine']:.4f}, max "
          f"{projection['max |projected - exact| whitened cosine']:.4f}")
    Path(args.out).write_text(json.dumps(with_provenance({"table": table,
                                                          "projection": projection}),
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
