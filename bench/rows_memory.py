"""Memory of reading training rows: lazy Arrow-backed rows vs every row as a dict.

    .venv/bin/python bench/rows_memory.py [--sizes 10000,100000,1000000]
        [--out bench/results/rows_memory.json]

For each size a JSONL of short Alpaca-style rows is generated (in a temporary folder),
then, each in a fresh process on the same file: `load_rows` + the content fingerprint +
formatting every row once (what `index` does before embedding), with the rows left in
`datasets`' memory-mapped Arrow files (today) and with them turned into a list of dicts
first (`list(rows.records)`: what `load_rows` returned before). Reported: the growth of
the process's anonymous memory (RssAnon: heap, not the file pages the kernel can drop) and
its peak RSS, after one warm-up load so `datasets`' one-time conversion into its cache is
not counted (its cost is printed separately).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import with_provenance

CHILD = r"""
import json, resource, sys, time
import datasets  # imported before the baseline: a library's own cost is not the rows'
from datablame.data.rows import load_rows
from datablame.data.template import PromptTemplate

def anon_mb():
    status = open("/proc/self/status").read()
    return int(status.split("RssAnon:")[1].split()[0]) / 1024

path, materialise = sys.argv[1], sys.argv[2] == "1"
before, t = anon_mb(), time.time()
rows = load_rows(path)
if materialise:
    rows.records = list(rows.records)
rows.fingerprint()
texts = rows.texts(PromptTemplate())
n = sum(len(texts[i:i + 4096]) for i in range(0, len(texts), 4096))
print(json.dumps({"rows": n, "seconds": time.time() - t, "anon_mb": anon_mb() - before,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
             "kappa", "lambda", "mu"]
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": " ".join(rng.choices(words, k=8)), "input": "",
                                 "output": " ".join(rng.choices(words, k=12)) + f" {i}"})
                     + "\n")


def run(path: Path, materialise: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), "1" if materialise else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--out", default="bench/results/rows_memory.json")
    args = ap.parse_args()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            path = Path(tmp) / f"rows-{n}.jsonl"
            write_rows(path, n)
            first = run(path, False)  # converts into datasets' cache once
            lazy, listed = run(path, False), run(path, True)
            table.append({"rows": n, "file_mb": path.stat().st_size / 2**20,
                          "first_load_seconds": first["seconds"],
                          "first_load_anon_mb": first["anon_mb"],
                          "lazy": lazy, "dicts": listed})
            print(f"{n:>9,} rows ({table[-1]['file_mb']:.0f} MB): anonymous memory lazy "
                  f"{lazy['anon_mb']:6.0f} MB vs dicts {listed['anon_mb']:6.0f} MB; peak RSS "
                  f"{lazy['peak_rss_mb']:5.0f} vs {listed['peak_rss_mb']:5.0f} MB; "
                  f"{lazy['seconds']:.1f} s vs {listed['seconds']:.1f} s (first load "
                  f"{first['seconds']:.1f} s)", flush=True)
    Path(args.out).write_text(json.dumps(with_provenance({"table": table}), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
