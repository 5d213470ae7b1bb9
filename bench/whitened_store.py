"""What `index --gradients --curvature ekfac` costs over a plain gradient store, on the same
rows, model and shards (issue 11's whitened store). Table + JSON.

    .venv/bin/python bench/whitened_store.py [--rows 2000 8000]

Per row count: the plain build, the whitened build (its curvature fit timed apart: one
true-Fisher EK-FAC on at most 4,096 evenly spaced rows), the curvature file's size, and
how far the whitened store's projected cosines sit from the exact whitened cosines (the
projection's error, K = 2048) for 200 row pairs. Model: the demo's tiny GPT-2 + LoRA
(`.datablame-cache/demo`, made by `make demo`), LoRA-B parameters (the store's default).
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
            ek = store.curvature
            pick = np.random.default_rng(0).choice(n, 200, replace=False)
            w = ek.whiten(model.gradients([tmpl.format(rows.records[int(i)]) for i in pick],
                                          batch_size=32)).numpy().astype(np.float64)
            w /= np.linalg.norm(w, axis=1, keepdims=True)
            exact = w[:100] @ w[100:].T
            stored = np.concatenate([np.load(Path(tmp) / "whitened" / "gradients" / s["file"])
                                     for s in store.manifest["shards"]]).astype(np.float64)
            p = stored[pick] / np.linalg.norm(stored[pick], axis=1, keepdims=True)
            projected = p[:100] @ p[100:].T
            table.append({"rows": n, "plain build s": plain_s, "whitened build s": whitened_s,
                          "of which curvature fit s": fit_s,
                          "fit rows": int(len(sample)), "draws per row": plan["draws_per_row"],
                          "curvature bytes": store.manifest["curvature"]["bytes"],
                          "lora-b params": model.num_params,
                          "max |projected - exact| whitened cosine":
                              float(np.abs(projected - exact).max())})
    print(f"{'rows':>6s} {'plain s':>8s} {'whitened s':>11s} {'fit s':>6s} {'ratio':>6s} "
          f"{'curvature KB':>13s} {'max |dcos|':>11s}")
    for r in table:
        print(f"{r['rows']:6d} {r['plain build s']:8.1f} {r['whitened build s']:11.1f} "
              f"{r['of which curvature fit s']:6.1f} "
              f"{r['whitened build s'] / r['plain build s']:6.2f} "
              f"{r['curvature bytes'] / 1024:13.0f} "
              f"{r['max |projected - exact| whitened cosine']:11.3f}")
    Path(args.out).write_text(json.dumps(with_provenance({"table": table}), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
