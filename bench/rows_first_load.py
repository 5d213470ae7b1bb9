"""A first load of a large training set: one process against worker processes, on the
same rows, as one file and as a folder of shard files. Table + JSON.

    .venv/bin/python bench/rows_first_load.py [--rows 1000000] [--workers 2] [--files 8]

Each cell runs in a fresh process with empty caches (`datasets`' Arrow copy, the file
digests, the fingerprint), so it pays what a new node pays the first time:
  load s         the files' sha256, the JSONL line check and the Arrow conversion
  fingerprint s  the hash over every row that indexes and stores record
  cpu s          user + system seconds of the process and its workers (the comparison
                 that holds on a shared machine)
`DATABLAME_LOAD_WORKERS` picks the processes; the fingerprints of every cell must agree.
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
import json, resource, sys, time
from datablame.data.rows import load_rows

t = time.time()
rows = load_rows(sys.argv[1])
loaded = time.time()
fingerprint = rows.fingerprint()
done = time.time()
me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"load_s": loaded - t, "fingerprint_s": done - loaded, "wall_s": done - t,
                  "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                  "rows": len(rows), "fingerprint": fingerprint}))
"""


def run(path: Path, workers: int, tmp: Path, tag: str) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / f"hf-{tag}"),
           "DATABLAME_CACHE_DIR": str(tmp / f"digests-{tag}"),
           "DATABLAME_LOAD_WORKERS": str(workers)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--out", default="bench/results/rows_first_load.json")
    args = ap.parse_args()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = tmp / "train.jsonl"
        write_rows(one, args.rows)
        folder = tmp / "shards"
        folder.mkdir()
        lines = one.read_text().splitlines(keepends=True)
        step = -(-len(lines) // args.files)
        for i in range(args.files):
            (folder / f"train-{i:05d}.jsonl").write_text("".join(lines[i * step:
                                                                   (i + 1) * step]))
        del lines
        for layout, path in (("one file", one), (f"{args.files} files", folder)):
            for workers in (1, args.workers):
                cell = run(path, workers, tmp, f"{layout}-{workers}".replace(" ", "_"))
                table.append({"layout": layout, "workers": workers, **cell})
    assert len({c["fingerprint"] for c in table}) == 1, "fingerprints differ"
    print(f"{'layout':>9s} {'workers':>7s} {'load s':>7s} {'fingerprint s':>13s} "
          f"{'wall s':>7s} {'cpu s':>6s}")
    for c in table:
        print(f"{c['layout']:>9s} {c['workers']:7d} {c['load_s']:7.2f} "
              f"{c['fingerprint_s']:13.2f} {c['wall_s']:7.2f} {c['cpu_s']:6.1f}")
    for layout in {c["layout"] for c in table}:
        one_p, many = (c for c in table if c["layout"] == layout)
        print(f"{layout}: {args.workers} workers take {many['wall_s'] / one_p['wall_s']:.2f}x "
              f"the wall time of one process, {many['cpu_s'] / one_p['cpu_s']:.2f}x its CPU")
    result = {"rows": args.rows, "cpus": os.cpu_count(), "table": table,
              "fingerprints_equal": True}
    Path(args.out).write_text(json.dumps(with_provenance(result), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
