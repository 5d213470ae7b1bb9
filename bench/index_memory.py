"""Peak memory of a whole `datablame index --gradients` build at two row counts (issue 12,
"memory does not grow with the number of rows"). Table + JSON.

    .venv/bin/python bench/index_memory.py [--rows 10000 100000]

Generates short Alpaca-shaped rows (the demo's sentence shapes), then runs the CLI in a
child process per row count: embedding every row into the flat retrieval index, the
copied-words index, and a K = 2048 fp16 gradient store with the demo's tiny GPT-2 + LoRA
(`.datablame-cache/demo`, made by `make demo`). Peak RSS is the child's ru_maxrss. What
still grows with rows is expected: the flat index holds 1.5 KB of embeddings per row, and
the copied-words index a word list per row (README, "Streaming and size").
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import with_provenance

ROOT = Path(__file__).resolve().parents[1]


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = ["Ada", "Bo", "Cy", "Di", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo"]
    things = ["river", "stone", "copper", "violin", "garden", "engine", "winter", "orbit"]
    return [{"instruction": f"What does {rng.choice(names)} keep in the {rng.choice(things)}?",
             "input": "", "output": f"{rng.choice(names)} keeps a {rng.choice(things)} there."}
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--model", default=str(ROOT / ".datablame-cache" / "demo" / "base"))
    ap.add_argument("--adapter", default=str(ROOT / ".datablame-cache" / "demo" / "adapter"))
    ap.add_argument("--out", default="bench/results/index_memory.json")
    args = ap.parse_args()
    table = []
    for n in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "train.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
            cmd = [sys.executable, "-m", "datablame", "index", str(data), "--out",
                   str(Path(tmp) / "idx"), "--gradients", "--model", args.model,
                   "--adapter", args.adapter, "--shard-rows", "4096"]
            code = ("import resource, subprocess, sys, json; "
                    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                    "print(json.dumps({'rc': r.returncode, 'err': r.stderr[-400:], 'maxrss_kb': "
                    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True,
                                 text=True, check=True)
            seconds = time.perf_counter() - t
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if result["rc"] != 0:
                raise SystemExit(f"index failed on {n} rows: {result['err']}")
            store = sum(p.stat().st_size for p in (Path(tmp) / "idx").rglob("*")
                        if p.is_file())
        table.append({"rows": n, "peak RSS MB": result["maxrss_kb"] / 1024,
                      "seconds": seconds, "index on disk MB": store / 1e6})
        print(f"{n:>8d} rows: peak RSS {table[-1]['peak RSS MB']:.0f} MB, "
              f"{seconds:.0f} s, index {store / 1e6:.0f} MB", flush=True)
    if len(table) > 1:
        a, b = table[0], table[-1]
        grow = (b["peak RSS MB"] - a["peak RSS MB"]) / (b["rows"] - a["rows"]) * 1024
        print(f"peak RSS grows {grow:.2f} KB per extra row ({a['rows']} -> {b['rows']})")
    Path(args.out).write_text(json.dumps(with_provenance({"table": table}), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
