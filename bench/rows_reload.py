"""Loading the same training file again: what every `trace` pays before its first query.
Table + JSON.

    .venv/bin/python bench/rows_reload.py [--rows 1000000]

A JSONL of short Alpaca-style rows is generated, then, each in a fresh process:
  first load   `load_rows` + fingerprint with nothing cached (the Arrow conversion, the
               file's sha256, the JSONL check, the fingerprint over every row)
  again        the same file in a new process: everything read from the caches
  every pass   what a load without those caches repeats each time, measured on the warm
               Arrow copy: the file's sha256, the JSONL line check, the row fingerprint
A trace of a 1B-row file would pay the `every pass` column a thousand times over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import with_provenance
from rows_memory import write_rows

CHILD = r"""
import json, sys, time
import datasets
from datablame.data.parallel_load import check_jsonl
from datablame.data.rows import ArrowRecords, Rows, load_rows
from datablame.store.content_digest import sha256_file
from pathlib import Path

path, mode = sys.argv[1], sys.argv[2]
t = time.time()
if mode == "every pass":
    sha256_file(Path(path))
    check_jsonl(Path(path))
    rows = load_rows(path)
    # the same rows without the cache directory they carry: every row hashed
    Rows(rows.path, ArrowRecords(rows.records.dataset)).fingerprint()
else:
    load_rows(path).fingerprint()
print(json.dumps({"seconds": time.time() - t}))
"""


def run(path: Path, mode: str, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", default="bench/results/rows_reload.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        write_rows(path, args.rows)
        # caches of its own: the first load is cold whatever ran before
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf"),
               "DATABLAME_CACHE_DIR": str(Path(tmp) / "digests")}
        result = {"rows": args.rows, "bytes": path.stat().st_size,
                  "first load": run(path, "first", env), "again": run(path, "again", env),
                  "every pass": run(path, "every pass", env)}
    print(f"{'rows':>9s} {'MB':>6s} {'first load s':>13s} {'again s':>8s} "
          f"{'every pass s':>13s} {'saved':>6s}")
    print(f"{result['rows']:9d} {result['bytes'] / 1e6:6.0f} {result['first load']:13.1f} "
          f"{result['again']:8.2f} {result['every pass']:13.1f} "
          f"{result['every pass'] / result['again']:5.0f}x")
    Path(args.out).write_text(json.dumps(with_provenance(result), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
